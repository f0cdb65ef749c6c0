"""COCO-format detection data (``coco:PATH``): annotation JSON + image files, read through torchvision's
`CocoDetection` (which parses the JSON with pycocotools and opens each image with PIL, as RGB).

Layouts of ``PATH`` (the first that fits):

- ``train.json``, ``test.json`` and optionally ``val.json``, with each image's ``file_name`` relative to
  ``PATH/images`` if that folder exists, else to ``PATH``;
- COCO's own: ``annotations/instances_<split>.json`` with images in ``PATH/<split>/`` (e.g. ``train2017``); the
  ``instances_val*`` set is the test split, since COCO's test annotations are not public.

Without a test set, one is carved from the training pool with the fixed split seed (option ``test_size``), as
``imagefolder:PATH`` does. Categories are renumbered 0..K-1 in the order of their ids in the training JSON; every other
JSON must name the same ones. Boxes ([x, y, w, h] in COCO) become (x0, y0, x1, y1); a box of zero width or height is
left out (torchvision's detectors refuse degenerate boxes), and so is a box holding a NaN or an infinity, with a
notice naming its image; a training set without any annotation is refused. Crowd annotations are kept with
``iscrowd=1`` for the metric, and the training loop leaves them out. Images are decoded on every access, not held in
memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from pathlib import Path

import torch
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import pil_to_tensor

from ..errors import AttnlabError
from .bundle import DetectionSource, carve


class CocoSplit:
    """Some images of one COCO-format set; ``split[i]`` is ``(uint8 3×H×W image, target)``."""

    def __init__(self, dataset: CocoDetection, categories: dict[int, int], indices: list[int] | None = None):
        self.dataset, self.categories = dataset, categories
        self.indices = list(range(len(dataset))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def take(self, indices: torch.Tensor) -> CocoSplit:
        return CocoSplit(self.dataset, self.categories, [self.indices[i] for i in indices.tolist()])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = self.indices[i]
        try:
            image, annotations = self.dataset[index]
        except OSError as e:
            name = self.dataset.coco.loadImgs(self.dataset.ids[index])[0]["file_name"]
            raise AttnlabError(f"{self.dataset.root}: cannot read image {name} ({e.strerror or e})") from None
        kept = [a for a in annotations if _finite(a["bbox"]) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([self.categories[a["category_id"]] for a in kept], dtype=torch.int64)
        crowd = torch.tensor([int(a.get("iscrowd", 0)) for a in kept], dtype=torch.int64)
        return pil_to_tensor(image), {"boxes": boxes, "labels": labels, "iscrowd": crowd}


def _open(annotations: Path, images: Path) -> CocoDetection:
    """`CocoDetection` over one JSON, with every problem of the JSON or a missing image file in one line."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            dataset = CocoDetection(str(images), str(annotations))
        coco = dataset.coco
        missing = next(
            (i["file_name"] for i in coco.dataset["images"] if not (images / i["file_name"]).is_file()), None
        )
        bad = next((a for a in coco.dataset.get("annotations", []) if _bad_annotation(a, coco.cats)), None)
    except ImportError:
        raise AttnlabError("coco:PATH needs pycocotools: pip install 'attnlab[detection]'") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise AttnlabError(f"{annotations}: not a readable COCO annotation file ({reason})") from None
    if missing is not None:
        raise AttnlabError(f"{annotations}: image {missing} not found under {images}")
    if bad is not None:
        raise AttnlabError(f"{annotations}: annotation {bad.get('id')} has an unknown category_id or a bad bbox")
    _warn_non_finite(annotations, coco)
    return dataset


def _finite(box: list[float]) -> bool:
    return all(math.isfinite(v) for v in box)


def _warn_non_finite(annotations: Path, coco) -> None:
    """One notice naming the first image whose box holds a NaN or an infinity (JSON allows them): such a box is
    left out, like a degenerate one, but said, since it is a fault of the file rather than of the object."""
    broken = [a for a in coco.dataset.get("annotations", []) if not _finite(a["bbox"])]
    if broken:
        first = broken[0]
        image = coco.imgs.get(first.get("image_id"), {}).get("file_name", f"id {first.get('image_id')}")
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        warnings.warn(
            f"{annotations}: the box of annotation {first.get('id')} on image {image} is not finite "
            f"({first['bbox']}); left out{more}",
            stacklevel=3,
        )


def _bad_annotation(annotation: dict, categories: dict) -> bool:
    box = annotation.get("bbox")
    return (
        annotation.get("category_id") not in categories
        or not isinstance(box, list)
        or len(box) != 4
        or not all(isinstance(v, int | float) for v in box)
    )


def _layout(root: Path) -> dict[str, tuple[Path, Path]]:
    """``{split: (json, image folder)}`` found under ``root``."""
    if (root / "train.json").is_file():
        images = root / "images" if (root / "images").is_dir() else root
        return {s: (root / f"{s}.json", images) for s in ("train", "val", "test") if (root / f"{s}.json").is_file()}
    found = {}
    for path in sorted((root / "annotations").glob("instances_*.json")):
        stem = path.stem.removeprefix("instances_")
        split = "train" if stem.startswith("train") else "test" if stem.startswith("val") else None
        if split and split not in found:
            found[split] = (path, root / stem)
    if "train" not in found:
        raise AttnlabError(
            f"coco:{root}: found neither train.json (+ test.json) nor annotations/instances_train*.json; "
            "see `attnlab detect train --help`"
        )
    return found


def load_coco(path: str | os.PathLike, *, test_size: int | float = 0.1) -> DetectionSource:
    """A COCO-format folder (layouts in the module doc).

    Args:
        path: the folder.
        test_size: images carved from the training pool as the test split when the folder has no test JSON.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise AttnlabError(f"coco:{path}: no such folder")
    sets = {split: _open(*where) for split, where in _layout(root).items()}
    cats = sets["train"].coco.cats
    ids = sorted(cats)
    if not ids:
        raise AttnlabError(f"{_layout(root)['train'][0]}: no categories")
    for split, dataset in sets.items():
        if {i: c["name"] for i, c in dataset.coco.cats.items()} != {i: cats[i]["name"] for i in ids}:
            raise AttnlabError(f"coco:{path}: the {split} set's categories differ from the train set's")
    if not sets["train"].coco.dataset.get("annotations"):
        raise AttnlabError(
            f"{_layout(root)['train'][0]}: the training set has images but no annotations; a detector cannot learn "
            "from images without boxes"
        )
    index = {cat_id: k for k, cat_id in enumerate(ids)}
    splits = {split: CocoSplit(dataset, index) for split, dataset in sets.items()}
    train = splits["train"]
    test = splits.get("test")
    if test is None:
        train, test = carve(train, test_size, what="test_size")
    return DetectionSource(
        train, test, [cats[i]["name"] for i in ids], in_chans=3, val=splits.get("val"), origin=f"coco:{root}"
    )
