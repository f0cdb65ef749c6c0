"""Which FMM merge should `fmm_` models use? Train resnet20 with every merge on Fashion-MNIST, select on validation.

Every run goes through the project's engine (`attnlab.train.train`) with its default recipe except a batch of 32 (the
budget is a few hundred steps); only the merge and the seed change. The winner is the multiplicative merge with the
best mean validation accuracy (``add`` is the reference, not a candidate); test accuracy is recorded for the report
but never used to choose. A run that diverges (the engine's `TrainingDiverged`) is recorded as such and counts as a
failure of its merge.

Writes ``OUT/runs.csv`` (one row per run) and ``OUT/summary.json`` (per merge: val/test accuracy mean ± std over seeds,
divergences; the winner; the budget and the command), and prints a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/fmm_variants.py --seeds 3 --epochs 3 --subset 3500 --val-size 3000 \
        --batch-size 32 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from attnlab.layers.merge import list_merges
from attnlab.train import TrainConfig, TrainingDiverged, train

FIELDS = ["merge", "seed", "status", "val_acc", "test_acc", "val_loss", "train_time_s", "wall_time_s", "run_dir"]


def run_one(merge: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one (merge, seed) and return its row; a finished run found on disk is read back instead of retrained."""
    torch.set_num_threads(args.threads)
    run_dir = Path(args.runs) / merge / f"seed{seed}"
    summary_file = run_dir / "summary.json"
    row: dict[str, Any] = {"merge": merge, "seed": seed, "run_dir": str(run_dir)}
    if summary_file.exists() and not args.retrain:
        summary = json.loads(summary_file.read_text())
    else:
        cfg = TrainConfig(
            model=args.model,
            dataset=args.dataset,
            data_dir=args.data_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
            subset=args.subset,
            val_size=args.val_size,
            seed=seed,
            out=str(run_dir),
            model_kwargs={"merge": merge},
        )
        try:
            summary = train(
                cfg,
                resume=run_dir.exists(),
                progress=False,  # resume: finish an interrupted run
                log=lambda line: print(f"[{merge} seed {seed}] {line}", flush=True),
            )
        except TrainingDiverged as e:
            return {**row, "status": f"diverged: {e}"}
    keys = ("val_acc", "test_acc", "val_loss", "train_time_s", "wall_time_s")
    return {**row, "status": "ok", **{k: summary[k] for k in keys}}


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]], merges: list[str]) -> dict[str, dict[str, Any]]:
    table = {}
    for merge in merges:
        ok = [r for r in rows if r["merge"] == merge and r["status"] == "ok"]
        val_mean, val_std = mean_std([r["val_acc"] for r in ok])
        test_mean, test_std = mean_std([r["test_acc"] for r in ok])
        table[merge] = {
            "val_acc_mean": val_mean,
            "val_acc_std": val_std,
            "test_acc_mean": test_mean,
            "test_acc_std": test_std,
            "runs": len([r for r in rows if r["merge"] == merge]),
            "diverged": len([r for r in rows if r["merge"] == merge and r["status"] != "ok"]),
            "run_time_s": sum(r["wall_time_s"] for r in ok),
        }
    return table


def pick_winner(table: dict[str, dict[str, Any]]) -> str | None:
    """The product with the best mean validation accuracy among those that never diverged (None if none is left)."""
    candidates = {m: t for m, t in table.items() if m != "add" and t["diverged"] == 0 and t["val_acc_mean"] is not None}
    return max(candidates, key=lambda m: candidates[m]["val_acc_mean"], default=None)


def markdown(table: dict[str, dict[str, Any]], winner: str) -> str:
    def pct(mean: float | None, std: float | None) -> str:
        return "—" if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}"

    lines = ["| merge | val acc % (mean ± std) | test acc % (not used to select) | diverged |", "|---|---|---|---|"]
    for merge, t in sorted(table.items(), key=lambda kv: -(kv[1]["val_acc_mean"] or 0.0)):
        name = f"**{merge}** (selected)" if merge == winner else merge
        lines.append(
            f"| {name} | {pct(t['val_acc_mean'], t['val_acc_std'])} | "
            f"{pct(t['test_acc_mean'], t['test_acc_std'])} | {t['diverged']}/{t['runs']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--merges", default=",".join(list_merges()), help="comma-separated merge names")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=3500, help="training images (after carving validation)")
    parser.add_argument("--batch-size", type=int, default=32, help="small batches: more steps in a small budget")
    parser.add_argument("--val-size", type=int, default=3000, help="validation images carved from the training pool")
    parser.add_argument("--model", default="fmm_resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs", default="runs/fmm_variants", help="where the runs' own directories go")
    parser.add_argument("--out", default="results/fmm_variants")
    parser.add_argument("--retrain", action="store_true", help="retrain runs already finished on disk")
    args = parser.parse_args(argv)

    merges = args.merges.split(",")
    jobs = [(m, s) for s in range(args.seeds) for m in merges]
    started = time.time()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run_one, *zip(*jobs), [args] * len(jobs)))
    table = summarise(rows, merges)
    winner = pick_winner(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "") + " python " + shlex.join(sys.argv)
    summary = {
        "selected": winner,
        "selection": "best mean validation accuracy among multiplicative merges that never diverged",
        "table": table,
        "budget": {
            "model": args.model,
            "dataset": args.dataset,
            "epochs": args.epochs,
            "subset": args.subset,
            "val_size": args.val_size,
            "batch_size": args.batch_size,
            "seeds": list(range(args.seeds)),
            "recipe": "TrainConfig defaults otherwise",
        },
        "run_time_s": sum(t["run_time_s"] for t in table.values()),  # wall time of the runs, summed
        "cpu_time_s": cpu_seconds(resource.RUSAGE_CHILDREN),  # the worker processes' user + system time
        "wall_time_s": time.time() - started,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jobs={args.jobs}, "
        f"threads per run={args.threads}",
        "command": command,
        "torch": torch.__version__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(markdown(table, winner))
    print(f"selected: {winner}; {summary['cpu_time_s']:.0f} CPU-s, {summary['wall_time_s']:.0f} s wall")


if __name__ == "__main__":
    main()
