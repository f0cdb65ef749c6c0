"""One image file to the uint8 pixels both imagefolder paths hold: decoded by PIL, converted to a mode, scaled to
cover the output size keeping its aspect ratio and centre-cropped to it (the in-memory and the streaming path call
this one function, so the same folder gives the same pixels whichever path reads it)."""

from __future__ import annotations

import math

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image

UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises on a truncated, corrupt or non-image file."""


def open_image(file, mode: str) -> Image.Image:
    """The image in ``file`` (a path or a binary file object), fully decoded and converted to ``mode``."""
    with Image.open(file) as image:
        return image.convert(mode)


def cover_crop(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` scaled (up or down) to cover ``size`` (H, W), centre-cropped to it, as an H×W×C uint8 array."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    image = TF.resize(image, [math.ceil(image.height * scale), math.ceil(image.width * scale)])
    array = np.array(TF.center_crop(image, [height, width]), dtype=np.uint8)  # a writable copy
    return array[:, :, None] if array.ndim == 2 else array
