"""Residual merges (attnlab.layers.merge): formulas against hand-written references, the zero-init contract, half
precision, and what each merge does to a deep network at initialisation and in one training step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnlab.errors import AttnlabError
from attnlab.layers import merge as merge_mod
from attnlab.layers.merge import DEFAULT_FMM_MERGE, create_merge, list_merges
from attnlab.models import create_model
from attnlab.models.resnet import BasicBlock

MERGES = list_merges()
PRODUCTS = [m for m in MERGES if m != "add"]
EPS = 1e-5  # BatchNorm2d's default


def bn_ref(x: torch.Tensor) -> torch.Tensor:
    """Training-mode BN with weight 1, bias 0, written out: per-channel batch mean and biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


REFERENCES = {
    "add": lambda f, s: f + s,
    "mul": lambda f, s: f * s,
    "mul_bn": lambda f, s: f * bn_ref(s),
    "gate": lambda f, s: (torch.sigmoid(f) + 0.5) * s,
    "gate_shortcut": lambda f, s: (torch.sigmoid(bn_ref(s)) + 0.5) * f,
    "mul_residual": lambda f, s: (1.0 + f) * s,
}


def pair(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(*shape, generator=g)
    s = torch.randn(*shape, generator=g).relu()  # a shortcut inside a stage comes after a ReLU
    return f.to(dtype), s.to(dtype)


def test_registry_lists_add_and_at_least_four_products():
    assert set(REFERENCES) == set(MERGES)
    assert len(PRODUCTS) >= 4
    assert DEFAULT_FMM_MERGE in PRODUCTS


@pytest.mark.parametrize("name", MERGES)
def test_forward_equals_documented_formula(name):
    f, s = pair(4, 6, 5, 3)
    out = create_merge(name, 6).train()(f, s)
    assert out.shape == f.shape
    torch.testing.assert_close(out, REFERENCES[name](f, s), rtol=1e-5, atol=1e-5)


def test_options_change_the_formula_as_documented():
    f, s = pair(3, 4, 5, 5)
    torch.testing.assert_close(create_merge("mul", 4, gain=2.0)(f, s), 2.0 * f * s)
    torch.testing.assert_close(
        create_merge("gate", 4, offset=1.0, bn_shortcut=True)(f, s),
        (torch.sigmoid(f) + 1.0) * bn_ref(s),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(
        create_merge("gate_shortcut", 4, offset=0.0)(f, s), torch.sigmoid(bn_ref(s)) * f, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        create_merge("mul_bn", 4, bn_residual=True)(f, s), bn_ref(f) * bn_ref(s), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", MERGES)
def test_identity_flag_matches_what_a_zeroed_residual_gives(name):
    """``identity_at_zero`` says whether F = 0 turns the merge into the identity; otherwise F = 0 kills S. Without
    options, zeroing F's last BN is right exactly then."""
    merge = create_merge(name, 6).train()
    _, s = pair(4, 6, 5, 3)
    out = merge(torch.zeros_like(s), s)
    if merge.identity_at_zero:
        torch.testing.assert_close(out, s)
    else:
        assert out.abs().max() == 0
    assert merge.zero_init_residual == merge.identity_at_zero


def test_mul_bn_with_a_fixed_residual_bias_starts_as_a_normalised_identity():
    """F's BN bias fixed at 1: its weight is zeroed (F ≡ 1), so each block starts as ReLU(BN(S) + 1) and the untrained
    net is finite in eval mode too (with weight 1 the products overflow to NaN there); ``zero_init_last=False`` keeps
    weight 1, and a second BN on F (which would renormalise F ≡ 1 to 0) keeps it too."""
    biased = {"merge": "mul_bn", "merge_args": {"residual_bias": 1, "shortcut_bias": 1}}
    torch.manual_seed(0)
    model = create_model("fmm_resnet20", in_chans=1, **biased)
    block = model.layer2[1]
    assert block.bn2.weight.abs().max() == 0
    x = torch.randn(8, 1, 28, 28)
    s = torch.relu(torch.randn(8, 32, 14, 14))
    torch.testing.assert_close(block.train()(s), torch.relu(block.merge.bn_shortcut(s)))  # F ≡ 1
    assert model.eval()(x).isfinite().all()
    untouched = create_model("fmm_resnet20", in_chans=1, zero_init_last=False, **biased)
    assert (untouched.layer2[1].bn2.weight == 1).all()
    second_bn = {"merge": "mul_bn", "merge_args": {"residual_bias": 1, "bn_residual": True}}
    assert (create_model("fmm_resnet20", in_chans=1, **second_bn).layer2[1].bn2.weight == 1).all()


@pytest.mark.parametrize("name", MERGES)
def test_stochastic_depth_only_where_a_dropped_residual_leaves_the_identity(name):
    merge_args = {"residual_bias": 1} if name == "mul_bn" else {}  # zeroed at init, yet F = 0 still kills the block
    if create_merge(name, 1).identity_at_zero:
        model = create_model("resnet20", merge=name, merge_args=merge_args, drop_path_rate=0.1)
        assert model.layer3[-1].drop_path is not None
    else:
        with pytest.raises(AttnlabError, match=f"drop_path_rate > 0 does not suit merge '{name}'"):
            create_model("resnet20", merge=name, merge_args=merge_args, drop_path_rate=0.1)


@pytest.mark.parametrize("name", MERGES)
def test_inputs_and_every_parameter_get_a_gradient(name):
    merge = create_merge(name, 5, bn_residual=True) if name == "mul_bn" else create_merge(name, 5)
    f, s = pair(3, 5, 4, 4, seed=1)
    f.requires_grad_(True), s.requires_grad_(True)
    weights = torch.randn(f.shape, generator=torch.Generator().manual_seed(2))
    (merge(f, s) * weights).sum().backward()
    for t in (f, s, *merge.parameters()):
        assert t.grad is not None and t.grad.isfinite().all() and t.grad.abs().sum() > 0
    assert len(list(merge.parameters())) == {"mul_bn": 4, "gate_shortcut": 2}.get(name, 0)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(MERGES),
    channels=st.integers(1, 8),
    batch=st.integers(1, 3),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_dtype_gives_a_finite_output_of_that_shape_and_dtype(
    name, channels, batch, height, width, dtype, scale, seed
):
    merge = create_merge(name, channels).to(dtype)
    merge.train(batch * height * width > 1)  # training-mode BN needs two values per channel
    f, s = pair(batch, channels, height, width, seed=seed)
    f, s = (scale * f).to(dtype), (scale * s).to(dtype)
    out = merge(f, s)
    assert out.shape == f.shape and out.dtype == dtype
    assert out.isfinite().all()
    if name in ("mul", "gate", "mul_residual"):  # no BN: half precision is the fp32 formula, rounded once
        expected = merge.float()(f.float(), s.float()).to(dtype)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", PRODUCTS)
def test_fp16_product_beyond_the_range_saturates_instead_of_overflowing(name):
    f, s = torch.full((2, 3, 2, 2), 300.0), torch.full((2, 3, 2, 2), 300.0)
    if name == "gate":  # the gate is below 1.5: S must be near the limit
        s = torch.full((2, 3, 2, 2), 6e4)
    if name in ("mul_bn", "gate_shortcut"):  # BN rescales S: F carries the size
        f, s = torch.full((2, 3, 2, 2), 6e4), pair(2, 3, 2, 2)[1] + 1.0
    assert not REFERENCES[name](f.half(), s.half()).isfinite().all()  # the naive fp16 formula overflows
    out = create_merge(name, 3).half()(f.half(), s.half())
    assert out.isfinite().all() and out.abs().max() == torch.finfo(torch.float16).max


def test_unknown_name_and_bad_options_raise_one_line_errors():
    with pytest.raises(AttnlabError, match="unknown merge 'mul_bm'; did you mean .*mul_bn"):
        create_merge("mul_bm", 8)
    with pytest.raises(AttnlabError, match="merge 'add': unknown option 'offset'; known: none"):
        create_merge("add", 8, offset=1.0)
    with pytest.raises(AttnlabError, match="offset >= 0"):
        create_merge("gate", 8, offset=-1.0)
    with pytest.raises(AttnlabError, match="gain > 0"):
        create_merge("mul", 8, gain=0.0)


# --- in a network -------------------------------------------------------------------------------------------------


def block_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    outputs = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: outputs.append(o.detach().float()))
        for m in model.modules()
        if isinstance(m, BasicBlock)
    ]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, outputs


@pytest.mark.parametrize("name", MERGES)
def test_resnet110_at_init_keeps_every_block_alive_and_at_sane_scale(name):
    """Measured at seed 0 (std range over the 54 block outputs / lowest fraction of non-zero units):
    add 0.58–0.60 / 0.50, gate 0.58–0.59 / 0.50, mul_residual 0.58–0.60 / 0.49, gate_shortcut 0.59–0.86 / 0.41,
    mul_bn 0.68–16 / 0.26. ``mul`` is the exception the module docstring predicts: the live fraction halves each block
    (0.25, 0.13, 0.06, ...) and the network is all zeros from block 9 on."""
    torch.manual_seed(0)
    model = create_model("fmm_resnet110", merge=name).train()
    _, outs = block_outputs(model, torch.randn(8, 3, 32, 32))
    assert len(outs) == 54 and all(o.isfinite().all() for o in outs)
    stds = torch.stack([o.std() for o in outs])
    live = torch.stack([(o != 0).float().mean() for o in outs])
    if name == "mul":
        assert 0.1 < live[0] < 0.4 and live[5] < 0.05  # ≈ 2^-(k+1) after block k
        assert outs[-1].abs().max() == 0
        return
    assert stds.min() > 1e-2 and stds.max() < 1e2, (stds.min().item(), stds.max().item())
    assert live.min() > 0.2, live.min().item()


@pytest.mark.parametrize("name", MERGES)
def test_resnet110_in_bf16_gives_finite_logits(name):
    torch.manual_seed(0)
    model = create_model("fmm_resnet110", merge=name).to(torch.bfloat16).train()
    assert model(torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)).isfinite().all()


