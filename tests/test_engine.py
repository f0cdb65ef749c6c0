"""The training engine end to end on small synthetic data: files, determinism, exact resume, DDP, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import (
    SYNTH,
    after_each_checkpoint,
    cli_resume,
    cli_train,
    forked,
    interrupt_at,
    kill_when,
    metrics,
    resume_here,
    same_weights,
    subprocess_env,
    tiny,
)

from attnlab import AttnlabError
from attnlab.cli import main
from attnlab.train import TrainConfig, load_trained, train
from attnlab.train.rundir import wall_time_before

TIMING = {"epoch_time", "img_per_s", "wall_time"}


def numbers(out: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics(out)]


def test_train_writes_every_file_and_learns(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(out, epochs=6, lr=0.1), log=lambda _: None)
    for name in ("config.yaml", "metrics.jsonl", "model.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    history = metrics(out)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time", "img_per_s"} <= history[0].keys()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["val_acc"] > 0.5  # 4 learnable classes: chance is 0.25
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for key in ("val_acc", "test_acc", "params", "flops", "wall_time_s", "train_img_per_s", "versions", "device"):
        assert key in saved
    assert saved["params"] == sum(p.numel() for p in load_trained(out)[0].parameters())
    assert saved["flops"] > 2 * saved["params"]  # convs reuse weights over positions
    assert len(list((out / "checkpoints").glob("epoch-*.json"))) == 2  # only the newest two are kept
    assert TrainConfig.from_yaml(out / "config.yaml") == tiny(out, epochs=6, lr=0.1)


def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    train(tiny(tmp_path / "a"), log=lambda _: None)
    train(tiny(tmp_path / "b"), log=lambda _: None)
    train(tiny(tmp_path / "c", seed=1), log=lambda _: None)
    assert numbers(tmp_path / "a") == numbers(tmp_path / "b")
    assert same_weights(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    assert numbers(tmp_path / "a") != numbers(tmp_path / "c")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cram_trains_with_the_equivariance_term(tmp_path, precision):
    """The penalty's extra forward on T(x) trains alongside the loss (and changes the weights), in fp32 and bf16."""
    for name, weight in (("plain", 0.0), ("equi", 0.5)):
        train(
            tiny(
                tmp_path / name,
                model="cram_resnet20",
                epochs=1,
                precision=precision,
                mechanisms={"cram": {"equivariance": weight}},
            ),
            log=lambda _: None,
        )
    assert numbers(tmp_path / "equi")[0]["train_loss"] > 0
    assert not same_weights(tmp_path / "plain" / "model.safetensors", tmp_path / "equi" / "model.safetensors")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_eval_command_reproduces_the_training_evaluation_bit_for_bit(tmp_path, capsys, precision):
    """The run's own data (subset and seed: the same normalisation), precision, memory layout and batch size: eval
    gives summary.json's val and test numbers exactly (another --batch-size: within float rounding)."""
    out = tmp_path / "run"
    summary = train(tiny(out, subset=200, seed=3, precision=precision), log=lambda _: None)
    for split in ("val", "test"):
        assert main(["eval", "--checkpoint", str(out), "--split", split]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["acc"], result["loss"]) == (summary[f"{split}_acc"], summary[f"{split}_loss"])
        assert main(["eval", "--checkpoint", str(out), "--split", split, "--batch-size", "7"]) == 0
        result = json.loads(capsys.readouterr().out)  # another batch size: other float rounding only
        assert result["loss"] == pytest.approx(summary[f"{split}_loss"], rel=1e-4)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--dataset",
                "synthetic",
                "--split",
                "val",
                *[f"--data-arg={k}={v}" for k, v in SYNTH.items()],
            ]
        )
        == 0
    )


def test_a_train_that_fails_before_any_work_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    assert main(["train", "--dataset", "fashion_mnist", "--out", str(out)]) == 2
    assert "unknown dataset 'fashion_mnist'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_says_how_to_continue_the_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    with after_each_checkpoint(monkeypatch, interrupt_at(1)):
        assert main(cli_train(out, epochs=2)[3:] + ["--no-progress"]) == 130
    assert f"attnlab: interrupted; to continue: attnlab train --out {out} --resume" in capsys.readouterr().err


