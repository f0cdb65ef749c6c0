"""Mechanism options (attnlab.layers.hooks): a factory declares its options by annotation, `check_mechanisms` checks a
run's ``mechanisms`` mapping without a model, and `training_hooks` refuses options for a mechanism the model lacks."""

from __future__ import annotations

from typing import Annotated

import pytest
import torch
from torch import nn

from attnlab.errors import AttnlabError
from attnlab.layers import (
    AWConv2d,
    StepHook,
    check_mechanisms,
    create_attn,
    list_training_hooks,
    register_training_hook,
    training_hooks,
)
from attnlab.layers import hooks as hooks_mod
from attnlab.models import create_model
from attnlab.schema import Range


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so a test's registrations do not outlive it."""
    monkeypatch.setattr(hooks_mod, "_HOOKS", dict(hooks_mod._HOOKS))
    return hooks_mod._HOOKS


def test_cram_and_aw_are_registered():
    assert {"aw", "cram"} <= set(list_training_hooks())


def test_mechanisms_are_checked_against_the_factory_annotations(registry):
    def probe(model: nn.Module, *, weight: Annotated[float, Range(0, 1)] = 0.5, names: list[str] = ()) -> None:
        return None

    register_training_hook("probe", probe)
    assert check_mechanisms({"probe": {"weight": 1, "names": "a,b"}}) == {"probe": {"weight": 1.0, "names": ["a", "b"]}}
    assert check_mechanisms({}) == {}
    cases = {
        "cramm": ({"cramm": {}}, "unknown mechanism 'cramm'; did you mean cram?"),
        "range": ({"probe": {"weight": 2}}, "mechanisms.probe: weight must be a finite number in [0, 1], got 2"),
        "option": ({"probe": {"wieght": 1}}, "mechanisms.probe: unknown option 'wieght'; did you mean weight?"),
        "options": ({"probe": 3}, "mechanisms.probe must be a mapping of option to value, got 3"),
        "mapping": (["probe"], "mechanisms must be a mapping of mechanism name to options, got ['probe']"),
    }
    for mechanisms, message in cases.values():
        with pytest.raises(AttnlabError) as e:
            check_mechanisms(mechanisms)
        assert str(e.value) == message


def test_a_factory_must_declare_its_options(registry):
    def positional(model, weight: float = 0.0):
        return None

    def unannotated(model, *, weight=0.0):
        return None

    def no_default(model, *, weight: float):
        return None

    for factory in (positional, unannotated, no_default):
        with pytest.raises(AttnlabError, match="option 'weight' must be keyword-only, annotated and have a default"):
            register_training_hook("bad", factory)
    assert "bad" not in list_training_hooks()


def test_options_for_a_mechanism_the_model_lacks_are_an_error():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3))
    assert training_hooks(plain) == [] and training_hooks(plain, {}) == []
    with pytest.raises(AttnlabError) as e:
        training_hooks(plain, {"cram": {"equivariance": 0.1}})
    assert str(e.value) == "mechanisms.cram.equivariance needs a model with CRAM layers; this model has none"
    with pytest.raises(AttnlabError, match="mechanisms.aw.channels_last needs a model with AW-convolution layers"):
        training_hooks(plain, {"aw": {"channels_last": True}})


def test_every_hook_of_the_model_comes_back_with_its_options():
    model = nn.Sequential(create_attn("cram", 4), AWConv2d(4, 4, 3, padding=1))
    cram, aw = sorted(training_hooks(model, {"cram": {"equivariance": 0.2, "transforms": "hflip"}}), key=str)
    assert (cram.weight, cram.transforms) == (0.2, ("hflip",)) and cram.channels_last
    assert isinstance(aw, StepHook) and aw.channels_last is False  # AW trains in NCHW unless asked
    (aw,) = [h for h in training_hooks(model, {"aw": {"channels_last": True}}) if type(h) is StepHook]
    assert aw.channels_last is True


def test_the_cram_hook_anneals_and_adds_its_weighted_penalty():
    torch.manual_seed(0)
    model = create_model("cram_resnet20", in_chans=1, num_classes=3, attn_kwargs={"beta_final": 40.0}).train()
    (hook,) = training_hooks(model, {"cram": {"equivariance": 0.5}})
    hook.before_step(1.0)
    assert all(float(m.beta) == pytest.approx(40.0) for m in model.modules() if hasattr(m, "beta_final"))
    x = torch.randn(2, 1, 16, 16)
    with hook.watch():
        model(x)
    penalty = hook.extra_loss(x, torch.Generator().manual_seed(0))
    assert penalty is not None and penalty.dim() == 0 and penalty.requires_grad
    (silent,) = training_hooks(model)
    assert silent.extra_loss(x, torch.Generator()) is None  # weight 0: no term, no extra forward


def test_an_equivariance_weight_needs_a_transform():
    model = create_attn("cram", 4)
    with pytest.raises(AttnlabError, match="equivariance > 0 needs at least one transform"):
        training_hooks(model, {"cram": {"equivariance": 0.1, "transforms": []}})
