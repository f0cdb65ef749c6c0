"""The documentation's claim tables (``studies/digest.py`` → ``docs/_generated/claims.md``): rebuilt from committed
comparison folders by the presets' own rules, digit for digit.

`test_committed_reports_rebuild_byte_for_byte` and `test_the_claims_page_is_what_the_committed_results_give` check the
real ``studies/results/claims*/`` of this repository; the others check the digest itself on comparison folders written
here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from attnlab.experiment import HOLDS, Plan, make_plan
from attnlab.experiment.plan import run_dir
from attnlab.report import build_report

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "studies" / "digest.py"
COMMITTED = ROOT / "studies" / "results"
REBUILT = ("results.csv", "summary.csv", "report.md")


@pytest.fixture(scope="module")
def digest_script():
    spec = importlib.util.spec_from_file_location("digest_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_comparison(out: Path, accuracies: dict[str, list[float]]) -> None:
    """The committed files of a finished `aw` comparison: its plan and each run's summary.json, nothing else."""
    plan = make_plan(preset="aw", budget="cpu")
    out.mkdir()
    plan.save(out)
    for _dataset, entry, seed, folder in plan.runs(out):
        folder.mkdir(parents=True)
        summary = {
            "model": entry.model,
            "seed": seed,
            "val_acc": accuracies[entry.name][seed],
            "test_acc": accuracies[entry.name][seed],
            "test_loss": 0.3,
            "params": 1000,
            "flops": 2000,
            "train_img_per_s": 100.0,
            "latency_ms": 1.0,
            "wall_time_s": 600.0,
            "epochs": 15,
            "device": "test CPU (1 threads)",
        }
        (folder / "summary.json").write_text(json.dumps(summary))


def test_digest_decides_the_claims_from_the_files(digest_script, tmp_path):
    base = [0.90, 0.91, 0.92]
    accuracies = {e.name: base for e in make_plan(preset="aw").entries}
    accuracies["aw_resnet20"] = [a + 0.01 + 0.001 * i for i, a in enumerate(base)]  # beats resnet20 on every seed
    accuracies["se_resnet20"] = [0.93] * 3  # every seed alike: no spread, which is not a missing one
    _fake_comparison(tmp_path / "aw", accuracies)
    text = digest_script.digest([tmp_path])
    assert f"## `{tmp_path.as_posix()}/`" in text and "`aw` — budget `cpu`" in text
    assert "runs finished: 18 of 18 (3 seeds)" in text
    assert "training wall time 3.0 h" in text
    line = next(row for row in text.splitlines() if row.startswith("| aw_resnet20 beats resnet20"))
    assert f"**{HOLDS}**" in line
    assert "| fashion-mnist | aw_resnet20 | 92.10 ± 1.10 | 3 |" in text
    assert "| fashion-mnist | resnet20 | 91.00 ± 1.00 | 3 |" in text
    assert "| fashion-mnist | se_resnet20 | 93.00 ± 0.00 | 3 |" in text
    shutil.rmtree(run_dir(tmp_path / "aw", "fashion-mnist", make_plan(preset="aw").entries[1], 2))
    assert "runs finished: 17 of 18" in digest_script.digest([tmp_path])  # an unfinished run is left out and counted


def test_digest_does_not_depend_on_the_last_invocation(digest_script, tmp_path):
    """A folder's runs span sessions started with different --jobs; resuming with another one only rewrites the plan's
    machine record, which must not change the page."""
    _fake_comparison(tmp_path / "aw", {e.name: [0.90, 0.91, 0.92] for e in make_plan(preset="aw").entries})
    before = digest_script.digest([tmp_path])
    make_plan(preset="aw", budget="cpu", jobs=2, command="attnlab compare --preset aw --jobs 2").save(tmp_path / "aw")
    assert digest_script.digest([tmp_path]) == before


def test_the_script_writes_the_page_and_refuses_a_missing_folder_in_one_line(digest_script, tmp_path, capsys):
    page, empty = tmp_path / "docs" / "claims.md", tmp_path / "empty"
    empty.mkdir()
    assert digest_script.main([str(empty), "--out", str(page)]) == 0
    assert f"## `{empty.as_posix()}/`\n\nNo claim experiment has been committed here yet.\n" in page.read_text()
    capsys.readouterr()
    assert digest_script.main([str(tmp_path / "nowhere"), "--out", str(page)]) == 2
    assert capsys.readouterr().err == f"digest: no such folder: {tmp_path / 'nowhere'}\n"
    assert "No claim experiment" in page.read_text()  # left as it was


@pytest.mark.parametrize(
    "folder",
    sorted(p.parent for p in COMMITTED.glob("claims*/*/compare.json")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_committed_reports_rebuild_byte_for_byte(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    build_report(Plan.load(copy), copy)
    for name in REBUILT:
        assert (copy / name).read_bytes() == (folder / name).read_bytes(), name


def test_the_claims_page_is_what_the_committed_results_give(digest_script):
    page = ROOT / "docs" / "_generated" / "claims.md"
    assert page.read_text() == digest_script.digest(digest_script.default_roots()), (
        "docs/_generated/claims.md is out of date: python studies/digest.py"
    )


def test_reports_take_analysis_headlines_from_the_saved_results_not_the_saved_headlines(tmp_path):
    """A headline is derived from the saved results when a report is built, whatever headline an older file stored."""
    committed = COMMITTED / "claims" / "smoothness"
    copy = tmp_path / "smoothness"
    shutil.copytree(committed, copy)
    tampered = 0
    for path in copy.glob("analyses/*/seed*/*.json"):
        saved = json.loads(path.read_text())
        if "headline" in saved:  # files saved before analyses stopped storing headlines
            saved["headline"] = {label: {"hessian_top_eig": -1.0} for label in saved["headline"]}
            path.write_text(json.dumps(saved))
            tampered += 1
    assert tampered >= 3  # the test means nothing without saved headlines to ignore
    build_report(Plan.load(copy), copy)
    assert (copy / "report.md").read_bytes() == (committed / "report.md").read_bytes()