def batch_loss(model: nn.Module) -> torch.Tensor:
    """Cross-entropy of ``model`` on a fixed synthetic batch of 16 random 32×32 images."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    return nn.functional.cross_entropy(model(x), y)


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_loss`` after backward: (loss, total gradient norm, stem gradient norm)."""
    loss = batch_loss(model)
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    return loss.detach(), norm, model.conv1.weight.grad.norm()


IDENTITY_AT_INIT = [m for m in MERGES if create_merge(m, 1).zero_init_residual]  # add, gate, mul_residual
NO_IDENTITY_PATH = ["mul_bn", "gate_shortcut"]


@pytest.mark.parametrize("name", MERGES)
def test_gradient_norm_with_depth(name):
    """Measured total gradient norm, resnet20 → resnet110: add 0.85 → 0.86, gate 0.84 → 0.80, mul_residual
    0.85 → 0.84, gate_shortcut 5.3 → 7e6, mul_bn 1e2 → 3e15 (no identity path: a plain BN net's explosion); mul's
    resnet110 is dead (zero gradient below the classifier)."""
    norms = {}
    for depth in ("resnet20", "resnet110"):
        torch.manual_seed(0)
        _, norms[depth], stem = loss_and_grads(create_model(depth, merge=name).train())
    if name in IDENTITY_AT_INIT:
        assert 0.1 < norms["resnet20"] < 10 and 0.1 < norms["resnet110"] < 10, norms
    elif name in NO_IDENTITY_PATH:
        assert norms["resnet110"] > 1e3 * norms["resnet20"], norms
    else:
        assert name == "mul" and stem == 0


