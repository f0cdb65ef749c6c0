"""``studies/claims.py`` takes finished runs instead of training them only where that is honest, and ``--status``
counts exactly those: a committed run (no weights; of this preset or, with the very same settings, of another) only when
no analysis of the preset still needs its weights, another preset's run only with its weights and the very same
settings. Run folders are made by hand; nothing trains."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from test_data import make_garments

from attnlab.experiment import make_plan
from attnlab.experiment.plan import run_dir

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "claims.py"


@pytest.fixture(scope="module")
def claims():
    spec = importlib.util.spec_from_file_location("claims_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, model: str, seed: int, weights: bool, **changes) -> Path:
    """A finished run of preset ``consistency``'s ``cpu`` budget under ``root``, ``changes`` made to its settings."""
    plan = make_plan(preset="consistency", budget="cpu")
    entry = next(e for e in plan.entries if e.name == model)
    folder = run_dir(root, "fashion-mnist", entry, seed)
    cfg = plan.run_config("fashion-mnist", entry, seed, folder)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dataclasses.replace(cfg, **changes).to_yaml())
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "skipped_steps": 0}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"model": model, "seed": seed, "test_acc": 0.9}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "checkpoints").mkdir()
    return folder


def test_status_and_prepare_take_the_same_finished_runs(claims, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    keep, other, other_kept = results / "consistency", runs / "aw", results / "aw"
    fake_run(other, "resnet20", 0, weights=True)  # shared: same settings, weights
    fake_run(other, "resnet20", 1, weights=False)  # no weights: not shared
    fake_run(other, "resnet20", 2, weights=True, lr=0.05)  # other settings: not shared
    fake_run(other, "se_resnet20", 0, weights=True, compile=True)  # differs only in a neutral setting: shared
    fake_run(keep, "cbam_resnet20", 0, weights=False)  # committed, but the consistency analysis needs its weights
    fake_run(keep, "resnet20", 1, weights=False)  # committed and not analysed: restored
    fake_run(other_kept, "resnet20", 2, weights=False)  # committed by another preset, not analysed here: restored
    fake_run(other_kept, "se_resnet20", 1, weights=False)  # committed by another preset, but analysed here
    fake_run(other_kept, "cbam_resnet20", 1, weights=False, lr=0.05)  # other settings: not restored
    others = [(runs / name, results / name) for name in ("aw", "fmm")]

    line = claims.status("consistency", "cpu", runs, keep, others)
    assert line.startswith("consistency: runs 4/12 finished, 0 half-trained, 120 run-epochs left")
    assert line.endswith("analyses 0/3 committed")

    claims.prepare("consistency", "cpu", runs, keep, others)
    out = runs / "consistency" / "runs" / "fashion-mnist"
    taken = sorted(p.parent.relative_to(out).as_posix() for p in out.glob("*/seed*/summary.json"))
    assert taken == ["resnet20/seed0", "resnet20/seed1", "resnet20/seed2", "se_resnet20/seed0"]
    assert not (out / "resnet20/seed0/checkpoints").exists()  # weights travel, checkpoints stay with their run
    assert claims.status("consistency", "cpu", runs, keep, others) == line


def test_status_refuses_trial_flags_it_would_not_count_with(claims, capsys):
    with pytest.raises(SystemExit) as stopped:
        claims.main(["--status", "--", "--epochs", "1"])
    assert stopped.value.code == 2 and "--status counts the presets' own runs" in capsys.readouterr().err


def test_the_gpu_campaign_script_runs_a_tiny_trial_on_the_cpu(tmp_path):
    """`studies/claims_gpu.sh` end to end at a tiny budget: trains, analyses, exports and archives the small files."""
    data = tmp_path / "data"
    make_garments(data, n_train=200, n_test=40)
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "JOBS": "1",  # the parallel workers are tested with compare itself; here the campaign path
        "PRESETS": "cram",
        "PYTHON": sys.executable,
        "ATTNLAB_DATA": str(data),
        "OUT": str(tmp_path / "out"),
        "RUNS": str(tmp_path / "runs"),
        "RESULTS": str(tmp_path / "kept" / "claims-full"),
        "OMP_NUM_THREADS": "1",
    }
    tiny = ["--epochs", "1", "--subset", "64", "--val-size", "32", "--seeds", "1", "--batch-size", "32"]
    tiny += ["--analysis-images", "8", "--data-arg", "canvas=48"]
    done = subprocess.run(["bash", str(SCRIPT.with_name("claims_gpu.sh")), *tiny], env=env, capture_output=True)
    assert done.returncode == 0, done.stdout.decode()[-2000:] + done.stderr.decode()[-2000:]
    with tarfile.open(tmp_path / "out" / "claims-full.tar.gz") as archive:
        names = set(archive.getnames())
    kept = "claims-full/cram/runs/cluttered-fashion-mnist"
    assert {f"{kept}/{model}/seed0/summary.json" for model in ("spatial_resnet20", "cram_resnet20")} <= names
    assert "claims-full/cram/analyses/cluttered-fashion-mnist/seed0/localization.json" in names
    assert {"claims-full/cram/report.md", "claims-full/status.txt"} <= names
    assert not any(name.endswith((".safetensors", "report.html")) for name in names)  # small files only
