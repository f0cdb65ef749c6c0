"""What AW-convolution costs: batched vs per-sample speed, training memory and step time against a plain ResNet.

Three measurements on the CPU (threads as given, ``--threads 1`` by default; every size is in the output):

1. layer — `AWConv2d` forward + backward at batch 128 on resnet20's 3×3 layer shapes (16→16 at 32×32, 64→64 at
   8×8): the batched grouped convolution against a loop over samples (A for one sample, ``F.conv2d`` with A ⊙ W).
   Target: batched ≥ 10× faster. On one CPU thread the loop runs the same arithmetic through the same kernels, so
   batching saves only the per-call overhead, and oneDNN's grouped kernel runs 64-channel groups on 8×8 maps at about
   half the speed of a dense convolution (0.5× at 64→64, ~1× at 16→16 here): the gain is bounded by the loop's
   overhead share. Where per-call overhead dominates (many threads, a GPU) it can only be larger — not measured here.
2. memory — one SGD training step of each model at batch 128 on 3×32×32 inputs, each model in a fresh process:
   (a) ``saved_MB``: what autograd keeps for backward (tensors saved by the forward, each storage counted once,
   parameters excluded) — exact and independent of the allocator; (b) ``step_peak_rss_MB``: peak resident memory
   of the process during its first training step (``ru_maxrss`` after it) minus the resident memory just before it —
   what the OS saw, with transient buffers, gradients, momentum and the allocator's behaviour. Target: AW within 2×.
3. step time — forward, backward and SGD update at batch 256; process CPU time (robust to other processes on a
   shared machine) and wall time, the minimum over interleaved rounds. Run twice: with glibc's default malloc, and
   with ``MALLOC_MMAP_MAX_=0`` — glibc serves every allocation over 32 MB with fresh mmap pages that are page-faulted
   on each use, and AW's weight-shaped tensors at batch 256 (256·64·64·9 floats = 38 MB) are just over that, while
   the plain network's largest activation (17 MB) is not. Target: AW / plain ≤ 1.5.

Models: ``resnet20``, ``aw_resnet20`` (default full generator) and ``aw_resnet20`` with the factorized generator.
Writes ``OUT/aw_speed_memory.json`` and ``OUT/aw_speed_memory.csv`` and prints a summary.

    OMP_NUM_THREADS=1 python benchmarks/aw_speed_memory.py --out studies/results/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from attnlab.layers.awconv import AWConv2d
from attnlab.models import create_model

MODELS = ("resnet20", "aw_resnet20", "aw_resnet20:factorized")
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def build(spec: str) -> torch.nn.Module:
    """``"aw_resnet20:factorized"`` → aw_resnet20 with the factorized AW generator."""
    name, _, generator = spec.partition(":")
    return create_model(name, aw={"generator": generator}) if generator else create_model(name)


def cpu_and_wall(fn) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


# --- 1. layer: batched vs per-sample -----------------------------------------------------------------------------


def per_sample_reference(layer: AWConv2d, x: torch.Tensor) -> torch.Tensor:
    """The slow reading of AW-convolution: for each sample, its A, then a plain conv with A ⊙ W."""
    outs = [
        F.conv2d(xi, layer.attention(xi)[0] * layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        for xi in x.split(1)
    ]
    return torch.cat(outs)


def time_forward_backward(fn, x: torch.Tensor, grad: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(CPU s, wall s) of ``fn(x).backward(grad)``, each the minimum over ``rounds`` after one warm-up."""
    fn(x).backward(grad)
    runs = [cpu_and_wall(lambda: fn(x).backward(grad)) for _ in range(rounds)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def layer_speed(batch: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for channels, size in ((16, 32), (64, 8)):
        for generator in ("full", "factorized"):
            torch.manual_seed(0)
            layer = AWConv2d(channels, channels, 3, padding=1, generator=generator)
            with torch.no_grad():  # a non-trivial attention (at init it is the constant 1)
                layer.attn_expand_weight.normal_(0, 0.3)
            x = torch.randn(batch, channels, size, size, requires_grad=True)
            grad = torch.randn(batch, channels, size, size)
            batched = time_forward_backward(layer, x, grad, rounds)
            per_sample = time_forward_backward(lambda t, layer=layer: per_sample_reference(layer, t), x, grad, rounds)
            with torch.no_grad():
                err = (layer(x) - per_sample_reference(layer, x)).abs().max().item()
            rows.append(
                {
                    "layer": f"{channels}->{channels} 3x3 at {size}x{size}",
                    "generator": generator,
                    "batch": batch,
                    "batched_cpu_s": batched[0],
                    "per_sample_cpu_s": per_sample[0],
                    "batched_wall_s": batched[1],
                    "per_sample_wall_s": per_sample[1],
                    "speedup_cpu": per_sample[0] / batched[0],
                    "max_abs_diff": err,
                }
            )
    return rows


# --- 2. memory (worker: one model per fresh process) -------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(spec: str, batch: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    gc.collect()
    before, maxrss_before = rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return {
        "model": spec,
        "batch": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "saved_MB": sum(saved.values()) / 2**20,
        "step_peak_rss_MB": (maxrss_after - before) / 2**20,
        "step_set_new_peak": maxrss_after > maxrss_before,
    }


# --- 3. step time (worker: all models interleaved in one process) ------------------------------------------------


def steptime_worker(specs: list[str], batch: int, rounds: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    steps = {}
    for spec in specs:
        model = build(spec)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        step()  # warm-up
        steps[spec] = step
    times: dict[str, list[tuple[float, float]]] = {spec: [] for spec in specs}
    for _ in range(rounds):
        for spec in specs:
            times[spec].append(cpu_and_wall(steps[spec]))
    return [
        {
            "model": spec,
            "batch": batch,
            "rounds": rounds,
            "cpu_s": min(t[0] for t in ts),
            "wall_s": min(t[1] for t in ts),
        }
        for spec, ts in times.items()
    ]


# --- orchestration ---------------------------------------------------------------------------------------------


def run_worker(args: list[str], env_extra: dict[str, str], threads: int) -> Any:
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--threads", str(threads), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="studies/results/benchmarks", help="directory for aw_speed_memory.json / .csv")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds; the minimum is reported")
    parser.add_argument("--layer-batch", type=int, default=128)
    parser.add_argument("--memory-batch", type=int, default=128)
    parser.add_argument("--time-batch", type=int, default=256)
    parser.add_argument("--worker", choices=["memory", "steptime"], help=argparse.SUPPRESS)
    parser.add_argument("--models", default=",".join(MODELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = args.models.split(",")
    if args.worker == "memory":
        print(json.dumps(memory_worker(specs[0], args.memory_batch)))
        return
    if args.worker == "steptime":
        print(json.dumps(steptime_worker(specs, args.time_batch, args.rounds)))
        return

    started = time.time()
    layer = layer_speed(args.layer_batch, args.rounds)
    memory = [
        run_worker(["--worker", "memory", "--models", s, "--memory-batch", str(args.memory_batch)], {}, args.threads)
        for s in specs
    ]
    steptime = {}
    for malloc, env in (("default", {}), ("mmap_max_0", TUNED_MALLOC)):
        steptime[malloc] = run_worker(
            [
                "--worker",
                "steptime",
                "--models",
                ",".join(specs),
                "--time-batch",
                str(args.time_batch),
                "--rounds",
                str(args.rounds),
            ],
            env,
            args.threads,
        )

    plain_mem = next(m for m in memory if m["model"] == "resnet20")
    for m in memory:
        m["saved_ratio"] = m["saved_MB"] / plain_mem["saved_MB"]
        m["rss_ratio"] = m["step_peak_rss_MB"] / plain_mem["step_peak_rss_MB"]
    for rows in steptime.values():
        plain = next(r for r in rows if r["model"] == "resnet20")
        for r in rows:
            r["cpu_ratio"], r["wall_ratio"] = r["cpu_s"] / plain["cpu_s"], r["wall_s"] / plain["wall_s"]

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "targets": {"layer_speedup": ">= 10", "memory_ratio": "<= 2", "step_time_ratio": "<= 1.5"},
        "layer": layer,
        "memory": memory,
        "steptime": steptime,
        "seconds": time.time() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aw_speed_memory.json").write_text(json.dumps(result, indent=2))
    with open(out / "aw_speed_memory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["section", "config", "metric", "value"])
        for r in layer:
            for k in ("batched_cpu_s", "per_sample_cpu_s", "speedup_cpu", "max_abs_diff"):
                writer.writerow(["layer", f"{r['layer']} {r['generator']} b{r['batch']}", k, r[k]])
        for m in memory:
            for k in ("params", "saved_MB", "saved_ratio", "step_peak_rss_MB", "rss_ratio"):
                writer.writerow(["memory", f"{m['model']} b{m['batch']}", k, m[k]])
        for malloc, rows in steptime.items():
            for r in rows:
                for k in ("cpu_s", "wall_s", "cpu_ratio", "wall_ratio"):
                    writer.writerow(["steptime", f"{r['model']} b{r['batch']} malloc={malloc}", k, r[k]])

    print(f"layer, batch {args.layer_batch} (forward+backward, CPU s; target speedup >= 10):")
    for r in layer:
        print(
            f"  {r['layer']:<22} {r['generator']:<10} batched {r['batched_cpu_s']:.4f}  per-sample "
            f"{r['per_sample_cpu_s']:.4f}  speedup {r['speedup_cpu']:.1f}x  max|diff| {r['max_abs_diff']:.1e}"
        )
    print(f"memory, one train step at batch {args.memory_batch} (target ratio <= 2):")
    for m in memory:
        print(
            f"  {m['model']:<24} params {m['params']:>7}  saved {m['saved_MB']:7.1f} MB ({m['saved_ratio']:.2f}x)"
            f"  step peak RSS {m['step_peak_rss_MB']:7.1f} MB ({m['rss_ratio']:.2f}x)"
        )
    print(f"train step time at batch {args.time_batch}, min of {args.rounds} (target ratio <= 1.5):")
    for malloc, rows in steptime.items():
        for r in rows:
            print(
                f"  malloc={malloc:<10} {r['model']:<24} cpu {r['cpu_s']:.3f} s ({r['cpu_ratio']:.2f}x)  "
                f"wall {r['wall_s']:.3f} s ({r['wall_ratio']:.2f}x)"
            )
    print(f"wrote {out / 'aw_speed_memory.json'} and .csv in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
