"""What a model costs: forward FLOPs, single-image latency, and `benchmark_models`, the side-by-side parameters, FLOPs,
latency and training-step throughput of several models.

Timings on a shared machine are noisy, so models are measured round-robin (model A, B, C, A, B, C, ...) within one
process and the median of the repeats is reported, together with the ratio to the first model (the baseline).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Sequence
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import AttnlabError
from ..models import create_model
from ..schema import PositiveInt, Range, check_call
from .compiling import compile_module, eager, is_compiled, run_or_fall_back
from .config import autocast_dtype, resolve_precision
from .entry import parse_entry


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def count_flops(model: nn.Module, in_chans: int, image_size: tuple[int, int], device: torch.device) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter; a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, *image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module, in_chans: int, image_size: tuple[int, int], device: torch.device, repeats: int = 20
) -> float:
    """Median forward time of one image in eval mode, in milliseconds."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *image_size, device=device)
    times = [_timed(lambda: model(x), device) for _ in range(repeats + 3)][3:]
    model.train(was_training)
    return 1000 * sorted(times)[len(times) // 2]


def _bench_setup(name, x, y, x_latency, num_classes: int, dtype, compile: bool, memory_format):
    """Model ``name`` (seed 0) on ``x``'s device, with a closure for one SGD step on (x, y) and one for inference.
    ``name`` is an entry (`attnlab.train.entry`): ``efficientnet_b0[attention=eca]`` measures the converted network."""
    entry = parse_entry(name)
    if entry.train:
        settings = ", ".join(entry.train)
        raise AttnlabError(f"bench: {name!r} sets training settings ({settings}); bench builds models only")
    torch.manual_seed(0)
    dev = x.device
    size = tuple(x.shape[2:])
    kwargs = dict(num_classes=num_classes, in_chans=x.shape[1], image_size=size)
    model = create_model(entry.model, **kwargs, **entry.model_kwargs)
    model = model.to(dev, memory_format=memory_format)
    if compile:
        compile_module(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = dtype is not None

    def step():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer():
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=amp):
            model(x_latency)

    return model, step, infer


def benchmark_models(
    names: Sequence[str],
    *,
    input_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (3, 32, 32),
    batch_size: PositiveInt = 256,
    num_classes: PositiveInt = 10,
    precision: str = "auto",
    compile: bool = False,
    channels_last: bool = True,
    repeats: PositiveInt = 10,
    warmup: Annotated[int, Range(0)] = 3,
    latency_batch: PositiveInt = 1,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Measure every model in ``names``; the first is the baseline of the ``*_ratio`` columns.

    Returns one dict per model: params, flops (forward, one image), latency_ms (median forward of ``latency_batch``
    images, eval mode), train_step_ms and train_img_per_s (median SGD step at ``batch_size``), and their ratios.
    ``precision`` is a `TrainConfig` precision (auto: bf16 where the device has it natively); ``compile`` compiles
    every model in place (`attnlab.train.compiling`), its compilation in the untimed warm-up rounds.
    """
    sizes = dict(input_size=input_size, batch_size=batch_size, num_classes=num_classes, repeats=repeats)
    check_call(benchmark_models, {**sizes, "warmup": warmup, "latency_batch": latency_batch}, "bench")
    if not names:
        raise AttnlabError("bench: no model given")
    dev = torch.device(device)
    precision = resolve_precision(precision, device)
    dtype = autocast_dtype(precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_size, generator=gen).to(dev, memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    x_latency = x[:latency_batch]
    setups = [
        (name, *_bench_setup(name, x, y, x_latency, num_classes, dtype, compile, memory_format)) for name in names
    ]

    step_times: dict[str, list[float]] = {name: [] for name in names}
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name, model, step, infer in setups:
            model.train()
            t_step = run_or_fall_back(model, name, functools.partial(_timed, step, dev))
            model.eval()
            t_infer = run_or_fall_back(model, name, functools.partial(_timed, infer, dev))
            if i >= warmup:
                step_times[name].append(t_step)
                latencies[name].append(t_infer)

    rows = []
    for name, model, _, _ in setups:
        step_s = statistics.median(step_times[name])
        rows.append(
            {
                "model": name,
                "params": sum(p.numel() for p in model.parameters()),
                "flops": _eager_flops(model, input_size, dev),
                "latency_ms": 1000 * statistics.median(latencies[name]),
                "train_step_ms": 1000 * step_s,
                "train_img_per_s": batch_size / step_s,
                "precision": precision,
                "compiled": is_compiled(model),
                "batch_size": batch_size,
                "input_size": "×".join(map(str, input_size)),
                "device": device,
            }
        )
    base = rows[0]
    for row in rows:
        row["train_step_ratio"] = row["train_step_ms"] / base["train_step_ms"]
        row["latency_ratio"] = row["latency_ms"] / base["latency_ms"]
    return rows


def _eager_flops(model: nn.Module, input_size: tuple[int, int, int], device: torch.device) -> int:
    with eager(model):
        return count_flops(model, input_size[0], input_size[1:], device)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of `benchmark_models` rows."""
    header = f"{'model':<20} {'params':>10} {'MFLOPs':>8} {'latency ms':>11} {'step ms':>9} {'img/s':>8} {'step ×':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<20} {r['params']:>10,} {r['flops'] / 1e6:>8.1f} {r['latency_ms']:>11.2f} "
            f"{r['train_step_ms']:>9.1f} {r['train_img_per_s']:>8.0f} {r['train_step_ratio']:>7.3f}"
        )
    return "\n".join(lines)
