"""Splits read from disk while training: images are decoded in `DataLoader` worker processes, a batch at a time, and
the split is never held in memory (`attnlab.data.folder` chooses this path for a folder over its memory budget).

A `StreamSplit` is a list of files and labels; it is carved, subsetted and taken like a `Split` (``take`` stays lazy,
so an analysis reading N test images decodes only those N). ``stream_batches`` iterates it the way `batches` iterates
a `Split`: it is handed the same epoch plan (permutation seeded by (seed, epoch), rank's positions, crop offset and flip
per position), so with the default augmentation a streamed epoch is bit for bit the in-memory epoch of the same
folder. Each batch is built whole in one worker, from its number alone; randomness a worker draws (timm's train
transforms, RandAugment) is seeded from (seed, epoch, sample index) there, and Mixup/CutMix from (seed, epoch, batch)
in the main process. So batch ``k`` does not depend on which worker built it, on the number of workers, or on where
the epoch started: a run resumed at step ``k`` sees the batches an uninterrupted one would.

Files are listed once, when the split is loaded: plain files (torchvision's `ImageFolder` listing, as the in-memory
path) or members of tar files, read with timm's `create_dataset` reader (`TarFiles`). A file that fails to decode,
disappears or is not an image stops the run with one line naming it, or, with ``skip_bad``, is left out of its batch
and counted (`StreamSplit.skipped`). A worker that dies or takes longer than ``timeout`` seconds for a batch is an
error, never a hang.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import AttnlabError
from .augment import normalize, random_crop
from .bundle import SPLIT_SEED, Split, seeded_generator
from .decode import UNREADABLE, cover_crop, open_image

STATS_BATCH = 256
"""Images per batch while streaming for statistics or materialising a split."""


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed split is read and augmented (the imagefolder options of the same names)."""

    workers: int = 2
    prefetch: int = 4
    timeout: float = 300.0
    skip_bad: bool = False
    timm_train: bool = False
    auto_augment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    stats_images: int = 10_000


