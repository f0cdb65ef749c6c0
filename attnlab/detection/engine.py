"""The detection training loop, with the classifier engine's guarantees: set up, (resume), train an epoch, validate
(COCO mAP), checkpoint, repeat, test.

The pieces are the training package's: the run folder and its lock (`attnlab.train.rundir`), atomic safetensors
checkpoints that keep the two newest (`attnlab.train.checkpoint`), the optimiser and warm-up + cosine schedule
(`attnlab.train.optim`), DDP under torchrun with rank 0 writing (`attnlab.train.distributed`), bf16/fp16 autocast.
Every source of randomness after initialisation is a function of (seed, epoch) — batch order, flips — or lives in the
checkpoint (the global RNG, which Faster R-CNN's proposal sampling draws from), so a run killed and resumed ends with
bit-identical weights on CPU. Metrics are COCO's (AP@[.5:.95], AP50, AP75, AP by size, AR@1/10/100), computed by
torchmetrics' `MeanAveragePrecision` with the pycocotools backend.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.detection import DetectionData, detection_batches, load_detection_dataset
from ..errors import AttnlabError
from ..io import remove_stale_temporaries, write_text_atomic
from ..train import distributed
from ..train.checkpoint import latest_checkpoint, save_checkpoint, save_tensors_atomic
from ..train.config import autocast_dtype
from ..train.cost import count_flops, measure_latency
from ..train.engine import TrainingDiverged, device_name, opened_run, versions
from ..train.optim import make_optimizer, make_scheduler, schedule_for
from ..train.rundir import RunDir, wall_time_before
from .config import RESUMABLE_CHANGES, DetectConfig
from .detector import create_detector

INSTALL_HINT = "pip install 'attnlab[detection]'"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


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


def train_detector(
    cfg: DetectConfig, *, resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train ``cfg``'s detector and write the run's files under ``cfg.out``; returns the summary.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.out`` from its newest intact checkpoint (or from scratch if it has none).
        progress: a tqdm bar per epoch (default: when stderr is a terminal); otherwise one line per epoch.
        log: where the per-epoch lines go (default: print to stdout).
    """
    with opened_run(cfg, resume, RESUMABLE_CHANGES) as (dist, device, run):
        return _train(cfg, dist, device, run, resume, progress, log or print)


