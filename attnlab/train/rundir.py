"""The output folder of a run: what lives there, who may write it, and refusing to overwrite a finished one."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import AttnlabError
from ..io import check_writable, make_dir, write_text_atomic

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "model_ema.safetensors",
    "checkpoints",
)


def wall_time_before(history: list[dict]) -> float:
    """Seconds the processes before a resume spent on a run, from its per-epoch records (``wall_time``, since the run
    began); for checkpoints that predate those, their training seconds (no validation or start-up: a lower bound)."""
    if not history:
        return 0.0
    return history[-1].get("wall_time", sum(h["epoch_time"] for h in history))


class RunDir:
    """Paths of a run's files under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.summary = self.root / "summary.json"
        self.weights = self.root / "model.safetensors"
        self.ema_weights = self.root / "model_ema.safetensors"  # the weights' moving average (``ema_decay``)
        self.checkpoints = self.root / "checkpoints"
        self.lock = self.root / ".lock"

    @property
    def finished(self) -> bool:
        """A run is finished iff its ``summary.json`` exists (the engine writes it last, atomically)."""
        return self.summary.is_file()

    def history(self) -> list[dict]:
        """The per-epoch records of ``metrics.jsonl`` (none if the file is missing)."""
        if not self.metrics.is_file():
            return []
        try:
            return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            raise AttnlabError(f"{self.metrics}: unreadable ({e})") from None

    def write_history(self, records: list[dict]) -> None:
        """Replace ``metrics.jsonl`` atomically with ``records``, one JSON object per line (see `history`)."""
        write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in records))

    def last_good_state(self, epochs_done: int) -> str:
        """Where a run that diverged after ``epochs_done`` epochs (each ends in a checkpoint) can be continued from,
        for its error message."""
        if epochs_done:
            return f"the last good checkpoint (epoch {epochs_done}) is in {self.checkpoints}"
        return "no epoch finished, so there is no checkpoint to continue from"

    def has_run(self) -> bool:
        return any((self.root / name).exists() for name in RUN_FILES)

    def prepare(self, resume: bool) -> None:
        """Create the folder; refuse an existing run unless resuming, and an unwritable place always."""
        check_writable(self.root, "--out")
        if self.has_run() and not resume:
            raise AttnlabError(
                f"--out {self.root}: holds an earlier run; pass --resume to continue it, or pick another --out"
            )
        make_dir(self.root, "--out")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``OUT/.lock`` for the duration; a second process is refused, a stale lock (dead owner) is cleared."""
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and _alive(owner):
                    raise AttnlabError(
                        f"--out {self.root}: in use by process {owner['pid']} on {owner['host']} "
                        f"(remove {self.lock} if that is wrong)"
                    ) from None
                self.lock.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        else:
            raise AttnlabError(f"--out {self.root}: could not take {self.lock}")
        try:
            yield
        finally:
            self.lock.unlink(missing_ok=True)

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.lock.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written by a process that died: treat as stale


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, so respect the lock
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return not _zombie(int(owner["pid"]))


def _zombie(pid: int) -> bool:
    """A process that has exited but was not reaped yet (e.g. a worker orphaned by a killed parent, under an init that
    does not reap): it holds nothing, so its lock is stale. Linux only; elsewhere False."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")
