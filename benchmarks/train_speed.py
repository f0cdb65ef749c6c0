"""Training speed and time-to-accuracy of the default recipe (a benchmark script, not a test).

1. Train-step throughput (img/s) of resnet20 and every attention variant at batch 256, fp32 and bf16, measured
   round-robin in one process (`attnlab.train.cost`) → ``results/train_speed_steps.csv``.
2. Time-to-accuracy: resnet20 trained with the default recipe on the full Fashion-MNIST (55k train / 5k val / 10k
   test) for each seed; per-epoch validation accuracy against cumulative wall time, and last-epoch test accuracy
   → ``results/train_speed_tta.csv`` and ``results/train_speed.json`` (mean ± std over seeds).
   Target: ≥ 94.0% test accuracy (mean of 3 seeds, last epoch) within 10 minutes of wall time on 2 CPU cores.

Usage: ``python benchmarks/train_speed.py [--seeds 0,1,2] [--epochs N] [--skip-steps] [--skip-tta] [--amp bf16]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnlab.io import write_csv as write_csv_atomic
from attnlab.train import TrainConfig, train
from attnlab.train.cost import benchmark_models, format_table

VARIANTS = [
    "resnet20",
    "se_resnet20",
    "eca_resnet20",
    "cbam_resnet20",
    "spatial_resnet20",
    "cram_resnet20",
    "aw_resnet20",
    "aw_se_resnet20",
    "aw_cbam_resnet20",
    "fmm_resnet20",
]
RESULTS = Path(__file__).resolve().parents[1] / "results"


def write_csv(path: Path, rows: list[dict]) -> None:
    print(f"wrote {write_csv_atomic(path, rows)}")


def step_throughput(repeats: int) -> None:
    rows = []
    for amp in (False, True):
        table = benchmark_models(VARIANTS, input_size=(1, 28, 28), batch_size=256, amp=amp, repeats=repeats)
        print(format_table(table))
        rows += table
    write_csv(RESULTS / "train_speed_steps.csv", rows)


def time_to_accuracy(seeds: list[int], epochs: int | None, amp: str, extra: dict) -> None:
    rows, finals = [], []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(
                model="resnet20",
                dataset="fashion-mnist",
                seed=seed,
                out=tmp,
                amp=amp,
                **({"epochs": epochs} if epochs else {}),
                **extra,
            )
            start = time.time()
            summary = train(cfg, progress=False)
            history = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        elapsed = 0.0
        for h in history:
            elapsed += h["epoch_time"]
            rows.append(
                {
                    "seed": seed,
                    "epoch": h["epoch"],
                    "train_seconds": round(elapsed, 2),
                    "val_acc": h["val_acc"],
                    "img_per_s": round(h["img_per_s"], 1),
                }
            )
        finals.append(
            {
                "seed": seed,
                "val_acc": summary["val_acc"],
                "test_acc": summary["test_acc"],
                "wall_time_s": time.time() - start,
                "train_img_per_s": summary["train_img_per_s"],
            }
        )
    write_csv(RESULTS / "train_speed_tta.csv", rows)
    tests = [f["test_acc"] for f in finals]
    walls = [f["wall_time_s"] for f in finals]
    report = {
        "recipe": TrainConfig(amp=amp, **({"epochs": epochs} if epochs else {}), **extra).to_dict(),
        "runs": finals,
        "test_acc_mean": statistics.mean(tests),
        "test_acc_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
        "wall_time_s_median": statistics.median(walls),
        "target": "test acc >= 0.940 (mean of 3 seeds, last epoch) within 600 s wall time on 2 CPU cores",
        "meets_target": statistics.mean(tests) >= 0.94 and max(walls) <= 600,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    (RESULTS / "train_speed.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, help="default: the recipe's own")
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-tta", action="store_true")
    args = parser.parse_args()
    extra = {k: v for k, v in {"batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    if not args.skip_steps:
        step_throughput(args.repeats)
    if not args.skip_tta:
        time_to_accuracy([int(s) for s in args.seeds.split(",")], args.epochs, args.amp, extra)


if __name__ == "__main__":
    main()
