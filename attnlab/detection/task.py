"""Detection as a kind of run (`attnlab.train.engine.RunTask`): torchvision's Faster R-CNN / RetinaNet over an
attnlab backbone, trained by the one run engine (resume, checkpoints, DDP, the non-finite policy, the mechanisms'
training hooks, which see the backbone) and scored by COCO's box metrics (AP@[.5:.95], AP50, AP75, AP by size,
AR@1/10/100) computed by torchmetrics' `MeanAveragePrecision` with the pycocotools backend.

Every source of randomness after initialisation is a function of (seed, epoch) — batch order, flips — or lives in the
checkpoint (the global RNG, which Faster R-CNN's proposal sampling draws from), so a run killed and resumed ends with
bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..data.detection import DetectionData, detection_batches, load_detection_dataset
from ..errors import AttnlabError
from ..train import distributed
from ..train.cost import count_flops, measure_latency
from ..train.engine import Run, RunTask, StepResult, run_task
from .config import RESUMABLE_CHANGES, DetectConfig
from .detector import create_detector

INSTALL_HINT = "pip install 'attnlab[detection]'"

METRICS = {  # our key: torchmetrics' key
    "ap": "map",
    "ap50": "map_50",
    "ap75": "map_75",
    "ap_small": "map_small",
    "ap_medium": "map_medium",
    "ap_large": "map_large",
    "ar1": "mar_1",
    "ar10": "mar_10",
    "ar100": "mar_100",
}

LOSS_TERMS = {
    "fasterrcnn": ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"),
    "retinanet": ("classification", "bbox_regression"),
}
"""The loss terms each detector returns in training (torchvision's names)."""


def load_data(cfg: DetectConfig) -> DetectionData:
    return load_detection_dataset(
        cfg.dataset, cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=cfg.seed, **cfg.dataset_options
    )


def build_detector(cfg: DetectConfig, data: DetectionData) -> nn.Module:
    """The configured detector for ``data``'s classes, channels, statistics and image size."""
    kwargs = dict(cfg.model_kwargs)
    in_chans = kwargs.pop("in_chans", data.in_chans)
    if in_chans != data.in_chans:
        raise AttnlabError(f"in_chans={in_chans} but {data.name} images have {data.in_chans} channel(s)")
    fixed = max(data.image_size) if data.image_size else None
    min_size = cfg.min_size or fixed or 800
    max_size = cfg.max_size or (max(min_size, fixed) if fixed else round(min_size * 1333 / 800))
    if cfg.out_indices is not None:
        kwargs["out_indices"] = cfg.out_indices
    return create_detector(
        cfg.model,
        data.num_classes,
        detector=cfg.detector,
        in_chans=in_chans,
        image_mean=data.mean,
        image_std=data.std,
        min_size=min_size,
        max_size=max_size,
        fpn_channels=cfg.fpn_channels,
        anchor_scale=cfg.anchor_scale,
        trainable_layers=cfg.trainable_layers,
        frozen_bn=cfg.frozen_bn,
        weights=cfg.backbone_weights,
        pretrained=cfg.pretrained,
        weights_file=cfg.weights,
        detector_kwargs=cfg.detector_kwargs,
        **kwargs,
    )


def _metric_value(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if value < 0 else value  # COCO's -1: no ground truth of that kind


@torch.no_grad()
def evaluate_detector(
    model: nn.Module,
    split,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    dist: distributed.Dist | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | None]:
    """COCO box metrics of ``model`` on ``split`` (gathered over ranks when distributed)."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError:
        raise AttnlabError(f"detection metrics need torchmetrics and pycocotools: {INSTALL_HINT}") from None

    dist = dist or distributed.Dist()
    device = torch.device(device)
    if len(split) == 0:
        raise AttnlabError("the evaluation split is empty")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools").to(device)
    was_training = model.training
    model.eval()
    stream = detection_batches(
        split, batch_size, train=False, rank=dist.rank, world_size=dist.world_size, device=device
    )
    for images, targets in stream:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            detections = model(images)
        predictions = [
            {"boxes": d["boxes"].float(), "scores": d["scores"].float(), "labels": d["labels"] - 1} for d in detections
        ]
        metric.update(predictions, targets)
    with contextlib.redirect_stdout(sys.stderr):  # pycocotools prints its tables on stdout
        result = metric.compute()
    model.train(was_training)
    return {key: _metric_value(result[name]) for key, name in METRICS.items()}


def _for_training(target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A data target as torchvision's detectors take it: crowd regions left out, labels 1..K (0 is background)."""
    keep = target["iscrowd"] == 0
    return {"boxes": target["boxes"][keep], "labels": target["labels"][keep] + 1}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def detector_costs(model: nn.Module, data: DetectionData, device: torch.device) -> dict[str, float]:
    """What a detector costs per image of ``data``'s size (its ``min_size`` square where sizes vary), eval mode:
    ``backbone_flops``, the forward FLOPs of backbone + FPN at the size the detector's transform resizes to (where
    attention mechanisms differ; the heads' share depends on how many proposals survive, so it is left out), and
    ``latency_ms``, the median time of the whole detector on one blank image."""
    size = data.image_size or (model.transform.min_size[-1],) * 2
    was_training = model.training
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([torch.zeros(data.in_chans, *size, device=device)])
    model.train(was_training)
    return {
        "backbone_flops": count_flops(model.backbone, data.in_chans, tuple(batch.tensors.shape[-2:]), device),
        "latency_ms": measure_latency(model, data.in_chans, size, device, repeats=10),
    }


def detector_record(cfg: DetectConfig, data: DetectionData) -> dict[str, Any]:
    """What rebuilds a trained detector without its data: the config and the data's classes, channels, statistics."""
    return {
        "config": cfg.to_dict(),
        "classes": data.classes,
        "in_chans": data.in_chans,
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": list(data.image_size) if data.image_size else None,
    }


class Detection(RunTask):
    """A detector trained with its own losses (summed) and scored by COCO AP; the mechanisms' hooks see its
    backbone, and their extra loss is computed on the batch the backbone saw (resized, normalised)."""

    resumable = RESUMABLE_CHANGES

    def load_data(self, cfg: DetectConfig, device: torch.device) -> DetectionData:
        return load_data(cfg)

    def build_model(self, cfg: DetectConfig, data: DetectionData) -> nn.Module:
        return build_detector(cfg, data)

    def hooked(self, model: nn.Module) -> nn.Module:
        return model.backbone

    def train_terms(self, cfg: DetectConfig) -> tuple[str, ...]:
        return ("loss", *LOSS_TERMS[cfg.detector])

    def steps_per_epoch(self, run: Run) -> int:
        shard = len(run.data.train) // run.dist.world_size
        if shard == 0:
            raise AttnlabError(
                f"{run.cfg.dataset}: {len(run.data.train)} training images for {run.dist.world_size} ranks"
            )
        return -(-shard // run.per_rank_batch)  # a ragged last batch is kept

    def batches(
        self, run: Run, epoch: int, start: int = 0
    ) -> Iterable[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        return detection_batches(
            run.data.train,
            run.per_rank_batch,
            train=True,
            epoch=epoch,
            seed=run.cfg.seed,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
            hflip=run.cfg.hflip,
            device=run.device,
            start=start,
        )

    def forward(self, run: Run, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> StepResult:
        seen: list[torch.Tensor] = []
        handle = run.model.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            losses = run.net(images, [_for_training(t) for t in targets])
        finally:
            handle.remove()
        loss = sum(value.float() for value in losses.values())
        n = len(images)
        sums = {key: value.detach().double() * n for key, value in {"loss": loss, **losses}.items()}
        return StepResult(loss, sums, seen[0] if seen else None)

    def evaluate(self, run: Run, split) -> dict[str, float | None]:
        return evaluate_detector(
            run.model,
            split,
            batch_size=run.cfg.eval_batch_size,
            device=run.device,
            dist=run.dist,
            autocast_dtype=run.autocast_dtype,
        )

    def epoch_text(self, record: dict[str, Any]) -> str:
        return f"train loss {record['train_loss']:.4f}  val AP {_pct(record['val_ap'])} AP50 {_pct(record['val_ap50'])}"

    def done_text(self, summary: dict[str, Any]) -> str:
        return f"val AP {_pct(summary['val_ap'])}  test AP {_pct(summary['test_ap'])} AP50 {_pct(summary['test_ap50'])}"

    def weights_metadata(self, run: Run) -> dict[str, str]:
        return {"attnlab_detection": json.dumps(detector_record(run.cfg, run.data))}

    def summary_fields(self, run: Run) -> dict[str, Any]:
        return {
            "detector": run.cfg.detector,
            "trainable_params": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
            **detector_costs(run.model, run.data, run.device),
            "train_images": len(run.data.train),
        }


def train_detector(
    cfg: DetectConfig, *, resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train ``cfg``'s detector and write the run's files under ``cfg.out``; returns the summary
    (`attnlab.train.engine.run_task` with `Detection`)."""
    return run_task(Detection(), cfg, resume=resume, progress=progress, log=log)
