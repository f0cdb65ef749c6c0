"""The in-memory dataset containers and the three ways a split is derived: validation carving, subsetting, statistics.

A `Split` is a whole split as tensors (uint8 images N×C×H×W, int64 labels, optional boxes), so a training epoch is
tensor indexing, not a Python loop over samples (the airbench design). A `DataBundle` is what `load_dataset` returns:
train/val/test splits plus what the training engine needs to know about them (classes, normalisation statistics,
augmentation that suits the data). A `Source` is what one dataset family's loader returns: the official train and test
splits before validation carving; a `DetectionSource` is its detection counterpart.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import AttnlabError
from ..schema import check_call

SPLIT_SEED = 0
"""Seed of the validation (and imagefolder test) carving: a constant, so every run and every model is selected on the
same validation images whatever its training seed."""


@dataclass
class Split:
    """One split held in memory.

    Attributes:
        images: uint8 N×C×H×W.
        labels: int64 N.
        boxes: float32 N×4 ground-truth boxes (x0, y0, x1, y1) in pixel-edge coordinates (x1, y1 exclusive: a box
            covering pixel columns 3..5 is x0=3, x1=6); only datasets with a localisation target have them.
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, images, labels = len(self.labels), self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise AttnlabError(f"Split images must be uint8 N×C×H×W, not {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.ndim != 1 or len(images) != n:
            raise AttnlabError(f"Split labels must be int64 of length {len(images)}, not {labels.dtype} {labels.shape}")
        if self.boxes is not None and (self.boxes.dtype != torch.float32 or tuple(self.boxes.shape) != (n, 4)):
            raise AttnlabError(f"Split boxes must be float32 {n}×4, got {self.boxes.dtype} {tuple(self.boxes.shape)}")

    streamed = False
    """Whether the images stay on disk (`attnlab.data.stream.StreamSplit`); a Split holds them."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C, H, W of its images."""
        return tuple(self.images.shape[1:])

    @property
    def nbytes(self) -> int:
        """Memory its tensors take."""
        return sum(t.nbytes for t in (self.images, self.labels, self.boxes) if t is not None)

    def take(self, indices: torch.Tensor) -> Split:
        """The samples at ``indices`` (in that order), boxes included."""
        boxes = None if self.boxes is None else self.boxes[indices.to(self.boxes.device)]
        return Split(self.images[indices.to(self.images.device)], self.labels[indices.to(self.labels.device)], boxes)

    def to(self, device: torch.device | str) -> Split:
        """The same split on ``device`` (to keep a small dataset on the GPU for the whole run)."""
        boxes = None if self.boxes is None else self.boxes.to(device)
        return Split(self.images.to(device), self.labels.to(device), boxes)


@dataclass
class Source:
    """What a dataset family's loader found: the official train and test splits and how to treat them.

    Attributes:
        train: the training pool, from which `load_dataset` carves the validation split.
        test: the held-out test split (both `attnlab.data.stream.StreamSplit` s when the images stay on disk).
        classes: class names, index = label.
        crop_padding: zero padding of the random-crop augmentation, in pixels.
        hflip: whether horizontal flips preserve the labels' meaning.
        default_val: validation size when the user gives none (a count or a fraction of the pool).
        origin: where the data came from (files, folder, generator and seed), for logs and summaries.
        notes: what the loader did that a user may not expect (images resized, a test split carved), one line each,
            shown once by `attnlab data` and at the start of a run.
    """

    train: Split
    test: Split
    classes: list[str]
    crop_padding: int
    hflip: bool
    default_val: int | float = 0.1
    origin: str = ""
    notes: tuple[str, ...] = ()


@dataclass
class DetectionSource:
    """What a detection dataset's loader found (`attnlab.data.detection`, `attnlab.data.coco`): train pool, test split
    (and val if the data has its own), as datasets of (image, target) pairs."""

    train: object
    test: object
    classes: list[str]
    in_chans: int
    val: object | None = None
    default_val: int | float = 0.1
    origin: str = ""


@dataclass
class DataBundle:
    """A dataset ready for training: three splits plus what the engine needs to know about them.

    Attributes:
        name: the dataset name as given to `load_dataset`.
        train, val, test: the splits (`Split` s, or `attnlab.data.stream.StreamSplit` s of files on disk); val is
            carved from the training pool with `SPLIT_SEED`, never from test.
        num_classes: number of classes.
        classes: class names, index = label.
        mean, std: per-channel statistics of the train split, in [0, 1] pixel units.
        crop_padding: zero padding of the random-crop augmentation, in pixels.
        hflip: whether `batches` flips training images horizontally.
        origin: where the data came from.
        notes: the loader's notes (`Source.notes`).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool
    origin: str = field(default="")
    notes: tuple[str, ...] = ()

    @property
    def in_chans(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.image_shape[1:])

    @property
    def nbytes(self) -> int:
        """Memory of the three splits' tensors (a streamed split's labels and file indices only)."""
        return sum(s.nbytes for s in (self.train, self.val, self.test))

    @property
    def streamed(self) -> bool:
        """Whether the images are read from disk in worker processes (`attnlab.data.stream`) rather than held."""
        return self.train.streamed

    def to(self, device: torch.device | str) -> DataBundle:
        """The same bundle with its three splits on ``device``."""
        splits = {name: getattr(self, name).to(device) for name in ("train", "val", "test")}
        return dataclasses.replace(self, **splits)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (seed, epoch, stream, ...) without collisions."""
    if any(k < 0 for k in keys):
        raise AttnlabError(f"seeds must be non-negative integers, got {keys}")
    state = np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def resolve_count(size: int | float, pool: int, what: str) -> int:
    """A count from ``size`` (an int count or a float fraction of ``pool``), checked to leave a non-empty pool."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise AttnlabError(f"{what} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise AttnlabError(f"{what} as a fraction must be in [0, 1), got {size}")
        size = round(size * pool)
    if not 0 <= size < pool:
        raise AttnlabError(f"{what}={size} must be in [0, {pool}) for a pool of {pool} images")
    return size


def carve(pool: Split, size: int | float, what: str = "val_size") -> tuple[Split, Split]:
    """Split ``pool`` into (rest, carved) with `SPLIT_SEED`; both keep the pool's order."""
    k = resolve_count(size, len(pool), what)
    perm = torch.randperm(len(pool), generator=seeded_generator(SPLIT_SEED))
    carved, rest = perm[:k].sort().values, perm[k:].sort().values
    return pool.take(rest), pool.take(carved)


