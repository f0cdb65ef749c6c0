"""How long do the analyses take on CPU? The issue's two targets, on ``--threads`` cores (default 2):

- consistency over all gates of se_resnet20 on 1,000 images (target ≤ 60 s): exact ablation of every channel of the
  nine SE gates, i.e. 336 units × 1,000 images = 336,000 partial forward passes, plus whatever ``--methods`` adds;
- Hessian top eigenvalue of se_resnet20, 20 power iterations over 1,000 images (target ≤ 60 s): 20 Hessian-vector
  products over all 1,000 images, exact by double backward (the default) and, for comparison, by central differences
  of gradients (``--hvp``), which is faster but, on this ReLU network in float32, lands on a different number (the
  eigenvalue column says how far; see `attnlab.analysis.landscape`).

The images are Fashion-MNIST test images (1×28×28, the project's default dataset) when the files are found, else
synthetic images of the same shape; the model is ``--checkpoint`` (a run folder) or a freshly initialised
se_resnet20 with random BatchNorm affine parameters (timings do not depend on what the weights learnt; the random BN
scales keep the gates from being silenced by the zero-initialised last BN of each block). The machine may be shared:
the load average before and after each measurement is recorded. Writes ``OUT/analysis_speed.json`` and ``.csv``.

    python benchmarks/analysis_speed.py --threads 2 --images 1000 --out studies/results/benchmarks
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    from attnlab.data import batches, load_dataset

    try:
        bundle = load_dataset("fashion-mnist")
        source = "fashion-mnist test"
    except Exception:  # no Fashion-MNIST files here: same shape, synthetic content
        bundle = load_dataset("synthetic", shape=[1, 28, 28], size=64, test_size=n, num_classes=10)
        source = "synthetic 1×28×28"
    split = bundle.test.take(torch.arange(min(n, len(bundle.test))))
    x, y = next(batches(split, bundle, len(split), train=False))
    return x, y, source


def _model(checkpoint: str | None) -> nn.Module:
    from attnlab import create_model
    from attnlab.train import load_trained

    if checkpoint:
        return load_trained(checkpoint)[0]
    torch.manual_seed(0)
    model = create_model("se_resnet20", num_classes=10, in_chans=1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            with torch.no_grad():
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


def _timed(what: str, fn) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    row = {
        "measurement": what,
        "seconds": round(seconds, 2),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    print(f"{what}: {seconds:.1f} s (load average {row['load_before']} → {row['load_after']})", flush=True)
    return row


def main() -> None:
    from attnlab.analysis import consistency, hessian_top_eigenvalue

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--checkpoint", help="a run folder of se_resnet20 (default: fresh weights)")
    parser.add_argument("--methods", default="ablation", help="consistency methods, comma-separated")
    parser.add_argument("--controls", action="store_true", help="also the null and random-gate controls")
    parser.add_argument("--hessian-iters", type=int, default=20)
    parser.add_argument(
        "--hvp",
        default="double_backward,finite_difference",
        help="Hessian-vector product methods to time, comma-separated",
    )
    parser.add_argument("--batch-size", type=int, default=250, help="images per Hessian-vector product batch")
    parser.add_argument("--skip", choices=("consistency", "hessian"), action="append", default=[])
    parser.add_argument("--out", default="studies/results/benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y, source = _images(args.images)
    model = _model(args.checkpoint)
    rows = []
    if "consistency" not in args.skip:
        methods = [m.strip() for m in args.methods.split(",")]
        rows.append(
            _timed(
                f"consistency se_resnet20, {len(x)} images, methods={'+'.join(methods)}, controls={args.controls}",
                lambda: consistency(model, x, y, methods=methods, null=args.controls, random_gate=args.controls),
            )
        )
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size)))
    for method in [] if "hessian" in args.skip else args.hvp.split(","):
        result: dict[str, Any] = {}
        rows.append(
            _timed(
                f"hessian top eigenvalue se_resnet20, {args.hessian_iters} iterations, {len(x)} images, hvp={method}",
                lambda method=method, result=result: result.update(
                    hessian_top_eigenvalue(
                        model,
                        F.cross_entropy,
                        batches,
                        iters=args.hessian_iters,
                        generator=torch.Generator().manual_seed(0),
                        hvp=method,
                    )
                ),
            )
        )
        rows[-1]["note"] = f"eigenvalue {result['eigenvalue']:.6g} by {result['hvp']}"
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "images": source,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis_speed.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    with open(out / "analysis_speed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["measurement", "seconds", "load_before", "load_after", "note"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'analysis_speed.json'} and .csv")


if __name__ == "__main__":
    main()
