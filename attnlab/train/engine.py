"""The training loop: reads top to bottom — `setup` (data, model, optimiser, resume), then `train_epoch` and
`end_epoch` (validate, checkpoint, log) for each epoch, then `finish` (test, weights, summary).

Same config and seed on the same machine give the same metrics; a run killed at any moment and resumed with
``resume=True`` ends with bit-identical weights (CPU), because every source of randomness after the model's
initialisation (batch order, augmentation, the random draws of a mechanism's loss term) is a function of (seed, epoch)
and the rest (weights, optimiser, scheduler, RNG) is in the checkpoint. Mechanisms take part through the hooks they
register (`attnlab.layers.hooks`): the engine imports none of them.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data import DataBundle, batches, load_dataset, num_batches
from ..errors import AttnlabError
from ..io import read_yaml, remove_stale_temporaries, write_text_atomic
from ..layers import StepHook, training_hooks
from ..models import create_model
from ..models.options import check_buildable
from . import distributed
from .checkpoint import latest_checkpoint, save_checkpoint, save_tensors_atomic
from .compiling import compile_module, eager, is_compiled, run_or_fall_back
from .config import RESUMABLE_CHANGES, TrainConfig, autocast_dtype, first_difference
from .cost import count_flops, measure_latency
from .evaluate import Tally, check_labels, evaluate
from .optim import make_optimizer, make_scheduler, schedule_for
from .rundir import RunDir, wall_time_before


class TrainingDiverged(AttnlabError):
    """The loss or the gradients became NaN/Inf and the run was told to stop."""


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AttnlabError(f"--device {name}: expected cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AttnlabError(f"--device {name}: CUDA is not available on this machine")
    return device


GPU_DATA_SHARE = 0.25
"""Largest share of the GPU's free memory a dataset may take to be kept there for the whole run."""


def data_on_gpu(bundle: DataBundle, device: torch.device, free_bytes: int) -> DataBundle:
    """``bundle`` moved to the GPU when it takes at most `GPU_DATA_SHARE` of its free memory (Fashion-MNIST: 55 MB), so
    a step indexes, crops and flips its batch there without a host copy, and many runs can share one GPU; a larger
    dataset stays in host memory and each batch is copied over."""
    return bundle.to(device) if bundle.nbytes <= GPU_DATA_SHARE * free_bytes else bundle


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
        check_labels(getattr(bundle, split_name).labels, num_classes, f"{bundle.name}: {split_name} ")
    model = create_model(cfg.model, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if min(bundle.image_size) < model.min_input_size:
        h, w = bundle.image_size
        raise AttnlabError(
            f"{bundle.name} images are {h}×{w}: too small for {cfg.model} (needs ≥ {model.min_input_size} px)"
        )
    return model


def _epoch_generator(seed: int, epoch: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 7919 + salt) % (2**63))


def versions() -> dict[str, str]:
    import timm
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@dataclass
class Run:
    """Everything a run holds from `setup` to `finish`."""

    cfg: TrainConfig
    dist: distributed.Dist
    device: torch.device
    folder: RunDir
    log: Callable[[str], None]
    show_bar: bool
    bundle: DataBundle
    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP when distributed
    hooks: list[StepHook]
    channels_last: bool
    autocast_dtype: torch.dtype | None
    per_rank_batch: int
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    started: float
    start_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_images: float = 0.0
    train_seconds: float = 0.0

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def evaluate(self, split) -> dict[str, float]:
        return run_or_fall_back(
            self.model,
            f"{self.cfg.model} (evaluation)",
            lambda: evaluate(
                self.net,
                split,
                self.bundle,
                batch_size=self.cfg.eval_batch_size,
                device=self.device,
                dist=self.dist,
                autocast_dtype=self.autocast_dtype,
                channels_last=self.channels_last,
            ),
        )


