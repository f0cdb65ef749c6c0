"""The run engine, one for every kind of run: reads top to bottom — `setup` (data, model, hooks, optimiser, resume),
then `train_epoch` and `end_epoch` (validate, checkpoint, log) for each epoch, then `finish` (test, weights,
summary). What differs between kinds of run (the data and its batches, the model, the loss of a batch, the
evaluation metric, the summary's own fields) is a `RunTask`: `attnlab.train.classify.Classification`,
`attnlab.detection.task.Detection`.

Same config and seed on the same machine give the same metrics; a run killed at any moment and resumed with
``resume=True`` ends with bit-identical weights (CPU), because every source of randomness after the model's
initialisation (batch order, augmentation, the random draws of a mechanism's loss term) is a function of (seed, epoch)
and the rest (weights, optimiser, scheduler, RNG) is in the checkpoint. Mechanisms take part through the hooks they
register (`attnlab.layers.hooks`), for every kind of run: the engine imports none of them. A non-finite loss or
gradient stops the run, or (``nonfinite: skip``) is undone and skipped, whatever the task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import AttnlabError
from ..io import read_yaml, remove_stale_temporaries, write_text_atomic
from ..layers import StepHook, check_mechanisms, training_hooks
from ..models.options import check_buildable
from . import distributed
from .checkpoint import latest_checkpoint, save_checkpoint, save_tensors_atomic
from .config import RunConfig, autocast_dtype, checkpoint_interval, first_difference
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


def epoch_generator(seed: int, epoch: int, salt: int) -> torch.Generator:
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
class StepResult:
    """What a task's forward of one training batch gives the engine: the ``loss`` to minimise, the per-batch
    ``sums`` the epoch's record averages (each already multiplied by the batch's size where it is a mean), and the
    tensor the mechanisms' hooks compute their extra loss on (the model's input; a detector's backbone input)."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    hook_input: torch.Tensor | None


class RunTask:
    """What one kind of run does its own way; the engine calls these and does everything else."""

    resumable: frozenset[str] = frozenset()
    """Settings that may change when a run is resumed."""

    def load_data(self, cfg: RunConfig, device: torch.device) -> Any:
        """The run's data: train, val and test splits, with a ``name``."""
        raise NotImplementedError

    def build_model(self, cfg: RunConfig, data: Any) -> nn.Module:
        raise NotImplementedError

    def hooked(self, model: nn.Module) -> nn.Module:
        """The module the mechanisms' training hooks look at and run (the model itself by default)."""
        return model

    def prepare(self, run: Run) -> None:
        """Adjust the fresh model before its optimiser exists (e.g. its memory layout)."""

    def before_training(self, run: Run) -> None:
        """A last step after resuming and wrapping in DDP (e.g. compiling)."""

    def train_terms(self, cfg: RunConfig) -> tuple[str, ...]:
        """The keys of `StepResult.sums`: the record's ``train_<key>`` (sum over the epoch / images)."""
        raise NotImplementedError

    def steps_per_epoch(self, run: Run) -> int:
        """Training batches per epoch on each rank (``accumulate`` of them make an optimiser step)."""
        raise NotImplementedError

    def batches(self, run: Run, epoch: int, start: int = 0) -> Iterable[tuple[Any, Any]]:
        """The epoch's training batches on this rank, as (inputs, targets), from batch ``start`` on: exactly those an
        uninterrupted epoch would go on with (a run resumed inside an epoch skips the ones it trained on)."""
        raise NotImplementedError

    def forward(self, run: Run, inputs: Any, targets: Any) -> StepResult:
        """The training forward and loss of one batch (called under autocast and the hooks' ``watch``)."""
        raise NotImplementedError

    def evaluate(self, run: Run, split: Any) -> dict[str, float | None]:
        """The evaluation metrics of ``split`` (the record's ``val_<key>``, the summary's ``test_<key>``)."""
        raise NotImplementedError

    def epoch_text(self, record: dict[str, Any]) -> str:
        """What the epoch's log line says of its losses and metrics."""
        raise NotImplementedError

    def done_text(self, summary: dict[str, Any]) -> str:
        raise NotImplementedError

    def weights_metadata(self, run: Run) -> dict[str, str]:
        """What ``model.safetensors`` carries to rebuild the model without its data."""
        raise NotImplementedError

    def summary_fields(self, run: Run) -> dict[str, Any]:
        """The task's own fields of ``summary.json`` (costs, sizes)."""
        return {}

    def gather_state(self, run: Run) -> dict[str, Any]:
        """What the task has gathered while running that no tensor holds (JSON), merged over ranks: every rank calls
        it at the same points, before each checkpoint (which keeps it for `resume_state`) and before the summary."""
        return {}

    def resume_state(self, run: Run, state: dict[str, Any]) -> None:
        """Take back what `gather_state` returned when the checkpoint a run resumes from was written."""

    def config_comment(self, run: Run) -> str:
        """Comment lines on top of ``config.yaml``: what the run's settings resolved to (which data path ran)."""
        return ""