def test_killed_run_resumes_to_bit_identical_weights(tmp_path, cli_reference):
    out = tmp_path / "killed"
    kill_when(cli_train(out), out / "checkpoints" / "epoch-0002.json")
    assert not (out / "summary.json").exists()
    # refuses to overwrite without --resume, and changes nothing
    before = sorted(p.name for p in out.rglob("*"))
    refused = forked(cli_train(out))
    assert refused.wait() == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr
    assert sorted(p.name for p in out.rglob("*")) == before
    # `attnlab train --out RUN --resume` takes the rest of the settings from the run itself
    resumed = cli_resume(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert same_weights(cli_reference / "model.safetensors", out / "model.safetensors")
    assert numbers(cli_reference) == numbers(out)
    # the wall time goes on from the killed process's, it does not start again at the resume
    records = metrics(out)
    assert all(b["wall_time"] >= a["wall_time"] + b["epoch_time"] for a, b in zip(records, records[1:]))
    assert json.loads((out / "summary.json").read_text())["wall_time_s"] > records[-1]["wall_time"]


def test_wall_time_before_a_resume_falls_back_to_the_training_seconds_of_old_checkpoints():
    assert wall_time_before([]) == 0.0
    assert wall_time_before([{"epoch_time": 2.0}, {"epoch_time": 3.0}]) == 5.0
    assert wall_time_before([{"epoch_time": 2.0, "wall_time": 4.0}, {"epoch_time": 3.0, "wall_time": 9.5}]) == 9.5


def test_resume_without_checkpoint_starts_from_scratch(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny(out), resume=True, log=lambda _: None)
    assert summary["epochs"] == 2 and len(metrics(out)) == 2


def test_resume_refuses_changed_settings(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, epochs=1), log=lambda _: None)
    with pytest.raises(ValueError, match="lr=0.05 but this command asks for 0.1"):
        train(tiny(out, epochs=2, lr=0.1), resume=True, log=lambda _: None)
    summary = train(tiny(out, epochs=2), resume=True, log=lambda _: None)  # more epochs is fine
    assert [m["epoch"] for m in metrics(out)] == [1, 2] and summary["epochs"] == 2


def test_torchrun_ddp_two_processes_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "attnlab",
        *cli_train(out, epochs=2)[3:],
    ]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(metrics(out)) == 2  # rank 0 alone wrote
    assert done.stdout.count("epoch 2/2") == 1
    # the shards cover the data: each epoch saw (almost) all training images
    assert metrics(out)[0]["img_per_s"] > 0 and summary["val_acc"] > 0.3


# ------------------------------------------------------------------------------------------ checkpoints inside epochs


@pytest.mark.parametrize("seed", [7])
def test_sigkill_inside_an_epoch_resumes_on_the_same_batches_to_bit_identical_weights(
    tmp_path, cli_reference, seed, capsys
):
    import random

    rng = random.Random(seed)
    epoch, step = rng.randrange(0, 3), rng.randrange(1, 5)  # 4 epochs of 5 steps: a step strictly inside one
    out = tmp_path / "killed"
    marker = out / "checkpoints" / f"epoch-{epoch:04d}-step-{step:06d}.json"
    kill_when(cli_train(out) + ["--checkpoint-every", "1"], marker)
    kept = sorted(p.name for p in (out / "checkpoints").glob("*.json"))
    assert len(kept) <= 2 and marker.name in kept or any("step" in k for k in kept), kept
    assert resume_here(out) == 0
    resumed = capsys.readouterr().out
    assert "at step" in resumed or "after epoch" in resumed
    assert same_weights(cli_reference / "model.safetensors", out / "model.safetensors")
    assert numbers(cli_reference) == numbers(out)  # the epoch's sums went on from the checkpoint's


