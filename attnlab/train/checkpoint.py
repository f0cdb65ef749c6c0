"""Checkpoints that cannot run code, are never half-written, and survive a corrupt newest file.

A checkpoint is a pair: ``NAME.safetensors`` (every tensor: weights, optimiser buffers, RNG states) and ``NAME.json``
(everything else, plus the SHA-256 of the tensor file). The tensor file is written first, the JSON last, each to a
temporary file that is fsynced and renamed over the target, so a crash leaves either the old pair or the new one. A
checkpoint counts only if its JSON parses and its checksum matches; `latest_checkpoint` falls back to the previous
one otherwise. Loading uses safetensors (no pickle) and checks keys, shapes and dtypes before touching the model.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import AttnlabError
from ..io import atomic_path, write_text_atomic

KEEP = 2  # checkpoints kept on disk: the newest and one to fall back on
_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?")


def save_tensors_atomic(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` to ``target`` as safetensors, atomically; returns the file's SHA-256."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            digest = sha256(tmp)
    except OSError as e:
        raise AttnlabError(
            f"{target}: could not write checkpoint ({e.strerror or e}); the previous one is intact"
        ) from None
    return digest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a torch.save zip, a truncated file) is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"{path}: no such checkpoint file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AttnlabError(f"{path}: not a valid safetensors file ({reason})") from None


def load_state_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``tensors`` into ``module`` only if keys, shapes and dtypes all match; otherwise one line naming the first
    problem."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AttnlabError(f"{source}: missing {len(missing)} tensor(s), e.g. '{missing[0]}' (wrong model?)")
    if unexpected:
        raise AttnlabError(f"{source}: unexpected {len(unexpected)} tensor(s), e.g. '{unexpected[0]}' (wrong model?)")
    for key, ref in expected.items():
        got = tensors[key]
        if got.shape != ref.shape:
            raise AttnlabError(f"{source}: '{key}' has shape {tuple(got.shape)}, the model needs {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise AttnlabError(f"{source}: '{key}' has dtype {got.dtype}, the model needs {ref.dtype}")
    module.load_state_dict(tensors, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints: flatten the optimiser / RNG states into tensors + JSON, and back.


def _split_state(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested state (dicts, lists) into ``tensors`` and leave a ``{"$tensor": key}`` marker."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"$tensor": prefix}
    if isinstance(state, dict):
        return {
            "$dict": [
                [_split_state(k, f"{prefix}.k{i}", tensors), _split_state(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(state.items())
            ]
        }
    if isinstance(state, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    return state


def _join_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict) and "$tensor" in state:
        return tensors[state["$tensor"]]
    if isinstance(state, dict) and "$dict" in state:
        return {_join_state(k, tensors): _join_state(v, tensors) for k, v in state["$dict"]}
    if isinstance(state, list):
        return [_join_state(v, tensors) for v in state]
    return state


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """``epoch-NNNN`` after ``epoch`` completed epochs, ``epoch-NNNN-step-SSSSSS`` ``step`` steps into the next."""
    return f"epoch-{epoch:04d}" if step is None else f"epoch-{epoch:04d}-step-{step:06d}"


def _order(path: Path) -> tuple[int, int]:
    """Where a checkpoint file lies in the run: (completed epochs, steps into the next; -1 at the epoch's end)."""
    found = _NAME.fullmatch(path.stem)
    return (int(found[1]), -1 if found[2] is None else int(found[2]))


def _in_order(directory: Path) -> list[Path]:
    return sorted((p for p in Path(directory).glob("epoch-*.json") if _NAME.fullmatch(p.stem)), key=_order)


def save_checkpoint(
    directory: Path, epoch: int, states: dict[str, Any], info: dict[str, Any], step: int | None = None
) -> Path:
    """Write checkpoint `checkpoint_name` ``(epoch, step)`` into ``directory`` and keep only the newest `KEEP`.

    Args:
        directory: the run's checkpoint folder.
        epoch: number of completed epochs.
        step: steps taken in the next epoch, for a checkpoint inside an epoch (None: at an epoch's end).
        states: named states (``model``, ``optimizer``, ``scheduler``, ``rng``, ...): nested dicts/lists of tensors
            and JSON values.
        info: JSON-serialisable extras (metrics history, config).
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(epoch, step)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {key: _split_state(state, key, tensors) for key, state in states.items()}
    digest = save_tensors_atomic(directory / f"{name}.safetensors", tensors)
    record = {"epoch": epoch, "sha256": digest, "states": skeleton, "info": info}
    try:
        write_text_atomic(directory / f"{name}.json", json.dumps(record))
    except OSError as e:
        raise AttnlabError(f"{directory / name}.json: could not write checkpoint ({e.strerror or e})") from None
    for old in _in_order(directory)[:-KEEP]:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    for orphan in directory.glob("epoch-*.safetensors"):  # tensor files whose JSON never got written
        if not orphan.with_suffix(".json").exists() and orphan.stem != name:
            orphan.unlink(missing_ok=True)
    return directory / f"{name}.json"


def _read_checkpoint(json_path: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    try:
        record = json.loads(json_path.read_text())
        tensor_path = json_path.with_suffix(".safetensors")
        if sha256(tensor_path) != record["sha256"]:
            raise AttnlabError(f"{tensor_path}: checksum mismatch")
        tensors = load_tensors(tensor_path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AttnlabError(f"{json_path}: unreadable checkpoint ({e})") from None
    states = {key: _join_state(state, tensors) for key, state in record["states"].items()}
    return record["epoch"], states, record["info"]


def latest_checkpoint(directory: Path) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """``(epoch, states, info)`` of the newest intact checkpoint in ``directory``, or ``None`` if there is none.

    A newest checkpoint that is corrupt is skipped with a warning and the previous one is used.
    """
    for json_path in reversed(_in_order(directory)):
        try:
            return _read_checkpoint(json_path)
        except AttnlabError as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}", stacklevel=2)
    return None