@dataclass
class EpochSoFar:
    """An epoch's training up to a step: what `train_epoch` sums, and the hooks' generator state."""

    step: int = 0
    sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    counted: int = 0
    skipped: int = 0
    seen: int = 0
    seconds: float = 0.0
    generator: torch.Tensor | None = None


class Preempted(AttnlabError):
    """The run was sent a stop signal with no handler of its own to pass it to: it checkpointed and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # what the signal itself would have given through a shell


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
"""What schedulers send before they stop a job: SLURM's SIGTERM on preemption or cancellation, the SIGUSR1/SIGUSR2
of ``--signal`` ahead of a time limit (submitit's is SIGUSR2)."""


class StopRequest:
    """The stop signals a run received, answered at the next step boundary: the engine writes a checkpoint and then
    does what the signal would have done without it (`answer`)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _received(self, signum: int, frame: Any) -> None:
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Catch `STOP_SIGNALS` while the run trains (only the main thread may; elsewhere nothing is caught)."""
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self.previous[number] = signal.signal(number, self._received)
        try:
            yield self
        finally:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    def answer(self, where: str, folder: RunDir) -> None:
        """After the checkpoint: hand the signal to the handler that was there before (submitit's requeues the job
        and exits; one that returns lets the run go on), or stop with `Preempted` where there was none."""
        import signal

        signum, self.signum = self.signum, None
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)
            return
        if previous == signal.SIG_IGN:
            return
        name = signal.Signals(signum).name
        raise Preempted(
            f"stopped by {name} {where}; checkpoint written; continue with --resume --out {folder.root}", signum
        )


@dataclass
class Run:
    """Everything a run holds from `setup` to `finish`."""

    task: RunTask
    cfg: RunConfig
    dist: distributed.Dist
    device: torch.device
    folder: RunDir
    log: Callable[[str], None]
    show_bar: bool
    data: Any
    model: nn.Module
    hooks: list[StepHook]
    autocast_dtype: torch.dtype | None
    per_rank_batch: int
    started: float
    net: nn.Module | None = None  # the model, wrapped in DDP when distributed
    channels_last: bool = False
    steps_per_epoch: int = 0  # optimiser steps
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    scaler: torch.amp.GradScaler | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_images: float = 0.0
    train_seconds: float = 0.0
    ema: nn.Module | None = None  # timm's ModelEmaV3 of the model (``ema_decay``)
    saved_buffers: list[torch.Tensor] | None = None  # the buffers before the step under way (nonfinite: skip)
    start_step: int = 0  # steps of epoch `start_epoch` a checkpoint inside it had already taken
    partial: EpochSoFar | None = None  # what those steps summed, from that checkpoint
    stop: StopRequest = dataclasses.field(default_factory=lambda: StopRequest())
    last_save: float = dataclasses.field(default_factory=time.monotonic)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def evaluate(self, split) -> dict[str, float | None]:
        return self.task.evaluate(self, split)


def _new_folders(root: Path) -> list[Path]:
    """The folders that making ``root`` creates, deepest first."""
    made = []
    for place in (root, *root.parents):
        if place.exists():
            break
        made.append(place)
    return made


