"""Fashion-MNIST time to accuracy of the default recipe (a benchmark script, not a test).

Target (issue 11): resnet20 (or any attnlab network) with the default recipe, tuned on validation only, reaches
≥ 94.0% last-epoch test accuracy (mean of 3 seeds) in ≤ 6 minutes of wall time per run on the 2-core machine.

``measure`` (the default): each precision × seed is trained once, on the full 55k/5k/10k split unless ``--subset``
says otherwise → ``studies/results/benchmarks/train_speed.csv`` (one row per run: wall and CPU seconds, last-epoch val
and test accuracy, the load average the run saw; then one ``mean`` row per precision, which says whether the target is
met — only a full-size run of 3+ seeds can meet it) and ``studies/results/benchmarks/train_speed_epochs.csv``
(validation accuracy against cumulative training seconds, epoch by epoch: where a run crosses 94%).

``tune``: the recipe is chosen on validation accuracy only — every combination of ``--grid`` values (e.g.
``--grid epochs=10,12,15 batch_size=128,256``) is trained per seed and ranked by mean last-epoch val accuracy among
those whose median wall time fits ``--budget-s`` → ``studies/results/benchmarks/train_speed_tuning.csv`` (no test
accuracy in it).

Wall time on a shared machine measures the machine's load as much as the recipe: every row records the 1-minute load
average and the process CPU seconds (all threads), so a loaded run can be told apart from a slow recipe.

Usage: ``python benchmarks/train_speed.py [measure|tune] [--seeds 0,1,2] [--precisions auto] [--compile]
[--subset N] [--set KEY=VALUE ...] [--grid KEY=V1,V2 ...]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from attnlab.io import write_csv
from attnlab.train import TrainConfig, train
from attnlab.train.rundir import RunDir

RESULTS = Path(__file__).resolve().parents[1] / "studies" / "results" / "benchmarks"
TARGET_ACC, TARGET_WALL_S, TARGET_SEEDS = 0.94, 360.0, 3


def one_run(settings: dict[str, Any], seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train once in a temporary folder: (run row, per-epoch rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{"model": "resnet20", "dataset": "fashion-mnist", **settings, "seed": seed, "out": tmp})
        wall, cpu = time.perf_counter(), time.process_time()
        summary = train(cfg, progress=False, log=lambda line: print(f"  seed {seed}: {line}", flush=True))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        history = RunDir(tmp).history()
    run = {
        "model": cfg.model,
        "precision": cfg.precision,
        "compile": summary["compile"],
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "subset": cfg.subset or "",
        "seed": seed,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "train_s": round(summary["train_time_s"], 1),
        "train_img_per_s": round(summary["train_img_per_s"], 1),
        "val_acc": summary["val_acc"],
        "test_acc": summary["test_acc"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "threads": torch.get_num_threads(),
    }
    seconds, epochs = 0.0, []
    for h in history:
        seconds += h["epoch_time"]
        epochs.append(
            {
                "precision": cfg.precision,
                "seed": seed,
                "epoch": h["epoch"],
                "train_s": round(seconds, 1),
                "val_acc": h["val_acc"],
                "img_per_s": round(h["img_per_s"], 1),
            }
        )
    return run, epochs


def mean_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean over seeds of one precision, and whether it meets the target (full data, ≥ 3 seeds only)."""
    test = statistics.mean(r["test_acc"] for r in runs)
    worst_wall = max(r["wall_s"] for r in runs)
    full = all(r["subset"] == "" for r in runs) and len(runs) >= TARGET_SEEDS
    verdict = ("met" if test >= TARGET_ACC and worst_wall <= TARGET_WALL_S else "missed") if full else "reduced size"
    return {
        **{k: runs[0][k] for k in ("model", "precision", "compile", "epochs", "batch_size", "lr", "subset")},
        "seed": "mean",
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 1),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 1),
        "train_img_per_s": round(statistics.median(r["train_img_per_s"] for r in runs), 1),
        "val_acc": statistics.mean(r["val_acc"] for r in runs),
        "test_acc": test,
        "test_acc_std": statistics.stdev(r["test_acc"] for r in runs) if len(runs) > 1 else 0.0,
        "target": f"test >= {TARGET_ACC:.3f}, mean of {TARGET_SEEDS} seeds, <= {TARGET_WALL_S:.0f} s wall: {verdict}",
    }


def measure(settings: dict[str, Any], seeds: list[int], precisions: list[str], out: Path) -> None:
    runs, epochs, means = [], [], []
    for precision in precisions:
        mine = []
        for seed in seeds:
            run, curve = one_run({**settings, "precision": precision}, seed)
            mine.append(run)
            epochs += curve
            print(run, flush=True)
        runs += mine
        means.append(mean_row(mine))
        print(means[-1], flush=True)
    rows = runs + means  # a mean row has columns a run row lacks (test_acc_std, target)
    print(f"wrote {write_csv(out / 'train_speed.csv', rows, list(dict.fromkeys(k for r in rows for k in r)))}")
    print(f"wrote {write_csv(out / 'train_speed_epochs.csv', epochs)}")


def tune(settings: dict[str, Any], seeds: list[int], grid: dict[str, list], budget_s: float, out: Path) -> None:
    rows = []
    for values in itertools.product(*grid.values()):
        candidate = dict(zip(grid, values))
        runs = [one_run({**settings, **candidate}, seed)[0] for seed in seeds]
        rows.append(
            {
                **candidate,
                "seeds": len(seeds),
                "val_acc": statistics.mean(r["val_acc"] for r in runs),
                "wall_s_median": statistics.median(r["wall_s"] for r in runs),
                "cpu_s_median": statistics.median(r["cpu_s"] for r in runs),
                "load_avg_1m": runs[-1]["load_avg_1m"],
            }
        )
        print(rows[-1], flush=True)
    fits = [r for r in rows if r["wall_s_median"] <= budget_s] or rows
    best = max(fits, key=lambda r: r["val_acc"])
    for row in rows:
        row["chosen"] = row is best
    print(f"chosen on validation: { ({k: best[k] for k in grid}) }")
    print(f"wrote {write_csv(out / 'train_speed_tuning.csv', rows)}")


def _pairs(items: list[str]) -> dict[str, Any]:
    pairs = {}
    for item in items:
        key, _, value = item.partition("=")
        pairs[key.replace("-", "_")] = yaml.safe_load(value)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("measure", "tune"), default="measure")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--precisions", default="auto", help="comma-separated, e.g. fp32,bf16 (auto: the default)")
    parser.add_argument("--compile", action="store_true", help="train compiled (--compile)")
    parser.add_argument("--subset", type=int, help="train on N images only (a reduced run; cannot meet the target)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other TrainConfig settings")
    parser.add_argument("--grid", nargs="*", default=["epochs=10,12,15"], metavar="KEY=V1,V2", help="tune: values")
    parser.add_argument("--budget-s", type=float, default=TARGET_WALL_S, help="tune: wall-time limit per run")
    parser.add_argument("--out", default=str(RESULTS), help="folder of the CSV files")
    args = parser.parse_args()
    settings = {"compile": args.compile, **({"subset": args.subset} if args.subset else {}), **_pairs(args.set)}
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    if args.mode == "tune":
        grid = {}
        for item in args.grid:
            key, _, values = item.partition("=")
            grid[key.replace("-", "_")] = [yaml.safe_load(v) for v in values.split(",")]
        tune(settings, seeds, grid, args.budget_s, out)
    else:
        measure(settings, seeds, args.precisions.split(","), out)


if __name__ == "__main__":
    main()
