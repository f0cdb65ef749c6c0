"""Observe what every attention module attends with, without changing the model's outputs.

attnlab's own modules pass their gate, map, rectangle or weight attention through an `AttentionProbe`; timm's and
torchvision's attention modules (and any class given to `register_attention`) are read at their gate, as `gates`
describes. Forward hooks only read: outputs are bit-identical with or without capture.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .gates import Site, attention_sites


class AttentionWarning(UserWarning):
    """A network whose attention `capture_attention` cannot (fully) see."""


class AttentionRecord(dict):
    """``{site path: tensor or dict of tensors}`` from the latest forward.

    Attributes:
        kinds: ``{path: kind}``: ``"channel"`` (B×C×1×1), ``"element"`` (per channel and position), ``"spatial"``
            (B×1×H×W), ``"rectangle"`` (dict: center, size, angle, mask) or ``"weight"`` (B×C_out×C_in×k×k).
        sites: ``{path: Site}``: each site's mechanism (``site.mechanism``, e.g. ``"SEModule"``, ``"CRAM"``) and the
            module whose output it gates.
        unread: ``"path (Class: why)"`` for every module that looks like attention but cannot be read.
    """

    def __init__(self):
        super().__init__()
        self.kinds: dict[str, str] = {}
        self.sites: dict[str, Site] = {}
        self.unread: list[str] = []


def attention_points(model: nn.Module) -> list[Site]:
    """Every readable attention site of ``model``, in definition order (see `gates.attention_sites`)."""
    return attention_sites(model)[0]


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _shaped(value: Any, kind: str) -> Any:
    """Channel gates as B×C×1×1 (ECA's are B×1×C, channels-last SE's B×1×1×C)."""
    if kind == "channel" and isinstance(value, torch.Tensor):
        return value.reshape(value.shape[0], -1, 1, 1)
    return value


def _hooks(site: Site, sites: list[Site], record: AttentionRecord, detach: bool) -> list[Any]:
    """Register the hooks that fill ``record[site.path]``; ``sites`` are all the sites of the same reading."""

    def store(path: str, value: Any) -> None:
        value = _shaped(value, site.kind)
        record[path] = _detached(value) if detach else value

    if site.probe is not None:
        return [site.probe.register_forward_hook(lambda mod, inputs, output: store(site.path, inputs[0]))]
    reading = site.reading
    if reading.read is not None:

        def read(mod: nn.Module, inputs: tuple, output: Any) -> None:
            with torch.no_grad() if detach else contextlib.nullcontext():
                store(site.path, reading.read(mod, inputs, output))

        return [site.module.register_forward_hook(read)]
    gate = site.module.get_submodule(reading.gate)
    if len(sites) == 1:
        return [gate.register_forward_hook(lambda mod, inputs, output: store(site.path, output))]
    calls = [0]  # the gate runs once per name in reading.calls, in that order, in every forward of its module

    def reset(mod: nn.Module, inputs: tuple) -> None:
        calls[0] = 0

    def called(mod: nn.Module, inputs: tuple, output: Any) -> None:
        store(sites[min(calls[0], len(sites) - 1)].path, output)
        calls[0] += 1

    return [site.module.register_forward_pre_hook(reset), gate.register_forward_hook(called)]


@contextlib.contextmanager
def capture_attention(model: nn.Module, detach: bool = True) -> Iterator[AttentionRecord]:
    """Context manager yielding an `AttentionRecord` that every forward of ``model`` refills.

    Warns (`AttentionWarning`) when the model has no readable attention, and lists the modules that look like
    attention but cannot be read (``record.unread``; `register_attention` makes a class readable).

    Args:
        model: any module: attnlab models, timm and torchvision networks, a user's own, DDP-wrapped.
        detach: store detached tensors (default); ``False`` keeps the autograd graph, for losses on the attention.
    """
    record = AttentionRecord()
    sites, record.unread = attention_sites(model)
    if record.unread:
        warnings.warn(
            f"capture_attention: {len(record.unread)} module(s) look like attention but cannot be read: "
            f"{', '.join(record.unread[:5])}{', ...' if len(record.unread) > 5 else ''} "
            "(attnlab.register_attention makes a class readable)",
            AttentionWarning,
            stacklevel=3,
        )
    elif not sites:
        warnings.warn(
            f"capture_attention: no attention found in {type(model).__name__} "
            "(attnlab.register_attention makes your own attention class readable)",
            AttentionWarning,
            stacklevel=3,
        )
    groups: dict[tuple[int, int, int], list[Site]] = {}
    for site in sites:
        record.kinds[site.path] = site.kind
        record.sites[site.path] = site
        groups.setdefault((id(site.module), id(site.reading), id(site.probe)), []).append(site)
    handles = []
    for group in groups.values():
        handles += _hooks(group[0], group, record, detach)
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