@contextlib.contextmanager
def opened_run(
    cfg: RunConfig, resume: bool, may_change: frozenset[str]
) -> Iterator[tuple[distributed.Dist, torch.device, RunDir]]:
    """What every run does around its loop: start the processes (torchrun), let rank 0 refuse a bad model or
    mechanism option or a resume with settings outside ``may_change`` before anything is written, prepare and lock
    the run folder, and tear the processes down at the end. A run that fails before writing any file leaves no folder
    behind. Yields (processes, device, run folder)."""
    dist, device = distributed.setup(cfg.device)
    folder = RunDir(cfg.out)
    made = _new_folders(folder.root) if dist.is_main else []
    try:
        if dist.is_main:
            check_buildable(cfg.model, cfg.model_kwargs)  # a bad model option fails before anything is written
            check_mechanisms(cfg.mechanisms)
            folder.prepare(resume)
            if resume and folder.config.exists():
                check_resumable(cfg, folder, may_change)
        dist.barrier()
        with folder.locked() if dist.is_main else contextlib.nullcontext():
            yield dist, resolve_device(str(device)), folder
    except BaseException:
        for place in made:  # nothing written: the folders this run made go again
            if place.is_dir() and not any(place.iterdir()):
                shutil.rmtree(place, ignore_errors=True)
        raise
    finally:
        distributed.teardown()


