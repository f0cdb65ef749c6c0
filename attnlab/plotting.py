"""The one figure style of the project (analyses and comparison reports alike): matplotlib's Agg backend, chosen
when the first figure is drawn, not at import; constrained layout; tab10 colours in a fixed order; small PNGs at
`DPI` without a software tag or timestamp, so the same numbers always give the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DPI = 100
PNG_METADATA = {"Software": None}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def color(i: int) -> tuple[float, ...]:
    """The ``i``-th series colour: tab10, then tab20 past ten series."""
    return pyplot().get_cmap("tab10" if i < 10 else "tab20")(i % 20)


def subplots(*args: Any, **kwargs: Any):
    """``plt.subplots`` in the house style (constrained layout)."""
    return pyplot().subplots(*args, layout="constrained", **kwargs)


def figure(**kwargs: Any):
    return pyplot().figure(layout="constrained", **kwargs)


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at `DPI`, creating the folder, and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)
    pyplot().close(fig)
    return path
