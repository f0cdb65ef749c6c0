"""Classification as a kind of run (`attnlab.train.engine.RunTask`): image batches with labels, cross-entropy,
accuracy, and the classifier's memory layout and ``torch.compile``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DataBundle, batch_notes, batches, load_dataset, num_batches
from ..errors import AttnlabError
from ..layers import StepHook
from ..models import create_model
from ..models.weights import WeightsNotice
from .compiling import compile_module, eager, is_compiled, run_or_fall_back
from .config import RESUMABLE_CHANGES, TrainConfig
from .cost import count_flops, measure_latency
from .engine import Run, RunTask, StepResult, run_task
from .evaluate import check_labels, evaluate

GPU_DATA_SHARE = 0.25
"""Largest share of the GPU's free memory a dataset may take to be kept there for the whole run."""


def data_on_gpu(bundle: DataBundle, device: torch.device, free_bytes: int) -> DataBundle:
    """``bundle`` moved to the GPU when it takes at most `GPU_DATA_SHARE` of its free memory (Fashion-MNIST: 55 MB), so
    a step indexes, crops and flips its batch there without a host copy, and many runs can share one GPU; a larger
    dataset stays in host memory and each batch is copied over."""
    return bundle.to(device) if bundle.nbytes <= GPU_DATA_SHARE * free_bytes else bundle


def data_path(bundle: DataBundle) -> str:
    """Which path reads the run's images, in words (the first line of its ``config.yaml``)."""
    if not bundle.streamed:
        return f"held in memory ({bundle.nbytes / 2**20:.1f} MiB)"
    options = bundle.train.options
    return f"streamed from disk by {options.workers} worker process(es), {options.prefetch} batches ahead each"


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
    with notices_as_lines():
        return create_model(
            cfg.model,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained=cfg.pretrained,
            weights=cfg.weights,
            image_size=tuple(bundle.image_size),
            **kwargs,
        )


@contextlib.contextmanager
def notices_as_lines(stream: TextIO | None = None) -> Iterator[None]:
    """Inside: each `WeightsNotice` (a classifier re-initialised, an input convolution adapted, a variant's new
    modules) becomes one ``attnlab: ...`` line on ``stream`` (stderr by default) instead of a warning's two; other
    warnings pass as they were."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightsNotice)
        yield
    for w in caught:
        if issubclass(w.category, WeightsNotice):
            print(f"attnlab: {w.message}", file=stream or sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def memory_layout(cfg: TrainConfig, hooks: list[StepHook]) -> bool:
    """Whether a run trains and evaluates in channels-last: ``cfg.channels_last``, or by default unless a mechanism
    in the model is slower in it. `attnlab eval` asks this too, to evaluate as the run did."""
    return all(h.channels_last for h in hooks) if cfg.channels_last is None else cfg.channels_last


def run_data(cfg: TrainConfig, dataset: str | None = None, data_dir: str | None = None, **options) -> DataBundle:
    """The data of the run configured by ``cfg``: its dataset with its options, folder, seed and validation split
    (exactly the splits it trained, validated and tested on); or ``dataset`` instead (then without the run's options
    and split). ``options`` are added to the dataset's."""
    same = dataset is None or dataset == cfg.dataset
    return load_dataset(
        cfg.dataset if same else dataset,
        data_dir or (cfg.data_dir if same else None),
        val_size=cfg.val_size if same else None,
        subset=cfg.subset if same else None,
        seed=cfg.seed,
        **{**(cfg.dataset_options if same else {}), **options},
    )


