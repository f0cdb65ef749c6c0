"""Comparisons and their reports: train entries × datasets × seeds, summarise over seeds, decide claims, render.

``run_compare(make_plan(...), out)`` is ``attnlab compare``; ``build_report(Plan.load(out), out)`` is
``attnlab report``. Layout: `plan` (what is compared), `compare` (running it), `results` (numbers read back from the
run folders), `stats` (mean, CI, paired tests), `verdicts` (the decision rules), `presets` (the claim experiments),
`plots`, `render` (Markdown and self-contained HTML) and `document` (the report itself).
"""

from .compare import CompareOutcome, make_plan, run_compare
from .document import ReportFiles, build_report
from .plan import AnalysisSpec, Entry, Plan, parse_entries, parse_entry
from .presets import PRESETS, Preset, get_preset, list_presets
from .stats import Described, PairedTest, describe, holm, paired_test
from .verdicts import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, Verdict

__all__ = [
    "DOES_NOT_HOLD",
    "HOLDS",
    "INCONCLUSIVE",
    "PRESETS",
    "AnalysisSpec",
    "CompareOutcome",
    "Described",
    "Entry",
    "PairedTest",
    "Plan",
    "Preset",
    "ReportFiles",
    "Verdict",
    "build_report",
    "describe",
    "get_preset",
    "holm",
    "list_presets",
    "make_plan",
    "paired_test",
    "parse_entries",
    "parse_entry",
    "run_compare",
]
