"""What `attnlab.convert` costs a network: parameters, FLOPs and CPU time of converted networks against the original.

Per network (timm efficientnet_b0, mobilenetv3_large_100, regnety_002, convnext_atto; torchvision resnet18 by
default) the original and its conversions as entries of the entry grammar (`train/entry.py`): a swap of its own
attention (``attention=eca|cbam|cram|none``) where it has one, an insert (``insert=se|eca|cbam|cram``) where it has
none, ``aw=3x3`` (AW's default full generator, and its factorized one) and ``merge=gate``; and the original once more,
timed as a variant (``original (A/A)``): its ratio shows the timing noise. A conversion `convert` refuses (e.g.
``aw=3x3`` on ConvNeXt, which has no dense 3×3) is one row with its error. FLOPs are torch.utils.flop_counter's for
one image (a multiply-add counts 2; it counts convolutions and matrix products, not the elementwise gates, sigmoids
and merges). Times are medians of ``--repeats`` round-robin rounds over all variants of one network in one process
(`timing.interleaved_medians`, process CPU time by default on the shared machine), each variant's ratio to the
original beside it: a forward in eval mode and one SGD step (forward, backward, update), fp32, batch ``--batch`` at
``--size`` px. The load average is recorded per network. Writes ``OUT/convert_cost.csv``.

    python benchmarks/convert_cost.py --threads 1 --out studies/results/benchmarks
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import interleaved_medians, load_average

from attnlab import AttnlabError, create_model
from attnlab.io import write_csv
from attnlab.train.cost import count_flops
from attnlab.train.entry import parse_entry

SWAPS = ["attention=none", "attention=eca", "attention=cbam", "attention=cram"]
INSERTS = ["insert=se", "insert=eca", "insert=cbam", "insert=cram"]
OTHERS = ["aw=3x3", "aw=3x3,aw_args.generator=factorized", "merge=gate"]
CONTROL = "original (A/A)"
"""The original built a second time and timed as a variant: its ratio is the noise of the timing (ideally 1)."""
NETWORKS = {  # network → the conversions measured on it
    "efficientnet_b0": SWAPS + OTHERS,
    "mobilenetv3_large_100": SWAPS + OTHERS,
    "regnety_002": SWAPS + OTHERS,
    "convnext_atto": INSERTS + OTHERS,
    "torchvision:resnet18": INSERTS + OTHERS,
}


def build(entry: str, size: int) -> torch.nn.Module:
    parsed = parse_entry(entry)
    torch.manual_seed(0)
    return create_model(parsed.model, num_classes=10, in_chans=3, image_size=size, **parsed.model_kwargs)


def closures(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    @torch.no_grad()
    def forward() -> None:
        model.eval()(x)

    def step() -> None:
        loss = F.cross_entropy(model.train()(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return forward, step


def measure(network: str, conversions: list[str], size: int, batch: int, repeats: int, clock: str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    rows, fns = [], {}
    for variant in ["", CONTROL, *conversions]:
        entry = f"{network}[{variant}]" if variant and variant != CONTROL else network
        start = time.perf_counter()
        try:
            model = build(entry, size)
        except AttnlabError as e:
            rows.append({"network": network, "variant": variant or "original", "note": str(e)})
            print(f"{entry}: refused: {e}", flush=True)
            continue
        forward, step = closures(model, x, y)
        fns[(variant, "forward")], fns[(variant, "step")] = forward, step
        rows.append(
            {
                "network": network,
                "variant": variant or "original",
                "params": sum(p.numel() for p in model.parameters()),
                "mflops": round(count_flops(model, 3, (size, size), torch.device("cpu")) / 1e6, 2),
                "build_s": round(time.perf_counter() - start, 2),
                "note": "",
            }
        )
    load_before = load_average()
    medians = interleaved_medians(fns, repeats=repeats, clock=clock)
    load = f"{load_before}–{load_average()}"
    base = next(r for r in rows if r["variant"] == "original")
    for row in rows:
        row.update(input=f"3×{size}×{size}", batch=batch, threads=torch.get_num_threads(), clock=clock, load=load)
        if "params" not in row:
            continue
        variant = "" if row["variant"] == "original" else row["variant"]
        row["params_ratio"] = round(row["params"] / base["params"], 3)
        row["flops_ratio"] = round(row["mflops"] / base["mflops"], 3)
        for how in ("forward", "step"):
            ms = 1000 * medians[(variant, how)]
            row[f"{how}_ms"] = round(ms, 2)
            row[f"{how}_ratio"] = round(medians[(variant, how)] / medians[("", how)], 3)
        print(
            f"{network:24} {row['variant']:16} {row['params']:>10,} ×{row['params_ratio']:.3f} "
            f"{row['mflops']:>8.1f} MFLOPs ×{row['flops_ratio']:.3f}  fwd {row['forward_ms']:7.1f} ms "
            f"×{row['forward_ratio']:.3f}  step {row['step_ms']:7.1f} ms ×{row['step_ratio']:.3f}",
            flush=True,
        )
    return rows


COLUMNS = [
    "network", "variant", "params", "params_ratio", "mflops", "flops_ratio", "forward_ms", "forward_ratio",
    "step_ms", "step_ratio", "build_s", "input", "batch", "threads", "clock", "load", "machine", "torch", "note",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated networks of the table")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10, help="timed round-robin rounds (2 untimed first)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path("studies/results/benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for network in args.networks.split(","):
        rows += measure(network, NETWORKS[network], args.size, args.batch, args.repeats, args.clock)
    for row in rows:
        row.update(machine=f"{platform.machine()} {platform.processor() or ''}".strip(), torch=torch.__version__)
    write_csv(args.out / "convert_cost.csv", [{c: row.get(c, "") for c in COLUMNS} for row in rows])
    print(f"wrote {args.out / 'convert_cost.csv'}")


if __name__ == "__main__":
    main()
