"""Registers attnlab's model names in timm's registry when timm is imported, without importing timm (or torch) first.

``import attnlab`` stays light, yet DESIGN's promise holds: after ``import attnlab``, every attnlab model name works in
``timm.create_model``. A finder on ``sys.meta_path`` wraps the loader of ``timm`` and of attnlab's own modules; when
one of them finishes loading while timm is loaded and no attnlab module is half-imported, it imports
`attnlab.models` (which registers the names) and removes itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from typing import Any

MODELS = "attnlab.models"


def _busy() -> bool:
    """Whether an attnlab module is being executed now (`attnlab.models` imported then could see it half-made)."""
    return any(
        getattr(getattr(m, "__spec__", None), "_initializing", False)
        for name, m in list(sys.modules.items())
        if name == "attnlab" or name.startswith("attnlab.")
    )


def register() -> None:
    """Import `attnlab.models` (it registers its names with timm) once timm is loaded and no attnlab import runs."""
    if MODELS in sys.modules:  # imported (or being imported): it registers the names itself
        uninstall()
    elif "timm" in sys.modules and not _busy():
        uninstall()
        importlib.import_module(MODELS)


class _Loader:
    """A module's own loader, with `register` run after it executes the module."""

    def __init__(self, loader: Any):
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        module.__spec__._initializing = False  # importlib clears it after we return; register must not wait for us
        try:
            register()
        finally:
            module.__spec__._initializing = True


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "timm" and not name.startswith("attnlab."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Watch imports until attnlab's models are registered with timm."""
    if MODELS not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
