"""Files the project reads and writes, in one place: atomic writes (a reader never sees half a file), YAML settings,
YAML scalars typed on the command line, JSON and CSV. Every failure is a one-line `AttnlabError` naming the file."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import AttnlabError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target`` atomically, on failure it goes."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes owner-only files; give the usual permissions
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files that a killed writer left in ``directory`` (call only while holding its lock)."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------- YAML


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line `AttnlabError` saying what is wrong with the file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise AttnlabError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise AttnlabError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AttnlabError(f"{path}: a config must be a mapping of settings, got {type(values).__name__}")
    return values


def yaml_scalar(text: str) -> Any:
    """A value typed as text (``key=value`` options) read as YAML: ``0.1`` a number, ``[1,2]`` a list, ``gate`` a
    string, plus the numbers YAML 1.1 leaves as strings (``1e-3``); text YAML cannot read stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def key_value(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, yaml_scalar(value))``; ValueError when there is no ``=`` or no key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml_scalar(value)


# ---------------------------------------------------------------------------------------------------------- JSON, CSV


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AttnlabError(f"{path}: unreadable ({e})") from None


def write_json_atomic(path: Path, value: Any, indent: int | None = 2) -> None:
    write_text_atomic(Path(path), json.dumps(value, indent=indent) + "\n")


def jsonable(value: Any) -> Any:
    """Plain JSON: numpy and torch numbers to Python, NaN/inf to null, tuples to lists, keys to strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and numpy scalars
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> str:
    """CSV text; floats are written in full (``repr``) so the file round-trips to the same numbers."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in fields})
    return buffer.getvalue()


def write_csv(path: str | Path, rows: Sequence[dict[str, Any]], fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically, creating its folder; columns: ``fields`` or the first row's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_csv(rows, list(fields) if fields is not None else list(rows[0]) if rows else []))
    return path
