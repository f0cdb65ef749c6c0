"""The benchmark scripts stay runnable: each imports against the current package and parses ``--help``.

They are not run here (they time things; their figures live in ``studies/results/benchmarks/``), but a rename in the
package must not leave them broken until the next time someone needs a number."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "timing")


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports_and_parses_help(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out
