"""Tiny training runs shared by the engine and reliability tests: synthetic data, a few hundred images, seconds each."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from attnlab.train import TrainConfig

SYNTH = {"shape": [1, 12, 12], "size": 384, "test_size": 128, "num_classes": 4}


def tiny(out: Path, **overrides) -> TrainConfig:
    """resnet20 on 320 synthetic 12×12 images (5 steps per epoch), 2 epochs unless overridden."""
    values = dict(
        model="resnet20",
        dataset="synthetic",
        dataset_options=SYNTH,
        epochs=2,
        batch_size=64,
        val_size=64,
        out=str(out),
        lr=0.05,
    )
    return TrainConfig(**{**values, **overrides})


def cli_train(out: Path, epochs: int = 4) -> list[str]:
    """The same run as `tiny` as an `attnlab train` command line."""
    return [
        sys.executable,
        "-m",
        "attnlab",
        "train",
        "--model",
        "resnet20",
        "--dataset",
        "synthetic",
        *[f"--data-arg={k}={json.dumps(v)}" for k, v in SYNTH.items()],
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--val-size",
        "64",
        "--lr",
        "0.05",
        "--out",
        str(out),
    ]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@contextlib.contextmanager
def after_each_checkpoint(monkeypatch, action: Callable[[Path, int, int | None], None]) -> Iterator[None]:
    """Within the block, the engine calls ``action(directory, epoch, step)`` right after it writes each checkpoint
    (``step`` None at an epoch's end); the engine's own writer is back after the block."""
    import attnlab.train.engine as engine

    save = engine.save_checkpoint

    def saved_then_acted(directory, epoch, states, info, step=None):
        path = save(directory, epoch, states, info, step=step)
        action(Path(directory), epoch, step)
        return path

    monkeypatch.setattr(engine, "save_checkpoint", saved_then_acted)
    try:
        yield
    finally:
        monkeypatch.setattr(engine, "save_checkpoint", save)


def interrupt_at(epoch: int, step: int | None = None) -> Callable[[Path, int, int | None], None]:
    """An `after_each_checkpoint` action: Ctrl-C (KeyboardInterrupt) right after the checkpoint of ``epoch`` finished
    epochs (``step`` steps into the next one: a checkpoint inside an epoch)."""

    def interrupt(directory: Path, at_epoch: int, at_step: int | None) -> None:
        if (at_epoch, at_step) == (epoch, step):
            raise KeyboardInterrupt

    return interrupt


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_when(cmd: list[str], marker: Path, timeout: float = 120) -> None:
    """Start ``cmd`` (an ``attnlab`` command line, `forked`) and SIGKILL it as soon as ``marker`` exists (e.g. a run's
    first checkpoint)."""
    import signal
    import time

    proc = forked(cmd)
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "the command ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def resume_here(out: Path) -> int:
    """``attnlab train --out OUT --resume`` in this process (a fresh one costs seconds of imports; `cli_resume` is
    that, for the tests of the command itself): the exit code."""
    from attnlab.cli import main

    return main(["train", "--out", str(out), "--resume", "--no-progress"])


def cli_resume(out: Path) -> Forked:
    """``attnlab train --out OUT --resume`` in a fresh process (`forked`), waited for: the rest of the settings come
    from the run itself."""
    done = forked(["train", "--out", str(out), "--resume"])
    done.wait()
    return done


# ------------------------------------------------------------------------------------------- forked CLI processes

FORKED_PRELOAD = [
    "torch",
    "torchvision",
    "timm",
    "attnlab.cli",
    "attnlab.cli.run",
    "attnlab.cli.compare",
    "attnlab.train.engine",
    "attnlab.experiment.runner",
    "tiny_runs",
]
"""What the fork server imports once, so that each `forked` command starts without paying these imports again."""

_forkserver = None
_logs: Path | None = None  # the stdout/stderr files of this process's forked commands, removed at its exit


def _context():
    """A forkserver context whose server has the training path imported (the server itself never runs torch, so a
    child starts as clean as a fresh interpreter that imported the same modules)."""
    global _forkserver, _logs
    if _forkserver is None:
        import atexit
        import multiprocessing
        import shutil
        import tempfile
        from multiprocessing import forkserver

        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(FORKED_PRELOAD)
        # reap the server (and so count its CPU and its children's) before this process exits
        atexit.register(forkserver._forkserver._stop)
        _logs = Path(tempfile.mkdtemp(prefix="forked-"))
        atexit.register(shutil.rmtree, _logs, True)
    return _forkserver


class Forked:
    """An ``attnlab`` command running in its own process, forked from a server that already imported the training
    path: its pid, signals, exit status (``-SIG`` when a signal killed it) and process group are a real process's;
    what it writes to fds 1 and 2 goes to two files, read by `stdout`/`stderr`."""

    def __init__(self, process, out: Path, err: Path):
        self._process, self._out, self._err = process, out, err
        self.pid = process.pid

    def poll(self) -> int | None:
        return None if self._process.is_alive() else self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise TimeoutError(f"the command did not end within {timeout} s")
        return self._process.exitcode

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._process.kill()

    @property
    def stdout(self) -> str:
        return self._out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(errors="replace")


def forked(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    prelude: str | None = None,
    new_session: bool = False,
) -> Forked:
    """Start ``attnlab ARGV`` (an argv of `cli_train` et al. may keep its ``python -m attnlab`` head) as
    `subprocess.Popen` would, in well under a second instead of ~10 CPU-s of imports. ``prelude``: Python source
    run in the child first, as ``python -c PRELUDE ARGV`` would (``sys.argv[1:]`` is ARGV; it calls `main` itself).
    Keep a real interpreter where its start-up is what is tested (imports, tracebacks at exit, torchrun), or where an
    environment variable must act that torch, timm or attnlab read once at import (the server's values hold)."""
    import tempfile

    if argv[1:3] == ["-m", "attnlab"]:
        argv = argv[3:]
    context = _context()
    logs = Path(tempfile.mkdtemp(dir=_logs))
    out, err = logs / "stdout", logs / "stderr"
    out.touch()
    err.touch()
    env = subprocess_env() if env is None else env
    process = context.Process(
        target=_run_cli, args=(list(argv), dict(env), str(cwd or os.getcwd()), str(out), str(err), prelude, new_session)
    )
    process.start()
    return Forked(process, out, err)


def _run_cli(argv, env, cwd, out, err, prelude, new_session) -> None:
    """The child of `forked`: the environment, working directory, fds 1/2 and session of a fresh process."""
    import warnings

    if new_session:
        os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    if env.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(line_buffering=True)
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["attnlab", *argv]
    if prelude is not None:
        exec(compile(prelude, "<prelude>", "exec"), {"__name__": "__main__"})
        return
    from attnlab.cli import main

    sys.exit(main(argv))