@contextlib.contextmanager
def opened_run(
    cfg, resume: bool, may_change: frozenset[str]
) -> Iterator[tuple[distributed.Dist, torch.device, RunDir]]:
    """What every training command does around its loop: start the processes (torchrun), let rank 0 refuse a bad model
    option or a resume with settings outside ``may_change`` before anything is written, prepare and lock the run
    folder, and tear the processes down at the end. Yields (processes, device, run folder)."""
    dist, device = distributed.setup(cfg.device)
    try:
        folder = RunDir(cfg.out)
        if dist.is_main:
            check_buildable(cfg.model, cfg.model_kwargs)  # a bad model option fails before anything is written
            folder.prepare(resume)
            if resume and folder.config.exists():
                check_resumable(cfg, folder, may_change)
        dist.barrier()
        with folder.locked() if dist.is_main else contextlib.nullcontext():
            yield dist, resolve_device(str(device)), folder
    finally:
        distributed.teardown()


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
    with opened_run(cfg, resume, RESUMABLE_CHANGES) as (dist, device, folder):
        run = setup(cfg, dist, device, folder, resume, progress, log or print)
        for epoch in range(run.start_epoch, cfg.epochs):
            end_epoch(run, epoch, *train_epoch(run, epoch))
        return finish(run)


def check_resumable(cfg, folder: RunDir, may_change: frozenset[str]) -> None:
    """Refuse to resume a run with settings that would change its numbers (any outside ``may_change``)."""
    differs = first_difference(read_yaml(folder.config), cfg.to_dict(), may_change)
    if differs:
        key, saved, wanted = differs
        raise AttnlabError(
            f"--resume: {folder.config} has {key}={saved!r} but this command asks for {wanted!r}; "
            "resume with the saved settings or use another --out"
        )


def setup(cfg: TrainConfig, dist, device: torch.device, folder: RunDir, resume: bool, progress, log) -> Run:
    """Data, model, hooks, optimiser and schedule of a run; its checkpoint when resuming; its first files."""
    started = time.time()
    if dist.is_main:
        for place in (folder.root, folder.checkpoints):
            remove_stale_temporaries(place)
    torch.manual_seed(cfg.seed)
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)  # slow: names the op that produced a NaN in backward
    bundle = load_dataset(
        cfg.dataset, cfg.data_dir, val_size=cfg.val_size, subset=cfg.subset, seed=cfg.seed, **cfg.dataset_options
    )
    if not cfg.augment:
        bundle = dataclasses.replace(bundle, crop_padding=0, hflip=False)
    if device.type == "cuda":
        bundle = data_on_gpu(bundle, device, free_bytes=torch.cuda.mem_get_info(device)[0])
    model = build_model(cfg, bundle).to(device)
    # adapter until the run config carries a `mechanisms` mapping (contract: ENGINE replaces these two fields)
    mechanisms = {"cram": {"equivariance": cfg.equivariance, "transforms": cfg.equivariance_transforms}}
    hooks = training_hooks(model, mechanisms if cfg.equivariance > 0 else None)
    channels_last = all(h.channels_last for h in hooks) if cfg.channels_last is None else cfg.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_dtype(cfg.precision)
    per_rank_batch = max(1, cfg.batch_size // dist.world_size)
    steps_per_epoch = num_batches(len(bundle.train), per_rank_batch, train=True, world_size=dist.world_size)
    if steps_per_epoch == 0:
        raise AttnlabError(f"{bundle.name}: {len(bundle.train)} training images make no full batch of {cfg.batch_size}")
    optimizer = make_optimizer(model, cfg)
    run = Run(
        cfg,
        dist,
        device,
        folder,
        log,
        show_bar=(sys.stderr.isatty() if progress is None else progress) and dist.is_main,
        bundle=bundle,
        model=model,
        net=model,
        hooks=hooks,
        channels_last=channels_last,
        autocast_dtype=autocast,
        per_rank_batch=per_rank_batch,
        steps_per_epoch=steps_per_epoch,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg, steps_per_epoch),
        scaler=torch.amp.GradScaler(device.type, enabled=autocast == torch.float16),
        started=started,
    )
    if resume:
        _resume(run)
    if dist.enabled:
        run.net = DistributedDataParallel(model)
    if cfg.compile:
        _compile(run)
    if dist.is_main:
        write_text_atomic(folder.config, cfg.to_yaml())
        folder.write_history(run.history)
    return run


