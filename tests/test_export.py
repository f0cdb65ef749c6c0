"""Deployment paths in eval mode: torch.export (batch size left dynamic), TorchScript saved and loaded, and ONNX through
torch's dynamo exporter run by onnxruntime; each must give the eager model's outputs.

Exporting costs per operator traced, so rather than one full network per prefix, each path runs on one network that
holds a block of every prefix: attnlab's resnet20 (its stem, input check and head) whose blocks are taken from the
prefixed resnet20s, one block each, in stages of 32, 16 and 8 px (`mixed`). The ImageNet style runs on timm's ResNet
with one block per stage: the factorized AW generator with SE, then CRAM down to a 1×1 map; and the bottleneck with
the FMM merge.
"""

from __future__ import annotations

import io

import pytest
import torch

from attnlab import create_model
from attnlab.models import VARIANTS

TOL = dict(rtol=1e-4, atol=1e-4)
SLOTS = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2), (3, 3)]
"""(stage, block) of resnet20 that the listed prefixes' blocks fill in order; stage 3 gets a fourth block for the
tenth prefix. Block 0 of stages 2 and 3 downsamples (a 1×1 convolution on the shortcut)."""


def mixed(prefixes: list[str]) -> torch.nn.Module:
    """resnet20 whose blocks come from the networks of ``prefixes`` (``""``: plain), one each in `SLOTS` order;
    stages are cut to the blocks filled (at least their first, so that every stage still changes the width)."""
    if len(prefixes) > len(SLOTS):
        raise ValueError(f"{len(prefixes)} prefixes for {len(SLOTS)} slots: add slots")
    model = create_model("resnet20", num_classes=5)
    filled: dict[int, int] = {}
    for prefix, (stage, index) in zip(prefixes, SLOTS, strict=False):
        donor = create_model(f"{prefix}_resnet20" if prefix else "resnet20", num_classes=5)
        blocks = getattr(model, f"layer{stage}")
        block = getattr(donor, f"layer{stage}")[min(index, len(blocks) - 1)]
        if index < len(blocks):
            blocks[index] = block
        else:
            blocks.append(block)
        filled[stage] = index + 1
    for stage in range(1, 4):
        blocks = getattr(model, f"layer{stage}")
        del blocks[max(1, filled.get(stage, 0)) :]
    return model


def trimmed(name: str, swap: dict[int, str] | None = None) -> torch.nn.Module:
    """ImageNet-style ``name`` with one block per stage; ``swap`` takes stage s's block from network ``swap[s]``."""
    model = create_model(name, num_classes=5)
    for stage in range(1, 5):
        blocks = getattr(model, f"layer{stage}")
        del blocks[1:]
        if swap and stage in swap:
            blocks[0] = getattr(create_model(swap[stage], num_classes=5), f"layer{stage}")[0]
    return model


EVERY = list(VARIANTS)  # "" (plain) and every prefix: ten blocks
NETWORKS = {
    "every_prefix_resnet20": lambda: mixed(EVERY),
    # timm's ResNet: the factorized AW generator (its tap-wise form at these sizes) with SE, CRAM down to a 1×1 map
    "cram_resnet18+aw_se": lambda: trimmed("cram_resnet18", swap={1: "aw_se_resnet18"}),
    "fmm_resnet50": lambda: trimmed("fmm_resnet50"),  # the bottleneck, with the FMM merge
}


def _trained_looking(build) -> torch.nn.Module:
    """``build()`` in eval mode with every parameter moved off its init and BN statistics from a batch: at init the
    last BN of each branch is zero and AW's generator outputs a constant, so outputs would not depend on the
    attention."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


def _inputs(*batch_sizes: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, size, size, generator=g) for b in batch_sizes]


def test_the_mixed_network_holds_one_block_of_every_prefix(scripted):
    model, _ = scripted
    blocks = [b for s in (1, 2, 3) for b in getattr(model, f"layer{s}")]
    kinds = {(type(b.se).__name__, type(b.conv2).__name__, type(b.merge).__name__) for b in blocks}
    assert len(blocks) == len(kinds) == len(EVERY)  # ten different blocks: no prefix dropped or repeated


@pytest.mark.parametrize("network", list(NETWORKS))
def test_torch_export_with_a_dynamic_batch_gives_the_eager_outputs(network):
    model = _trained_looking(NETWORKS[network])
    example, *others = _inputs(2, 1, 3)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    exported = program.module()
    with torch.no_grad():
        for x in (example, *others):
            torch.testing.assert_close(exported(x), model(x), **TOL)


ONNX = {
    # every prefix without AW (CRAM, spatial, the FMM merge, timm's SE, ECA and CBAM), the batch left dynamic
    "dynamic": [v for v in EVERY if not VARIANTS[v].aw],
    # AW folds the batch into the groups of one convolution, and ONNX's Conv takes its group count as a constant:
    # AW exports for the batch size of the example (torch.export above keeps it dynamic)
    "static": ["aw"],
}


@pytest.mark.slow
@pytest.mark.parametrize("batch", list(ONNX))
def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(batch, tmp_path):
    pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript (dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported graph (dev extra)")
    model = _trained_looking(lambda: mixed(ONNX[batch]))
    example, other = _inputs(2, 3)
    static = batch == "static"
    shapes = None if static else {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False)
    program.save(tmp_path / "model.onnx")
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        for x in (example,) if static else (example, other):
            (out,) = session.run(None, {input_name: x.numpy()})
            torch.testing.assert_close(torch.from_numpy(out), model(x), **TOL)


@pytest.fixture(scope="module")
def scripted():
    """The every-prefix network and its TorchScript, saved and loaded."""
    model = _trained_looking(NETWORKS["every_prefix_resnet20"])
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return model, torch.jit.load(buffer)


def test_torchscript_saved_and_loaded_gives_the_eager_outputs(scripted):
    model, loaded = scripted
    with torch.no_grad():
        for x in _inputs(2, 1):
            torch.testing.assert_close(loaded(x), model(x), **TOL)


def test_torchscript_of_timms_resnet_with_factorized_aw_gives_the_eager_outputs():
    model = _trained_looking(NETWORKS["cram_resnet18+aw_se"])
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        for x in _inputs(2, 1):
            torch.testing.assert_close(loaded(x), model(x), **TOL)


def test_scripted_model_still_refuses_bad_input(scripted):
    _, loaded = scripted
    with pytest.raises(torch.jit.Error, match="expects 3 input channels, got 1"):
        loaded(torch.randn(1, 1, 32, 32))
    with pytest.raises(torch.jit.Error, match="too small"):
        loaded(torch.randn(1, 3, 4, 32))
