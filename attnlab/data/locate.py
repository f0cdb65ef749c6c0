"""Where dataset files are looked for, and where a download goes.

Search order: the ``data_dir`` argument (``--data-dir``), then each folder in the environment variable ``ATTNLAB_DATA``
(``os.pathsep``-separated), then system folders a family names (Debian's ``/usr/share/datasets/fashion-mnist``). Inside
each root a family also accepts its own subfolder (``ROOT/fashion-mnist``) and torchvision's layout
(``ROOT/FashionMNIST/raw``), so a folder prepared by torchvision or by hand works as is. Downloads (only when asked)
go to ``data_dir``, else the first ``ATTNLAB_DATA`` folder, else ``~/.cache/attnlab/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "ATTNLAB_DATA"


def search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """The user-given roots in search order: ``data_dir`` then the ``ATTNLAB_DATA`` folders."""
    roots = [Path(data_dir).expanduser()] if data_dir else []
    roots += [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return roots


def candidate_dirs(roots: list[Path], subfolders: list[str]) -> list[Path]:
    """Every ``root`` and ``root/sub`` for each sub, in order, without duplicates."""
    found: list[Path] = []
    for root in roots:
        for d in [root, *(root / s for s in subfolders)]:
            if d not in found:
                found.append(d)
    return found


def download_root(data_dir: str | os.PathLike | None) -> Path:
    """Where a requested download is stored."""
    roots = search_roots(data_dir)
    return roots[0] if roots else Path("~/.cache/attnlab/data").expanduser()