def _compile(run: Run) -> None:
    """Compile the model in place (the data pipeline stays eager) and compile its training graph now, on one batch of
    zeros, so that a model that cannot compile falls back to eager (one warning) before training starts. The probe's
    forward and backward leave no trace: the model's state (BN statistics), its gradients and the RNG are restored."""
    model, bundle = run.model, run.bundle
    compile_module(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    x = torch.zeros(run.per_rank_batch, bundle.in_chans, *bundle.image_size, device=run.device)
    if run.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def probe() -> None:
        model.train()
        with run.autocast():
            out = run.net(x)
        out.float().sum().backward()

    run_or_fall_back(model, run.cfg.model, probe)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    torch.set_rng_state(rng)


def _resume(run: Run) -> None:
    """Load the newest intact checkpoint, if there is one, into ``run``."""
    found = latest_checkpoint(run.folder.checkpoints)
    if found is None:
        return
    run.start_epoch, states, info = found
    run.model.load_state_dict(states["model"])
    run.optimizer.load_state_dict(states["optimizer"])
    run.scheduler.load_state_dict(states["scheduler"])
    # the step count comes from the checkpoint, the schedule's length from this config: resuming with more epochs
    # stretches the rest of the schedule (identical to the saved one when epochs did not change)
    run.scheduler.lr_lambdas = [schedule_for(run.cfg, run.steps_per_epoch) for _ in run.scheduler.lr_lambdas]
    run.scaler.load_state_dict(states["scaler"])
    torch.set_rng_state(states["rng"]["torch"])
    if "cuda" in states["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(states["rng"]["cuda"], run.device)
    run.history = info["history"][: run.start_epoch]
    run.started -= wall_time_before(run.history)
    if run.dist.is_main:
        run.log(f"resuming {run.folder.root} after epoch {run.start_epoch}")


def train_epoch(run: Run, epoch: int) -> tuple[Tally, int, int, float]:
    """One pass over the training split; returns the tally of the steps taken, the steps skipped, the images seen (by
    every step, skipped or not: the work done) and the seconds."""
    cfg = run.cfg
    run.net.train()
    t0 = time.perf_counter()
    generator = _epoch_generator(cfg.seed, epoch, salt=2)
    tally, skipped, seen = Tally(run.device), 0, 0
    stream = batches(
        run.bundle.train,
        run.bundle,
        run.per_rank_batch,
        train=True,
        epoch=epoch,
        seed=cfg.seed,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
        device=run.device,
        channels_last=run.channels_last,
    )
    bar = tqdm(
        stream,
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not run.show_bar,
        dynamic_ncols=True,
    )
    for step, (x, y) in enumerate(bar):
        progress = (epoch * run.steps_per_epoch + step) / (cfg.epochs * run.steps_per_epoch)
        loss, logits = _step(run, x, y, generator, progress, epoch)
        seen += len(y)
        if loss is None:
            skipped += 1
            continue
        with torch.no_grad():
            tally.add(loss.detach().double() * len(y), logits, y)
        if run.show_bar:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return tally, skipped, seen, time.perf_counter() - t0


def _step(run: Run, x, y, generator, progress: float, epoch: int):
    """One optimiser step on batch (x, y): (loss, logits), or (None, None) when a non-finite step was skipped."""
    cfg, model = run.cfg, run.model
    # "skip" must also undo what a bad forward did to BN running statistics
    saved_buffers = [b.clone() for b in model.buffers()] if cfg.nonfinite == "skip" else None
    for hook in run.hooks:
        hook.before_step(progress)
    with run.autocast():
        with contextlib.ExitStack() as watching:
            for hook in run.hooks:
                watching.enter_context(hook.watch())
            # a compiled graph may meet a new shape mid-run (the last, partial batch) and fail to recompile
            logits = run_or_fall_back(model, cfg.model, lambda: run.net(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        total = loss
        for hook in run.hooks:
            if (term := hook.extra_loss(x, generator)) is not None:
                total = total + term
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    # with fp16 the GradScaler itself skips steps with inf/NaN gradients and lowers its scale
    if not run.scaler.is_enabled() and not (torch.isfinite(grad_norm) and torch.isfinite(total)):
        _skip_step(run, saved_buffers, "loss" if not torch.isfinite(total) else "gradients", epoch)
        return None, None
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss, logits


def _skip_step(run: Run, saved_buffers, what: str, epoch: int) -> None:
    """A step with a non-finite loss or gradients: stop the run, or (``nonfinite: skip``) undo it and go on."""
    if run.cfg.nonfinite == "stop":
        raise TrainingDiverged(
            f"non-finite {what} at epoch {epoch + 1}; {run.folder.last_good_state(len(run.history))} "
            "(try a lower --lr, --grad-clip, or --nonfinite skip)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for buffer, saved in zip(run.model.buffers(), saved_buffers):
            buffer.copy_(saved)
    with warnings.catch_warnings():  # a skipped step keeps the schedule on time, on purpose
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        run.scheduler.step()


def end_epoch(run: Run, epoch: int, tally: Tally, skipped: int, seen: int, seconds: float) -> None:
    """Validate, record the epoch in the history, write a checkpoint and the metrics, log one line."""
    dist = run.dist
    loss_sum, correct, count = tally.total(dist)  # count: images of the steps not skipped
    skipped, seen = dist.all_sum(torch.tensor([skipped, seen], device=run.device)).tolist()
    run.train_images += seen  # throughput counts the skipped steps' work too
    run.train_seconds += seconds
    val = run.evaluate(run.bundle.val)
    record = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / count if count else math.nan,  # NaN: every step of the epoch was skipped
        "train_acc": correct / count if count else math.nan,
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": run.scheduler.get_last_lr()[0],
        "epoch_time": seconds,
        "img_per_s": seen / seconds,
        "skipped_steps": int(skipped),
        "wall_time": time.time() - run.started,  # since the run began, every process that trained it together
    }
    run.history.append(record)
    if dist.is_main:
        rng = {"torch": torch.get_rng_state()}
        if run.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(run.device)
        states = {
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
        }
        save_checkpoint(run.folder.checkpoints, epoch + 1, states, {"history": run.history})
        run.folder.write_history(run.history)
        run.log(
            f"epoch {epoch + 1}/{run.cfg.epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}  "
            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}  lr {record['lr']:.4f}  "
            f"{record['img_per_s']:.0f} img/s  {seconds:.1f}s"
        )
    dist.barrier()


def finish(run: Run) -> dict[str, Any]:
    """Test once, write the final weights and ``summary.json``; returns the summary (on every rank)."""
    test = run.evaluate(run.bundle.test)
    summary = None
    if run.dist.is_main:
        cfg, bundle = run.cfg, run.bundle
        metadata = {
            "attnlab_model": cfg.model,
            "num_classes": str(bundle.num_classes),
            "in_chans": str(bundle.in_chans),
            "model_kwargs": json.dumps(cfg.model_kwargs),
        }
        save_tensors_atomic(run.folder.weights, run.model.state_dict(), metadata)
        summary = _summary(run, test)
        write_text_atomic(run.folder.summary, json.dumps(summary, indent=2))
        run.log(
            f"done: val acc {summary['val_acc']:.2%}  test acc {summary['test_acc']:.2%}  "
            f"{summary['train_img_per_s']:.0f} img/s  → {run.folder.root}"
        )
    return run.dist.broadcast_object(summary)


def _summary(run: Run, test: dict[str, float]) -> dict[str, Any]:
    cfg, bundle, history, device = run.cfg, run.bundle, run.history, run.device
    last = history[-1]
    with eager(run.model) as model:  # FLOPs and the one-image latency of the plain module
        flops = count_flops(model, bundle.in_chans, bundle.image_size, device)
        latency_ms = measure_latency(model, bundle.in_chans, bundle.image_size, device)
    return {
        "model": cfg.model,
        "dataset": bundle.name,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "val_acc": last["val_acc"],
        "val_loss": last["val_loss"],
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "params": sum(p.numel() for p in run.model.parameters()),
        "flops": flops,
        "latency_ms": latency_ms,
        "train_img_per_s": (run.train_images / run.train_seconds)
        if run.train_seconds
        else sum(h["img_per_s"] for h in history) / len(history),
        "wall_time_s": time.time() - run.started,
        "train_time_s": sum(h["epoch_time"] for h in history),
        "image_size": list(bundle.image_size),
        "world_size": run.dist.world_size,
        "device": device_name(device),
        "precision": cfg.precision,
        "compile": is_compiled(run.model),  # False where --compile fell back to eager
        "versions": versions(),
    }
