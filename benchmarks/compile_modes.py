"""Which torch.compile mode `--compile` uses: compile time and median train-step time of resnet20 per mode.

Modes (inductor backend): ``default``, ``max-autotune-no-cudagraphs`` (autotuned GEMM/conv templates) and
``reduce-overhead`` (CUDA graphs; on CPU it adds nothing to ``default``), beside eager. Each mode gets its own model,
compiled in place (`attnlab.train.compiling.compile_module`); the steps are timed round-robin in one process, medians
over the repeats, as process CPU seconds by default (a shared machine's waits for a core left out) →
``studies/results/benchmarks/compile_modes.csv``. The first two steps (where the compilation happens) are wall seconds
and depend on inductor's on-disk cache: cold only on a machine's first run.

Usage: ``python benchmarks/compile_modes.py [--precision bf16] [--batch-size 128] [--repeats 10] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlab.io import write_csv
from attnlab.models import create_model
from attnlab.train.compiling import compile_module

MODES = ("eager", "default", "max-autotune-no-cudagraphs", "reduce-overhead")
RESULTS = Path(__file__).resolve().parents[1] / "studies" / "results" / "benchmarks"


def _setup(name: str, mode: str, device: torch.device, dtype: torch.dtype | None, x, y):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=x.shape[1]).to(device, memory_format=torch.channels_last)
    if mode != "eager":
        compile_module(model, mode=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timed(step, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    start = now()
    step()
    return now() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--input-size", default="1,28,28")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="step time in process CPU seconds (default; leaves out waits for a core) or wall seconds",
    )
    parser.add_argument("--csv", default=str(RESULTS / "compile_modes.csv"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    shape = tuple(int(v) for v in args.input_size.split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *shape, generator=gen).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    steps, first = {}, {}
    for mode in args.modes.split(","):
        steps[mode] = _setup(args.model, mode, device, dtype, x, y)
        first[mode] = _timed(steps[mode]) + _timed(steps[mode])  # the compile happens here (train graph, 2 steps)
        print(f"{mode}: first two steps {first[mode]:.1f} s", flush=True)
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(args.repeats):
        for mode, step in steps.items():
            times[mode].append(_timed(step, args.clock))
    base = statistics.median(times["eager"]) if "eager" in times else None
    rows = []
    for mode, ts in times.items():
        median = statistics.median(ts)
        rows.append(
            {
                "model": args.model,
                "mode": mode,
                "precision": args.precision,
                "batch_size": args.batch_size,
                "input_size": "×".join(map(str, shape)),
                "device": args.device,
                "threads": torch.get_num_threads(),
                "first_two_steps_wall_s": round(first[mode], 2),
                "clock": args.clock,
                "step_ms_median": round(1000 * median, 2),
                "step_ms_min": round(1000 * min(ts), 2),
                "vs_eager": round(median / base, 3) if base else None,
                "repeats": args.repeats,
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
        print(rows[-1], flush=True)
    print(f"wrote {write_csv(args.csv, rows)}")


if __name__ == "__main__":
    main()
