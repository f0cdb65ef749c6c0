"""Comparisons: what is compared (`plan`: the entry grammar, `Plan`, the folder layout), studies (`study`: `Preset`
and `Budget`, read from a YAML file too), the library's claim experiments (`presets`, and `make_plan`, which turns a
preset, a study file or explicit choices into a plan), running it (`runner`: a local pool; `launchers`: one
submitit/SLURM job per run), the numbers read back from disk (`results`), the decision rules (`verdicts`) and the
papers' claims built on them (`claims`). ``run_compare(make_plan(...), out)`` then
``attnlab.report.build_report(plan, out)`` is ``attnlab compare``.
"""

from .launchers import Resources, SubmititLauncher
from .plan import AnalysisSpec, Entry, Plan, parse_entries, parse_entry
from .presets import PRESETS, get_preset, list_presets, load_preset, make_plan, preset_of
from .runner import CompareOutcome, Launcher, LocalPool, run_compare
from .study import Budget, Preset, read_study
from .verdicts import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, Claim, Metric, Verdict

__all__ = [
    "DOES_NOT_HOLD",
    "HOLDS",
    "INCONCLUSIVE",
    "PRESETS",
    "AnalysisSpec",
    "Budget",
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
    "load_preset",
    "make_plan",
    "parse_entries",
    "parse_entry",
    "preset_of",
    "read_study",
    "run_compare",
]
