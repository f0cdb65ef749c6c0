"""The training loop: reads top to bottom — set up, (resume), train an epoch, validate, checkpoint, repeat, test.

Same config and seed on the same machine give the same metrics; a run killed at any moment and resumed with
``resume=True`` ends with bit-identical weights (CPU), because every source of randomness after the model's
initialisation (batch order, augmentation, equivariance transforms) is a function of (seed, epoch) and the rest
(weights, optimiser, scheduler, RNG) is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..data import DataBundle, Split, batches, load_dataset, num_batches
from ..errors import AttnlabError
from ..layers import AWConv2d
from ..layers.cram import anneal_beta, capture_rectangles, equivariance_penalty, has_cram
from ..models import create_model
from . import distributed
from .checkpoint import (
    latest_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
    save_tensors_atomic,
    write_text_atomic,
)
from .config import RESUMABLE_CHANGES, TrainConfig, first_difference, read_yaml
from .optim import make_optimizer, make_scheduler, schedule_for
from .rundir import RunDir


class TrainingDiverged(AttnlabError):
    """The loss or the gradients became NaN/Inf and the run was told to stop."""


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``--amp`` asks for on ``device`` (None: full fp32)."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16" and device.type == "cpu":
        raise AttnlabError("--amp fp16 needs CUDA; on CPU use --amp bf16")
    if cfg.amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if device.type == "cpu" or cuda_bf16 else torch.float16
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttnlabError(f"--device {name}: CUDA is not available on this machine")
    return device


def build_model(cfg: TrainConfig, bundle: DataBundle) -> nn.Module:
    """The configured model, checked against the data's channels, classes and image size."""
    kwargs = dict(cfg.model_kwargs)
    in_chans = kwargs.pop("in_chans", bundle.in_chans)
    if in_chans != bundle.in_chans:
        raise AttnlabError(f"in_chans={in_chans} but {bundle.name} images have {bundle.in_chans} channel(s)")
    num_classes = kwargs.pop("num_classes", bundle.num_classes)
    if num_classes != bundle.num_classes:
        raise AttnlabError(f"num_classes={num_classes} but {bundle.name} has {bundle.num_classes} classes")
    for split_name in ("train", "val", "test"):
        labels = getattr(bundle, split_name).labels
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise AttnlabError(
                f"{bundle.name}: {split_name} labels must lie in [0, {num_classes}), found "
                f"{int(labels.min())}..{int(labels.max())}"
            )
    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if min(bundle.image_size) < model.min_input_size:
        h, w = bundle.image_size
        raise AttnlabError(
            f"{bundle.name} images are {h}×{w}: too small for {cfg.model} (needs ≥ {model.min_input_size} px)"
        )
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    bundle: DataBundle,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    dist: distributed.Dist | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``split`` (summed over ranks when distributed)."""
    dist = dist or distributed.Dist()
    device = torch.device(device)
    num_classes = getattr(model, "num_classes", None) or getattr(getattr(model, "module", None), "num_classes", None)
    if num_classes and len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
        raise AttnlabError(
            f"labels must lie in [0, {num_classes}) for this model, found "
            f"{int(split.labels.min())}..{int(split.labels.max())}"
        )
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for x, y in batches(
        split,
        bundle,
        batch_size,
        train=False,
        rank=dist.rank,
        world_size=dist.world_size,
        device=device,
        channels_last=channels_last,
    ):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        totals += torch.stack(
            [
                F.cross_entropy(logits.float(), y, reduction="sum").double(),
                (logits.argmax(1) == y).sum().double(),
                torch.tensor(float(len(y)), dtype=torch.float64, device=device),
            ]
        )
    loss_sum, correct, count = dist.all_sum(totals).tolist()
    model.train(was_training)
    if count == 0:
        raise AttnlabError(f"{bundle.name}: the evaluation split is empty")
    return {"loss": loss_sum / count, "acc": correct / count}


def count_flops(model: nn.Module, in_chans: int, image_size: tuple[int, int], device: torch.device) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter; a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, *image_size, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    model: nn.Module, in_chans: int, image_size: tuple[int, int], device: torch.device, repeats: int = 20
) -> float:
    """Median forward time of one image in eval mode, in milliseconds."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, *image_size, device=device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1000 * sorted(times)[len(times) // 2]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _epoch_generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7919 + salt) % (2**63))


