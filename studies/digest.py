"""The claim experiments at a glance: ``docs/_generated/claims.md``, built from the committed comparison folders.

    python studies/digest.py [ROOT ...] [--out docs/_generated/claims.md]        (``make claims`` runs it last)

One section per ROOT (default: every ``studies/results/claims*`` folder: ``claims`` for the presets' CPU budgets,
``claims-full`` for their full budgets on a GPU once one has run them), one table of verdicts and one of scores per
comparison folder in it (a folder holding a ``compare.json``). Every verdict is decided by the preset's own rules from
the files the folder holds (``compare.json``, each run's ``summary.json``, the analyses' JSON), exactly as
`attnlab report` decides them: nothing is typed by hand. The documentation's claims page includes the file;
``tests/test_digest.py`` regenerates it from the committed folders and compares.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnlab.errors import AttnlabError  # noqa: E402
from attnlab.experiment import PRESETS, Plan, preset_of  # noqa: E402
from attnlab.experiment.plan import PLAN_FILE  # noqa: E402
from attnlab.experiment.results import collect_results, load_analyses, missing_runs, summarize  # noqa: E402
from attnlab.experiment.verdicts import Evidence, decide_claims  # noqa: E402
from attnlab.io import check_writable, make_dir, write_text_atomic  # noqa: E402
from attnlab.report.document import pct  # noqa: E402
from attnlab.report.render import Block, Bullets, Heading, Paragraph, Table, to_markdown  # noqa: E402

RESULTS = ROOT / "studies" / "results"
PAGE = ROOT / "docs" / "_generated" / "claims.md"


def default_roots() -> list[Path]:
    """Every committed ``studies/results/claims*`` folder, the CPU budgets' first."""
    return sorted(p for p in RESULTS.glob("claims*") if p.is_dir())


def shown(path: Path) -> str:
    """``path`` as the page names it: relative to the repository where it lies inside it."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


def comparison_folders(root: Path) -> list[Path]:
    """The comparison folders under ``root`` (those holding a plan): the library's presets in its order, then others
    by name."""
    found = sorted(p.parent for p in Path(root).glob(f"*/{PLAN_FILE}"))
    rank = {name: i for i, name in enumerate(PRESETS)}
    return sorted(found, key=lambda p: (rank.get(p.name, len(rank)), p.name))


def _hours(rows: Sequence[dict[str, Any]]) -> str:
    seconds = sum(float(r["wall_time_s"]) for r in rows if r.get("wall_time_s") not in (None, ""))
    return f"{seconds / 3600:.1f} h"


def _score_rows(plan: Plan, rows: Sequence[dict[str, Any]]) -> tuple[tuple[str, ...], ...]:
    table = []
    score = plan.kind.score
    for r in summarize(plan, rows):
        std = r[f"test_{score}_std"]  # None or "" for a single seed; 0.0 is a spread like any other
        mean, std = float(r[f"test_{score}_mean"]), math.nan if std in (None, "") else float(std)
        table.append((r["dataset"], r["model"], f"{pct(mean)} ± {pct(std)}", str(r["n"])))
    return tuple(table)


def preset_blocks(out: Path) -> list[Block]:
    """One comparison folder's budget, verdicts and scores."""
    plan = Plan.load(out)
    preset = preset_of(plan)
    rows = collect_results(plan, out)
    missing = missing_runs(plan, out)
    total = len(plan.datasets) * len(plan.entries) * len(plan.seeds)
    devices = sorted({r["device"] for r in rows if r.get("device")}) or ["no finished run yet"]
    blocks: list[Block] = [
        Heading(3, f"`{plan.preset or out.name}` — budget `{plan.budget}`"),
        Bullets(
            (
                f"runs finished: {total - len(missing)} of {total} ({len(plan.seeds)} seeds); "
                f"training wall time {_hours(rows)} in all",
                # not the last invocation's --jobs: runs of one folder span sessions run with different ones
                f"machine: {', '.join(devices)}; {plan.machine.get('cpus', '?')} CPU(s)",
                f"files: `{shown(out)}/` (report.md has every number)",
            )
        ),
    ]
    if preset is not None and preset.claims and rows:
        evidence = Evidence(rows, load_analyses(plan, out))
        verdicts = [
            (v.claim, f"**{v.verdict}**", v.numbers)
            for _, found in decide_claims(preset.claims, evidence, plan.datasets)
            for v in found
        ]
        numbers = f"numbers (last-epoch test {plan.kind.score_name} unless said)"
        blocks.append(Table(("claim", "verdict", numbers), tuple(verdicts)))
    if rows:
        score = f"test {plan.kind.score_name} {plan.kind.unit} (mean ± std)"
        blocks.append(Table(("dataset", "entry", score, "seeds"), _score_rows(plan, rows)))
    return blocks


def section(root: Path) -> list[Block]:
    """The blocks of every comparison folder under ``root``, under one heading naming it."""
    if not Path(root).is_dir():
        raise AttnlabError(f"digest: no such folder: {root}")
    blocks: list[Block] = [Heading(2, f"`{shown(root)}/`")]
    folders = comparison_folders(root)
    if not folders:
        blocks.append(Paragraph("No claim experiment has been committed here yet."))
    for out in folders:
        blocks += preset_blocks(out)
    return blocks


def digest(roots: Sequence[Path]) -> str:
    """The Markdown page for ``roots``."""
    blocks: list[Block] = [
        Paragraph(
            "Generated by `python studies/digest.py` from the committed comparison folders (each folder's `report.md` "
            "has every number); do not edit by hand."
        )
    ]
    for root in roots:
        blocks += section(root)
    return to_markdown(blocks).strip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", type=Path, help="folders of comparisons (default: studies/results/claims*)")
    p.add_argument("--out", type=Path, default=PAGE, help="the Markdown page written (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        text = digest(args.roots or default_roots())
        check_writable(args.out, "--out", folder=False)
        make_dir(args.out.parent, "--out")
        write_text_atomic(args.out, text)
    except AttnlabError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"digest: {shown(args.out)} rebuilt from {', '.join(shown(r) for r in args.roots or default_roots())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
