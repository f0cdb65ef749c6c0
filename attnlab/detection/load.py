"""Load a finished detection run (or its bare ``model.safetensors``) back into a detector, and evaluate it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..data.detection import DetectionData, load_detection_dataset
from ..errors import AttnlabError
from ..train.checkpoint import load_state_strict, load_tensors
from ..train.config import autocast_dtype
from ..train.engine import resolve_device
from ..train.load import _weights_path, read_metadata
from .config import DetectConfig
from .task import build_detector, evaluate_detector


def load_detector(path: str | Path, device: str = "cpu") -> tuple[nn.Module, DetectConfig, DetectionData]:
    """The detector stored at ``path`` (a run folder or its ``model.safetensors``), in eval mode, with its config and
    a data description (classes, channels, statistics; no splits)."""
    weights = _weights_path(Path(path))
    meta = read_metadata(weights)
    if "attnlab_detection" not in meta:
        raise AttnlabError(f"{weights}: not an attnlab detector (no 'attnlab_detection' metadata)")
    try:
        record = json.loads(meta["attnlab_detection"])
        cfg = DetectConfig.from_dict({**record["config"], "backbone_weights": None}, source=str(weights))
        size = tuple(record["image_size"]) if record["image_size"] else None
        data = DetectionData(
            cfg.dataset,
            None,
            None,
            None,
            record["classes"],
            record["in_chans"],
            tuple(record["mean"]),
            tuple(record["std"]),
            size,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise AttnlabError(f"{weights}: damaged detector metadata ({e})") from None
    model = build_detector(cfg, data)
    load_state_strict(model, load_tensors(weights), weights)
    return model.to(device).eval(), cfg, data


def evaluate_run(
    path: str | Path,
    *,
    dataset: str | None = None,
    split: str = "test",
    data_dir: str | None = None,
    data_options: dict[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "cpu",
) -> dict[str, Any]:
    """COCO metrics of a trained detector on a split of its own dataset (default) or of ``dataset``, computed in the
    precision it was trained in, as its training's own evaluation was (an fp16 run evaluated on a CPU: fp32)."""
    device = str(resolve_device(device))
    model, cfg, trained_on = load_detector(path, device)
    same = dataset is None or dataset == cfg.dataset
    name = cfg.dataset if dataset is None else dataset
    options = {**(cfg.dataset_options if same else {}), **(data_options or {})}
    data = load_detection_dataset(
        name, data_dir or (cfg.data_dir if same else None), val_size=cfg.val_size if same else None, **options
    )
    if data.num_classes != trained_on.num_classes or data.in_chans != trained_on.in_chans:
        raise AttnlabError(
            f"{name} has {data.in_chans} channel(s) and {data.num_classes} classes; the detector takes "
            f"{trained_on.in_chans} and {trained_on.num_classes}"
        )
    chosen = getattr(data, split)
    precision = cfg.precision if cfg.precision != "fp16" or device.startswith("cuda") else "fp32"
    metrics = evaluate_detector(
        model, chosen, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype(precision)
    )
    return {
        "checkpoint": str(path),
        "dataset": name,
        "split": split,
        "images": len(chosen),
        "precision": precision,
        **metrics,
    }
