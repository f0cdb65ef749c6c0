"""CIFAR-10 and CIFAR-100 from the official "python version" archive, read without trusting its pickles.

The batches are Python pickles, and unpickling runs whatever callables a file names. `SafeUnpickler` therefore resolves
only the few globals a CIFAR batch needs (numpy's array reconstruction, ``numpy.ndarray``, ``numpy.dtype``,
``codecs.encode`` for bytes pickled by Python 3) and refuses every other one with an `AttnlabError`, before anything
is called. The loaded dict is then checked (uint8 N×3072 ``data``, N labels in range).

A root folder may hold the extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``) or the ``.tar.gz``
itself, which is read in place without extracting. File names, meta keys, url and md5 come from torchvision's
`CIFAR10`/`CIFAR100` class attributes; ``download=True`` uses torchvision's downloader, which checks the archive's
official md5. Local files are checked for structure, not md5, so re-packed or generated archives also load.
"""

from __future__ import annotations

import codecs
import importlib
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import download_and_extract_archive

from ..errors import AttnlabError
from .bundle import Source, Split
from .locate import candidate_dirs, download_root, search_roots


def _numpy_global(name: str) -> object:
    """``numpy._core.<name>`` (numpy ≥ 2) or ``numpy.core.<name>`` (numpy 1.x), whichever exists."""
    module, attr = name.rsplit(".", 1)
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name}")


def _allowed_globals() -> dict[tuple[str, str], object]:
    reconstruct, frombuffer = _numpy_global("multiarray._reconstruct"), _numpy_global("numeric._frombuffer")
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dicts, lists and strings, and nothing else.

    Args:
        file: binary file to read.
        name: how to name the file in errors.
    """

    _ALLOWED = _allowed_globals()

    def __init__(self, file: io.BufferedIOBase, name: str):
        super().__init__(file, encoding="latin1")
        self.name = name

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise AttnlabError(f"{self.name}: refused to unpickle {module}.{name} (not in a CIFAR batch)") from None


def safe_unpickle(data: bytes, name: str) -> object:
    """The object pickled in ``data``, loaded with `SafeUnpickler`; any failure is an `AttnlabError` naming ``name``."""
    try:
        return SafeUnpickler(io.BytesIO(data), name).load()
    except AttnlabError:
        raise
    except Exception as e:  # a corrupt pickle can raise almost anything (EOFError, UnpicklingError, ValueError...)
        raise AttnlabError(f"{name}: corrupt pickle ({type(e).__name__}: {e})") from None


def _batch_reader(root: Path, base_folder: str, archive: str) -> tuple[Callable[[str], bytes], str] | None:
    """``(read, label)`` where ``read(name)`` returns member ``name`` of the dataset found in ``root`` (the extracted
    folder or the archive) and ``label`` names its location in errors; None if ``root`` holds neither."""
    folder = root / base_folder
    if folder.is_dir():

        def read_file(name: str) -> bytes:
            path = folder / name
            if not path.is_file():
                raise AttnlabError(f"{path}: missing (the {base_folder} folder is incomplete)")
            return path.read_bytes()

        return read_file, str(folder)
    if (root / archive).is_file():
        try:
            with tarfile.open(root / archive, "r:gz") as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as e:
            raise AttnlabError(f"{root / archive}: unreadable archive ({e})") from None

        def read_member(name: str) -> bytes:
            try:
                return members[f"{base_folder}/{name}"]
            except KeyError:
                raise AttnlabError(f"{root / archive}: has no member {base_folder}/{name}") from None

        return read_member, f"{root / archive}:{base_folder}"
    return None


def _read_batches(read: Callable[[str], bytes], where: str, names: list[str], num_classes: int) -> Split:
    images, labels = [], []
    for name in names:
        entry = safe_unpickle(read(name), f"{where}/{name}")
        if not isinstance(entry, dict) or "data" not in entry:
            raise AttnlabError(f"{where}/{name}: not a CIFAR batch (no 'data' entry)")
        data, batch_labels = entry["data"], entry.get("labels", entry.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise AttnlabError(f"{where}/{name}: 'data' is not a uint8 N×3072 array")
        if batch_labels is None or len(batch_labels) != len(data):
            raise AttnlabError(f"{where}/{name}: {len(data)} images but {len(batch_labels or [])} labels")
        batch_labels = np.asarray(batch_labels, dtype=np.int64)
        if len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < num_classes:
            raise AttnlabError(f"{where}/{name}: labels outside [0, {num_classes})")
        images.append(data)
        labels.append(batch_labels)
    image_array = np.concatenate(images).reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(image_array), torch.from_numpy(np.concatenate(labels)))


def load_cifar(dataset: type[CIFAR10], name: str, data_dir: str | os.PathLike | None, download: bool) -> Source:
    """Train and test splits of torchvision's ``dataset`` class (CIFAR10 or CIFAR100), read with `SafeUnpickler`."""
    args = (dataset.base_folder, dataset.filename)
    found = next(filter(None, (_batch_reader(f, *args) for f in candidate_dirs(search_roots(data_dir), [name]))), None)
    if found is None and download:
        root = download_root(data_dir)
        try:
            download_and_extract_archive(dataset.url, str(root), filename=dataset.filename, md5=dataset.tgz_md5)
        except (RuntimeError, OSError) as e:
            raise AttnlabError(f"{name}: download to {root} failed: {' '.join(str(e).split())}") from None
        found = _batch_reader(root, *args)
    if found is None:
        looked = ", ".join(map(str, search_roots(data_dir))) or "nowhere (no --data-dir, ATTNLAB_DATA unset)"
        raise AttnlabError(
            f"{name}: neither {dataset.base_folder}/ nor {dataset.filename} found in {looked} or their {name}/ "
            "subfolders; pass --data-dir DIR (or ATTNLAB_DATA=DIR) holding one of them, or --download"
        )
    read, label = found
    meta_name, key = dataset.meta["filename"], dataset.meta["key"]
    meta = safe_unpickle(read(meta_name), f"{label}/{meta_name}")
    if not isinstance(meta, dict) or not isinstance(meta.get(key), list):
        raise AttnlabError(f"{label}/{meta_name}: no '{key}' list")
    classes = [str(c) for c in meta[key]]
    train = _read_batches(read, label, [n for n, _md5 in dataset.train_list], len(classes))
    test = _read_batches(read, label, [n for n, _md5 in dataset.test_list], len(classes))
    return Source(train, test, classes, crop_padding=4, hflip=True, default_val=0.1, origin=label)


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Source:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32×32 colour images in 10 classes."""
    return load_cifar(CIFAR10, "cifar10", data_dir, download)


def load_cifar100(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Source:
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32×32 colour images in 100 fine classes."""
    return load_cifar(CIFAR100, "cifar100", data_dir, download)
