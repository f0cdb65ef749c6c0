"""Which AW-convolution implementation is fastest per layer shape: the measurement behind `awconv.auto_path`.

Forward + backward of one `AWConv2d` (3×3, padding 1, random generator) on resnet20's 3×3 conv2 shapes — 16, 32, 64
channels on 32/16/8 (3×32×32 inputs) or 28/14/7 (1×28×28) maps — in channels-last memory, fp32 and bf16 autocast,
each implementation of `awconv.IMPLS` that applies to the generator. All candidates of one shape run round-robin in
one process (`timing.interleaved_medians`); the time is relative to a plain ``nn.Conv2d`` of the same shape. Writes
``OUT/aw_paths.csv`` (its ``path=loop`` rows were measured with the per-sample loop the library no longer ships; see
docs/MEASUREMENTS.md).

    python benchmarks/aw_paths.py --threads 2 --out studies/results/benchmarks
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timing import interleaved_medians, load_average

from attnlab.io import write_csv
from attnlab.layers.awconv import AWConv2d

SHAPES = {"3x32x32": ((16, 32), (32, 16), (64, 8)), "1x28x28": ((16, 28), (32, 14), (64, 7))}
PATHS = {"full": ("grouped", "unfold"), "factorized": ("grouped", "taps", "unfold")}


def step(layer: torch.nn.Module, x: torch.Tensor, bf16: bool):
    def run() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = layer(x)
        out.float().sum().backward()

    return run


def measure(channels: int, size: int, batch: int, generator: str, bf16: bool, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    plain = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    fns = {"plain conv": step(plain, x, bf16)}
    for path in PATHS[generator]:
        layer = AWConv2d(channels, channels, 3, padding=1, generator=generator, impl=path)
        with torch.no_grad():
            layer.attn_expand_weight.normal_(0, 0.3)
        fns[path] = step(layer.to(memory_format=torch.channels_last), x, bf16)
    load = load_average()
    medians = interleaved_medians(fns, repeats=repeats)
    return [
        {
            "generator": generator,
            "channels": channels,
            "map": f"{size}x{size}",
            "batch": batch,
            "precision": "bf16" if bf16 else "fp32",
            "path": path,
            "ms": round(1000 * t, 2),
            "x_plain_conv": round(t / medians["plain conv"], 2),
            "fastest": path == min((p for p in medians if p != "plain conv"), key=medians.get),
            "load": load,
        }
        for path, t in medians.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--inputs", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", default="studies/results/benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for inputs in args.inputs:
        for channels, size in SHAPES[inputs]:
            for batch in args.batch:
                for generator in PATHS:
                    for bf16 in (False, True):
                        rows += measure(channels, size, batch, generator, bf16, args.repeats)
                        best = next(r for r in rows[::-1] if r["fastest"])
                        print(
                            f"{generator:10} {channels:3}@{size:2} b{batch} {best['precision']}: "
                            + ", ".join(f"{r['path']} {r['ms']}" for r in rows[-len(PATHS[generator]) - 1 :]),
                            flush=True,
                        )
    print(f"wrote {write_csv(Path(args.out) / 'aw_paths.csv', rows)}")


if __name__ == "__main__":
    main()
