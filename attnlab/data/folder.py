"""Any folder of images, one subfolder per class (torchvision's `ImageFolder` layout), loaded into memory.

Use it as ``--dataset imagefolder:PATH`` (options with ``--data-arg KEY=VALUE``). Two layouts::

    PATH/train/CLASS/*.png   PATH/test/CLASS/*.png     a test split of your own (``PATH/val/`` works too)
    PATH/CLASS/*.png                                   one pool: the test split is carved from it

Any image format PIL reads works; a class is a subfolder name, labels follow the sorted names. In the second layout
the test split is carved with the fixed `SPLIT_SEED` (option ``test_size``), so the test images do not change with the
training seed; the validation split is always carved from the training images (``--val-size``, default 10%).

Options (``load_imagefolder``): ``image_size`` (default 64: every image becomes 64×64; an int or H,W), ``mode``
(``RGB``, 3 channels, the default; ``L``, grey), ``test_size`` (default 0.2: a fraction or a count; only for the
second layout). Each image is decoded by PIL, converted to ``mode``, scaled to cover ``image_size`` keeping its aspect
ratio (up or down), centre-cropped to it and kept as uint8; the loader notes, once, when images were resized and when
a test split was carved (`Source.notes`).

Everything is held in memory (N×C×H×W bytes: 100k RGB images at 64×64 are 1.2 GB), which suits the small and medium
folders this library studies; big folders (ImageNet-sized) do not fit this design and need a streaming loader.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets import ImageFolder

from ..errors import AttnlabError
from .bundle import Source, Split, carve


def _image_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise AttnlabError(f"imagefolder option image_size must be a positive int or (H, W), got {image_size!r}")
    return size


def _read_folder(
    folder: Path, size: tuple[int, int], mode: str, classes: list[str] | None, resized: dict[tuple[int, int], int]
) -> tuple[Split, list[str]]:
    """Every image under ``folder`` as one uint8 split, and the class names; labels index ``classes`` if given (a
    held-out folder may lack some of them), else the folder's own sorted classes. Counts the images of each original
    size (W, H) that were resized in ``resized``."""
    try:
        found = ImageFolder(str(folder), allow_empty=classes is not None)
    except (FileNotFoundError, OSError) as e:
        raise AttnlabError(f"{folder}: not an image folder ({' '.join(str(e).split())})") from None
    classes = classes or found.classes
    unknown = sorted(set(found.classes) - set(classes))
    if unknown:
        raise AttnlabError(f"{folder}: class folder {unknown[0]!r} is not among the training classes")
    mapping = {name: i for i, name in enumerate(classes)}
    height, width = size
    images, labels = [], []
    for path, index in found.samples:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if (image.height, image.width) != (height, width):
                    resized[image.size] = resized.get(image.size, 0) + 1
                scale = max(height / image.height, width / image.width)
                image = TF.resize(image, [math.ceil(image.height * scale), math.ceil(image.width * scale)])
                image = TF.center_crop(image, [height, width])
        except (OSError, ValueError) as e:
            raise AttnlabError(f"{path}: unreadable image ({e})") from None
        array = np.asarray(image, dtype=np.uint8)
        images.append(array[:, :, None] if array.ndim == 2 else array)
        labels.append(mapping[found.classes[index]])
    if not images:
        raise AttnlabError(f"{folder}: holds no images")
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return Split(stacked, torch.tensor(labels, dtype=torch.int64)), classes


def load_imagefolder(
    path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] = 64,
    mode: str = "RGB",
    test_size: int | float = 0.2,
) -> Source:
    """Images from a class-per-subfolder tree (the layouts and what happens to the images: module docstring).

    Args:
        path: the folder (with ``train/`` and ``test/`` or ``val/``, or class folders directly).
        image_size: output size, an int for square images or (H, W); images of another size are scaled (up or down)
            to cover it and centre-cropped.
        mode: PIL mode the images are converted to: ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel).
        test_size: when there is no test/val folder, how much of the pool becomes the test split (count or fraction).

    Returns:
        The splits, with `Source.notes` saying whether images were resized and a test split carved.
    """
    root = Path(path).expanduser()
    size = _image_size(image_size)
    if mode not in ("RGB", "L"):
        raise AttnlabError(f"imagefolder option mode must be 'RGB' or 'L', got {mode!r}")
    if not root.is_dir():
        raise AttnlabError(f"{root}: no such folder (imagefolder:PATH needs a folder of class subfolders)")
    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    resized: dict[tuple[int, int], int] = {}
    notes = []
    if held_out is not None:
        if not (root / "train").is_dir():
            raise AttnlabError(f"{root}: has {held_out.name}/ but no train/ folder")
        train, classes = _read_folder(root / "train", size, mode, None, resized)
        test, _ = _read_folder(held_out, size, mode, classes, resized)
    else:
        pool, classes = _read_folder(root, size, mode, None, resized)
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
    origin = f"imagefolder {root}"
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