def run_task(
    task: RunTask,
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``task``'s model as ``cfg`` says and write the run's files under ``cfg.out``; returns the summary.

    Args:
        task: the kind of run.
        cfg: the run's configuration.
        resume: continue the run in ``cfg.out`` from its newest intact checkpoint (or from scratch if it has none).
        progress: show a tqdm bar per epoch (default: when stderr is a terminal); otherwise one line per epoch.
        log: where the per-epoch lines go (default: print to stdout).
    """
    with opened_run(cfg, resume, task.resumable) as (dist, device, folder):
        run = setup(task, cfg, dist, device, folder, resume, progress, log or print)
        with run.stop.installed():
            for epoch in range(run.start_epoch, cfg.epochs):
                end_epoch(run, epoch, *train_epoch(run, epoch))
        return finish(run)


def check_resumable(cfg: RunConfig, folder: RunDir, may_change: frozenset[str]) -> None:
    """Refuse to resume a run with settings that would change its numbers (any outside ``may_change``)."""
    differs = first_difference(read_yaml(folder.config), cfg.to_dict(), may_change, type(cfg))
    if differs:
        key, saved, wanted = differs
        raise AttnlabError(
            f"--resume: {folder.config} has {key}={saved!r} but this command asks for {wanted!r}; "
            "resume with the saved settings or use another --out"
        )


def setup(task: RunTask, cfg: RunConfig, dist, device: torch.device, folder: RunDir, resume: bool, progress, log):
    """Data, model, hooks, optimiser and schedule of a run; its checkpoint when resuming; its first files."""
    started = time.time()
    if dist.is_main:
        for place in (folder.root, folder.checkpoints):
            remove_stale_temporaries(place)
    torch.manual_seed(cfg.seed)
    if cfg.detect_anomaly:
        torch.autograd.set_detect_anomaly(True)  # slow: names the op that produced a NaN in backward
    data = task.load_data(cfg, device)
    model = task.build_model(cfg, data).to(device)
    autocast = autocast_dtype(cfg.precision)
    run = Run(
        task,
        cfg,
        dist,
        device,
        folder,
        log,
        show_bar=(sys.stderr.isatty() if progress is None else progress) and dist.is_main,
        data=data,
        model=model,
        hooks=training_hooks(task.hooked(model), cfg.mechanisms),
        autocast_dtype=autocast,
        per_rank_batch=max(1, cfg.batch_size // dist.world_size),
        started=started,
    )
    task.prepare(run)
    batches = task.steps_per_epoch(run)
    run.steps_per_epoch = batches // cfg.accumulate  # optimiser steps: what the schedule counts
    if run.steps_per_epoch == 0:
        raise AttnlabError(f"accumulate={cfg.accumulate}: an epoch has only {batches} batch(es) of {cfg.batch_size}")
    run.optimizer = make_optimizer(model, cfg)
    run.scheduler = make_scheduler(run.optimizer, cfg, run.steps_per_epoch)
    run.scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    if cfg.ema_decay is not None:
        from timm.utils import ModelEmaV3

        run.ema = ModelEmaV3(model, decay=cfg.ema_decay)
    if resume:
        _resume(run)
    run.net = DistributedDataParallel(model) if dist.enabled else model
    task.before_training(run)
    if dist.is_main:
        write_text_atomic(folder.config, task.config_comment(run) + cfg.to_yaml())
        folder.write_history(run.history)
    return run


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
    if run.ema is not None:
        run.ema.module.load_state_dict(states["ema"])
    torch.set_rng_state(states["rng"]["torch"])
    if "cuda" in states["rng"] and run.device.type == "cuda":
        torch.cuda.set_rng_state(states["rng"]["cuda"], run.device)
    run.history = info["history"][: run.start_epoch]
    run.task.resume_state(run, info.get("task", {}))  # an older checkpoint has none
    run.started -= wall_time_before(run.history) + info.get("partial", {}).get("seconds", 0.0)
    where = f"after epoch {run.start_epoch}"
    if "partial" in info:  # a checkpoint inside epoch start_epoch + 1
        on_rank = run.dist.is_main  # the sums saved are over every rank: one of them carries them on
        run.partial = EpochSoFar(
            **{**info["partial"], **({} if on_rank else {"counted": 0, "skipped": 0, "seen": 0})},
            sums=states.get("partial", {}) if on_rank else {},
            generator=states["rng"]["hooks"],
        )
        run.start_step = run.partial.step
        where = f"at step {run.start_step} of epoch {run.start_epoch + 1}"
    if run.dist.is_main:
        run.log(f"resuming {run.folder.root} {where}")


def train_epoch(run: Run, epoch: int) -> tuple[dict[str, torch.Tensor], int, int, int, float]:
    """One pass over the training split (the rest of it, after a checkpoint inside it); returns the sums of the
    steps taken, the images they saw, the steps skipped, the images seen by every step (skipped or not: the work
    done) and the seconds. Between steps it checkpoints as ``checkpoint_every`` says or a stop signal asks."""
    cfg = run.cfg
    run.net.train()
    t0 = time.perf_counter()
    so_far = run.partial if epoch == run.start_epoch and run.partial is not None else EpochSoFar()
    run.partial = None
    generator = epoch_generator(cfg.seed, epoch, salt=2)
    if so_far.generator is not None:
        generator.set_state(so_far.generator)
    sums, counted, skipped, seen = dict(so_far.sums), so_far.counted, so_far.skipped, so_far.seen
    start, group = so_far.step, cfg.accumulate  # ``step`` counts batches: ``accumulate`` of them make a step
    used = run.steps_per_epoch * group  # a ragged tail of batches that makes no whole step is left out
    bar = tqdm(
        itertools.islice(run.task.batches(run, epoch, start), used - start),
        total=used,
        initial=start,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=not run.show_bar,
        dynamic_ncols=True,
    )
    pending: list[tuple[int, StepResult]] = []  # the batches of the step under way
    for step, (inputs, targets) in enumerate(bar, start):
        progress = (epoch * used + step) / (cfg.epochs * used)
        pending.append(
            (
                len(targets),
                _micro_step(run, inputs, targets, generator, progress, step % group == 0, (step + 1) % group == 0),
            )
        )
        if (step + 1) % group:
            continue
        ok = _optimizer_step(run, [result for _, result in pending], epoch)
        images = sum(n for n, _ in pending)
        seen += images
        if not ok:
            skipped += 1
        else:
            counted += images
            for _, result in pending:
                for key, value in result.sums.items():
                    sums[key] = sums.get(key, 0) + value.detach().double()
            if run.show_bar:
                bar.set_postfix(loss=f"{pending[-1][1].loss.item():.3f}", refresh=False)
        pending = []
        if _checkpoint_due(run, step + 1):
            seconds = so_far.seconds + time.perf_counter() - t0
            _save(run, epoch, EpochSoFar(step + 1, sums, counted, skipped, seen, seconds, generator.get_state()))
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return sums, counted, skipped, seen, so_far.seconds + time.perf_counter() - t0


def _checkpoint_due(run: Run, batches: int) -> bool:
    """Whether to checkpoint after ``batches`` batches of the epoch (the end of an optimiser step): a stop signal
    arrived, or ``checkpoint_every`` says so (never at the epoch's end, which checkpoints anyway). Rank 0's clock
    decides for every rank, and a signal to any rank stops them all, so that they checkpoint together."""
    every = checkpoint_interval(run.cfg.checkpoint_every) if run.cfg.checkpoint_every is not None else None
    due = False
    steps = batches // run.cfg.accumulate
    if every is not None and steps < run.steps_per_epoch:
        unit, amount = every
        due = steps % int(amount) == 0 if unit == "steps" else time.monotonic() - run.last_save >= amount
    if run.dist.enabled:
        import signal

        numbers = [int(getattr(signal, name, 0)) for name in STOP_SIGNALS]
        flags = [float(due and run.dist.is_main), *(float(run.stop.signum == n) for n in numbers)]
        summed = run.dist.all_sum(torch.tensor(flags, device=run.device)).tolist()
        due = summed[0] > 0
        if run.stop.signum is None:
            run.stop.signum = next((n for n, got in zip(numbers, summed[1:]) if got > 0), None)
    return due or run.stop.signum is not None


def _save(run: Run, epoch: int, so_far: EpochSoFar) -> None:
    """A checkpoint ``so_far.step`` steps into ``epoch`` (its sums over every rank); then answer a stop signal."""
    keys = run.task.train_terms(run.cfg)  # every rank sums the same keys, whatever it skipped
    zero = torch.zeros((), dtype=torch.float64, device=run.device)
    totals = run.dist.all_sum(torch.stack([so_far.sums.get(k, zero) for k in keys]))
    counts = run.dist.all_sum(
        torch.tensor([so_far.counted, so_far.skipped, so_far.seen], dtype=torch.float64, device=run.device)
    )
    task_state = run.task.gather_state(run)
    if run.dist.is_main:
        counted, skipped, seen = (int(c) for c in counts.tolist())
        partial = {"step": so_far.step, "counted": counted, "skipped": skipped, "seen": seen, "seconds": so_far.seconds}
        states = _states(run)
        states["rng"]["hooks"] = so_far.generator
        states["partial"] = {k: totals[i] for i, k in enumerate(keys)}
        save_checkpoint(
            run.folder.checkpoints,
            epoch,
            states,
            {"history": run.history, "partial": partial, "task": task_state},
            step=so_far.step,
        )
    run.last_save = time.monotonic()
    run.dist.barrier()
    if run.stop.signum is not None:
        run.stop.answer(f"at step {so_far.step} of epoch {epoch + 1}", run.folder)


def _micro_step(run: Run, inputs, targets, generator, progress: float, first: bool, last: bool) -> StepResult:
    """Forward and backward of one batch, its gradients added to those of the step's earlier batches (``first``:
    none yet; ``last``: the step's last batch); the loss is divided by ``accumulate`` so that the step's gradient
    is that of the mean over its batches. The result's ``loss`` is the batch's whole loss, extra terms included."""
    cfg, model = run.cfg, run.model
    if first:
        run.optimizer.zero_grad(set_to_none=True)
        # "skip" must also undo what a bad forward did to BN running statistics
        run.saved_buffers = [b.clone() for b in model.buffers()] if cfg.nonfinite == "skip" else None
    for hook in run.hooks:
        hook.before_step(progress)
    with run.autocast():
        with contextlib.ExitStack() as watching:
            for hook in run.hooks:
                watching.enter_context(hook.watch())
            result = run.task.forward(run, inputs, targets)
        total = result.loss
        for hook in run.hooks:
            if (term := hook.extra_loss(result.hook_input, generator)) is not None:
                total = total + term
    syncing = contextlib.nullcontext() if last or not run.dist.enabled else run.net.no_sync()
    with syncing:  # DDP averages the gradients over ranks once per step, at its last batch
        run.scaler.scale(total if cfg.accumulate == 1 else total / cfg.accumulate).backward()
    return StepResult(total.detach(), result.sums, result.hook_input)


def _optimizer_step(run: Run, results: list[StepResult], epoch: int) -> bool:
    """The optimiser step of the batches of ``results``; False when a non-finite step was skipped."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip or math.inf)
    finite_loss = all(bool(torch.isfinite(r.loss)) for r in results)
    # with fp16 the GradScaler itself skips steps with inf/NaN gradients and lowers its scale
    if not run.scaler.is_enabled() and not (torch.isfinite(grad_norm) and finite_loss):
        _skip_step(run, run.saved_buffers, "gradients" if finite_loss else "loss", epoch)
        return False
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)
    return True


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


def end_epoch(
    run: Run, epoch: int, sums: dict[str, torch.Tensor], counted: int, skipped: int, seen: int, seconds: float
) -> None:
    """Validate, record the epoch in the history, write a checkpoint and the metrics, log one line."""
    dist = run.dist
    keys = run.task.train_terms(run.cfg)
    zero = torch.zeros((), dtype=torch.float64, device=run.device)
    counts = torch.tensor([counted, skipped, seen], dtype=torch.float64, device=run.device)
    totals = dist.all_sum(torch.cat([torch.stack([sums.get(k, zero) for k in keys]), counts])).tolist()
    counted, skipped, seen = totals[len(keys) :]
    run.train_images += seen  # throughput counts the skipped steps' work too
    run.train_seconds += seconds
    val = run.evaluate(run.data.val)
    if run.ema is not None:
        with _evaluating(run, run.ema.module):
            val.update({f"ema_{k}": v for k, v in run.evaluate(run.data.val).items()})
    record: dict[str, Any] = {"epoch": epoch + 1}
    # NaN: every step of the epoch was skipped (not a loss of 0 nobody had)
    record.update({f"train_{k}": (total / counted if counted else math.nan) for k, total in zip(keys, totals)})
    record.update({f"val_{k}": v for k, v in val.items()})
    record.update(
        lr=run.scheduler.get_last_lr()[0],
        epoch_time=seconds,
        img_per_s=seen / seconds,
        skipped_steps=int(skipped),
        wall_time=time.time() - run.started,  # since the run began, every process that trained it together
    )
    run.history.append(record)
    task_state = run.task.gather_state(run)
    if dist.is_main:
        info = {"history": run.history, "task": task_state}
        save_checkpoint(run.folder.checkpoints, epoch + 1, _states(run), info)
        run.last_save = time.monotonic()
        run.folder.write_history(run.history)
        run.log(
            f"epoch {epoch + 1}/{run.cfg.epochs}  {run.task.epoch_text(record)}  lr {record['lr']:.4f}  "
            f"{record['img_per_s']:.1f} img/s  {seconds:.1f}s"
        )
    dist.barrier()


def _states(run: Run) -> dict[str, Any]:
    """What a checkpoint holds of the run: weights, optimiser, schedule, scaler and RNG."""
    rng = {"torch": torch.get_rng_state()}  # Faster R-CNN's proposal and RoI sampling draw from it too
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    states = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng,
    }
    if run.ema is not None:
        states["ema"] = run.ema.module.state_dict()
    return states


