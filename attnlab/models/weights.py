"""Load a network's weights from a file: safetensors, or a state dict saved by ``torch.save`` (.pth/.pt/.bin),
read with ``weights_only=True`` (no code is ever unpickled).

The file is read by timm's own loader (``timm.models.load_state_dict``): it unwraps timm's training checkpoints
(``state_dict_ema``/``model_ema`` first, as timm does, then ``state_dict``), torchvision's reference-script
checkpoints (``model``) and strips DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes. Keys are then
matched against the model:

- a classifier of another size (or none in the file) is left freshly initialised, with a one-line notice;
- a 3-channel input convolution loaded into a network of other ``in_chans`` is adapted as timm adapts its pretrained
  weights (``adapt_input_conv``), with a notice;
- an attnlab variant loads its base network's weights (``se_resnet50`` from ``resnet50``): the keys only the variant
  has (its attention, AW generators, merges) are expected to be missing and are listed;
- any other missing, unexpected or mis-shaped key is an `AttnlabError` naming the first few.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from timm.models import load_state_dict as timm_load_state_dict
from torch import nn

from ..errors import AttnlabError
from .external import classifier, first_conv

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
SHOWN = 5  # keys named in an error


class WeightsNotice(UserWarning):
    """Something `load_weights` did on purpose that the user should know (a classifier re-initialised, ...)."""


@dataclass
class LoadedWeights:
    """What `load_weights` did.

    Attributes:
        loaded: number of tensors loaded.
        reinitialised: keys left at their fresh initialisation (a classifier of another size).
        new: keys only the model has (an attnlab variant's own modules), left at their initialisation.
        notices: the one-line notices (also issued as `WeightsNotice` warnings).
    """

    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (see the module docstring), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise AttnlabError(f"weights file not found: {path}")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise AttnlabError(f"{path}: weights must be a {', '.join(WEIGHT_SUFFIXES)} file")
    try:
        state = timm_load_state_dict(str(path), use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # safetensors, zip and unpickling errors of every kind: the file is not readable weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnlabError(f"{path}: not a readable state dict ({first})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AttnlabError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return dict(state)


def _strip_wrapper_prefix(state: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a first component every key shares (``model.``, ``backbone.``, ...) when that makes the keys the model's."""
    heads = {k.partition(".")[0] for k in state}
    if len(heads) == 1 and not (state.keys() & own.keys()):
        head = heads.pop() + "."
        stripped = {k.removeprefix(head): v for k, v in state.items()}
        if stripped.keys() & own.keys():
            return stripped
    return state


def _within(key: str, module: str) -> bool:
    return key.startswith(module + ".")


def _base_keys(model: nn.Module) -> set[str] | None:
    """The state-dict keys of an attnlab variant's base network (``se_resnet50`` → ``resnet50``), None otherwise."""
    from . import MODEL_NAMES, _split_name

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if name not in MODEL_NAMES:
        return None
    variant, arch = _split_name(name)
    if not variant or name == arch:
        return None
    import timm

    with torch.device("meta"):
        base = timm.create_model(arch, num_classes=1, in_chans=1)
    return set(base.state_dict())


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN]) + (f" (and {len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def load_weights(
    model: nn.Module, source: str | Path | Mapping[str, torch.Tensor], *, new: Iterable[str] = ()
) -> LoadedWeights:
    """Load weights into ``model`` in place (see the module docstring for what is adapted and what is refused).

    Args:
        model: any network (attnlab, timm, torchvision, a user's).
        source: a weights file, or a state dict.
        new: further keys the model may have that the weights lack (left at their initialisation, listed).
    """
    where = str(source) if isinstance(source, (str, Path)) else "the state dict"
    state = read_weights(source) if isinstance(source, (str, Path)) else dict(source)
    own = model.state_dict()
    state = _strip_wrapper_prefix(state, own)
    report = LoadedWeights()
    head = classifier(model)
    head_name = head[0] if head is not None else None
    conv = first_conv(model)
    conv_key = f"{conv[0]}.weight" if conv is not None else None
    base = _base_keys(model)
    expected_new = set(new) | ((own.keys() - base) if base is not None else set())

    load, unexpected, mismatched, head_mismatch = {}, [], [], False
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
            continue
        target = own[key]
        if value.shape != target.shape:
            if head_name and _within(key, head_name):
                head_mismatch = True
                continue
            if key == conv_key and value.ndim == 4 and value.shape[0] == target.shape[0]:
                value = adapt_input_conv(target.shape[1], value, base_chans=value.shape[1])
                report.notices.append(
                    f"input convolution {conv[0]} adapted from {state[key].shape[1]} to {target.shape[1]} channels"
                )
            else:
                mismatched.append(f"{key} {tuple(value.shape)} for {tuple(target.shape)}")
                continue
        load[key] = value
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    head_missing = [k for k in missing if head_name and _within(k, head_name)]
    variant_new = [k for k in missing if k in expected_new and k not in head_missing]
    other_missing = [k for k in missing if k not in head_missing and k not in expected_new]
    if unexpected:
        unexpected.sort(key=lambda k: k.endswith("num_batches_tracked"))  # name the informative keys first
        raise AttnlabError(f"{where}: {len(unexpected)} key(s) the model does not have: {_shown(unexpected)}")
    if mismatched:
        raise AttnlabError(f"{where}: {len(mismatched)} tensor(s) of another shape: {_shown(mismatched)}")
    if other_missing:
        raise AttnlabError(f"{where}: {len(other_missing)} key(s) of the model are missing: {_shown(other_missing)}")
    if head_mismatch or head_missing:
        report.reinitialised = [k for k in own if _within(k, head_name)]
        for key in report.reinitialised:
            load.pop(key, None)
        outputs = getattr(head[1], "out_features", None)
        why = (
            "the weights have none"
            if head_missing and not head_mismatch
            else "the weights' classifier has another size"
        )
        report.notices.append(f"classifier {head_name} re-initialised for {outputs} classes ({why})")
    if variant_new:
        report.new = variant_new
        modules = sorted({k.rpartition(".")[0] for k in variant_new})
        report.notices.append(
            f"{len(variant_new)} tensor(s) of modules the weights lack, left initialised: {_shown(modules)}"
        )
    model.load_state_dict(load, strict=False)
    report.loaded = len(load)
    for notice in report.notices:
        warnings.warn(f"{where}: {notice}", WeightsNotice, stacklevel=2)
    return report


__all__ = ["LoadedWeights", "WeightsNotice", "load_weights", "read_weights"]
