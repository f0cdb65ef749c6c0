"""The README's claim section: rebuilt from committed comparison folders by the presets' own rules, digit for digit.

`test_committed_reports_rebuild_byte_for_byte` and `test_readme_claims_match_the_committed_files` check the real
``results/claims/`` of this repository (and ``results/claims-full/``, the full budgets, once a GPU has run them); the
others check the digest itself on comparison folders written here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.experiment import HOLDS, make_plan
from attnlab.experiment.plan import run_dir
from attnlab.report import build_report
from attnlab.report.digest import END, begin_marker, digest, readme_section, write_into_readme

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ("results/claims", "results/claims-full")  # the CPU budgets; the full ones on a GPU
REBUILT = ("results.csv", "summary.csv", "report.md")


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


def test_digest_decides_the_claims_from_the_files(tmp_path):
    base = [0.90, 0.91, 0.92]
    accuracies = {e.name: base for e in make_plan(preset="aw").entries}
    accuracies["aw_resnet20"] = [a + 0.01 + 0.001 * i for i, a in enumerate(base)]  # beats resnet20 on every seed
    accuracies["se_resnet20"] = [0.93] * 3  # every seed alike: no spread, which is not a missing one
    _fake_comparison(tmp_path / "aw", accuracies)
    text = digest(tmp_path)
    assert "`aw` — budget `cpu`" in text and "runs finished: 18 of 18 (3 seeds)" in text
    assert "training wall time 3.0 h" in text
    line = next(row for row in text.splitlines() if row.startswith("| aw_resnet20 beats resnet20"))
    assert f"**{HOLDS}**" in line
    assert "| fashion-mnist | aw_resnet20 | 92.10 ± 1.10 | 3 |" in text
    assert "| fashion-mnist | resnet20 | 91.00 ± 1.00 | 3 |" in text
    assert "| fashion-mnist | se_resnet20 | 93.00 ± 0.00 | 3 |" in text
    shutil.rmtree(run_dir(tmp_path / "aw", "fashion-mnist", make_plan(preset="aw").entries[1], 2))
    assert "runs finished: 17 of 18" in digest(tmp_path)  # an unfinished run is left out and counted


def test_digest_does_not_depend_on_the_last_invocation(tmp_path):
    """A folder's runs span sessions started with different --jobs; resuming with another one only rewrites the plan's
    machine record, which must not change the README (it did once, and CI went red on a resume)."""
    _fake_comparison(tmp_path / "aw", {e.name: [0.90, 0.91, 0.92] for e in make_plan(preset="aw").entries})
    before = digest(tmp_path)
    make_plan(preset="aw", budget="cpu", jobs=2, command="attnlab compare --preset aw --jobs 2").save(tmp_path / "aw")
    assert digest(tmp_path) == before


def test_readme_markers_are_written_and_read_back(tmp_path, capsys):
    readme = tmp_path / "README.md"
    nothing = (tmp_path / "nothing").as_posix()
    readme.write_text(f"# title\n\n{begin_marker('a')}\nold a\n{END}\n\n{begin_marker(nothing)}\nold\n{END}\n\nrest\n")
    write_into_readme(readme, "new section\n", nothing)
    assert readme_section(readme, nothing) == "new section\n"
    assert readme_section(readme, "a") == "old a\n"  # each folder has its own pair of markers
    assert readme.read_text().endswith(f"{END}\n\nrest\n")
    assert main(["report", "--digest", nothing, "--readme", str(readme)]) == 0
    assert "No claim experiment has been committed" in readme_section(readme, nothing)
    assert readme_section(readme, "a") == "old a\n"
    readme.write_text(f"{begin_marker('a')}\nno end marker\n")
    with pytest.raises(AttnlabError, match="no claim markers for a"):
        write_into_readme(readme, "x", "a")
    assert main(["report", "--digest", nothing, "--readme", str(readme)]) == 2
    assert readme.read_text() == f"{begin_marker('a')}\nno end marker\n"


@pytest.mark.parametrize(
    "folder",
    sorted(p.parent for root in COMMITTED for p in (ROOT / root).glob("*/compare.json")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_committed_reports_rebuild_byte_for_byte(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    from attnlab.experiment import Plan

    build_report(Plan.load(copy), copy)
    for name in REBUILT:
        assert (copy / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("shown_as", COMMITTED)
def test_readme_claims_match_the_committed_files(shown_as):
    assert readme_section(ROOT / "README.md", shown_as) == digest(ROOT / shown_as, shown_as=shown_as), (
        f"README's claim section is out of date: attnlab report --digest {shown_as} --readme README.md"
    )


def test_reports_take_analysis_headlines_from_the_saved_results_not_the_saved_headlines(tmp_path):
    """A mended headline reaches analyses saved before it: the committed smoothness analyses once quoted, as the "top
    Hessian eigenvalue", the eigenvalue of largest magnitude (−369 on one cram_resnet20 seed)."""
    from attnlab.experiment import Plan

    committed = ROOT / "results" / "claims" / "smoothness"
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