def take_subset(train: Split, n: int, seed: int) -> Split:
    """The first ``n`` samples of a permutation seeded by ``seed`` (kept in the split's order)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= len(train):
        raise AttnlabError(f"subset={n!r} must be an int in [1, {len(train)}] (the training images left after val)")
    perm = torch.randperm(len(train), generator=seeded_generator(seed, 1))
    return train.take(perm[:n].sort().values)


def channel_counts(images: torch.Tensor) -> torch.Tensor:
    """Each channel's exact 256-bin histogram of uint8 N×C×H×W ``images`` (C×256 int64; one `torch.bincount` per
    channel, no float copy of the data)."""
    return torch.stack([torch.bincount(channel.flatten(), minlength=256) for channel in images.cpu().unbind(1)])


def stats_from_counts(counts: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std in [0, 1] units from C×256 pixel histograms, in float64, so the result
    matches a float64 computation over all pixels to rounding. A constant channel gets std 1 (not 0) so that
    normalising by it stays finite."""
    if counts.sum() == 0:
        raise AttnlabError("cannot compute normalisation statistics of an empty training split")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in counts.double():
        mean = (channel * values).sum() / channel.sum()
        var = (channel * (values - mean).square()).sum() / channel.sum()
        means.append(mean.item())
        stds.append(var.sqrt().item() if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units (`stats_from_counts` of their
    histograms)."""
    if len(images) == 0:
        raise AttnlabError("cannot compute normalisation statistics of an empty training split")
    return stats_from_counts(channel_counts(images))


def loader_kwargs(
    name: str, loader: Callable, options: dict, data_dir: str | os.PathLike | None, download: bool
) -> dict:
    """The keyword arguments for dataset ``name``'s ``loader``: its ``options``, refused in one line if it does not
    take one, plus ``data_dir`` and ``download`` where it reads files."""
    params = inspect.signature(loader).parameters
    allowed = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p != "download"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"its options: {', '.join(allowed)}" if allowed else "it takes none"
        raise AttnlabError(f"dataset '{name}' has no option '{unknown[0]}' ({takes})")
    kwargs = check_call(loader, options, f"dataset '{name}'")  # of the types the loader declares
    if "data_dir" in params:
        kwargs["data_dir"] = data_dir
    if "download" in params:
        kwargs["download"] = download
    return kwargs
