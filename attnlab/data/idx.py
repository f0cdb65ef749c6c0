"""MNIST and Fashion-MNIST from IDX files (the format LeCun's MNIST and Zalando's Fashion-MNIST ship in).

An IDX file is a 4-byte big-endian magic number (0x00000803 for uint8 images of 3 dimensions, 0x00000801 for uint8
labels of 1 dimension), one big-endian uint32 per dimension, then the raw bytes. Files may be gzip-compressed (detected
by the gzip magic 0x1f8b, not by the name). Unlike torchvision's reader, which asserts, every check here (magic,
declared size against the file length, image/label counts, label range) fails with an `AttnlabError` naming the file.

Files are looked up as described in `attnlab.data.locate`, also in a ``fashion-mnist``/``mnist`` subfolder and
torchvision's ``FashionMNIST/raw``/``MNIST/raw`` layout; Fashion-MNIST also in Debian's package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``). With ``download=True`` and no local copy,
torchvision's own download code (mirrors and md5s) fetches them.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from ..errors import AttnlabError
from .bundle import Source, Split
from .locate import candidate_dirs, download_root, search_roots

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class IdxFamily:
    """One IDX dataset: its name, torchvision class (file names, classes, download), and where else to look."""

    name: str
    torchvision_class: type
    hflip: bool
    system_dirs: tuple[Path, ...] = ()
    install_hint: str = ""

    @property
    def stems(self) -> list[str]:
        """The four file names without ``.gz``: train images, train labels, test images, test labels."""
        return [os.path.splitext(name)[0] for name, _md5 in self.torchvision_class.resources]


FASHION_MNIST = IdxFamily(
    "fashion-mnist",
    torchvision.datasets.FashionMNIST,
    hflip=True,
    system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    install_hint="`apt-get install dataset-fashion-mnist`, ",
)
MNIST = IdxFamily("mnist", torchvision.datasets.MNIST, hflip=False)


def read_idx(path: Path, kind: str) -> np.ndarray:
    """The array stored in IDX file ``path``; ``kind`` is ``"images"`` (N×H×W) or ``"labels"`` (N)."""
    magic_expected, ndim = (IMAGES_MAGIC, 3) if kind == "images" else (LABELS_MAGIC, 1)
    raw = path.read_bytes()
    held = "file holds"
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise AttnlabError(f"{path}: corrupt gzip data ({e})") from None
        held = "decompressed file holds"
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AttnlabError(f"{path}: truncated: {held} {len(raw)} bytes, less than an IDX {kind} header ({header})")
    magic = int.from_bytes(raw[:4], "big")
    if magic != magic_expected:
        raise AttnlabError(f"{path}: wrong magic number 0x{magic:08x}, expected 0x{magic_expected:08x} (IDX {kind})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    shape, needed = "×".join(map(str, dims)), header + math.prod(dims)
    if len(raw) < needed:
        raise AttnlabError(f"{path}: truncated: header declares {shape} {kind} but {held} {len(raw)} of {needed} bytes")
    if len(raw) > needed:
        raise AttnlabError(f"{path}: {len(raw) - needed} bytes after the {shape} {kind} its header declares")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_split(images_path: Path, labels_path: Path, num_classes: int) -> Split:
    """Images and labels from a pair of IDX files, checked to agree in count and to hold valid labels."""
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    if len(images) != len(labels):
        raise AttnlabError(f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} images")
    if len(labels) and labels.max() >= num_classes:
        raise AttnlabError(f"{labels_path}: label {labels.max()} out of range for {num_classes} classes")
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


def _existing(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_files(family: IdxFamily, data_dir: str | os.PathLike | None) -> list[Path] | None:
    """The four IDX files of ``family`` from the first folder holding any of them, or None if no folder does."""
    roots = search_roots(data_dir) + list(family.system_dirs)
    subfolders = [family.name, f"{family.torchvision_class.__name__}/raw"]
    for folder in candidate_dirs(roots, subfolders):
        found = [_existing(folder, stem) for stem in family.stems]
        if all(found):
            return found
        missing = [stem for stem, path in zip(family.stems, found) if path is None]
        if len(missing) < len(found):
            raise AttnlabError(f"{folder / missing[0]}[.gz]: missing; {family.name} needs {', '.join(family.stems)}")
    return None


def load_idx_family(family: IdxFamily, data_dir: str | os.PathLike | None, download: bool) -> Source:
    """Train and test splits of ``family``, from local files or (only if ``download``) through torchvision."""
    files = find_files(family, data_dir)
    if files is None and download:
        root = download_root(data_dir)
        try:
            family.torchvision_class(str(root), train=True, download=True)
        except (RuntimeError, OSError) as e:
            raise AttnlabError(f"{family.name}: download to {root} failed: {' '.join(str(e).split())}") from None
        files = find_files(family, root / family.torchvision_class.__name__ / "raw")
    if files is None:
        roots = search_roots(data_dir) + list(family.system_dirs)
        looked = ", ".join(map(str, roots)) or "nowhere (no --data-dir, ATTNLAB_DATA unset)"
        raise AttnlabError(
            f"{family.name}: IDX files ({family.stems[0]}[.gz] and 3 more) not found in {looked} or their "
            f"{family.name}/ and {family.torchvision_class.__name__}/raw/ subfolders; get them with "
            f"{family.install_hint}--data-dir DIR (or ATTNLAB_DATA=DIR), or --download"
        )
    classes = list(family.torchvision_class.classes)
    train = read_split(files[0], files[1], len(classes))
    test = read_split(files[2], files[3], len(classes))
    origin = str(files[0].parent)
    return Source(train, test, classes, crop_padding=2, hflip=family.hflip, default_val=5000, origin=origin)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Source:
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28×28 grey garments in 10 classes; flips keep the class."""
    return load_idx_family(FASHION_MNIST, data_dir, download)


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Source:
    """MNIST (LeCun et al. 1998): 60k/10k 28×28 grey digits; no flips (a mirrored digit is another symbol)."""
    return load_idx_family(MNIST, data_dir, download)
