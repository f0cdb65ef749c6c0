"""Any folder of images, one subfolder per class (torchvision's `ImageFolder` layout), loaded into memory.

``imagefolder:PATH`` reads ``PATH/train`` and ``PATH/test`` (or ``PATH/val``) when either of the latter exists;
otherwise ``PATH`` itself is the class-folder root and the test split is carved from it with the fixed `SPLIT_SEED`
(option ``test_size``), so the test images do not change with the training seed. torchvision's `ImageFolder` finds
the classes and files; each image is decoded by PIL, converted to ``mode``, scaled to cover ``image_size`` keeping its
aspect ratio, centre-cropped to it and kept as uint8.

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


def _read_folder(folder: Path, size: tuple[int, int], mode: str, classes: list[str] | None) -> tuple[Split, list[str]]:
    """Every image under ``folder`` as one uint8 split, and the class names; labels index ``classes`` if given (a
    held-out folder may lack some of them), else the folder's own sorted classes."""
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
    """Images from a class-per-subfolder tree.

    Args:
        path: the folder (with ``train/`` and ``test/`` or ``val/``, or class folders directly).
        image_size: output size, an int for square images or (H, W).
        mode: PIL mode the images are converted to: ``"RGB"`` (3 channels) or ``"L"`` (grey, 1 channel).
        test_size: when there is no test/val folder, how much of the pool becomes the test split (count or fraction).
    """
    root = Path(path).expanduser()
    size = _image_size(image_size)
    if mode not in ("RGB", "L"):
        raise AttnlabError(f"imagefolder option mode must be 'RGB' or 'L', got {mode!r}")
    if not root.is_dir():
        raise AttnlabError(f"{root}: no such folder (imagefolder:PATH needs a folder of class subfolders)")
    held_out = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if held_out is not None:
        if not (root / "train").is_dir():
            raise AttnlabError(f"{root}: has {held_out.name}/ but no train/ folder")
        train, classes = _read_folder(root / "train", size, mode, None)
        test, _ = _read_folder(held_out, size, mode, classes)
    else:
        pool, classes = _read_folder(root, size, mode, None)
        train, test = carve(pool, test_size, "imagefolder option test_size")
    origin = f"imagefolder {root}"
    return Source(train, test, classes, crop_padding=min(size) // 8, hflip=True, default_val=0.1, origin=origin)