class _Run:
    """What one training run holds: data, model, optimiser state and the per-epoch history."""

    def __init__(self, cfg: DetectConfig, dist: distributed.Dist, device: torch.device, run: RunDir):
        torch.manual_seed(cfg.seed)
        self.cfg, self.dist, self.device, self.run = cfg, dist, device, run
        self.data = load_data(cfg)
        self.model = build_detector(cfg, self.data).to(device)
        self.autocast = autocast_dtype(cfg.precision)
        self.batch = max(1, cfg.batch_size // dist.world_size)
        self.steps = -(-(len(self.data.train) // dist.world_size) // self.batch)
        if self.steps == 0:
            raise AttnlabError(f"{cfg.dataset}: {len(self.data.train)} training images for {dist.world_size} ranks")
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast == torch.float16)
        self.net = DistributedDataParallel(self.model) if dist.enabled else self.model
        self.history: list[dict[str, Any]] = []

    def states(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(self.device),  # Faster R-CNN's proposal and RoI sampling draw from it
        }

    def restore(self, states: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self.model.load_state_dict(states["model"])
        self.optimizer.load_state_dict(states["optimizer"])
        self.scheduler.load_state_dict(states["scheduler"])
        # the step count comes from the checkpoint, the schedule's length from this config
        self.scheduler.lr_lambdas = [schedule_for(self.cfg, self.steps) for _ in self.scheduler.lr_lambdas]
        self.scaler.load_state_dict(states["scaler"])
        _set_rng_state(states["rng"], self.device)
        self.history = history

    def evaluate(self, split) -> dict[str, float | None]:
        return evaluate_detector(
            self.model,
            split,
            batch_size=self.cfg.eval_batch_size,
            device=self.device,
            dist=self.dist,
            autocast_dtype=self.autocast,
        )

    def train_epoch(self, epoch: int, show_bar: bool) -> dict[str, float]:
        """One epoch of optimiser steps; returns the mean of each loss term and the images seen."""
        cfg = self.cfg
        self.net.train()
        sums: dict[str, torch.Tensor] = {}
        stream = detection_batches(
            self.data.train,
            self.batch,
            train=True,
            epoch=epoch,
            seed=cfg.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            hflip=cfg.hflip,
            device=self.device,
        )
        bar = tqdm(stream, total=self.steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not show_bar)
        for images, targets in bar:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                losses = self.net(images, [_for_training(t) for t in targets])
            loss = sum(value.float() for value in losses.values())
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss at epoch {epoch + 1}; {self.run.last_good_state(len(self.history))} "
                    "(try a lower --lr or --grad-clip)"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            for key, value in {"loss": loss, **losses}.items():
                sums[key] = sums.get(key, 0) + value.detach().double() * len(images)
            sums["images"] = sums.get("images", 0) + torch.tensor(len(images), dtype=torch.float64, device=self.device)
            if show_bar:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        keys = sorted(sums)
        totals = dict(zip(keys, self.dist.all_sum(torch.stack([sums[k] for k in keys])).tolist()))
        images = totals.pop("images")
        return {**{f"train_{k}": v / images for k, v in totals.items()}, "images": images}


def _train(cfg, dist, device, run: RunDir, resume: bool, progress, log) -> dict[str, Any]:
    started = time.time()
    if dist.is_main:
        for folder in (run.root, run.checkpoints):
            remove_stale_temporaries(folder)
    state = _Run(cfg, dist, device, run)
    start_epoch = 0
    if resume and (found := latest_checkpoint(run.checkpoints)) is not None:
        start_epoch, states, info = found
        state.restore(states, info["history"][:start_epoch])
        started -= wall_time_before(state.history)
        if dist.is_main:
            log(f"resuming {run.root} after epoch {start_epoch}")
    if dist.is_main:
        write_text_atomic(run.config, cfg.to_yaml())
        run.write_history(state.history)
    show_bar = (sys.stderr.isatty() if progress is None else progress) and dist.is_main
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train = state.train_epoch(epoch, show_bar)
        seconds = time.perf_counter() - t0
        val = state.evaluate(state.data.val)
        record = {"epoch": epoch + 1, **{k: v for k, v in train.items() if k != "images"}}
        record.update({f"val_{k}": v for k, v in val.items()})
        record.update(lr=state.scheduler.get_last_lr()[0], epoch_time=seconds, img_per_s=train["images"] / seconds)
        record["wall_time"] = time.time() - started  # since the run began, every process that trained it together
        state.history.append(record)
        if dist.is_main:
            save_checkpoint(run.checkpoints, epoch + 1, state.states(), {"history": state.history})
            run.write_history(state.history)
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {record['train_loss']:.4f}  val AP {_pct(val['ap'])} "
                f"AP50 {_pct(val['ap50'])}  lr {record['lr']:.4f}  {record['img_per_s']:.1f} img/s  {seconds:.1f}s"
            )
        dist.barrier()
    test = state.evaluate(state.data.test)
    summary = None
    if dist.is_main:
        summary = _finish(state, run, test, started)
        log(
            f"done: val AP {_pct(summary['val_ap'])}  test AP {_pct(test['ap'])} AP50 {_pct(test['ap50'])}  "
            f"→ {run.root}"
        )
    return dist.broadcast_object(summary)


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


def _finish(state: _Run, run: RunDir, test: dict[str, float | None], started: float) -> dict[str, Any]:
    """Write the final weights (with what `detect eval` needs to rebuild the detector) and the summary."""
    cfg, data = state.cfg, state.data
    metadata = {"attnlab_detection": json.dumps(detector_record(cfg, data))}
    save_tensors_atomic(run.weights, state.model.state_dict(), metadata)
    last = state.history[-1]
    seconds = sum(h["epoch_time"] for h in state.history)
    summary = {
        "model": cfg.model,
        "detector": cfg.detector,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        **{k: v for k, v in last.items() if k.startswith("val_")},
        **{f"test_{k}": v for k, v in test.items()},
        "params": sum(p.numel() for p in state.model.parameters()),
        "trainable_params": sum(p.numel() for p in state.model.parameters() if p.requires_grad),
        **detector_costs(state.model, data, state.device),
        "train_images": len(data.train),
        "train_img_per_s": sum(h["img_per_s"] * h["epoch_time"] for h in state.history) / seconds,
        "train_time_s": seconds,
        "wall_time_s": time.time() - started,
        "world_size": state.dist.world_size,
        "device": device_name(state.device),
        "amp": str(state.autocast).removeprefix("torch.") if state.autocast else "off",
        "versions": versions(),
    }
    write_text_atomic(run.summary, json.dumps(summary, indent=2))
    return summary


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
