"""Detection data: images holding several labelled boxes, and seeded, sharded, flipped batches of them.

A detection split is a map-style dataset: ``split[i]`` is ``(image, target)``, a uint8 C×H×W image and
``{"boxes": float32 n×4, "labels": int64 n, "iscrowd": int64 n}``; boxes are (x0, y0, x1, y1) in pixel-edge
coordinates (x1, y1 exclusive, as in `attnlab.data.bundle.Split` and COCO's x+w), labels index ``classes`` (0..K-1;
the detector adds its own background class). ``split.take(indices)`` gives a sub-split, so validation is carved from
the training pool with `carve` and a training ``subset`` is taken with `take_subset`, exactly as for the classifiers.

Datasets (``load_detection_dataset(name)``):

- ``detection-fashion-mnist``: 1–5 Fashion-MNIST garments per ``canvas``×``canvas`` canvas, each scaled by a factor
  drawn from ``scale`` and placed at random (rejecting places whose nominal square overlaps an earlier garment's by
  IoU > ``max_overlap``; a garment with no free place among ``tries`` draws is left out), plus ``clutter`` pieces of
  random garments, merged by maximum — the rendering of `attnlab.data.cluttered`, with several objects. Boxes are
  the tight extent of each placed garment's pixels. Train canvases use Fashion-MNIST train garments, test canvases
  its test garments; everything follows ``data_seed``. Rendered splits are cached as safetensors under
  ``$ATTNLAB_CACHE`` (default ``~/.cache/attnlab``), keyed by the options and the source files' contents; the cache
  only saves time (same bits either way).
- ``coco:PATH``: COCO-format JSON + images through torchvision's `CocoDetection` (`attnlab.data.coco`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AttnlabError, unknown_name
from ..io import atomic_path
from .bundle import DetectionSource, Split, carve, channel_stats, loader_kwargs, seeded_generator, take_subset
from .cluttered import check_options, paste_clutter, place, tight_boxes
from .idx import load_fashion_mnist

RENDER_VERSION = 1  # part of the cache key: bump when the rendering changes
CHUNK = 256  # canvases rendered at once (× up to 5 garment layers each)


@dataclass
class CanvasSplit:
    """A detection split of same-sized images held as tensors.

    Attributes:
        images: uint8 N×C×S×S.
        labels: int64 N×K, one slot per possible object; -1 marks an empty slot.
        boxes: float32 N×K×4 (zeros in empty slots).
    """

    images: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)

    def take(self, indices: torch.Tensor) -> CanvasSplit:
        return CanvasSplit(self.images[indices], self.labels[indices], self.boxes[indices])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        present = self.labels[i] >= 0
        labels = self.labels[i][present]
        return self.images[i], {"boxes": self.boxes[i][present], "labels": labels, "iscrowd": torch.zeros_like(labels)}


@dataclass
class DetectionData:
    """A detection dataset ready for training: splits, class names and the train split's statistics.

    Attributes:
        mean, std: per-channel statistics of (a sample of) the training images, in [0, 1] units.
        image_size: (H, W) when every image has it, else None.
    """

    name: str
    train: object
    val: object
    test: object
    classes: list[str]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int] | None
    origin: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes ``a`` (…×T×4) against ``b`` (…×J×4), x0 y0 x1 y1 → …×T×J."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a, area_b = (a[..., 2:] - a[..., :2]).prod(-1), (b[..., 2:] - b[..., :2]).prod(-1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def choose_places(
    candidates: torch.Tensor, counts: torch.Tensor, max_overlap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each canvas, the first of each slot's candidate squares (N×K×T×4) whose IoU with the slots already placed
    is ≤ ``max_overlap``; slot j is used only if j < counts. Returns (N×K×4 squares, N×K bool placed)."""
    n, k = candidates.shape[:2]
    chosen = torch.zeros(n, k, 4, dtype=candidates.dtype)
    placed = torch.zeros(n, k, dtype=torch.bool)
    rows = torch.arange(n)
    for j in range(k):
        iou = _pairwise_iou(candidates[:, j], chosen[:, :j])  # N×T×j
        free = ((iou <= max_overlap) | ~placed[:, None, :j]).all(-1)  # N×T
        chosen[:, j] = candidates[rows, j, free.int().argmax(1)]
        placed[:, j] = free.any(1) & (j < counts)
    return chosen, placed