def _check_resumable(cfg: TrainConfig, run: RunDir) -> None:
    """Refuse to resume a run with settings that would change its numbers."""
    differs = first_difference(read_yaml(run.config), cfg.to_dict(), RESUMABLE_CHANGES)
    if differs:
        key, saved, wanted = differs
        raise AttnlabError(
            f"--resume: {run.config} has {key}={saved!r} but this command asks for {wanted!r}; "
            "resume with the saved settings or use another --out"
        )


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and write the run's files under ``cfg.out``; returns the summary.

    Args:
        cfg: the run's configuration.
        resume: continue the run in ``cfg.out`` from its newest intact checkpoint (or from scratch if it has none).
        progress: show a tqdm bar per epoch (default: when stderr is a terminal); otherwise one line per epoch.
        log: where the per-epoch lines go (default: print to stdout).
    """
    dist, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, dist, resolve_device(str(device)), resume, progress, log or print)
    finally:
        distributed.teardown()


def _train(cfg, dist, device, resume, progress, log) -> dict[str, Any]:
    run = RunDir(cfg.out)
    if dist.is_main:
        run.prepare(resume)
        if resume and run.config.exists():
            _check_resumable(cfg, run)
    dist.barrier()
    with run.locked() if dist.is_main else contextlib.nullcontext():
        return _train_locked(cfg, dist, device, resume, progress, log, run)


def _train_locked(cfg, dist, device, resume, progress, log, run: RunDir) -> dict[str, Any]:
    started = time.time()
    if dist.is_main:
        for folder in (run.root, run.checkpoints):
            remove_stale_temporaries(folder)
    torch.manual_seed(cfg.seed)
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)  # slow: names the op that produced a NaN in backward
    bundle = load_dataset(
        cfg.dataset, cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=cfg.seed, **cfg.dataset_options
    )
    if not cfg.augment:
        bundle = dataclasses.replace(bundle, crop_padding=0, hflip=False)
    model = build_model(cfg, bundle).to(device)
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = not any(isinstance(m, AWConv2d) for m in model.modules())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast_dtype = amp_dtype(cfg, device)
    per_rank_batch = max(1, cfg.batch_size // dist.world_size)
    steps_per_epoch = num_batches(len(bundle.train), per_rank_batch, train=True, world_size=dist.world_size)
    if steps_per_epoch == 0:
        raise AttnlabError(f"{bundle.name}: {len(bundle.train)} training images make no full batch of {cfg.batch_size}")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    cram_model = has_cram(model)
    if cfg.equivariance > 0 and not cram_model:
        raise AttnlabError(f"--equivariance needs a model with CRAM layers; {cfg.model} has none")

    start_epoch, history = 0, []
    if resume and (found := latest_checkpoint(run.checkpoints)) is not None:
        start_epoch, states, info = found
        model.load_state_dict(states["model"])
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        # the step count comes from the checkpoint, the schedule's length from this config: resuming with more
        # epochs stretches the rest of the schedule (identical to the saved one when epochs did not change)
        scheduler.lr_lambdas = [schedule_for(cfg, steps_per_epoch) for _ in scheduler.lr_lambdas]
        scaler.load_state_dict(states["scaler"])
        _set_rng_state(states["rng"], device)
        history = info["history"][:start_epoch]
        if dist.is_main:
            log(f"resuming {run.root} after epoch {start_epoch}")
    if dist.is_main:
        write_text_atomic(run.config, cfg.to_yaml())
        write_text_atomic(run.metrics, "".join(json.dumps(h) + "\n" for h in history))

    net = DistributedDataParallel(model) if dist.enabled else model
    show_bar = (sys.stderr.isatty() if progress is None else progress) and dist.is_main
    n_params = sum(p.numel() for p in model.parameters())
    train_images = 0
    train_seconds = 0.0

    def evaluate_on(split: Split) -> dict[str, float]:
        return evaluate(
            net,
            split,
            bundle,
            batch_size=cfg.eval_batch_size,
            device=device,
            dist=dist,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
        )

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        equi_gen = _epoch_generator(cfg.seed, epoch, salt=2)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        skipped = 0
        stream = batches(
            bundle.train,
            bundle,
            per_rank_batch,
            train=True,
            epoch=epoch,
            seed=cfg.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            device=device,
            channels_last=channels_last,
        )
        bar = tqdm(
            stream,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            disable=not show_bar,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar):
            # "skip" must also undo what a bad forward did to BN running statistics
            saved_buffers = [b.clone() for b in model.buffers()] if cfg.nonfinite == "skip" else None
            if cram_model:  # CRAM's mask sharpness may anneal over the run
                anneal_beta(model, (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch))
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                with capture_rectangles(model) if cfg.equivariance else contextlib.nullcontext() as rectangles:
                    logits = net(x)  # only this forward's rectangles: the penalty's own forward on T(x) stays out
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                total = loss
                if cfg.equivariance:  # one extra forward on T(x), through the bare model (DDP: one forward each)
                    total = loss + cfg.equivariance * equivariance_penalty(
                        model, x, equi_gen, rectangles=rectangles, transforms=cfg.equivariance_transforms
                    )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            # with fp16 the GradScaler itself skips steps with inf/NaN gradients and lowers its scale
            if not scaler.is_enabled() and not (torch.isfinite(grad_norm) and torch.isfinite(total)):
                if cfg.nonfinite == "stop":
                    raise TrainingDiverged(
                        f"non-finite {'loss' if not torch.isfinite(total) else 'gradients'} at epoch {epoch + 1}; "
                        f"the last good checkpoint is in {run.checkpoints} (try a lower --lr, --grad-clip, or "
                        "--nonfinite skip)"
                    )
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, saved in zip(model.buffers(), saved_buffers):
                        buffer.copy_(saved)
                with warnings.catch_warnings():  # a skipped step keeps the schedule on time, on purpose
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                    scheduler.step()
                continue
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                sums += torch.stack(
                    [
                        loss.detach().double() * len(y),
                        (logits.argmax(1) == y).sum().double(),
                        torch.tensor(float(len(y)), dtype=torch.float64, device=device),
                    ]
                )
            if show_bar:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds = time.perf_counter() - t0
        loss_sum, correct, count = dist.all_sum(sums).tolist()  # count: images of the steps not skipped
        train_images += count
        train_seconds += epoch_seconds
        val = evaluate_on(bundle.val)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count if count else math.nan,  # NaN: every step of the epoch was skipped
            "train_acc": correct / count if count else math.nan,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "lr": scheduler.get_last_lr()[0],
            "epoch_time": epoch_seconds,
            "img_per_s": count / epoch_seconds,
            "skipped_steps": int(dist.all_sum(torch.tensor([skipped], device=device)).item()),
        }
        history.append(record)
        if dist.is_main:
            states = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(device),
            }
            save_checkpoint(run.checkpoints, epoch + 1, states, {"history": history})
            write_text_atomic(run.metrics, "".join(json.dumps(h) + "\n" for h in history))
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}  "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}  lr {record['lr']:.4f}  "
                f"{record['img_per_s']:.0f} img/s  {epoch_seconds:.1f}s"
            )
        dist.barrier()

    test = evaluate_on(bundle.test)
    summary = None
    if dist.is_main:
        metadata = {
            "attnlab_model": cfg.model,
            "num_classes": str(bundle.num_classes),
            "in_chans": str(bundle.in_chans),
            "model_kwargs": json.dumps(cfg.model_kwargs),
        }
        save_tensors_atomic(run.weights, model.state_dict(), metadata)
        last = history[-1]
        summary = {
            "model": cfg.model,
            "dataset": bundle.name,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "val_acc": last["val_acc"],
            "val_loss": last["val_loss"],
            "test_acc": test["acc"],
            "test_loss": test["loss"],
            "params": n_params,
            "flops": count_flops(model, bundle.in_chans, bundle.image_size, device),
            "latency_ms": measure_latency(model, bundle.in_chans, bundle.image_size, device),
            "train_img_per_s": (train_images / train_seconds)
            if train_seconds
            else sum(h["img_per_s"] for h in history) / len(history),
            "wall_time_s": time.time() - started,
            "train_time_s": sum(h["epoch_time"] for h in history),
            "image_size": list(bundle.image_size),
            "world_size": dist.world_size,
            "device": _device_name(device),
            "amp": str(autocast_dtype).removeprefix("torch.") if autocast_dtype else "off",
            "versions": _versions(),
        }
        write_text_atomic(run.summary, json.dumps(summary, indent=2))
        log(
            f"done: val acc {summary['val_acc']:.2%}  test acc {summary['test_acc']:.2%}  "
            f"{summary['train_img_per_s']:.0f} img/s  → {run.root}"
        )
    return dist.broadcast_object(summary)
