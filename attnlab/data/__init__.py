"""Datasets as in-memory tensors, and seeded, sharded, augmented batches over them.

``load_dataset(name)`` returns a `DataBundle`: train/val/test `Split` s (uint8 images, int64 labels, optional boxes),
class names, the train split's per-channel mean/std, and the augmentation that suits the data. ``batches(split,
bundle, batch_size, train=...)`` turns a split into normalised float batches on a device; training batches follow a
permutation seeded by (seed, epoch), are sharded across DDP ranks with an equal batch count per rank, and are
augmented (zero-padded random crop, horizontal flip where it suits the data) on whole batches. Same arguments, same
bits: a killed run resumes on exactly the batches it would have seen. An image folder too large for memory comes as
`attnlab.data.stream.StreamSplit` s; ``batches`` draws the same epoch plan for them and hands it to DataLoader
workers that read the files (`attnlab.data.folder`).

Datasets (``list_datasets()``): ``fashion-mnist``, ``mnist`` (IDX files, `attnlab.data.idx`), ``cifar10``,
``cifar100`` (python pickle archive read by a restricted unpickler, `attnlab.data.cifar`), ``imagefolder:PATH``
(`attnlab.data.folder`), ``cluttered-fashion-mnist`` (garment on a cluttered canvas, with boxes,
`attnlab.data.cluttered`) and ``synthetic`` (`attnlab.data.synthetic`). Files are found through ``data_dir``, the
``ATTNLAB_DATA`` environment variable, or system folders (`attnlab.data.locate`); nothing is downloaded unless
``download=True``.

Splits: validation is carved from the training pool with a constant seed (`SPLIT_SEED`), never from test, so every
run and every model is selected on the same images; ``val_size`` defaults to 5000 for the MNIST-likes, 10% otherwise.
``subset=N`` keeps N training images (a permutation seeded by the run's ``seed``). Options of a dataset (``shape``,
``canvas``, ``image_size``...) are keyword arguments; one it does not take is an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from ..errors import AttnlabError, unknown_name
from .augment import draw_params, flip, normalize, random_crop
from .bundle import (
    SPLIT_SEED,
    DataBundle,
    Source,
    Split,
    carve,
    channel_stats,
    loader_kwargs,
    seeded_generator,
    stats_from_counts,
    take_subset,
)
from .cifar import load_cifar10, load_cifar100
from .cluttered import load_cluttered_fashion_mnist
from .folder import load_imagefolder
from .idx import load_fashion_mnist, load_mnist
from .stream import EpochPlan, stream_batches, train_transform
from .synthetic import load_synthetic

__all__ = [
    "SPLIT_SEED",
    "DataBundle",
    "Source",
    "Split",
    "batch_notes",
    "batches",
    "list_datasets",
    "load_dataset",
    "num_batches",
    "register_dataset",
]

Loader = Callable[..., Source]
IMAGEFOLDER = "imagefolder"
_REGISTRY: dict[str, Loader] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "cluttered-fashion-mnist": load_cluttered_fashion_mnist,
    "synthetic": load_synthetic,
}


def register_dataset(name: str, loader: Loader) -> Loader:
    """Make ``load_dataset(name)`` call ``loader``; it takes keyword-only options (and ``data_dir``/``download`` if it
    reads files) and returns a `Source`."""
    _REGISTRY[name] = loader
    return loader


def list_datasets() -> list[str]:
    """Dataset names, sorted; ``imagefolder:PATH`` stands for any folder."""
    return sorted([*_REGISTRY, f"{IMAGEFOLDER}:PATH"])


def _resolve(name: str) -> tuple[Loader, tuple]:
    if name == IMAGEFOLDER or name.startswith(f"{IMAGEFOLDER}:"):
        path = name[len(IMAGEFOLDER) + 1 :]
        if not path:
            raise AttnlabError("dataset imagefolder needs a folder: imagefolder:PATH")
        return load_imagefolder, (path,)
    try:
        return _REGISTRY[name], ()
    except KeyError:
        raise unknown_name("dataset", name, list_datasets()) from None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = False,
    **options,
) -> DataBundle:
    """Load dataset ``name`` into memory and split it into train/val/test.

    Args:
        name: one of `list_datasets()` (``imagefolder:PATH`` with a real path).
        data_dir: folder to look in first for the dataset's files.
        val_size: validation images carved from the training pool: an int count or a float fraction (default 5000
            for the MNIST-likes, 0.1 otherwise).
        subset: keep only this many training images (after carving val), chosen by ``seed``.
        seed: the run's seed; only ``subset`` uses it (generated datasets take their own ``data_seed`` option).
        download: fetch the files through torchvision if no local copy is found.
        **options: dataset options (e.g. ``shape`` for synthetic, ``canvas`` for cluttered-fashion-mnist).
    """
    loader, args = _resolve(name)
    source = loader(*args, **loader_kwargs(name, loader, options, data_dir, download))
    train, val = carve(source.train, source.default_val if val_size is None else val_size)
    if subset is not None:
        train = take_subset(train, subset, seed)
    notes = source.notes
    if train.streamed:
        counts, used = train.channel_counts(train.options.stats_images)
        mean, std = stats_from_counts(counts)
        if used < len(train):
            notes += (f"normalisation statistics from {used} of the {len(train)} training images (stats_images)",)
    else:
        mean, std = channel_stats(train.images)
    return DataBundle(
        name=name,
        train=train,
        val=val,
        test=source.test,
        num_classes=len(source.classes),
        classes=list(source.classes),
        mean=mean,
        std=std,
        crop_padding=source.crop_padding,
        hflip=source.hflip,
        origin=source.origin,
        notes=notes,
    )


MIN_STEPS = 4
"""Fewer optimiser steps per epoch than this and `batch_notes` warns."""
DROPPED_SHARE = 0.1
"""A ragged last batch dropped each epoch that is at least this share of the training split is warned about."""


def batch_notes(n: int, batch_size: int, world_size: int = 1) -> list[str]:
    """Warnings, one line each, about a training split of ``n`` images at ``batch_size`` per rank: fewer than
    `MIN_STEPS` optimiser steps per epoch, or a large share of the images left out of every epoch (`batches` drops a
    ragged last training batch)."""
    steps = num_batches(n, batch_size, train=True, world_size=world_size)
    used = steps * batch_size * world_size
    total = batch_size * world_size
    notes = []
    if steps < MIN_STEPS:
        notes.append(
            f"{n} training images at batch size {total} make {steps} optimiser step(s) per epoch; the model will "
            f"hardly learn (lower --batch-size, e.g. to {2 ** max(0, (n // MIN_STEPS).bit_length() - 1)})"
        )
    if steps and n - used >= DROPPED_SHARE * n:
        notes.append(
            f"each epoch leaves out {n - used} of the {n} training images ({(n - used) / n:.0%}) to keep batches "
            f"full at batch size {total}; a batch size that divides {n} uses them all"
        )
    return notes


def _check_sharding(batch_size: int, rank: int, world_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttnlabError(f"batch_size must be a positive integer, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise AttnlabError(f"rank {rank} is not in [0, world_size={world_size})")


def num_batches(
    n: int, batch_size: int, *, train: bool, world_size: int = 1, rank: int = 0, drop_last: bool | None = None
) -> int:
    """How many batches `batches` yields on ``rank`` for a split of ``n`` samples.

    Training shards hold ``n // world_size`` samples on every rank (the ``n % world_size`` left over change with the
    epoch's permutation), so every rank runs the same number of steps, as DDP needs. ``drop_last=None`` drops a
    ragged last training batch unless that would leave no batch at all, and never drops in evaluation.
    """
    _check_sharding(batch_size, rank, world_size)
    shard = n // world_size if train else len(range(rank, n, world_size))
    if drop_last is None:
        drop_last = train and shard >= batch_size
    return shard // batch_size if drop_last else -(-shard // batch_size)


def batches(
    split: Split,
    bundle: DataBundle,
    batch_size: int,
    *,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    drop_last: bool | None = None,
    channels_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float32 images and int64 labels on ``device``, ``batch_size`` per rank at a time.

    With ``train=True`` the epoch visits a permutation seeded by (``seed``, ``epoch``), identical on every rank;
    ``rank`` takes positions ``rank, rank + world_size, ...`` of it, and each sample is cropped and flipped with
    parameters drawn per position from (``seed``, ``epoch``), so a sample's augmentation does not depend on the
    number of ranks. With ``train=False`` the split is read in order, ``rank::world_size``, unaugmented. The images
    stay where the split keeps them (CPU, or the GPU after ``split.to(device)``); each batch is indexed there and
    moved to ``device``.

    Args:
        split: the split to iterate (one of ``bundle``'s).
        bundle: supplies mean/std, crop padding and whether to flip.
        batch_size: samples per batch on this rank.
        train: shuffle, shard evenly and augment, or read in order.
        epoch, seed: select the permutation and augmentation.
        rank, world_size: this process's place among the DDP processes.
        device: where the batches go.
        drop_last: see `num_batches`.
        channels_last: return images in channels-last memory format.
        start: the first batch to yield (a run resumed inside an epoch skips those it trained on; the permutation
            and augmentation are drawn whole, so the rest are the batches an uninterrupted epoch yields).
    """
    count = num_batches(len(split), batch_size, train=train, world_size=world_size, rank=rank, drop_last=drop_last)
    n = len(split)
    if train:
        order = torch.randperm(n, generator=seeded_generator(seed, epoch, 0))
        positions = torch.arange((n // world_size) * world_size)[rank::world_size]
        offsets, flips = draw_params(n, bundle.crop_padding, seeded_generator(seed, epoch, 1))
        indices, offsets, flips = order[positions], offsets[positions], flips[positions]
    else:
        indices = torch.arange(n)[rank::world_size]
    mean = torch.tensor(bundle.mean, dtype=torch.float32, device=device)
    std = torch.tensor(bundle.std, dtype=torch.float32, device=device)
    if split.streamed:
        if train and (bundle.crop_padding or bundle.hflip):  # augmented (not a run with augment off)
            transform = train_transform(split, bundle.mean, bundle.std)
            flips = flips if bundle.hflip else None
            plan = EpochPlan(indices, offsets, flips, (seed, epoch), bundle.crop_padding, transform)
        else:
            plan = EpochPlan(indices, None, None, None)
        steps = range(start, count)
        return stream_batches(split, plan, steps, batch_size, mean, std, device, channels_last, bundle.num_classes)
    augment = (bundle.crop_padding, offsets, flips if bundle.hflip else None) if train else None
    indices = indices.to(split.images.device)
    return _iterate(split, indices, range(start, count), batch_size, augment, mean, std, device, channels_last)


def _iterate(
    split: Split,
    indices: torch.Tensor,
    steps: range,
    batch_size: int,
    augment: tuple[int, torch.Tensor, torch.Tensor | None] | None,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device | str,
    channels_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b in steps:
        batch = slice(b * batch_size, (b + 1) * batch_size)
        images = split.images[indices[batch]].to(device, non_blocking=True)
        labels = split.labels[indices[batch].to(split.labels.device)].to(device, non_blocking=True)
        if augment is not None:
            padding, offsets, flips = augment
            images = random_crop(images, padding, offsets[batch])
            if flips is not None:
                images = flip(images, flips[batch])
        images = normalize(images, mean, std)
        yield (images.contiguous(memory_format=torch.channels_last) if channels_last else images), labels