def test_stop_signal_checkpoints_at_the_next_step_and_the_resumed_run_is_bit_identical(tmp_path, cli_reference):
    import signal
    import time

    out = tmp_path / "stopped"
    cmd = cli_train(out) + ["--checkpoint-every", "1h"]  # the clock never asks: only the signal checkpoints
    proc = forked(cmd)
    marker = out / "checkpoints" / "epoch-0001.json"
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr[-500:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 128 + signal.SIGUSR1, proc.stderr
    err = proc.stderr
    assert "stopped by SIGUSR1 at step" in err and "continue with --resume" in err and "Traceback" not in err
    inside = [p for p in (out / "checkpoints").glob("epoch-*-step-*.json")]
    assert len(inside) == 1 and not (out / "summary.json").exists()
    assert resume_here(out) == 0
    assert same_weights(cli_reference / "model.safetensors", out / "model.safetensors")


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "checkpoint_every must be a number of steps (500) or a duration (10min, 90s, 2h), got '0'"),
        ("10 parsecs", "got '10 parsecs'"),
    ],
)
def test_a_bad_checkpoint_interval_is_one_line(tmp_path, capsys, value, message):
    assert main(cli_train(tmp_path / "run")[3:] + ["--checkpoint-every", value]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------------- gradient accumulation


def test_accumulating_two_batches_of_b_steps_as_one_batch_of_2b(tmp_path):
    """Without BN (whose batch statistics depend on the batch's size) the two differ only by float rounding: the same
    images in the same order and augmentation, the mean loss of 2B as the mean of two means of B, the same schedule
    of optimiser steps."""
    from torch import nn

    from attnlab.train.classify import Classification
    from attnlab.train.engine import run_task

    class WithoutBN(Classification):
        def build_model(self, cfg, data):
            return nn.Sequential(
                nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, SYNTH["num_classes"])
            )

    quiet = {"log": lambda _: None, "progress": False}
    one = run_task(WithoutBN(), tiny(tmp_path / "one", batch_size=64, precision="fp32"), **quiet)
    two = run_task(WithoutBN(), tiny(tmp_path / "two", batch_size=32, accumulate=2, precision="fp32"), **quiet)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two ways of summing: rounding differs, as it must
    assert [m["lr"] for m in metrics(tmp_path / "one")] == [m["lr"] for m in metrics(tmp_path / "two")]
    assert one["val_acc"] == pytest.approx(two["val_acc"], abs=1 / 64)


def test_accumulating_more_batches_than_an_epoch_has_is_one_line(tmp_path):
    with pytest.raises(AttnlabError, match=r"^accumulate=9: an epoch has only 5 batch\(es\) of 64$"):
        train(tiny(tmp_path / "run", accumulate=9), log=lambda _: None)


# ------------------------------------------------------------------------------------------- moving average (EMA)


def test_ema_is_evaluated_saved_and_resumed_inside_an_epoch_bit_for_bit(tmp_path, monkeypatch):
    whole = train(tiny(tmp_path / "whole", ema_decay=0.9), log=lambda _: None)
    assert {"val_ema_acc", "val_ema_loss", "test_ema_acc", "test_ema_loss"} <= whole.keys()
    assert "val_ema_acc" in metrics(tmp_path / "whole")[-1]
    raw, ema = (load_file(str(tmp_path / "whole" / name)) for name in ("model.safetensors", "model_ema.safetensors"))
    assert raw.keys() == ema.keys() and not all(torch.equal(raw[k], ema[k]) for k in raw)

    with after_each_checkpoint(monkeypatch, interrupt_at(1, 3)), pytest.raises(KeyboardInterrupt):
        train(tiny(tmp_path / "stopped", ema_decay=0.9, checkpoint_every=1), log=lambda _: None)
    resumed = train(tiny(tmp_path / "stopped", ema_decay=0.9, checkpoint_every=1), resume=True, log=lambda _: None)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert same_weights(tmp_path / "whole" / name, tmp_path / "stopped" / name), name
    assert resumed["test_ema_acc"] == whole["test_ema_acc"] and numbers(tmp_path / "whole") == numbers(
        tmp_path / "stopped"
    )


def test_ema_decay_outside_0_1_is_one_line(tmp_path):
    with pytest.raises(AttnlabError, match=r"^ema_decay must be in \(0, 1\), got 1.0$"):
        tiny(tmp_path / "run", ema_decay=1.0)
