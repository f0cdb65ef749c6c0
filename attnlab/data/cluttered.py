"""Cluttered Fashion-MNIST: a garment at a random position and scale on a larger canvas, among pieces of other garments.

This is the localisation benchmark for spatial attention ("where to look", CRAM): the class is decided by one object
whose ground-truth box is known, while clutter makes attending to the whole canvas costly. It follows cluttered MNIST
(Mnih et al. 2014, "Recurrent Models of Visual Attention"): each image is a Fashion-MNIST garment, scaled by a factor
drawn uniformly from ``scale`` and placed uniformly at random on a ``canvas``×``canvas`` black canvas, plus ``clutter``
``patch``×``patch`` pieces cut at random from *other* garments of the same split and pasted at random places;
overlaps combine by maximum, so the garment's own pixels are never dimmed.

Our reading of "random scale": a continuous factor, applied by bilinear resampling (`F.grid_sample` with an affine
grid, which scales and places a whole batch in one call) at sub-pixel positions. ``boxes`` are the tight extent of
the placed garment's non-zero pixels (x0, y0, x1, y1; x1, y1 exclusive), measured on the rendered garment before
clutter is added. Train images come from Fashion-MNIST train, test images from its test split; everything is drawn
from ``data_seed``, with the garment placement and the clutter on separate random streams, so ``clutter=0`` renders
the same garments in the same places (the clean reference of a cluttered set).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from ..errors import AttnlabError
from .bundle import Source, Split, seeded_generator
from .idx import load_fashion_mnist

CHUNK = 2048  # images rendered per grid_sample call: bounds the float working memory to ~70 MB at 64×64


def place(images: torch.Tensor, canvas: int, scales: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
    """Images (uint8 B×C×h×w) scaled by ``scales`` (B) with their top-left corner at ``origins`` (B×2, x then y,
    in canvas pixels) on a black ``canvas``×``canvas`` (uint8 B×C×canvas×canvas)."""
    b, c, h, w = images.shape
    # The sampling grid of a scale-and-shift, built per axis (F.affine_grid would do a 3×2 matmul per pixel): canvas
    # pixel centre X = u + 0.5 shows source point x = (X - origin) / scale, normalised to [-1, 1] over the source's
    # pixel edges (align_corners=False) as 2 x / size - 1.
    centres = torch.arange(canvas, dtype=torch.float32) + 0.5
    gx, gy = (2 * (centres - origins[:, i, None]) / (size * scales[:, None]) - 1 for i, size in ((0, w), (1, h)))
    grid = torch.stack([gx[:, None, :].expand(b, canvas, canvas), gy[:, :, None].expand(b, canvas, canvas)], dim=-1)
    placed = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return placed.round_().clamp_(0, 255).to(torch.uint8)


def tight_boxes(layer: torch.Tensor) -> torch.Tensor:
    """(x0, y0, x1, y1) of the non-zero pixels of each image of ``layer`` (B×C×H×W), x1/y1 exclusive; 0s if blank."""
    boxes = []
    for profile in (layer.amax(dim=(1, 2)) > 0, layer.amax(dim=(1, 3)) > 0):  # columns (x), rows (y)
        size = profile.shape[1]
        first = profile.int().argmax(dim=1)
        last = size - profile.flip(1).int().argmax(dim=1)
        boxes.append((first, last))
    (x0, x1), (y0, y1) = boxes
    box = torch.stack([x0, y0, x1, y1], dim=1).float()
    return box * layer.flatten(1).any(dim=1, keepdim=True)


def add_clutter(canvas_images: torch.Tensor, pieces: torch.Tensor, origins: torch.Tensor) -> None:
    """Paste ``pieces`` (B×K×C×p×p) into ``canvas_images`` (B×C×S×S) at ``origins`` (B×K×2, x then y) by maximum."""
    b, k, _, p, _ = pieces.shape
    batch, offsets = torch.arange(b)[:, None, None], torch.arange(p)
    for j in range(k):  # a loop over the few pieces per image, each step vectorised over the batch
        rows = (origins[:, j, 1, None] + offsets)[:, :, None]
        cols = (origins[:, j, 0, None] + offsets)[:, None, :]
        region = canvas_images.permute(0, 2, 3, 1)[batch, rows, cols]  # B×p×p×C
        merged = torch.maximum(region, pieces[:, j].permute(0, 2, 3, 1))
        canvas_images.permute(0, 2, 3, 1)[batch, rows, cols] = merged


def paste_clutter(
    canvas_images: torch.Tensor,
    pool: torch.Tensor,
    donors: torch.Tensor,
    cuts: torch.Tensor,
    spots: torch.Tensor,
    patch: int,
) -> None:
    """Cut ``patch``×``patch`` pieces of the ``pool`` images ``donors`` (B×K) at ``cuts`` (B×K×2, x then y) and paste
    them into ``canvas_images`` (B×C×S×S) at ``spots`` (B×K×2) by maximum."""
    offsets = torch.arange(patch)
    rows = (cuts[:, :, 1, None] + offsets)[:, :, :, None]  # B×K×p×1
    cols = (cuts[:, :, 0, None] + offsets)[:, :, None, :]  # B×K×1×p
    pieces = pool.permute(0, 2, 3, 1)[donors[:, :, None, None], rows, cols]  # B×K×p×p×C
    add_clutter(canvas_images, pieces.permute(0, 1, 4, 2, 3), spots)


def check_options(what: str, counts: tuple[tuple[str, object, int], ...], scale: object) -> tuple[float, float]:
    """Refuse a non-integer or too small count option (``(name, value, minimum)``) and a bad ``scale`` range in one
    line; returns ``scale`` as floats."""
    for name, value, minimum in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise AttnlabError(f"{what} option {name} must be an integer >= {minimum}, got {value!r}")
    if not isinstance(scale, tuple | list) or len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1]):
        raise AttnlabError(f"{what} option scale must be (min, max) with 0 < min <= max, got {scale!r}")
    return float(scale[0]), float(scale[1])


def render(
    source: Split,
    canvas: int,
    clutter: int,
    patch: int,
    scale: tuple[float, float],
    seed: tuple[int, ...],
) -> Split:
    """The cluttered version of ``source``: same labels, canvas-sized images, tight garment boxes."""
    n, c, h, w = source.images.shape
    place_rng, clutter_rng = seeded_generator(*seed, 0), seeded_generator(*seed, 1)
    scales = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=place_rng, dtype=torch.float64)
    room = torch.stack([canvas - w * scales, canvas - h * scales], dim=1)
    origins = torch.rand(n, 2, generator=place_rng, dtype=torch.float64) * room
    if clutter:
        if n < 2:
            raise AttnlabError("cluttered-fashion-mnist needs at least 2 source images to cut clutter from others")
        donors = (torch.arange(n)[:, None] + torch.randint(1, n, (n, clutter), generator=clutter_rng)) % n
        cuts = torch.randint(0, min(h, w) - patch + 1, (n, clutter, 2), generator=clutter_rng)
        spots = torch.randint(0, canvas - patch + 1, (n, clutter, 2), generator=clutter_rng)
    images = torch.empty(n, c, canvas, canvas, dtype=torch.uint8)
    boxes = torch.empty(n, 4, dtype=torch.float32)
    for start in range(0, n, CHUNK):
        sl = slice(start, start + CHUNK)
        garments = place(source.images[sl], canvas, scales[sl].float(), origins[sl].float())
        boxes[sl] = tight_boxes(garments)
        if clutter:
            paste_clutter(garments, source.images, donors[sl], cuts[sl], spots[sl], patch)
        images[sl] = garments
    return Split(images, source.labels.clone(), boxes)


def load_cluttered_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    canvas: int = 64,
    clutter: int = 4,
    patch: int = 8,
    scale: tuple[float, float] | list[float] = (0.75, 1.5),
    data_seed: int = 0,
) -> Source:
    """Cluttered Fashion-MNIST rendered from the Fashion-MNIST files (found as for ``fashion-mnist``).

    Args:
        data_dir: where the Fashion-MNIST IDX files are.
        download: fetch Fashion-MNIST through torchvision if no local copy is found.
        canvas: side of the square canvas, in pixels.
        clutter: clutter pieces per image (0: garment alone).
        patch: side of each clutter piece, in pixels.
        scale: (min, max) of the uniform garment scale factor.
        data_seed: seed of placement and clutter.
    """
    what = "cluttered-fashion-mnist"
    checks = (("canvas", canvas, 1), ("clutter", clutter, 0), ("patch", patch, 1), ("data_seed", data_seed, 0))
    scale = check_options(what, checks, scale)
    source = load_fashion_mnist(data_dir, download=download)
    side = max(source.train.images.shape[2:])
    if canvas < math.ceil(side * scale[1]):
        raise AttnlabError(f"{what}: canvas={canvas} cannot hold a {side}px garment scaled by {scale[1]}")
    if patch > side:
        raise AttnlabError(f"{what}: patch={patch} is larger than a {side}px garment")
    args = (canvas, clutter, patch, scale)
    train, test = render(source.train, *args, seed=(data_seed, 0)), render(source.test, *args, seed=(data_seed, 1))
    origin = f"{what} from {source.origin}: canvas={canvas} clutter={clutter} patch={patch} scale={scale}"
    origin += f" data_seed={data_seed}"
    return Source(train, test, source.classes, crop_padding=canvas // 16, hflip=True, default_val=5000, origin=origin)