def render_canvases(
    source: Split,
    count: int,
    canvas: int,
    objects: tuple[int, int],
    scale: tuple[float, float],
    clutter: int,
    patch: int,
    max_overlap: float,
    tries: int,
    seed: tuple[int, ...],
) -> CanvasSplit:
    """``count`` canvases of ``objects[0]``..``objects[1]`` garments drawn from ``source`` (see the module doc)."""
    n_src, c, h, w = source.images.shape
    k = objects[1]
    place_rng, clutter_rng = seeded_generator(*seed, 0), seeded_generator(*seed, 1)
    counts = torch.randint(objects[0], objects[1] + 1, (count,), generator=place_rng)
    picks = torch.randint(0, n_src, (count, k), generator=place_rng)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(count, k, generator=place_rng, dtype=torch.float64)
    sizes = torch.stack([w * scales, h * scales], dim=-1)[:, :, None, :]  # N×K×1×2
    origins = torch.rand(count, k, tries, 2, generator=place_rng, dtype=torch.float64) * (canvas - sizes)
    squares, placed = choose_places(torch.cat([origins, origins + sizes], dim=-1), counts, max_overlap)
    if clutter:
        donors = torch.randint(0, n_src, (count, clutter), generator=clutter_rng)
        cuts = torch.randint(0, min(h, w) - patch + 1, (count, clutter, 2), generator=clutter_rng)
        spots = torch.randint(0, canvas - patch + 1, (count, clutter, 2), generator=clutter_rng)
    images = torch.empty(count, c, canvas, canvas, dtype=torch.uint8)
    boxes = torch.zeros(count, k, 4, dtype=torch.float32)
    for start in range(0, count, CHUNK):
        sl = slice(start, start + CHUNK)
        used = placed[sl].flatten()
        layers = torch.zeros(len(used), c, canvas, canvas, dtype=torch.uint8)  # one layer per slot, blank if unused
        layers[used] = place(
            source.images[picks[sl].flatten()[used]],
            canvas,
            scales[sl].flatten()[used].float(),
            squares[sl, :, :2].flatten(0, 1)[used].float(),
        )
        boxes[sl] = tight_boxes(layers).view(-1, k, 4)
        merged = layers.view(-1, k, c, canvas, canvas).amax(dim=1)
        if clutter:
            paste_clutter(merged, source.images, donors[sl], cuts[sl], spots[sl], patch)
        images[sl] = merged
    present = placed & (boxes[..., 2] > boxes[..., 0])  # a garment rendered blank has no box
    labels = torch.where(present, source.labels[picks], -1)
    return CanvasSplit(images, labels, boxes * present[..., None])


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE") or Path("~/.cache/attnlab").expanduser())


def cached_splits(key: dict, sources: tuple[Split, ...], render) -> tuple[CanvasSplit, ...]:
    """``render()``'s splits, read from the cache when a file for ``key`` and ``sources``' contents is there, written
    to it (atomically; silently skipped where the cache is not writable) otherwise."""
    digest = hashlib.sha256(json.dumps({**key, "version": RENDER_VERSION}, sort_keys=True).encode())
    for split in sources:
        for tensor in (split.images, split.labels):
            digest.update(tensor.contiguous().numpy().data)
    path = cache_dir() / f"detection-{digest.hexdigest()[:24]}.safetensors"
    try:
        t = load_file(str(path))
        n = len({name.split(".")[0] for name in t})
        return tuple(CanvasSplit(t[f"{i}.images"], t[f"{i}.labels"], t[f"{i}.boxes"]) for i in range(n))
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError):
        pass  # no cache yet, or a damaged one: render again
    splits = render()
    tensors = {
        f"{i}.{f}": getattr(s, f).contiguous() for i, s in enumerate(splits) for f in ("images", "labels", "boxes")
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    except OSError:
        pass
    return splits


def load_detection_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    canvas: int = 96,
    objects: tuple[int, int] | list[int] = (1, 5),
    scale: tuple[float, float] | list[float] = (0.75, 1.5),
    clutter: int = 4,
    patch: int = 8,
    max_overlap: float = 0.25,
    tries: int = 10,
    size: int = 12000,
    test_size: int = 2000,
    data_seed: int = 0,
) -> DetectionSource:
    """detection-fashion-mnist rendered from the Fashion-MNIST files (found as for ``fashion-mnist``).

    Args:
        canvas: side of the square canvas, in pixels.
        objects: (min, max) garments per canvas, drawn uniformly.
        scale: (min, max) of the uniform garment scale factor.
        clutter: clutter pieces per canvas; patch: their side in pixels.
        max_overlap: largest IoU between the nominal squares of two garments of a canvas.
        tries: random places tried per garment before it is left out.
        size, test_size: canvases in the training pool (validation is carved from it) and in the test split.
        data_seed: seed of every random choice of the rendering.
    """
    what = "detection-fashion-mnist"
    counts = (("canvas", canvas, 1), ("clutter", clutter, 0), ("patch", patch, 1), ("tries", tries, 1))
    counts += (("size", size, 2), ("test_size", test_size, 1), ("data_seed", data_seed, 0))
    scale = check_options(what, counts, scale)
    if not isinstance(objects, tuple | list) or len(objects) != 2 or not 1 <= int(objects[0]) <= int(objects[1]):
        raise AttnlabError(f"{what} option objects must be [min, max] with 1 <= min <= max, got {objects!r}")
    if isinstance(max_overlap, bool) or not isinstance(max_overlap, int | float) or not 0 <= max_overlap <= 1:
        raise AttnlabError(f"{what} option max_overlap must be a number in [0, 1], got {max_overlap!r}")
    objects = (int(objects[0]), int(objects[1]))
    source = load_fashion_mnist(data_dir, download=download)
    side = max(source.train.images.shape[2:])
    if canvas < side * scale[1]:
        raise AttnlabError(f"{what}: canvas={canvas} cannot hold a {side}px garment scaled by {scale[1]}")
    if patch > side:
        raise AttnlabError(f"{what}: patch={patch} is larger than a {side}px garment")
    args = (canvas, objects, scale, clutter, patch, float(max_overlap), tries)
    key = dict(zip(("canvas", "objects", "scale", "clutter", "patch", "max_overlap", "tries"), args))
    key.update(size=size, test_size=test_size, data_seed=data_seed)

    def render() -> tuple[CanvasSplit, CanvasSplit]:
        return (
            render_canvases(source.train, size, *args, seed=(data_seed, 0)),
            render_canvases(source.test, test_size, *args, seed=(data_seed, 1)),
        )

    train, test = cached_splits(key, (source.train, source.test), render)
    origin = f"{what} from {source.origin}: " + " ".join(f"{k}={v}" for k, v in key.items())
    return DetectionSource(train, test, source.classes, in_chans=source.train.images.shape[1], origin=origin)


