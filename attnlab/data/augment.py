"""Training augmentation and normalisation on whole batches, as tensor ops on the batch's device (airbench-style).

The random parameters (a crop offset and a flip bit per sample) are drawn separately from a seeded generator, so the
operations themselves are plain deterministic functions that tests can compare with a per-sample reference.
Random crop = torchvision's ``RandomCrop(size, padding=p)`` with zero fill: pad by ``p`` black pixels, cut an
H×W window at offset (dy, dx) ∈ [0, 2p]². Flip = ``RandomHorizontalFlip``. Both run on uint8 before normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_params(n: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (n×2 int64: dy, dx in [0, 2·padding]) and flip flags (n bool) for ``n`` samples.

    Both are always drawn, so the stream does not depend on whether the data uses flips.
    """
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    return offsets, flips


def random_crop(images: torch.Tensor, padding: int, offsets: torch.Tensor) -> torch.Tensor:
    """Each image zero-padded by ``padding`` and cut back to its size at its own ``offsets`` (B×2: dy, dx)."""
    if padding == 0:
        return images
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = offsets.to(images.device)
    rows = (offsets[:, 0, None] + torch.arange(h, device=images.device))[:, None, :, None]  # B×1×H×1
    cols = (offsets[:, 1, None] + torch.arange(w, device=images.device))[:, None, None, :]  # B×1×1×W
    cut_rows = padded.gather(2, rows.expand(b, c, h, w + 2 * padding))
    return cut_rows.gather(3, cols.expand(b, c, h, w))


def flip(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images mirrored left-right where ``flips`` (B bool) is set."""
    return torch.where(flips.to(images.device)[:, None, None, None], images.flip(3), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 ``(x / 255 - mean) / std``; ``mean``/``std`` are per channel (C) in [0, 1] units."""
    return images.float().div_(255).sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
