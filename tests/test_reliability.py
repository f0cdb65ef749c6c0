"""Faults during training and loading: kills at random moments, corrupt and malicious files, full disks, NaNs, locks."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import tiny_runs
import torch
from safetensors.torch import load_file, save_file
from tiny_runs import forked, same_weights, subprocess_env

from attnlab import AttnlabError
from attnlab.cli import main
from attnlab.train import TrainingDiverged, load_trained, train
from attnlab.train import checkpoint as ckpt
from attnlab.train.rundir import RunDir

tiny = functools.partial(tiny_runs.tiny, epochs=3)
cli_train = functools.partial(tiny_runs.cli_train, epochs=5)


# ------------------------------------------------------------------------------------------------ kills and resumes


def test_sigkill_at_random_moments_then_resume_gives_bit_identical_weights(tmp_path):
    reference = tmp_path / "reference"  # 5 epochs, unlike `cli_reference`: more moments to kill in
    started = time.perf_counter()
    assert main([*cli_train(reference)[3:], "--no-progress"]) == 0
    whole = time.perf_counter() - started  # a forked run starts at once: kill within its first third, on any machine
    out = tmp_path / "victim"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(12):
        if kills == 3:  # enough moments: the rest of the run is resumed in this process
            assert main([*cli_train(out)[3:], "--resume", "--no-progress"]) == 0
            break
        proc = forked(cli_train(out) + (["--resume"] if attempt else []))
        time.sleep(rng.uniform(0.05, 0.35) * whole)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr[-500:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    else:
        assert main([*cli_train(out)[3:], "--resume", "--no-progress"]) == 0
    assert kills >= 2, "the kills must have interrupted the run"
    assert same_weights(reference / "model.safetensors", out / "model.safetensors")
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import attnlab.train.checkpoint as ckpt
    from attnlab.cli import main
    target, original = int(sys.argv[1]), ckpt.save_file
    calls = []
    def dying_save_file(tensors, path, metadata=None):
        original(tensors, path, metadata=metadata)   # the temporary file is complete, not yet renamed
        calls.append(path)
        if len(calls) == target:
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save_file = dying_save_file
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("dies_on_save", [1, 3])
def test_kill_while_a_checkpoint_is_written_then_resume(tmp_path, dies_on_save, cli_reference):
    out = tmp_path / "victim"  # 4 epochs, as `cli_reference`
    died = forked([str(dies_on_save), *cli_train(out, epochs=4)[3:]], prelude=KILL_DURING_SAVE)
    assert died.wait() == -signal.SIGKILL, died.stderr[-500:]
    # the half-saved checkpoint is invisible: only the epochs before it count
    names = sorted(p.name for p in (out / "checkpoints").glob("epoch-*.json"))
    assert names == [f"epoch-{e:04d}.json" for e in range(max(1, dies_on_save - 2), dies_on_save)]
    assert main([*cli_train(out, epochs=4)[3:], "--resume", "--no-progress"]) == 0
    assert same_weights(cli_reference / "model.safetensors", out / "model.safetensors")
    assert not list(out.rglob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back_to_previous_with_a_warning(tmp_path):
    reference = tmp_path / "reference"
    train(tiny(reference), log=lambda _: None)
    out = tmp_path / "run"
    train(tiny(out), log=lambda _: None)
    newest = out / "checkpoints" / "epoch-0003.safetensors"
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the tensor data: the header still parses, the checksum does not match
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        epoch, _, _ = ckpt.latest_checkpoint(out / "checkpoints")
    assert epoch == 2
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        train(tiny(out), resume=True, log=lambda _: None)
    assert same_weights(reference / "model.safetensors", out / "model.safetensors")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny(out, epochs=1), log=lambda _: None)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    original = ckpt.save_file

    def full_disk(tensors, path, metadata=None):
        original(tensors, path, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(AttnlabError, match="No space left on device.*previous one is intact"):
        train(tiny(out, epochs=2), resume=True, log=lambda _: None)
    after = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    assert after == before  # nothing half-written, nothing removed
    assert ckpt.latest_checkpoint(out / "checkpoints")[0] == 1


# ------------------------------------------------------------------------------------------------------------ locks


def test_second_process_on_the_same_out_is_refused_and_stale_lock_is_cleared(tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False)
    with run.locked():
        with pytest.raises(AttnlabError, match="in use by process"):
            train(tiny(run.root), resume=True, log=lambda _: None)
    assert not run.lock.exists()
    # a lock left by a process that died is stale
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    train(tiny(run.root, epochs=1), resume=True, log=lambda _: None)
    assert (run.root / "summary.json").exists() and not run.lock.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_lock_of_an_exited_but_unreaped_process_is_stale(tmp_path):
    """An orphaned worker whose init does not reap it stays a zombie: it holds nothing, so its lock is cleared."""
    run = RunDir(tmp_path / "run")
    run.prepare(resume=False)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while "Z" not in Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]:
            assert time.time() < deadline
            time.sleep(0.01)
        run.lock.write_text(json.dumps({"pid": zombie.pid, "host": os.uname().nodename}))
        with run.locked():
            assert json.loads(run.lock.read_text())["pid"] == os.getpid()
    finally:
        zombie.wait()


def test_concurrent_cli_trainings_on_one_out_the_second_refuses(tmp_path, capsys):
    """The first training holds the lock from its first epoch line on, and trains on (100,000 epochs) until it is
    killed, so it is alive and holding the lock for as long as the second (here, in this process) takes."""
    out = tmp_path / "run"
    first = forked(cli_train(out, epochs=100_000), env={**subprocess_env(), "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while not first.stdout.startswith("epoch 1/"):  # the first epoch ended, lock held
            assert first.poll() is None and time.time() < deadline, first.stderr[-500:]
            time.sleep(0.02)
        assert (out / ".lock").exists() and first.poll() is None
        assert main([*cli_train(out, epochs=500)[3:], "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "in use by process" in err and "Traceback" not in err
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------------------------ safe loading


def _trained(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    train(tiny(out, epochs=1), log=lambda _: None)
    return out


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_place_of_weights_runs_no_code(tmp_path):
    out = _trained(tmp_path)
    marker = tmp_path / "pwned"
    (out / "model.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(AttnlabError, match="not a valid safetensors file") as info:
        load_trained(out)
    assert not marker.exists() and "\n" not in str(info.value)
    # the same pickle as a checkpoint: skipped (with a warning), never unpickled
    for f in (out / "checkpoints").glob("*.safetensors"):
        f.write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.warns(UserWarning):
        assert ckpt.latest_checkpoint(out / "checkpoints") is None
    assert not marker.exists()


def _torch_save_zip(path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(3)}, path)
    assert zipfile.is_zipfile(path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _retensor(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    meta = {"attnlab_model": "resnet20", "num_classes": "4", "in_chans": "1", "model_kwargs": "{}"}
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "damage, message",
    [
        (_torch_save_zip, "not a valid safetensors file"),
        (_truncate, "not a valid safetensors file"),
        (lambda p: p.write_bytes(b""), "not a valid safetensors file"),
        (lambda p: _retensor(p, lambda t: t.__setitem__("fc.weight", torch.zeros(5, 64))), "'fc.weight' has shape"),
        (lambda p: _retensor(p, lambda t: t.__setitem__("fc.bias", t["fc.bias"].double())), "'fc.bias' has dtype"),
        (lambda p: _retensor(p, lambda t: t.pop("conv1.weight")), "missing 1 tensor"),
        (lambda p: _retensor(p, lambda t: t.__setitem__("extra", torch.zeros(1))), "unexpected 1 tensor"),
        (lambda p: save_file({"x": torch.zeros(1)}, str(p)), "not an attnlab model file"),
    ],
)
def test_bad_weight_files_are_refused_with_one_line(tmp_path, damage, message):
    out = _trained(tmp_path)
    damage(out / "model.safetensors")
    with pytest.raises(AttnlabError, match=message) as info:
        load_trained(out)
    assert "\n" not in str(info.value)


def test_no_code_path_calls_torch_load_without_weights_only():
    root = Path(__file__).resolve().parents[1] / "attnlab"
    offenders = [
        f"{path}:{n}"
        for path in root.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if ("torch.load(" in line and "weights_only=True" not in line) or "pickle.load(" in line
    ]
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------- numerical faults


def _poison(monkeypatch, at_step: int | None):
    """Make the model's output NaN on training step ``at_step`` of the run (counted over the whole run; None: every
    step)."""
    import attnlab.train.classify as engine

    original = engine.build_model
    steps = {"n": 0}

    def build(cfg, bundle):
        model = original(cfg, bundle)

        def hook(module, args, output):
            if module.training:
                steps["n"] += 1
                if at_step is None or steps["n"] == at_step:
                    return output * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(engine, "build_model", build)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=8)  # 5 steps per epoch: the NaN comes in epoch 2
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 2.*last good checkpoint") as info:
        train(tiny(out), log=lambda _: None)
    assert "\n" not in str(info.value)
    assert ckpt.latest_checkpoint(out / "checkpoints")[0] == 1
    assert not (out / "summary.json").exists()


def test_nan_loss_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=2)
    with pytest.raises(TrainingDiverged, match="epoch 1; no epoch finished, so there is no checkpoint to continue"):
        train(tiny(tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_can_be_skipped_by_option(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=8)
    out = tmp_path / "run"
    summary = train(tiny(out, nonfinite="skip", grad_clip=1.0), log=lambda _: None)
    skipped = [json.loads(line)["skipped_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert skipped == [0, 1, 0]
    weights = load_file(str(out / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert summary["test_acc"] > 0


def test_an_epoch_whose_every_step_was_skipped_reports_no_training_loss(tmp_path, monkeypatch):
    _poison(monkeypatch, at_step=None)
    out = tmp_path / "run"
    train(tiny(out, nonfinite="skip", epochs=1), log=lambda _: None)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["skipped_steps"] == 5
    assert record["img_per_s"] * record["epoch_time"] == pytest.approx(320)  # the work done: every image, skipped too
    assert math.isnan(record["train_loss"]) and math.isnan(record["train_acc"])  # not a loss of 0 nobody had