class FolderFiles:
    """Image files by path; the paths are one bytes array, which forked workers share without copying."""

    def __init__(self, paths: list[str]):
        self.paths = np.array([os.fsencode(p) for p in paths])

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def name(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def reset(self) -> None:
        """Nothing is held open."""


class TarFiles:
    """Members of a tar file, or of a folder of tar shards, through timm's ``ReaderImageInTar``
    (`timm.data.create_dataset` on a tar file): a member ``CLASS/NAME.jpg`` is labelled by its folder, a member at a
    shard's top by the shard's name. ``order`` puts timm's samples in the order the split uses (`attnlab.data.folder`
    sets the folder layout's)."""

    def __init__(self, root: str):
        from timm.data import create_dataset
        from timm.data.readers.reader_image_in_tar import ReaderImageInTar

        try:  # timm's create_dataset reads a .tar file itself; a folder it takes for images, so it is told
            tar = os.path.isfile(root)
            self.reader = create_dataset("", root=root, search_split=False).reader if tar else ReaderImageInTar(root)
        except (AssertionError, OSError, EOFError, ValueError) as e:
            raise AttnlabError(
                f"{root}: not a readable tar of images ({' '.join(str(e).split()) or type(e).__name__})"
            ) from None
        self.root = root
        self.order = np.arange(len(self.reader))

    def members(self) -> list[tuple[str, str]]:
        """(class name, member path inside its tar) of each sample, in timm's order."""
        reader = self.reader
        return [(reader.class_idx_to_name[int(t)], reader.samples[i][0].name) for i, t in enumerate(reader.targets)]

    def __len__(self) -> int:
        return len(self.order)

    def open(self, i: int):
        return self.reader[int(self.order[i])][0]

    def name(self, i: int) -> str:
        ti, shard, _ = self.reader.samples[int(self.order[i])]
        return f"{os.path.join(self.root, shard) if shard else self.root}:{ti.name}"

    def reset(self) -> None:
        """Forget the tar handles inherited from the parent process: a forked worker opens its own, so that no two
        processes move one file offset."""
        states = self.reader.tar_state
        for state in [states] if not isinstance(states, dict) else list(states.values()):
            state.reset()
            for child in state.children.values():
                child.reset()


class StreamSplit:
    """A split whose images stay on disk: which files (``indices`` into ``files``), their labels, the output size and
    mode, and how to read them. Duck-types `Split` where the rest of the library looks (``labels``, ``boxes``,
    ``take``, ``to``, ``len``).

    ``skipped`` is shared by every split of one source: the files ``skip_bad`` left out so far (their names)."""

    boxes = None
    streamed = True

    def __init__(
        self,
        files: FolderFiles | TarFiles,
        labels: torch.Tensor,
        size: tuple[int, int],
        mode: str,
        options: StreamOptions,
        origin: str,
        indices: torch.Tensor | None = None,
        skipped: set[str] | None = None,
    ):
        self.files, self.size, self.mode, self.options, self.origin = files, size, mode, options, origin
        self.indices = torch.arange(len(files)) if indices is None else indices
        self.labels = labels
        self.skipped = set() if skipped is None else skipped

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, *self.size)

    @property
    def nbytes(self) -> int:
        """Memory its own tensors take (labels and file indices; the files' list is shared)."""
        return self.labels.nbytes + self.indices.nbytes

    def take(self, indices: torch.Tensor) -> StreamSplit:
        """The samples at ``indices`` (in that order), still on disk."""
        return StreamSplit(
            self.files,
            self.labels[indices],
            self.size,
            self.mode,
            self.options,
            self.origin,
            self.indices[indices],
            self.skipped,
        )

    def to(self, device: torch.device | str) -> StreamSplit:
        """The same split: it is read from disk into each batch's device."""
        return self

    def materialize(self) -> Split:
        """The whole split decoded into memory (as the in-memory path holds it); bad files as ``skip_bad`` says."""
        images, labels = [], []
        for x, y in self._read(torch.arange(len(self)), STATS_BATCH):
            images.append(x)
            labels.append(y)
        if not images:
            raise AttnlabError(f"{self.origin}: holds no readable images")
        return Split(torch.cat(images), torch.cat(labels))

    def channel_counts(self, limit: int) -> tuple[torch.Tensor, int]:
        """Per-channel 256-bin pixel histograms (C×256 int64) of up to ``limit`` of the split's images, chosen with
        `SPLIT_SEED` (all of them when the split is that small), and how many images they cover."""
        n = len(self)
        chosen = (
            torch.randperm(n, generator=seeded_generator(SPLIT_SEED, 2))[:limit].sort().values if n > limit else None
        )
        counts = torch.zeros(self.image_shape[0], 256, dtype=torch.int64)
        for x, _ in self._read(torch.arange(n) if chosen is None else chosen, STATS_BATCH):
            for c in range(x.shape[1]):
                counts[c] += torch.bincount(x[:, c].flatten(), minlength=256)
        return counts, min(n, limit)

    def _read(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 images and labels of the samples at ``order``, unaugmented, a batch at a time."""
        plan = EpochPlan(order, None, None, None)
        yield from _load(self, plan, range(-(-len(order) // batch_size)), batch_size)


@dataclass
class EpochPlan:
    """What `attnlab.data.batches` decided for the epoch on this rank: the split's sample at each position, and the
    crop offset and flip drawn for each position (None: not augmented); ``seed`` (seed, epoch) keys the randomness
    drawn in the workers and for Mixup (None: evaluation, or a run with augment off)."""

    indices: torch.Tensor
    offsets: torch.Tensor | None
    flips: torch.Tensor | None
    seed: tuple[int, int] | None
    padding: int = 0
    transform: Any = None


@contextlib.contextmanager
def seeded(*keys: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded from ``keys`` inside, restored after (timm's transforms and
    Mixup draw from them)."""
    a, b = np.random.SeedSequence(list(keys)).generate_state(2)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(int(a))
    np.random.seed(int(b))
    torch.default_generator.manual_seed(int(a))
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class _Batches(Dataset):
    """Batch ``b`` of a plan, built in a worker: (uint8 B×C×H×W images, int64 labels, [(file, why) it left out])."""

    def __init__(self, split: StreamSplit, plan: EpochPlan, batch_size: int):
        self.split, self.plan, self.batch_size = split, plan, batch_size

    def __len__(self) -> int:
        return -(-len(self.plan.indices) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        split, plan = self.split, self.plan
        images, labels, bad = [], [], []
        for position in range(b * self.batch_size, min((b + 1) * self.batch_size, len(plan.indices))):
            i = int(plan.indices[position])
            f = int(split.indices[i])
            try:
                image = open_image(split.files.open(f), split.mode)
            except FileNotFoundError:
                bad.append((split.files.name(f), "the file is gone (it was there when the run started)"))
                continue
            except UNREADABLE as e:
                bad.append((split.files.name(f), f"unreadable image ({' '.join(str(e).split())})"))
                continue
            if plan.transform is not None:
                with seeded(*plan.seed, 2, i):
                    x = plan.transform(image)
            else:
                x = torch.from_numpy(cover_crop(image, split.size)).permute(2, 0, 1)
                if plan.offsets is not None:
                    x = random_crop(x[None], plan.padding, plan.offsets[position : position + 1])[0]
                if plan.flips is not None and plan.flips[position]:
                    x = x.flip(2)
            images.append(x)
            labels.append(int(split.labels[i]))
        c, h, w = split.image_shape
        stacked = torch.stack(images) if images else torch.empty(0, c, h, w, dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.int64), bad


STOP_SIGNALS = ("SIGUSR1", "SIGUSR2")
"""What a scheduler sends a whole job ahead of a time limit: a worker ignores them, so that the trainer
(`attnlab.train.engine`) answers with a checkpoint instead of meeting a dead worker. SIGTERM is not ignored: torch ends
a stuck worker with it, and a worker that ignored it could outlive its trainer."""


def _worker_init(_: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.split.files.reset()
    torch.set_num_threads(1)  # a worker decodes; the trainer's threads compute
    for name in STOP_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _load(split: StreamSplit, plan: EpochPlan, steps: range, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The plan's batches ``steps`` as (uint8 images, labels) on the CPU, read by ``split.options.workers``
    processes; bad files and failed workers as the module docstring says."""
    options = split.options
    workers = options.workers
    if not steps:  # a run resumed at an epoch's last step: no worker to start
        return
    loader = DataLoader(
        _Batches(split, plan, batch_size),
        batch_size=None,
        sampler=steps,
        num_workers=workers,
        prefetch_factor=options.prefetch if workers else None,
        timeout=options.timeout if workers else 0,
        worker_init_fn=_worker_init if workers else None,
        # the workers' base seed comes from here, not from the training process's generator, which a resumed run
        # must find as the checkpoint left it (dropout draws from it); nothing in a worker uses that seed
        generator=torch.Generator().manual_seed(0),
    )
    batches = iter(loader)
    for step in steps:
        try:
            images, labels, bad = next(batches)
        except RuntimeError as e:  # a worker died or timed out (torch says which)
            reason = " ".join(str(e).split("\n")[0].split())
            raise AttnlabError(
                f"{split.origin}: a data loader worker failed at batch {step} ({reason}); "
                "a slow disk may need --data-arg timeout=SECONDS"
            ) from None
        if bad:
            if not options.skip_bad:
                name, why = bad[0]
                raise AttnlabError(f"{name}: {why} (--data-arg skip_bad=true leaves such files out and counts them)")
            split.skipped.update(name for name, _ in bad)
        if len(labels) == 0:
            raise AttnlabError(f"{split.origin}: every image of batch {step} was unreadable (first: {bad[0][0]})")
        yield images, labels


def train_transform(split: StreamSplit, mean: tuple[float, ...], std: tuple[float, ...]):
    """timm's ImageNet-style train transform at the split's size (random resized crop, flip, colour jitter, and
    RandAugment if ``auto_augment`` names it), resolved by `timm.data.resolve_data_config`, ending in uint8 pixels (the
    batch is normalised after). None unless ``timm_train`` or ``auto_augment`` asks for it."""
    options = split.options
    if not (options.timm_train or options.auto_augment):
        return None
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({"input_size": split.image_shape, "mean": mean, "std": std, "crop_pct": 1.0})
    try:
        return create_transform(
            config["input_size"],
            is_training=True,
            auto_augment=options.auto_augment,
            interpolation=config["interpolation"],
            mean=config["mean"],
            std=config["std"],
            normalize=False,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise AttnlabError(f"imagefolder option auto_augment={options.auto_augment!r}: timm refuses it ({e})") from None


def stream_batches(
    split: StreamSplit,
    plan: EpochPlan,
    steps: range,
    batch_size: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    device: torch.device | str,
    channels_last: bool,
    num_classes: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The plan's batches ``steps``, normalised on ``device`` (Mixup/CutMix applied to training batches when the
    options ask: the labels are then class probabilities, B×classes)."""
    mixing = None
    if plan.seed is not None and (split.options.mixup or split.options.cutmix):
        from timm.data import Mixup

        mixing = Mixup(
            mixup_alpha=split.options.mixup,
            cutmix_alpha=split.options.cutmix,
            label_smoothing=0.0,
            num_classes=num_classes,
        )
    pin = torch.device(device).type == "cuda"
    for step, (images, labels) in zip(steps, _load(split, plan, steps, batch_size)):
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        images = normalize(images.to(device, non_blocking=True), mean, std)
        labels = labels.to(device, non_blocking=True)
        if mixing is not None:
            if len(labels) % 2:
                raise AttnlabError(f"mixup/cutmix mix a batch with its mirror: batch {step} has {len(labels)} images")
            with seeded(*plan.seed, 3, step):
                images, labels = mixing(images, labels)
        yield (images.contiguous(memory_format=torch.channels_last) if channels_last else images), labels
