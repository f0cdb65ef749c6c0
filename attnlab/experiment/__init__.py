"""Comparisons: what is compared (`plan`: the entry grammar, `Plan`, the folder layout), the claim experiments
(`presets`, and `make_plan`, which turns a preset or explicit choices into a plan), running it (`runner`: a local
pool; `launchers`: one submitit/SLURM job per run), the numbers read back from disk (`results`) and the claims
decided on them (`claims`). ``run_compare(make_plan(...), out)`` then ``attnlab.report.build_report(plan, out)`` is
``attnlab compare``.
"""

from .claims import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, Claim, Metric, Verdict
from .launchers import Resources, SubmititLauncher
from .plan import AnalysisSpec, Entry, Plan, parse_entries, parse_entry
from .presets import PRESETS, Preset, get_preset, list_presets, make_plan
from .runner import CompareOutcome, Launcher, LocalPool, run_compare

__all__ = [
    "DOES_NOT_HOLD",
    "HOLDS",
    "INCONCLUSIVE",
    "PRESETS",
    "AnalysisSpec",
    "Claim",
    "CompareOutcome",
    "Entry",
    "Launcher",
    "LocalPool",
    "Metric",
    "Plan",
    "Preset",
    "Resources",
    "SubmititLauncher",
    "Verdict",
    "get_preset",
    "list_presets",
    "make_plan",
    "parse_entries",
    "parse_entry",
    "run_compare",
]
