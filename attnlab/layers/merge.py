"""Residual merges: how a block combines its residual branch F with its shortcut S.

A block computes ``act(merge(F, S))``, F being the residual branch after its last BN (and after its attention, if any)
and S the shortcut (the input, or a 1×1 conv + BN when the shape changes). ``add`` is ResNet's F + S. The rest are
FMMNet's multiplicative family (Ye et al., "Towards Understanding the Effectiveness of Attention Mechanism",
arXiv 2106.15067): the paper replaces the residual addition with a multiplication of feature maps and claims the product
regularises and smooths the network. The abstract does not fix the product's form. A training log of the first
author's, which postdates the paper, found that the form decides the outcome and that fixing a factor's BN bias at 1
helps (its numbers: docs/MEASUREMENTS.md). So the form is a switch, the fixed biases are options (``residual_bias``,
``shortcut_bias``), and every variant is written so the network starts at a sane scale. The block may also leave out
its activation after the merge (``post_act=False`` on the model, as in pre-activation ResNets).

Two claims hide in "multiplication beats addition", and the presets keep them apart: *plain* products (``mul``,
``mul_bn``: the paper's literal replacement) and *gated* products (``gate``, ``gate_shortcut``, ``mul_residual``: one
factor squashed or offset so that it acts like an attention gate on the other).

Scale at initialisation (tests/test_merge.py checks it; numbers in docs/MEASUREMENTS.md): ``mul`` zeroes about half
of the live units per block and compounds heavy tails, so it is kept only as the literal baseline; ``mul_bn`` and
``gate_shortcut`` stay near unit scale but keep no identity path, so their gradient explodes with depth like a
skip-less network's; ``gate`` and ``mul_residual`` start every block as the identity, like ``add``.

Half precision: the product of two fp16 activations of a few hundred overflows (65504), and bf16 keeps 8 mantissa bits.
Every multiplicative merge therefore computes its formula in fp32 when an input is fp16/bf16 and clamps the result to
the input dtype's finite range before casting back (BN on S runs first, in the input's dtype, as the rest of the net).
``add`` is left as plain ResNet addition.

Each merge states ``identity_at_zero``: whether F = 0 makes the block the identity (what stochastic depth, which zeroes
F, needs), and ``zero_init_residual``: whether zeroing F's last BN weight (timm's ``zero_init_last``) is the right
start. The two agree except for ``mul_bn`` with a fixed residual bias c ≠ 0, where a zeroed weight leaves F ≡ c.
``DEFAULT_FMM_MERGE`` is the variant the ``fmm_`` models use, chosen on validation accuracy by
benchmarks/fmm_variants.py (the run and its table: docs/MEASUREMENTS.md).

Every merge takes ``device``/``dtype`` as timm's layers do and builds its parameters there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AttnlabError, lookup
from ..schema import check_call


def _upcast(f: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """F and S in fp32 if either is half precision, and the dtype the result must be returned in."""
    dtype = torch.promote_types(f.dtype, s.dtype)
    if dtype == torch.float16 or dtype == torch.bfloat16:
        return f.float(), s.float(), dtype
    return f, s, dtype


def _downcast(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``y`` in ``dtype``, clamped to its finite range so a large product saturates instead of becoming inf."""
    if y.dtype == dtype:
        return y
    # only ever called to return to half precision; the two finite maxima as literals, for TorchScript
    limit = 65504.0 if dtype == torch.float16 else 3.3895313892515355e38
    return y.clamp(-limit, limit).to(dtype)


class FixedBiasBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose bias is a constant buffer, not a parameter: BN(x) with its shift fixed at ``bias``.

    Used before a product, where a BN bias of 1 makes the factor start around 1 instead of 0 (the fix the author's
    training log found helpful, module docstring). A buffer, so no optimiser, weight decay or ``requires_grad_`` call
    can move it; the state-dict key stays ``bias``.
    """

    def __init__(self, channels: int, bias: float, **kwargs):
        super().__init__(channels, **kwargs)
        del self.bias
        self.register_buffer(
            "bias", torch.full((channels,), float(bias), device=self.weight.device, dtype=self.weight.dtype)
        )

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, bias: float) -> FixedBiasBatchNorm2d:
        """``bn`` with its bias fixed at ``bias`` (weight and running statistics copied), built on its device."""
        fixed = cls(
            bn.num_features, bias, eps=bn.eps, momentum=bn.momentum, device=bn.weight.device, dtype=bn.weight.dtype
        )
        with torch.no_grad():
            fixed.weight.copy_(bn.weight)
            fixed.running_mean.copy_(bn.running_mean)
            fixed.running_var.copy_(bn.running_var)
        return fixed


def _shortcut_bn(channels: int, bias: float | None, dd: dict) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, **dd) if bias is None else FixedBiasBatchNorm2d(channels, bias, **dd)


class AddMerge(nn.Module):
    """y = F + S (ResNet). The block applies its activation afterwards."""

    identity_at_zero = zero_init_residual = True  # F = 0 at init makes the block the identity

    def __init__(self, channels: int, device: Any = None, dtype: Any = None):
        super().__init__()

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return residual + shortcut


class MulMerge(nn.Module):
    """y = g · F ⊙ S, the literal FMMNet product (g = 1 by default).

    Zeroing F would zero the block, so F's BN keeps its default init (weight 1). The constant gain only sets the start
    (F's BN weight can learn any scale): g = √2 would restore the second moment that ReLU halves when S ≥ 0, but it
    only inflates the heavy-tailed later stages (docs/MEASUREMENTS.md), and no gain revives the units the product
    zeroes (module docstring).

    Args:
        channels: channels of F and S (unused; kept so every merge takes ``channels`` first).
        gain: constant factor g > 0.
    """

    identity_at_zero = zero_init_residual = False

    def __init__(self, channels: int, gain: float = 1.0, device: Any = None, dtype: Any = None):
        super().__init__()
        if not gain > 0:
            raise AttnlabError(f"merge 'mul' needs gain > 0, got {gain}")
        self.gain = float(gain)

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        f, s, dtype = _upcast(residual, shortcut)
        return _downcast(self.gain * f * s, dtype)

    def extra_repr(self) -> str:
        return f"gain={self.gain:.4g}"


class MulBNMerge(nn.Module):
    """y = F ⊙ BN(S): the "BN(F)·BN(S)" product, F's BN being the block's own last BN (our reading).

    F already ends in a BN, and a second one right after it is the same function (BN∘BN = BN up to eps in training), so
    only S gets a new BN; ``bn_residual=True`` adds the literal second BN on F anyway. Re-centring S every block revives
    the units an earlier ReLU zeroed, so the forward does not cascade; with no identity path the gradient does, with
    depth (module docstring). Both BNs start at weight 1, bias 0; F's BN is not zeroed (it would zero the block).

    ``residual_bias=1, shortcut_bias=1`` is the author's log's "both BN biases fixed at 1". With F's bias fixed at
    c ≠ 0 (and no second BN on F), F's BN weight *is* zeroed at init unless the model's ``zero_init_last`` is off:
    F ≡ c, and the block starts as c·BN(S), a normalised identity (our reading; the log does not say how it
    initialised). Keeping weight 1 there trained worse (docs/MEASUREMENTS.md).

    Args:
        channels: channels of F and S.
        bn_residual: also normalise F inside the merge (redundant with the block's last BN).
        residual_bias: fix the bias of F's last BN (the block's) at this value; None: learned as usual.
        shortcut_bias: fix the bias of the BN on S at this value; None: learned as usual.
    """

    identity_at_zero = False

    def __init__(
        self,
        channels: int,
        bn_residual: bool = False,
        residual_bias: float | None = None,
        shortcut_bias: float | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.residual_bias = residual_bias
        self.bn_shortcut = _shortcut_bn(channels, shortcut_bias, dd)
        self.bn_residual = nn.BatchNorm2d(channels, **dd) if bn_residual else nn.Identity()

    @property
    def zero_init_residual(self) -> bool:
        """Zero F's last BN weight only when its bias is fixed at c ≠ 0 (F ≡ c) and no second BN renormalises F to 0;
        otherwise F ≡ 0 would zero the block."""
        return bool(self.residual_bias) and isinstance(self.bn_residual, nn.Identity)

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        f, s, dtype = _upcast(self.bn_residual(residual), self.bn_shortcut(shortcut))
        return _downcast(f * s, dtype)


class GateMerge(nn.Module):
    """y = (σ(F) + c) ⊙ S: the residual branch as a gate in (c, c + 1) on the shortcut; c = 0.5 by default.

    With F's last BN zeroed, σ(0) + 0.5 = 1 and the block is the identity at init, as ResNet's (gradient still reaches
    F, through σ'(0) = 1/4). The author's log's form (σ(F)+1)·BN(S) is ``offset=1, bn_shortcut=True``; ``offset=1``
    alone would scale S by 1.5 per block at init, 1.5¹⁷ ≈ 10³ across one stage of resnet110, which is why it is not
    the default.

    Args:
        channels: channels of F and S.
        offset: the constant c; must be ≥ 0 so the gate stays positive.
        bn_shortcut: normalise S before gating it.
    """

    identity_at_zero = zero_init_residual = True

    def __init__(
        self, channels: int, offset: float = 0.5, bn_shortcut: bool = False, device: Any = None, dtype: Any = None
    ):
        super().__init__()
        if not offset >= 0:
            raise AttnlabError(f"merge 'gate' needs offset >= 0, got {offset}")
        self.offset = float(offset)
        self.bn_shortcut = nn.BatchNorm2d(channels, device=device, dtype=dtype) if bn_shortcut else nn.Identity()

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        f, s, dtype = _upcast(residual, self.bn_shortcut(shortcut))
        return _downcast((torch.sigmoid(f) + self.offset) * s, dtype)

    def extra_repr(self) -> str:
        return f"offset={self.offset:.4g}"


class GateShortcutMerge(nn.Module):
    """y = (σ(BN(S)) + c) ⊙ F: the shortcut as a gate in (c, c + 1) on the residual branch; c = 0.5 by default.

    The best plain-bias product of the author's log ((σ(BN(S))+0.5)·BN(F), F's BN being the block's own).
    The gate averages ≈ 1 at init, so y has F's unit scale; F is renormalised every block, so depth does not compound
    it. There is no identity path (S reaches y only through the gate), so the gradient grows with depth as in a plain
    network (module docstring). Zeroing F would zero the block, so F's BN keeps its default init.

    ``residual_bias=1`` is the log's variant with F's BN bias fixed at 1, its best product. F's BN keeps weight 1
    then too: zeroing it (F ≡ 1, the block starting as σ(BN(S)) + c) trained worse (docs/MEASUREMENTS.md).

    Args:
        channels: channels of F and S.
        offset: the constant c; must be ≥ 0 so the gate stays positive.
        residual_bias: fix the bias of F's last BN (the block's) at this value; None: learned as usual.
    """

    identity_at_zero = zero_init_residual = False

    def __init__(
        self,
        channels: int,
        offset: float = 0.5,
        residual_bias: float | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__()
        if not offset >= 0:
            raise AttnlabError(f"merge 'gate_shortcut' needs offset >= 0, got {offset}")
        self.offset = float(offset)
        self.residual_bias = residual_bias
        self.bn_shortcut = nn.BatchNorm2d(channels, device=device, dtype=dtype)

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        f, s, dtype = _upcast(residual, self.bn_shortcut(shortcut))
        return _downcast((torch.sigmoid(s) + self.offset) * f, dtype)

    def extra_repr(self) -> str:
        return f"offset={self.offset:.4g}"


class MulResidualMerge(nn.Module):
    """y = (1 + F) ⊙ S = S + F ⊙ S: a multiplicative residual, the product's analogue of F + S (our addition).

    With F's last BN zeroed the block is exactly the identity at init, like ResNet's, and F receives the gradient S; the
    block then learns a per-unit relative change of S instead of an additive one. Unlike ``gate`` the factor is
    unbounded, so training can also switch units off (1 + F ≤ 0).

    Args:
        channels: channels of F and S (unused; kept so every merge takes ``channels`` first).
    """

    identity_at_zero = zero_init_residual = True

    def __init__(self, channels: int, device: Any = None, dtype: Any = None):
        super().__init__()

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        f, s, dtype = _upcast(residual, shortcut)
        return _downcast((1.0 + f) * s, dtype)


MERGES: dict[str, type[nn.Module]] = {
    "add": AddMerge,
    "mul": MulMerge,
    "mul_bn": MulBNMerge,
    "gate": GateMerge,
    "gate_shortcut": GateShortcutMerge,
    "mul_residual": MulResidualMerge,
}
DEFAULT_FMM_MERGE = "gate_shortcut"
"""The merge of the ``fmm_`` models: chosen on validation accuracy by benchmarks/fmm_variants.py
(docs/MEASUREMENTS.md)."""


def create_merge(name: str, channels: int, device: Any = None, dtype: Any = None, **kwargs) -> nn.Module:
    """Build merge ``name`` on ``device`` in ``dtype``; its ``forward(residual, shortcut)`` gives the block's
    pre-activation output."""
    cls = lookup(MERGES, name, "merge")
    return cls(channels, **check_call(cls, kwargs, f"merge '{name}'"), device=device, dtype=dtype)


def list_merges() -> list[str]:
    """Registered merge names, sorted."""
    return sorted(MERGES)
