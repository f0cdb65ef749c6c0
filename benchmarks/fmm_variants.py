"""Which FMM merge should `fmm_` models use? Train resnet20 with every merge on Fashion-MNIST, select on validation.

A comparison like any other (`attnlab.experiment.run_compare`, then `attnlab.report.build_report`): one entry
``fmm_resnet20[merge=NAME]`` per merge, the engine's default recipe except a batch of 32 (the budget is a few hundred
steps); only the merge and the seed change. The winner is the multiplicative merge with the best mean validation
accuracy among those whose runs all finished (``add`` is the reference, not a candidate; a run that diverges fails,
and its merge with it); test accuracy is in the report but never used to choose.

Writes the comparison under ``OUT`` (``results.csv``, ``summary.csv``, ``report.md``, the runs) and
``OUT/selection.json`` (the winner, its rule, the command), and prints the choice. ``--resume`` reuses finished runs.

    OMP_NUM_THREADS=1 python benchmarks/fmm_variants.py --seeds 3 --epochs 3 --subset 3500 --val-size 3000 \
        --batch-size 32 --jobs 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from attnlab.experiment import make_plan, run_compare
from attnlab.experiment.results import collect_results
from attnlab.io import write_json_atomic
from attnlab.layers.merge import list_merges
from attnlab.report import build_report
from attnlab.stats import describe

RULE = "best mean validation accuracy among multiplicative merges whose runs all finished"


def pick_winner(rows: list[dict], entries: dict[str, str], seeds: int) -> str | None:
    """The product merge (not ``add``) with the best mean validation accuracy, among those with every seed finished
    (a failed run has no row), or None."""
    means = {}
    for merge, name in entries.items():
        values = [r["val_acc"] for r in rows if r["model"] == name]
        if merge != "add" and len(values) == seeds:
            means[merge] = describe(values).mean
    return max(means, key=means.get, default=None)


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
    parser.add_argument("--out", default="studies/results/benchmarks/fmm_variants")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs in --out")
    args = parser.parse_args(argv)

    entries = {m: f"{args.model}[merge={m}]" for m in args.merges.split(",")}
    recipe = {"epochs": args.epochs, "subset": args.subset, "val_size": args.val_size, "batch_size": args.batch_size}
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python {shlex.join(sys.argv)}"
    plan = make_plan(
        models=list(entries.values()),
        datasets=[args.dataset],
        seeds=args.seeds,
        recipe={**recipe, "data_dir": args.data_dir} if args.data_dir else recipe,
        analyses=[],
        command=command,
        jobs=args.jobs,
    )
    out, started = Path(args.out), time.time()
    run_compare(plan, out, resume=args.resume, jobs=args.jobs)
    files = build_report(plan, out)
    winner = pick_winner(collect_results(plan, out), entries, args.seeds)
    selection = {"selected": winner, "selection": RULE, "command": command, "wall_time_s": time.time() - started}
    write_json_atomic(out / "selection.json", selection)
    print(f"selected: {winner} ({RULE}); numbers in {files.markdown}")


if __name__ == "__main__":
    main()