class Classification(RunTask):
    """A classifier trained with cross-entropy (with label smoothing) and scored by accuracy."""

    resumable = RESUMABLE_CHANGES

    def load_data(self, cfg: TrainConfig, device: torch.device) -> DataBundle:
        bundle = run_data(cfg)
        if not cfg.augment:
            bundle = dataclasses.replace(bundle, crop_padding=0, hflip=False)
        if device.type == "cuda":
            bundle = data_on_gpu(bundle, device, free_bytes=torch.cuda.mem_get_info(device)[0])
        return bundle

    def build_model(self, cfg: TrainConfig, data: DataBundle) -> nn.Module:
        return build_model(cfg, data)

    def prepare(self, run: Run) -> None:
        run.channels_last = memory_layout(run.cfg, run.hooks)
        if run.channels_last:
            run.model = run.model.to(memory_format=torch.channels_last)

    def before_training(self, run: Run) -> None:
        if run.cfg.compile:
            _compile(run)

    def train_terms(self, cfg: TrainConfig) -> tuple[str, ...]:
        return ("loss", "acc")

    def steps_per_epoch(self, run: Run) -> int:
        bundle, dist = run.data, run.dist
        steps = num_batches(len(bundle.train), run.per_rank_batch, train=True, world_size=dist.world_size)
        if steps == 0:
            raise AttnlabError(
                f"{bundle.name}: {len(bundle.train)} training images make no full batch of {run.cfg.batch_size}"
            )
        if dist.is_main:  # once per run start, where the batch size is known
            for note in bundle.notes:
                run.log(f"note: {note}")
            for warning in batch_notes(len(bundle.train), run.per_rank_batch, dist.world_size):
                run.log(f"warning: {warning}")
        return steps

    def batches(self, run: Run, epoch: int, start: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return batches(
            run.data.train,
            run.data,
            run.per_rank_batch,
            train=True,
            epoch=epoch,
            seed=run.cfg.seed,
            rank=run.dist.rank,
            world_size=run.dist.world_size,
            device=run.device,
            channels_last=run.channels_last,
            start=start,
        )

    def forward(self, run: Run, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        # a compiled graph may meet a new shape mid-run (the last, partial batch) and fail to recompile
        logits = run_or_fall_back(run.model, run.cfg.model, lambda: run.net(x))
        loss = F.cross_entropy(logits.float(), y, label_smoothing=run.cfg.label_smoothing)
        hard = y if y.ndim == 1 else y.argmax(1)  # Mixup/CutMix batches carry class probabilities
        with torch.no_grad():
            sums = {"loss": loss.detach().double() * len(y), "acc": (logits.argmax(1) == hard).sum().double()}
        return StepResult(loss, sums, x)

    def evaluate(self, run: Run, split) -> dict[str, float]:
        return run_or_fall_back(
            run.model,
            f"{run.cfg.model} (evaluation)",
            lambda: evaluate(
                run.net,
                split,
                run.data,
                batch_size=run.cfg.eval_batch_size,
                device=run.device,
                dist=run.dist,
                autocast_dtype=run.autocast_dtype,
                channels_last=run.channels_last,
            ),
        )

    def epoch_text(self, record: dict[str, Any]) -> str:
        return (
            f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}  "
            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.2%}"
        )

    def done_text(self, summary: dict[str, Any]) -> str:
        return (
            f"val acc {summary['val_acc']:.2%}  test acc {summary['test_acc']:.2%}  "
            f"{summary['train_img_per_s']:.0f} img/s"
        )

    def weights_metadata(self, run: Run) -> dict[str, str]:
        return {
            "attnlab_model": run.cfg.model,
            "num_classes": str(run.data.num_classes),
            "in_chans": str(run.data.in_chans),
            "model_kwargs": json.dumps(run.cfg.model_kwargs),
        }

    def config_comment(self, run: Run) -> str:
        return f"# data: {data_path(run.data)}\n"

    def summary_fields(self, run: Run) -> dict[str, Any]:
        bundle, device = run.data, run.device
        with eager(run.model) as model:  # FLOPs and the one-image latency of the plain module
            flops = count_flops(model, bundle.in_chans, bundle.image_size, device)
            latency_ms = measure_latency(model, bundle.in_chans, bundle.image_size, device)
        return {
            "flops": flops,
            "latency_ms": latency_ms,
            "image_size": list(bundle.image_size),
            "channels_last": run.channels_last,
            "compile": is_compiled(run.model),  # False where --compile fell back to eager
            "data_path": "stream" if bundle.streamed else "memory",
            **({"skipped_images": len(bundle.train.skipped)} if bundle.streamed else {}),
        }

    def gather_state(self, run: Run) -> dict[str, Any]:
        """The names of the unreadable files ``skip_bad`` left out so far, every rank's; kept in each checkpoint so that
        a resumed run counts them too."""
        if not run.data.streamed:
            return {}
        skipped = run.data.train.skipped  # one set shared by the source's splits
        skipped.update(run.dist.union(skipped))
        return {"skipped_images": sorted(skipped)}

    def resume_state(self, run: Run, state: dict[str, Any]) -> None:
        if run.data.streamed:
            run.data.train.skipped.update(state.get("skipped_images", ()))


def _compile(run: Run) -> None:
    """Compile the model in place (the data pipeline stays eager) and compile its training graph now, on one batch of
    zeros, so that a model that cannot compile falls back to eager (one warning) before training starts. The probe's
    forward and backward leave no trace: the model's state (BN statistics), its gradients and the RNG are restored."""
    model, bundle = run.model, run.data
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


def train(
    cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` and write the run's files under ``cfg.out``; returns the summary
    (`attnlab.train.engine.run_task` with `Classification`)."""
    return run_task(Classification(), cfg, resume=resume, progress=progress, log=log)
