"""Analyses that test what the papers claim, as library functions and as ``attnlab analyze NAME``.

- ``consistency``: do attention weights agree with feature importance? (`attnlab.analysis.consistency`)
- ``smoothness``: how smooth is the network near and in-between real samples? (`attnlab.analysis.smoothness`)
- ``landscape``: filter-normalised loss surfaces and Hessian spectrum estimates (`attnlab.analysis.landscape`)
- ``localization``: where does spatial attention look? (`attnlab.analysis.localization`)

`registry` holds one record per analysis (function, headline metrics, figures); `run_analysis` loads trained runs,
runs one analysis on each, and writes ``OUT/<name>.json`` and ``OUT/<name>_*.png``; `headlines` derives the numbers
to quote from such a JSON.
"""

from __future__ import annotations

from ..stats import mean_ci
from .consistency import consistency
from .importance import ablation_importance, captum_importance, gradient_x_activation
from .landscape import (
    filter_normalized_direction,
    hessian_top_eigenvalue,
    hessian_trace,
    landscape,
    loss_surface_1d,
    loss_surface_2d,
)
from .localization import box_iou, localization, localization_iou, polygon_iou, rectangle_box_iou
from .ranks import kendall_rows, spearman_rows, topk_overlap
from .registry import ANALYSES, Analysis, analysis_options, get_analysis
from .runner import group_means, headlines, run_analysis
from .sites import GateSite, gate_sites
from .smoothness import input_gradient_norm, jacobian_frobenius, noise_robustness, path_smoothness, smoothness

__all__ = [
    "ANALYSES",
    "Analysis",
    "GateSite",
    "ablation_importance",
    "analysis_options",
    "box_iou",
    "captum_importance",
    "consistency",
    "filter_normalized_direction",
    "gate_sites",
    "get_analysis",
    "gradient_x_activation",
    "group_means",
    "headlines",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "input_gradient_norm",
    "jacobian_frobenius",
    "kendall_rows",
    "landscape",
    "localization",
    "localization_iou",
    "loss_surface_1d",
    "loss_surface_2d",
    "mean_ci",
    "noise_robustness",
    "path_smoothness",
    "polygon_iou",
    "rectangle_box_iou",
    "run_analysis",
    "smoothness",
    "spearman_rows",
    "topk_overlap",
]