COCO = "coco"
_REGISTRY = {"detection-fashion-mnist": load_detection_fashion_mnist}


def list_detection_datasets() -> list[str]:
    return sorted([*_REGISTRY, f"{COCO}:PATH"])


def _resolve(name: str):
    if name == COCO or name.startswith(f"{COCO}:"):
        from .coco import load_coco

        path = name[len(COCO) + 1 :]
        if not path:
            raise AttnlabError("dataset coco needs a folder: coco:PATH")
        return load_coco, (path,)
    try:
        return _REGISTRY[name], ()
    except KeyError:
        raise unknown_name("detection dataset", name, list_detection_datasets()) from None


def _statistics(split, limit: int = 500) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Channel mean/std of ``split``'s images (of ``limit`` of them drawn with a fixed seed, for big folders)."""
    if isinstance(split, CanvasSplit):
        return channel_stats(split.images)
    indices = torch.randperm(len(split), generator=seeded_generator(0, 2))[:limit].tolist()
    pixels = torch.cat([split[i][0].flatten(1) for i in indices], dim=1)  # C×P
    return channel_stats(pixels[None, :, :, None])


def load_detection_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int | float | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = False,
    **options,
) -> DetectionData:
    """Load detection dataset ``name`` and split it into train/val/test, as `attnlab.data.load_dataset` does for
    classifiers: validation carved from the training pool with the fixed split seed (unless the data has its own and
    no ``val_size`` is given), ``subset`` training images chosen by ``seed``."""
    loader, args = _resolve(name)
    source = loader(*args, **loader_kwargs(name, loader, options, data_dir, download))
    if source.val is not None and val_size is None:
        train, val = source.train, source.val
    else:
        train, val = carve(source.train, source.default_val if val_size is None else val_size)
    if subset is not None:
        train = take_subset(train, subset, seed)
    if len(train) == 0:
        raise AttnlabError(f"{name}: the training split is empty")
    mean, std = _statistics(train)
    size = tuple(train.images.shape[2:]) if isinstance(train, CanvasSplit) else None
    return DetectionData(
        name, train, val, source.test, list(source.classes), source.in_chans, mean, std, size, source.origin
    )


def detection_batches(
    split,
    batch_size: int,
    *,
    train: bool,
    epoch: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    hflip: bool = True,
    device: torch.device | str = "cpu",
    start: int = 0,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Lists of float images in [0, 1] and their targets on ``device``, ``batch_size`` per rank at a time.

    As `attnlab.data.batches`: in training, a permutation seeded by (``seed``, ``epoch``), the same on every rank,
    of which ``rank`` takes positions ``rank::world_size`` (``len // world_size`` each, so every rank runs the same
    number of steps, a ragged last batch kept), each image flipped horizontally (boxes too) by a coin drawn per
    position; in evaluation, the split in order, ``rank::world_size``, unflipped. ``start``: the first batch to
    yield (the rest are those of the whole epoch).
    """
    from . import num_batches

    n = len(split)
    count = num_batches(n, batch_size, train=train, world_size=world_size, rank=rank, drop_last=False)
    if train:
        order = torch.randperm(n, generator=seeded_generator(seed, epoch, 0))
        positions = torch.arange((n // world_size) * world_size)[rank::world_size]
        flips = (torch.rand(n, generator=seeded_generator(seed, epoch, 1)) < 0.5)[positions] & hflip
        indices = order[positions]
    else:
        indices = torch.arange(n)[rank::world_size]
        flips = torch.zeros(len(indices), dtype=torch.bool)
    for b in range(start, count):
        images, targets = [], []
        for i, flip in zip(indices[b * batch_size : (b + 1) * batch_size].tolist(), flips[b * batch_size :].tolist()):
            image, target = split[i]
            image = image.to(device, non_blocking=True).float().div_(255)
            target = {key: value.to(device) for key, value in target.items()}
            if flip:
                image = image.flip(-1)
                target["boxes"] = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1], device=device)
                target["boxes"] += torch.tensor([image.shape[-1], 0, image.shape[-1], 0], device=device)
            images.append(image)
            targets.append(target)
        yield images, targets
