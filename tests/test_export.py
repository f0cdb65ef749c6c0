"""Deployment paths in eval mode: torch.export (batch size left dynamic) and TorchScript saved and loaded for every
prefix, ONNX through torch's dynamo exporter run by onnxruntime for every mechanism of attnlab's own; each must give
the eager model's outputs."""

from __future__ import annotations

import io

import pytest
import torch

from attnlab import create_model
from attnlab.models import VARIANTS

CIFAR = ["resnet20", *(f"{v}_resnet20" for v in VARIANTS if v)]
IMAGENET = ["aw_se_resnet18", "cram_resnet18", "fmm_resnet50"]
TOL = dict(rtol=1e-4, atol=1e-4)


def _trained_looking(name: str, **kwargs) -> torch.nn.Module:
    """``name`` in eval mode with every parameter moved off its init and BN statistics from a batch: at init the last
    BN of each branch is zero and AW's generator outputs a constant, so outputs would not depend on the attention."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


def _inputs(*batch_sizes: int, size: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 3, size, size, generator=g) for b in batch_sizes]


@pytest.mark.parametrize("name", CIFAR + [pytest.param(n, marks=pytest.mark.slow) for n in IMAGENET])
def test_torch_export_with_a_dynamic_batch_gives_the_eager_outputs(name):
    model = _trained_looking(name)
    example, *others = _inputs(2, 1, 3)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    exported = program.module()
    with torch.no_grad():
        for x in (example, *others):
            torch.testing.assert_close(exported(x), model(x), **TOL)


ONNX = ["spatial_resnet20", "cram_resnet20", "aw_resnet20", "fmm_resnet20", "cbam_resnet20"]
"""attnlab's own operators (spatial, CRAM, AW, the FMM merge) and timm's CBAM, whose channel and spatial gates use
every operator of SE and ECA but ECA's 1-D convolution: the ONNX exporter's cost is tens of seconds a network."""


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX)
def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(name, tmp_path):
    pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript (dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime runs the exported graph (dev extra)")
    model = _trained_looking(name)
    example, other = _inputs(2, 3)
    # AW folds the batch into the groups of one convolution, and ONNX's Conv takes its group count as a constant:
    # AW models export for the batch size of the example (torch.export above keeps it dynamic)
    static = name.startswith("aw_")
    batch = None if static else {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=batch, verbose=False)
    program.save(tmp_path / "model.onnx")
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    with torch.no_grad():
        for x in (example,) if static else (example, other):
            (out,) = session.run(None, {input_name: x.numpy()})
            torch.testing.assert_close(torch.from_numpy(out), model(x), **TOL)


@pytest.mark.parametrize("name", CIFAR + ["aw_se_resnet18"])
def test_torchscript_saved_and_loaded_gives_the_eager_outputs(name):
    model = _trained_looking(name)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        for x in _inputs(2, 1):
            torch.testing.assert_close(loaded(x), model(x), **TOL)


def test_scripted_model_still_refuses_bad_input():
    scripted = torch.jit.script(create_model("cram_resnet20").eval())
    with pytest.raises(torch.jit.Error, match="expects 3 input channels, got 1"):
        scripted(torch.randn(1, 1, 32, 32))
    with pytest.raises(torch.jit.Error, match="too small"):
        scripted(torch.randn(1, 3, 4, 32))