@contextlib.contextmanager
def _evaluating(run: Run, module: nn.Module) -> Iterator[None]:
    """``run`` with ``module`` (the weights' average) in place of its model, for the task's evaluation."""
    saved = run.model, run.net
    run.model = run.net = module
    try:
        yield
    finally:
        run.model, run.net = saved


def finish(run: Run) -> dict[str, Any]:
    """Test once, write the final weights and ``summary.json``; returns the summary (on every rank)."""
    test = run.evaluate(run.data.test)
    if run.ema is not None:
        with _evaluating(run, run.ema.module):
            test.update({f"ema_{k}": v for k, v in run.evaluate(run.data.test).items()})
    run.task.gather_state(run)  # what the test split added, on every rank
    summary = None
    if run.dist.is_main:
        save_tensors_atomic(run.folder.weights, run.model.state_dict(), run.task.weights_metadata(run))
        if run.ema is not None:
            save_tensors_atomic(run.folder.ema_weights, run.ema.module.state_dict(), run.task.weights_metadata(run))
        summary = _summary(run, test)
        write_text_atomic(run.folder.summary, json.dumps(summary, indent=2))
        run.log(f"done: {run.task.done_text(summary)}  → {run.folder.root}")
    return run.dist.broadcast_object(summary)


def _summary(run: Run, test: dict[str, float | None]) -> dict[str, Any]:
    cfg, history = run.cfg, run.history
    return {
        "model": cfg.model,
        "dataset": run.data.name,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        **{k: v for k, v in history[-1].items() if k.startswith("val_")},
        **{f"test_{k}": v for k, v in test.items()},
        "params": sum(p.numel() for p in run.model.parameters()),
        **run.task.summary_fields(run),
        "train_img_per_s": (run.train_images / run.train_seconds)
        if run.train_seconds
        else sum(h["img_per_s"] for h in history) / len(history),
        "wall_time_s": time.time() - run.started,
        "train_time_s": sum(h["epoch_time"] for h in history),
        "world_size": run.dist.world_size,
        "device": device_name(run.device),
        "precision": cfg.precision,
        "versions": versions(),
    }
