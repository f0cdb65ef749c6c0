"""Load a finished run (or a bare ``model.safetensors``) back into a model, without unpickling anything, and the data
it was trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..data import DataBundle
from ..errors import AttnlabError
from ..models import create_model
from .checkpoint import load_state_strict, load_tensors
from .config import TrainConfig
from .rundir import RunDir


def _weights_path(path: Path) -> Path:
    if path.is_dir():
        run = RunDir(path)
        if not run.weights.exists():
            hint = " (training not finished? resume it)" if run.checkpoints.exists() else ""
            raise AttnlabError(f"{path}: no model.safetensors in this folder{hint}")
        return run.weights
    if not path.exists():
        raise AttnlabError(f"{path}: no such run folder or weights file")
    return path


def read_metadata(weights: Path) -> dict[str, str]:
    load_tensors(weights)  # refuses non-safetensors files with a clear message before we open the header
    with safe_open(str(weights), framework="pt") as f:
        return f.metadata() or {}


def load_trained(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig | None]:
    """The model stored at ``path`` (a run folder or a ``.safetensors`` file written by attnlab), in eval mode.

    Returns the model and the run's config (None for a bare weights file).
    """
    weights = _weights_path(Path(path))
    meta = read_metadata(weights)
    if "attnlab_model" not in meta:
        raise AttnlabError(f"{weights}: not an attnlab model file (no 'attnlab_model' metadata)")
    try:
        kwargs = json.loads(meta.get("model_kwargs", "{}"))
        num_classes, in_chans = int(meta["num_classes"]), int(meta["in_chans"])
    except (ValueError, KeyError) as e:
        raise AttnlabError(f"{weights}: damaged metadata ({e})") from None
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "in_chans")}
    model = create_model(meta["attnlab_model"], num_classes=num_classes, in_chans=in_chans, **kwargs)
    load_state_strict(model, load_tensors(weights), weights)
    run = RunDir(weights.parent)
    cfg = TrainConfig.from_yaml(run.config) if run.config.exists() else None
    return model.to(device).eval(), cfg


def check_fits(model: nn.Module, bundle: DataBundle, where: str) -> None:
    """Refuse data whose channels or classes are not the ones ``model`` takes, in one line starting with ``where``."""
    if bundle.in_chans != model.in_chans or bundle.num_classes != model.num_classes:
        raise AttnlabError(
            f"{where} has {bundle.in_chans} channel(s) and {bundle.num_classes} classes; the model takes "
            f"{model.in_chans} and {model.num_classes}"
        )


def evaluate_trained(
    path: str | Path,
    *,
    split: str = "test",
    dataset: str | None = None,
    data_dir: str | None = None,
    data_options: dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Loss and accuracy of the model stored at ``path`` on a split, computed as its training's own evaluation was:
    the run's data (options, seed, subset and split, so the same normalisation), precision (fp16 on a CPU: fp32),
    memory layout, evaluation batch size and compile state, so that a run's own split gives its ``summary.json``'s
    numbers bit for bit on the machine that trained it. A bare weights file needs ``dataset``."""
    from ..data import load_dataset
    from ..layers import training_hooks
    from .classify import memory_layout, run_data
    from .compiling import compile_module, run_or_fall_back
    from .config import autocast_dtype
    from .evaluate import evaluate

    model, cfg = load_trained(path, device=device)
    name = dataset or (cfg.dataset if cfg else None)
    if name is None:
        raise AttnlabError(f"{path}: no config.yaml beside the weights; pass --dataset")
    options = dict(data_options or {})
    bundle = load_dataset(name, data_dir, **options) if cfg is None else run_data(cfg, name, data_dir, **options)
    check_fits(model, bundle, name)
    precision, channels_last, compiled = "fp32", False, False
    if cfg is not None:
        precision = cfg.precision if cfg.precision != "fp16" or device.startswith("cuda") else "fp32"
        channels_last = memory_layout(cfg, training_hooks(model, cfg.mechanisms))
        summary = RunDir(Path(path) if Path(path).is_dir() else Path(path).parent).summary
        compiled = summary.is_file() and json.loads(summary.read_text()).get("compile", False)
        batch_size = batch_size or cfg.eval_batch_size
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        compile_module(model)
    chosen = getattr(bundle, split)
    result = run_or_fall_back(
        model,
        f"{model.__class__.__name__} (evaluation)",
        lambda: evaluate(
            model,
            chosen,
            bundle,
            batch_size=batch_size or 512,
            device=device,
            autocast_dtype=autocast_dtype(precision),
            channels_last=channels_last,
        ),
    )
    return {"checkpoint": str(path), "dataset": name, "split": split, "images": len(chosen), **result}