@pytest.mark.parametrize("name", MERGES)
def test_resnet110_one_sgd_step_moves_the_loss(name):
    """One SGD step (lr 0.1, gradient clipped to norm 1, a no-op where the norm is below 1) on the batch it saw."""
    torch.manual_seed(0)
    model = create_model("resnet110", merge=name).train()
    loss, _, _ = loss_and_grads(model)
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        after = batch_loss(model)
    assert after.isfinite() and after != loss
    if name != "gate_shortcut":  # measured: its exploded gradient's direction raises the loss (2.407 → 2.415)
        assert after < loss


def test_fmm_resnet20_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_model("fmm_resnet20").train()
    assert all(
        b.merge.__class__ is merge_mod.MERGES[DEFAULT_FMM_MERGE] for b in model.modules() if isinstance(b, BasicBlock)
    )
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    zeroed = merge_mod.MERGES[DEFAULT_FMM_MERGE].zero_init_residual
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), pname
        # a zeroed last BN blocks the gradient to the convs before it at step 0, as in ResNet
        in_branch = "layer" in pname and any(k in pname for k in ("conv1.weight", "bn1.", "conv2.weight"))
        before_zeroed_bn = zeroed and in_branch
        if not before_zeroed_bn:
            assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", PRODUCTS)
def test_resnet20_without_zero_init_every_parameter_gets_a_nonzero_gradient(name):
    torch.manual_seed(0)
    model = create_model("resnet20", merge=name, zero_init_last=False).train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3])).backward()
    for pname, p in model.named_parameters():
        assert p.grad.isfinite().all() and p.grad.abs().sum() > 0, pname


