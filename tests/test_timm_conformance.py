"""timm's own model tests (``tests/test_models.py`` of the installed timm), run over attnlab's models.

timm parametrises those tests over its registry at import time; here the same test functions are called with
attnlab's names: every test on every prefix of a CIFAR-style net (resnet20, and the four-stage resnet18c); the cheap
tests (forward, backward, features, intermediates) also on every prefix of an ImageNet-style basic-block net (resnet18)
and on the bottleneck (aw_se_resnet50), which runs the costly ones (FX, TorchScript) for that style. The file is not
ours to copy: ``make setup`` fetches it from timm's sdist on PyPI (``scripts/fetch_timm_tests.py``); without it this
module skips, saying so. Every attnlab model passes every test below: there is no exception list (timm's own is
``EXCLUDE_JIT_FILTERS`` and friends in that file; AW's fused autograd functions, which TorchScript cannot compile, are
replaced by `AWConv2d.forward_plain` when scripted, as timm's own memory-efficient activations are).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import timm

import attnlab  # noqa: F401  (registers attnlab's names in timm's registry)
from attnlab.models import VARIANTS

SOURCE = (
    Path(__file__).resolve().parent.parent / ".timm-tests" / f"timm-{timm.__version__}" / "tests" / "test_models.py"
)
if not SOURCE.is_file():
    pytest.skip(
        f"timm's own model tests are not here ({SOURCE}): run `make setup` or scripts/fetch_timm_tests.py",
        allow_module_level=True,
    )
_spec = importlib.util.spec_from_file_location("timm_test_models", SOURCE)
TIMM = importlib.util.module_from_spec(_spec)
with warnings.catch_warnings():  # timm's own marks (base, cfg, ...) are registered in timm's pytest config, not ours
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    _spec.loader.exec_module(TIMM)
# timm's input-size targets (128–384 px, sized for its CI) down to 64 px for the ImageNet-style nets: the suite runs on
# 2 CPU cores. CIFAR-style nets declare 32 px and run at that. Every size check of the tests still applies.
for _target in ("FWD", "BWD", "JIT", "FFEAT", "FWD_FX", "BWD_FX"):
    setattr(TIMM, f"TARGET_{_target}_SIZE", 64)

PREFIXES = [v for v in VARIANTS if v]
CIFAR = ["resnet20", *(f"{p}_resnet20" for p in PREFIXES), "resnet18c"]
IMAGENET = [f"{p}_resnet18" for p in PREFIXES] + ["aw_se_resnet50"]
NAMES = CIFAR + IMAGENET
HEAVY = {"aw_se_resnet50"}

# timm's tests that every timm model runs (parametrised there over the registry): the arguments besides model_name.
# The cheap ones run on every name; the costly ones (FX tracing, TorchScript, the meta-device config checks, 1–3 CPU-s
# a name, mostly per module traced) on every CIFAR name, which holds every prefix's block at its cheapest.
CHEAP = {
    "test_model_forward": dict(batch_size=1),
    "test_model_backward": dict(batch_size=2),
    "test_model_forward_features": dict(batch_size=1),
    "test_model_forward_intermediates_features": dict(batch_size=1),
    "test_model_forward_intermediates": dict(batch_size=1),
}
COSTLY = {
    "test_model_default_cfgs": dict(batch_size=1, cfg_device="meta"),  # cfg_device: timm's fixture, on torch ≥ 2.0
    "test_model_forward_torchscript": dict(batch_size=1),
    "test_model_forward_fx": dict(batch_size=1),
    "test_model_backward_fx": dict(batch_size=2),
    "test_model_forward_fx_torchscript": dict(batch_size=1),
}
PER_MODEL = {**CHEAP, **COSTLY}
# the costly ones on the ImageNet style: its default config (shared by every ImageNet name) on the cheapest net with the
# factorized AW generator; FX and TorchScript on the bottleneck, in timm's ResNet with the factorized generator and SE
IMAGENET_COSTLY = {
    "test_model_default_cfgs": ["aw_resnet18"],
    **{test: ["aw_se_resnet50"] for test in COSTLY if test != "test_model_default_cfgs"},
}
# timm's tests that it runs on a few named models (its ResNets among them): run on a few of ours, both styles
PER_FEATURE = {
    "test_reset_classifier_keeps_pool": {},
    "test_features_only_grad_checkpointing_backward": {},
    "test_head_hidden_size": dict(model_kwargs={}),
    "test_prune_intermediate_layers_params_used": {},
    "test_prune_intermediate_layers_contract": {},
    "test_forward_after_prune_intermediate_layers": {},
    "test_prune_to_stem_feature": {},
    "test_model_forward_torchscript_with_features_fx": dict(batch_size=1),
}
FEATURE_NAMES = ["cram_resnet20", "aw_se_resnet20", "aw_resnet18"]


def _param(test: str, name: str):
    return pytest.param(test, name, marks=[pytest.mark.slow] if name in HEAVY else [], id=f"{test}-{name}")


MODEL_PARAMS = [_param(test, name) for test in PER_MODEL for name in CIFAR]
MODEL_PARAMS += [_param(test, name) for test in CHEAP for name in IMAGENET]
MODEL_PARAMS += [_param(test, name) for test, names in IMAGENET_COSTLY.items() for name in names]


@pytest.mark.parametrize("test, name", MODEL_PARAMS)
def test_timm_model_test(test, name):
    getattr(TIMM, test)(name, **PER_MODEL[test])


@pytest.mark.parametrize("test, name", [_param(test, name) for test in PER_FEATURE for name in FEATURE_NAMES])
def test_timm_feature_test(test, name):
    getattr(TIMM, test)(name, **PER_FEATURE[test])


def test_names_cover_every_prefix_in_both_styles():
    for prefix in PREFIXES:
        assert f"{prefix}_resnet20" in CIFAR and f"{prefix}_resnet18" in IMAGENET
    assert set(NAMES) <= set(timm.list_models())
    tested = {(p.values[0], p.values[1]) for p in MODEL_PARAMS}
    for name in NAMES:  # every prefix in both styles runs timm's cheap tests, every CIFAR name all of them
        assert {(test, name) for test in (PER_MODEL if name in CIFAR else CHEAP)} <= tested
    for test in COSTLY:  # and each costly test runs on the ImageNet style too
        assert any(name in IMAGENET for t, name in tested if t == test)
