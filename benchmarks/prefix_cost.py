"""What each attention prefix costs a training step, eager and compiled, relative to resnet20 (issue 11 targets).

Per prefix (none, se, eca, cbam, spatial, cram, fmm, aw factorized, aw full) and input (1×28×28 at batch 128,
3×32×32 at batch 256 by default; ``--batch`` adds sizes): one SGD step (forward, backward, update) with bf16
autocast and channels-last memory, eager and under ``torch.compile(model, mode=...)`` (inductor). All models and both
modes of one input are measured round-robin in one process (`timing.interleaved_medians`, process CPU time by
default: the machine is shared), so the ratios to resnet20's step in the same mode are side by side. Compilation
happens in the untimed warm-up rounds; its time is recorded. A model that fails to compile is recorded with the error
and timed eager only. ``--modes`` compares compile modes on resnet20 and one attention model first.
Writes ``OUT/prefix_cost.csv``.

    python benchmarks/prefix_cost.py --threads 2 --out studies/results/benchmarks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved_medians, load_average

from attnlab import create_model
from attnlab.io import write_csv

PREFIXES = {  # prefix → (model name, build options, compiled target relative to resnet20)
    "none": ("resnet20", {}, 1.0),
    "se": ("se_resnet20", {}, 1.05),
    "eca": ("eca_resnet20", {}, 1.05),
    "cbam": ("cbam_resnet20", {}, 1.20),
    "spatial": ("spatial_resnet20", {}, 1.10),
    "cram": ("cram_resnet20", {}, 1.10),
    "fmm": ("fmm_resnet20", {}, 1.05),
    "aw_factorized": ("aw_resnet20", {"aw": {"generator": "factorized"}}, 1.5),
    "aw_full": ("aw_resnet20", {"aw": {"generator": "full"}}, 2.5),
}
INPUTS = {"1x28x28": ((1, 28, 28), 128), "3x32x32": ((3, 32, 32), 256)}


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def build(prefix: str, in_chans: int) -> torch.nn.Module:
    name, options, _ = PREFIXES[prefix]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=in_chans, **options)
    return model.to(memory_format=torch.channels_last).train()


def compiled_step(prefix: str, in_chans: int, x, y, mode: str) -> tuple[object | None, float, str]:
    """(step function or None, compile seconds, note): compiles and runs two steps; a failure is caught and noted."""
    model = build(prefix, in_chans)
    step = train_step(torch.compile(model, mode=mode), x, y)
    start = time.perf_counter()
    try:
        step()
        step()
    except Exception as e:  # record why this model does not compile, keep measuring the others
        return None, time.perf_counter() - start, f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return step, time.perf_counter() - start, ""


def measure_input(key: str, batch: int, prefixes: list[str], mode: str, repeats: int, clock: str) -> list[dict]:
    shape, _ = INPUTS[key]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=gen)
    fns, notes, compile_s = {}, {}, {}
    for prefix in prefixes:
        fns[(prefix, "eager")] = train_step(build(prefix, shape[0]), x, y)
        step, compile_s[prefix], notes[prefix] = compiled_step(prefix, shape[0], x, y, mode)
        if step is not None:
            fns[(prefix, "compiled")] = step
        print(f"{key} b{batch} {prefix}: compiled in {compile_s[prefix]:.0f} s {notes[prefix]}", flush=True)
    load = load_average()
    medians = interleaved_medians(fns, repeats=repeats, clock=clock)
    rows = []
    for (prefix, how), seconds in medians.items():
        base = medians.get(("none", how))
        ratio = seconds / base if base else float("nan")
        target = PREFIXES[prefix][2]
        rows.append(
            {
                "prefix": prefix,
                "model": PREFIXES[prefix][0],
                "input": key,
                "batch": batch,
                "mode": how if how == "eager" else f"compiled:{mode}",
                "step_ms": round(1000 * seconds, 1),
                "x_resnet20": round(ratio, 3),
                "target": target if prefix != "none" else "",
                "met": (ratio <= target) if how != "eager" and prefix != "none" else "",
                "compile_s": round(compile_s[prefix], 1) if how != "eager" else "",
                "note": notes[prefix] if how != "eager" else "",
                "threads": torch.get_num_threads(),
                "clock": clock,
                "load": load,
            }
        )
        print(f"  {prefix:14} {how:8} {1000 * seconds:8.1f} ms  ×{ratio:.3f}", flush=True)
    for prefix in prefixes:  # a model that did not compile: its row says why, with no time
        if (prefix, "compiled") not in fns:
            rows.append(
                {
                    "prefix": prefix,
                    "model": PREFIXES[prefix][0],
                    "input": key,
                    "batch": batch,
                    "mode": f"compiled:{mode}",
                    "target": PREFIXES[prefix][2],
                    "met": False,
                    "compile_s": round(compile_s[prefix], 1),
                    "note": notes[prefix],
                    "threads": torch.get_num_threads(),
                    "clock": clock,
                    "load": load,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--batch", type=int, nargs="*", default=[], help="batch sizes instead of each input's own")
    parser.add_argument("--prefixes", nargs="+", default=list(PREFIXES), choices=list(PREFIXES))
    parser.add_argument("--mode", default="default", help="torch.compile mode of the measurement")
    parser.add_argument("--modes", nargs="*", default=[], help="first compare these modes on none and cbam")
    parser.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    parser.add_argument("--out", default="studies/results/benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # dynamo counts recompilations per code object across instances: nine compiled ResNets of one class in one
    # process exceed the default limit of 8 and the last ones would silently run eager
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for mode in args.modes:
        rows += measure_input("3x32x32", INPUTS["3x32x32"][1], ["none", "cbam"], mode, args.repeats, args.clock)
    for key in args.inputs:
        for batch in args.batch or [INPUTS[key][1]]:
            # a graph compiled for another input size would be recompiled with symbolic sizes, which some models'
            # kernels refuse (CRAM: "cannot determine truth value of Relational"): start each input afresh
            torch._dynamo.reset()
            rows += measure_input(key, batch, args.prefixes, args.mode, args.repeats, args.clock)
    print(f"wrote {write_csv(Path(args.out) / 'prefix_cost.csv', rows)}")


if __name__ == "__main__":
    main()