def test_fixed_bias_bn_is_bn_with_a_constant_shift_that_no_optimiser_moves():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    plain, fixed = nn.BatchNorm2d(4), merge_mod.FixedBiasBatchNorm2d(4, bias=1.0)
    torch.testing.assert_close(fixed(x), plain(x) + 1.0)
    assert "bias" not in dict(fixed.named_parameters()) and "bias" in fixed.state_dict()
    fixed.requires_grad_(True)
    opt = torch.optim.SGD(fixed.parameters(), lr=1.0, weight_decay=0.1)
    fixed(x).pow(2).mean().backward()
    opt.step()
    assert torch.equal(fixed.bias, torch.ones(4))


@pytest.mark.parametrize(
    "merge, merge_args, fixed",
    [
        ("mul_bn", {"residual_bias": 1, "shortcut_bias": 1}, {"bn2", "merge.bn_shortcut"}),
        ("gate_shortcut", {"residual_bias": 1}, {"bn2"}),
        ("mul_bn", {}, set()),
    ],
)
def test_fixed_biases_reach_the_blocks_last_bn_and_the_merges_bn(merge, merge_args, fixed):
    model = create_model("fmm_resnet20", in_chans=1, merge=merge, merge_args=merge_args)
    block = model.layer2[1]
    found = {n for n, m in block.named_modules() if isinstance(m, merge_mod.FixedBiasBatchNorm2d)}
    assert found == fixed
    for name in found:
        assert torch.equal(block.get_submodule(name).bias, torch.ones_like(block.get_submodule(name).bias))
    x = torch.randn(4, 1, 12, 12)
    model(x).sum().backward()  # every learned parameter still gets a gradient
    assert all(p.grad is not None for p in model.parameters())


def test_post_act_false_returns_the_merge_itself():
    torch.manual_seed(0)
    with_act = create_model("resnet20", in_chans=1, zero_init_last=False)
    without = create_model("resnet20", in_chans=1, zero_init_last=False, post_act=False)
    without.load_state_dict(with_act.state_dict())
    block_in = torch.randn(2, 16, 8, 8)
    a, b = with_act.layer1[0].eval()(block_in), without.layer1[0].eval()(block_in)
    torch.testing.assert_close(a, b.relu())
    assert (b < 0).any()
    with pytest.raises(AttnlabError, match="post_act must be true or false"):
        create_model("resnet20", post_act="no")
