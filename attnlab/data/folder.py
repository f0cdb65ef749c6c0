"""Any folder of images, one subfolder per class (torchvision's `ImageFolder` layout), or tar files of them: held in
memory when they fit a memory budget, else streamed from disk (`attnlab.data.stream`).

Use it as ``--dataset imagefolder:PATH`` (options with ``--data-arg KEY=VALUE``). Two layouts::

    PATH/train/CLASS/*.png   PATH/test/CLASS/*.png     a test split of your own (``PATH/val/`` works too)
    PATH/CLASS/*.png                                   one pool: the test split is carved from it

Any image format PIL reads works; a class is a subfolder name, labels follow the sorted names. In the second layout
the test split is carved with the fixed `SPLIT_SEED` (option ``test_size``), so the test images do not change with the
training seed; the validation split is always carved from the training images (``--val-size``, default 10%).
A split may also be a tar file or a folder of tar shards whose members are ``CLASS/NAME.jpg`` (``PATH/train.tar``
and ``PATH/test.tar``, ``PATH/train/*.tar``, or ``imagefolder:POOL.tar``), read through timm's `create_dataset` tar
reader; its members are ordered and labelled as the same tree on disk would be, so a tarred folder is the same data.

Options (``load_imagefolder``): ``image_size`` (default 64: every image becomes 64×64; an int or H,W), ``mode``
(``RGB``, 3 channels, the default; ``L``, grey), ``test_size`` (default 0.2: a fraction or a count; only for the
second layout). Each image is decoded by PIL, converted to ``mode``, scaled to cover ``image_size`` keeping its aspect
ratio (up or down), centre-cropped to it and kept as uint8 (`attnlab.data.decode`: the same pixels on both paths);
the loader notes, once, when images were resized and when a test split was carved (`Source.notes`).

Memory or disk: the decoded images take N×C×H×W bytes (100k RGB images at 64×64: 1.2 GB). When that exceeds
``memory_budget`` (GiB, default 4: a fixed size, so a run takes the same path on every machine and when resumed) the
splits are streamed: read and decoded by ``workers`` DataLoader processes (default 2, ``prefetch`` batches each)
while training, never all held; ``stream=true`` / ``false`` forces a path. Streaming with the default augmentation
gives exactly the batches the in-memory path gives (normalisation statistics from ``stats_images`` training images,
all of them up to 10,000). Options only the streaming path has, which therefore choose it: ``timm_train`` (timm's
ImageNet-style train transforms: random resized crop, flip, colour jitter), ``auto_augment`` (a timm RandAugment /
AutoAugment string such as ``rand-m9-mstd0.5``), ``mixup`` / ``cutmix`` (timm's Mixup alphas). A file that fails to
decode while streaming stops the run with one line naming it (the last checkpoint stays), unless ``skip_bad=true``
leaves such files out and counts them (``skipped_images`` in ``summary.json``: the distinct files, every rank's,
across resumes); a worker that dies or takes over ``timeout`` seconds for a batch is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from ..errors import AttnlabError
from ..schema import PositiveInt, Range
from .bundle import Source, Split, carve
from .decode import UNREADABLE, cover_crop, open_image
from .stream import FolderFiles, StreamOptions, StreamSplit, TarFiles

GIB = 2**30


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise AttnlabError(f"imagefolder option image_size must be a positive int or (H, W), got {image_size!r}")
    return size


def _is_tar(place: Path) -> bool:
    """A tar file, or a folder of tar shards (read by timm's tar reader)."""
    if place.is_file():
        return place.suffix.lower() == ".tar"
    return place.is_dir() and any(p.suffix.lower() == ".tar" for p in place.iterdir())


def _list(place: Path, classes: list[str] | None) -> tuple[FolderFiles | TarFiles, torch.Tensor, list[str]]:
    """The files of one split, their labels and the class names; labels index ``classes`` if given (a held-out
    split may lack some of them), else the split's own sorted classes. Folders are listed as torchvision's
    `ImageFolder` lists them; tar members in the order and with the labels the same tree would have on disk."""
    if _is_tar(place):
        files = TarFiles(str(place))
        members = files.members()
        names = [name for name, _ in members]
    else:
        try:
            found = ImageFolder(str(place), allow_empty=classes is not None)
        except (FileNotFoundError, OSError) as e:
            raise AttnlabError(f"{place}: not an image folder ({' '.join(str(e).split())})") from None
        files = FolderFiles([path for path, _ in found.samples])
        names = [found.classes[index] for _, index in found.samples]
    own = sorted(set(names))
    classes = classes or own
    unknown = sorted(set(own) - set(classes))
    if unknown:
        raise AttnlabError(f"{place}: class folder {unknown[0]!r} is not among the training classes")
    mapping = {name: i for i, name in enumerate(classes)}
    labels = [mapping[name] for name in names]
    if isinstance(files, TarFiles):  # the folder layout's order: by class, then folder, then name
        order = sorted(range(len(names)), key=lambda i: (labels[i], *os.path.split(members[i][1])))
        files.order = np.array(order, dtype=np.int64)
        labels = [labels[i] for i in order]
    if not labels:
        raise AttnlabError(f"{place}: holds no images")
    return files, torch.tensor(labels, dtype=torch.int64), classes


def _read(
    files: FolderFiles, labels: torch.Tensor, size: tuple[int, int], mode: str, resized: dict[tuple[int, int], int]
) -> Split:
    """Every file decoded into one uint8 split; counts the images of each original size (W, H) that were resized."""
    images = []
    for i in range(len(files)):
        path = files.name(i)
        try:
            image = open_image(files.open(i), mode)
        except UNREADABLE as e:
            raise AttnlabError(f"{path}: unreadable image ({e})") from None
        if (image.height, image.width) != size:
            resized[image.size] = resized.get(image.size, 0) + 1
        images.append(cover_crop(image, size))
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Split(stacked, labels)


def load_imagefolder(
    path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] = 64,
    mode: str = "RGB",
    test_size: int | float = 0.2,
    stream: bool | None = None,
    memory_budget: Annotated[float, Range(0)] = 4.0,
    workers: Annotated[int, Range(0)] = 2,
    prefetch: PositiveInt = 4,
    timeout: Annotated[float, Range(0, low_open=True)] = 300.0,
    skip_bad: bool = False,
    timm_train: bool = False,
    auto_augment: str | None = None,
    mixup: Annotated[float, Range(0)] = 0.0,
    cutmix: Annotated[float, Range(0)] = 0.0,
    stats_images: PositiveInt = 10_000,
) -> Source:
    """Images from a class-per-subfolder tree or tar files of one (the layouts, the two paths and what happens to the
    images: module docstring).

    Args:
        path: the folder (with ``train/`` and ``test/`` or ``val/``, or class folders directly), or a tar file.
        image_size: output size, an int for square images or (H, W); images of another size are scaled (up or down)
            to cover it and centre-cropped.
        mode: PIL mode the images are converted to: ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel).
        test_size: when there is no test/val folder, how much of the pool becomes the test split (count or fraction).
        stream: read the images from disk in worker processes while training (true) or hold them in memory (false);
            by default, stream when the decoded images exceed ``memory_budget`` or a streaming-only option is set.
        memory_budget: GiB of decoded images (N×C×H×W bytes) the in-memory path may hold.
        workers: DataLoader worker processes that read and decode while streaming (0: in the training process).
        prefetch: batches each worker keeps ready.
        timeout: seconds a worker may take for one batch before the run stops with an error.
        skip_bad: while streaming, leave out an unreadable or vanished file and count it, instead of stopping.
        timm_train: train on timm's ImageNet-style transforms (random resized crop, flip, colour jitter) instead of
            the zero-padded crop and flip; streaming only.
        auto_augment: a timm auto-augment string (``rand-m9-mstd0.5`` for RandAugment); streaming only.
        mixup: timm Mixup alpha of the training batches (0: off); streaming only.
        cutmix: timm CutMix alpha of the training batches (0: off); streaming only.
        stats_images: training images the normalisation statistics are computed from when streaming.

    Returns:
        The splits (`StreamSplit` s when streamed), with `Source.notes` saying whether images were resized, a test
        split carved, and which path reads them.
    """
    root = Path(path).expanduser()
    size = _image_size(image_size)
    if mode not in ("RGB", "L"):
        raise AttnlabError(f"imagefolder option mode must be 'RGB' or 'L', got {mode!r}")
    if not (root.is_dir() or _is_tar(root)):
        raise AttnlabError(f"{root}: no such folder (imagefolder:PATH needs a folder of class subfolders)")
    parts = {p.stem: p for p in (root.iterdir() if root.is_dir() else ()) if p.stem in ("train", "test", "val")}
    parts = {k: p for k, p in parts.items() if p.is_dir() or _is_tar(p)}
    held_out = parts.get("test", parts.get("val"))
    if held_out is not None:
        if "train" not in parts:
            raise AttnlabError(f"{root}: has {held_out.name} but no train/ folder")
        train_files, train_labels, classes = _list(parts["train"], None)
        test_files, test_labels, _ = _list(held_out, classes)
    else:
        train_files, train_labels, classes = _list(root, None)
    count = len(train_labels) + (0 if held_out is None else len(test_labels))
    decoded = count * (1 if mode == "L" else 3) * size[0] * size[1]
    only_streamed = [
        k
        for k, v in (("timm_train", timm_train), ("auto_augment", auto_augment), ("mixup", mixup), ("cutmix", cutmix))
        if v
    ]
    if stream is False and only_streamed:
        raise AttnlabError(f"imagefolder option {only_streamed[0]} needs the streaming path; drop stream=false")
    why = "forced by option stream"
    if stream is None:
        stream = bool(only_streamed) or decoded > memory_budget * GIB
        why = (
            f"option {only_streamed[0]} needs it"
            if only_streamed
            else f"{decoded / GIB:.2f} GiB decoded {'>' if stream else '≤'} memory_budget={memory_budget} GiB"
        )
    options = StreamOptions(workers, prefetch, timeout, skip_bad, timm_train, auto_augment, mixup, cutmix, stats_images)
    origin = f"imagefolder {root}"

    def split(files, labels) -> Split | StreamSplit:
        streamed = StreamSplit(files, labels, size, mode, options, origin, skipped=skipped)
        if stream:
            return streamed
        return _read(files, labels, size, mode, resized) if isinstance(files, FolderFiles) else streamed.materialize()

    skipped: set[str] = set()
    resized: dict[tuple[int, int], int] = {}
    notes = []
    if held_out is not None:
        train, test = split(train_files, train_labels), split(test_files, test_labels)
    else:
        pool = split(train_files, train_labels)
        train, test = carve(pool, test_size, "imagefolder option test_size")
        notes.append(
            f"{root} has no test/ or val/ folder: {len(test)} of its {len(pool)} images were set aside as the test "
            f"split (option test_size={test_size}, fixed seed)"
        )
    if resized:
        shown = ", ".join(f"{w}×{h}" for (w, h), _ in sorted(resized.items(), key=lambda kv: -kv[1])[:3])
        notes.insert(
            0,
            f"{sum(resized.values())} of {len(train) + len(test)} images were resized to {size[1]}×{size[0]} (from "
            f"{shown}{', ...' if len(resized) > 3 else ''}; option image_size, default 64)",
        )
    if stream:
        notes.append(
            f"streaming {count} images from disk with {workers} worker process(es) ({why}); each is scaled to cover "
            f"{size[1]}×{size[0]} and centre-cropped as it is read"
        )
    return Source(
        train,
        test,
        classes,
        crop_padding=min(size) // 8,
        hflip=True,
        default_val=0.1,
        origin=origin,
        notes=tuple(notes),
    )
