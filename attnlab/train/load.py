"""Load a finished run (or a bare ``model.safetensors``) back into a model, without unpickling anything, and the data
it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from torch import nn

from ..data import DataBundle, load_dataset
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


def run_data(cfg: TrainConfig, dataset: str | None = None, data_dir: str | None = None, **options) -> DataBundle:
    """The data of the run configured by ``cfg``: its dataset with its options, folder and validation split; or
    ``dataset`` instead (then without the run's options and split). ``options`` are added to the dataset's."""
    same = dataset is None or dataset == cfg.dataset
    return load_dataset(
        cfg.dataset if same else dataset,
        data_dir or (cfg.data_dir if same else None),
        val_size=cfg.val_size if same else None,
        **{**(cfg.dataset_options if same else {}), **options},
    )


def check_fits(model: nn.Module, bundle: DataBundle, where: str) -> None:
    """Refuse data whose channels or classes are not the ones ``model`` takes, in one line starting with ``where``."""
    if bundle.in_chans != model.in_chans or bundle.num_classes != model.num_classes:
        raise AttnlabError(
            f"{where} has {bundle.in_chans} channel(s) and {bundle.num_classes} classes; the model takes "
            f"{model.in_chans} and {model.num_classes}"
        )
