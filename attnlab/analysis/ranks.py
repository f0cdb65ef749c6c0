"""Row-wise rank statistics, batched over thousands of rows at once.

Each row pairs an attention value with an importance value for every unit (channel or position) of one sample, and
the analyses need one correlation per row. ``scipy.stats.spearmanr`` and ``kendalltau`` work on one pair of vectors
(or, on 2-D input, correlate every row with every other), so the rows are done here as whole-array operations and
checked against scipy row by row in the tests: Spearman's ρ is Pearson's r of scipy's average ranks, Kendall's τ-b
counts concordant and discordant pairs through sign matrices. A row without variation (a constant gate, an
importance that is all zero) has no defined correlation and gives NaN, as in scipy; summaries skip NaNs and say how
many rows they kept.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
import torch

KENDALL_CHUNK_ELEMENTS = 2**24  # rows·units² per sign-matrix chunk (64 MiB of float32)


def _as_numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / denom
    r[denom == 0] = np.nan  # ranks are exact, so a constant row centres to exact zeros
    return np.clip(r, -1.0, 1.0)


def spearman_rows(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row of ``a`` with the same row of ``b`` (N×U → N), ties given average ranks."""
    a, b = _as_numpy(a), _as_numpy(b)
    return _row_pearson(scipy.stats.rankdata(a, axis=1), scipy.stats.rankdata(b, axis=1))


def kendall_rows(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row of ``a`` with the same row of ``b`` (N×U → N), as ``scipy.stats.kendalltau``."""
    a, b = torch.as_tensor(_as_numpy(a)), torch.as_tensor(_as_numpy(b))
    n, u = a.shape
    out = torch.empty(n, dtype=torch.float64)
    step = max(1, KENDALL_CHUNK_ELEMENTS // max(1, u * u))
    for start in range(0, n, step):  # chunks bound the N×U×U sign matrices, each chunk one tensor expression
        sa = torch.sign(a[start : start + step, :, None] - a[start : start + step, None, :])
        sb = torch.sign(b[start : start + step, :, None] - b[start : start + step, None, :])
        concordance = (sa * sb).sum((1, 2))
        untied = sa.abs().sum((1, 2)) * sb.abs().sum((1, 2))
        out[start : start + step] = torch.where(untied > 0, concordance / untied.clamp_min(1).sqrt(), torch.nan)
    return out.clamp(-1, 1).numpy()


def topk_overlap(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Fraction of each row's ``k`` largest units of ``a`` that are also among the ``k`` largest of ``b`` (N).

    Ties at the k-th value are broken by position, the same way for both rows.
    """
    a, b = torch.as_tensor(_as_numpy(a)), torch.as_tensor(_as_numpy(b))
    k = max(1, min(int(k), a.shape[1]))
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return ((top_a & top_b).sum(1).double() / k).numpy()


def shuffled_rows(a: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each row of ``a`` independently permuted (a null model that keeps every row's values)."""
    order = torch.rand(a.shape, generator=generator).argsort(dim=1)
    return a.gather(1, order.to(a.device))


__all__ = ["kendall_rows", "shuffled_rows", "spearman_rows", "topk_overlap"]
