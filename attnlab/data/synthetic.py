"""A seeded, learnable synthetic dataset for tests and smoke runs: no files, any shape, any number of classes.

Each class has a smooth random prototype (Gaussian noise at 1/8 resolution, at least 2×2, upsampled bilinearly); an
image is mid-grey + its class's prototype + independent per-pixel Gaussian noise of the same amplitude, rounded to
uint8. One pixel says little about the class, the whole image says a lot, so a small network's loss visibly falls
within a few hundred steps. Everything is drawn from ``data_seed`` (not the training seed), so every run of a
comparison sees the same images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import AttnlabError
from .bundle import Source, Split, seeded_generator

AMPLITUDE = 40.0  # grey levels, for both the prototype and the noise (std)


def _check_positive(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttnlabError(f"synthetic option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _draw(prototypes: torch.Tensor, n: int, generator: torch.Generator) -> Split:
    num_classes = len(prototypes)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    noise = torch.randn((n, *prototypes.shape[1:]), generator=generator)
    images = 127.5 + AMPLITUDE * (prototypes[labels] + noise)
    return Split(images.round().clamp(0, 255).to(torch.uint8), labels)


def load_synthetic(
    *,
    shape: tuple[int, int, int] | list[int] = (3, 32, 32),
    num_classes: int = 10,
    size: int = 512,
    test_size: int = 256,
    data_seed: int = 0,
) -> Source:
    """Synthetic class-prototype images.

    Args:
        shape: (C, H, W) of every image.
        num_classes: number of classes (labels are balanced within each split).
        size: training pool size (validation is carved from it).
        test_size: test split size.
        data_seed: seed of prototypes, labels and noise.
    """
    if not isinstance(shape, tuple | list) or len(shape) != 3:
        raise AttnlabError(f"synthetic option shape must be (C, H, W), got {shape!r}")
    c, h, w = (_check_positive("shape", v) for v in shape)
    num_classes = _check_positive("num_classes", num_classes, 2)
    size, test_size = _check_positive("size", size), _check_positive("test_size", test_size)
    data_seed = _check_positive("data_seed", data_seed, 0)
    coarse = torch.randn((num_classes, c, max(2, h // 8), max(2, w // 8)), generator=seeded_generator(data_seed, 0))
    prototypes = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    prototypes = prototypes / prototypes.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
    train = _draw(prototypes, size, seeded_generator(data_seed, 1))
    test = _draw(prototypes, test_size, seeded_generator(data_seed, 2))
    classes = [f"class{i}" for i in range(num_classes)]
    origin = f"synthetic shape={(c, h, w)} classes={num_classes} data_seed={data_seed}"
    return Source(train, test, classes, crop_padding=min(h, w) // 16, hflip=False, default_val=0.1, origin=origin)
