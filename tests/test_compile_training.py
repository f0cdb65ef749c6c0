"""``--compile`` in the product: compiled training computes what eager training computes (within float tolerance),
keeps the module's state_dict keys, resumes bit-identically after a kill, records itself, and falls back to eager
with one warning line where inductor cannot compile (here: no C++ compiler)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_data import make_garments
from tiny_runs import cli_train, kill_when, metrics, resume_here, same_weights, tiny

from attnlab.analysis import run_analysis
from attnlab.cli import main
from attnlab.data import batches, load_dataset
from attnlab.errors import AttnlabError
from attnlab.layers import create_attn
from attnlab.layers.cram import CRAM, capture_rectangles
from attnlab.models import create_model
from attnlab.models.resnet import BasicBlock, CifarResNet
from attnlab.train import train
from attnlab.train.compiling import compile_module, is_compiled, run_or_fall_back

pytestmark = pytest.mark.slow  # every test here compiles a ResNet (tens of seconds on 2 busy cores)


COMPILED = ["--compile", "--precision", "fp32", "--eval-batch-size", "64"]
"""`cli_train` compiled; validation (64 images) and test (128) in batches of 64, so that evaluation compiles one graph
(a second batch size would compile a dynamic graph beside it, with its own kernels)."""


def _quiet(_line: str) -> None:
    pass


def test_compiled_training_matches_eager_keeps_the_keys_and_resumes_bit_identically_after_a_kill(tmp_path, capfd):
    """One compiled reference run serves both checks: against a compiled run killed after epoch 1 and resumed, bit for
    bit, and against eager training within float tolerance. The exact check comes first, so that a tolerance failure
    cannot hide it. The reference and the resume run in this process (a fresh one costs seconds of imports and its own
    tracing); only the run that is killed needs its own, and it finds the reference's kernels in inductor's cache."""
    reference, eager, compiled = tmp_path / "reference", tmp_path / "eager", COMPILED
    assert main([*cli_train(reference, epochs=2)[3:], *compiled, "--no-progress"]) == 0
    out = tmp_path / "killed"
    kill_when([*cli_train(out, epochs=2), *compiled], out / "checkpoints" / "epoch-0001.json", timeout=900)
    assert not (out / "summary.json").exists()
    capfd.readouterr()
    assert resume_here(out) == 0
    resumed = capfd.readouterr()
    assert "resuming" in resumed.out and "warning" not in resumed.err  # no fall-back to eager
    assert yaml.safe_load((out / "config.yaml").read_text())["compile"] is True  # --resume keeps the saved setting
    assert json.loads((out / "summary.json").read_text())["compile"] is True  # the resumed run ran compiled
    assert same_weights(reference / "model.safetensors", out / "model.safetensors")
    assert [m["val_loss"] for m in metrics(out)] == [m["val_loss"] for m in metrics(reference)]

    want = train(tiny(eager, epochs=2, precision="fp32"), log=_quiet)
    got = json.loads((reference / "summary.json").read_text())
    for a, b in zip(metrics(eager), metrics(reference), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
        assert abs(b["val_acc"] - a["val_acc"]) <= 1 / 64 + 1e-9  # at most one of 64 images on the other side
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
    assert abs(got["test_acc"] - want["test_acc"]) <= 1 / 128 + 1e-9
    w_eager, w_compiled = load_file(str(eager / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert w_compiled.keys() == w_eager.keys()  # the module was compiled in place: no "_orig_mod." prefix
    for key in w_eager:
        torch.testing.assert_close(w_compiled[key], w_eager[key], rtol=1e-3, atol=1e-4, msg=key)
    assert (got["compile"], want["compile"], got["precision"]) == (True, False, "fp32")
    assert yaml.safe_load((reference / "config.yaml").read_text())["compile"] is True


@pytest.fixture
def no_cxx_compiler():
    """inductor's CPU backend with a C++ compiler that does not exist, and no cached kernels to hide it. Patched with
    inductor's own ``config.patch``: pytest's monkeypatch undoes a config attribute by deleting it, which leaves
    inductor unusable for every later test of the process."""
    import torch._inductor.config as inductor

    torch._dynamo.reset()
    with inductor.patch({"cpp.cxx": ("/nonexistent/attnlab-test-c++",), "force_disable_caches": True}):
        yield
    torch._dynamo.reset()


def test_a_model_that_cannot_compile_trains_eagerly_after_one_warning(tmp_path, no_cxx_compiler, capfd):
    want = train(tiny(tmp_path / "eager", epochs=1), log=_quiet)
    got = train(tiny(tmp_path / "fallback", epochs=1, compile=True), log=_quiet)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("attnlab: warning: --compile: resnet20 could not be compiled")
    assert "running it eagerly" in warnings[0]
    assert got["compile"] is False  # what actually ran
    assert (got["test_loss"], got["val_acc"]) == (want["test_loss"], want["val_acc"])  # eager: bit-identical
    assert same_weights(tmp_path / "eager" / "model.safetensors", tmp_path / "fallback" / "model.safetensors")


def test_an_analysis_that_cannot_compile_runs_eagerly_and_says_so(tmp_path, no_cxx_compiler, capfd):
    train(tiny(tmp_path / "run", epochs=1), log=_quiet)
    report = run_analysis("smoothness", [tmp_path / "run"], tmp_path / "out", images=8, compile=True)
    assert report["compile"] == {"run": False}  # what actually ran, not what was asked
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning: --compile" in line.lower()]
    assert len(warnings) == 1 and "smoothness of run could not be compiled" in warnings[0]


def test_a_failure_of_the_model_itself_is_raised_not_hidden_by_the_fallback(capfd):
    model = compile_module(create_model("resnet20", num_classes=4, in_chans=1))
    with pytest.raises(AttnlabError, match="model expects 1 input channels, got 3"):
        run_or_fall_back(model, "resnet20", lambda: model(torch.zeros(2, 3, 12, 12)))  # 3 channels into a 1-channel net
    assert not is_compiled(model) and "warning" not in capfd.readouterr().err


def test_many_differently_built_models_of_one_class_all_compile():
    """dynamo's recompile limit counts graphs per code object over every instance of a class: past torch's default
    of 8, a comparison's later models would silently run eagerly."""
    from torch import nn
    from torch._dynamo.utils import counters

    from attnlab.train.compiling import compile_module

    class Stack(nn.Module):
        def __init__(self, depth: int):
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(4, 4) for _ in range(depth)])

        def forward(self, x):
            return torch.relu(self.layers(x))

    before = counters["stats"]["unique_graphs"]
    for depth in range(1, 12):
        compile_module(Stack(depth), backend="eager")(torch.randn(2, 4))
    assert counters["stats"]["unique_graphs"] - before == 11


def test_a_compiled_call_that_fails_mid_epoch_falls_back_and_the_run_finishes(tmp_path, monkeypatch, capfd):
    """The probe before epoch 1 compiles a full batch; a training split smaller than one batch makes dynamo recompile
    for its size, and that may fail (an op inductor refuses with symbolic sizes): the step reruns eagerly and the run
    goes on. (A larger split drops its ragged last batch, so training sees one shape.)"""
    import attnlab.train.classify as engine

    def compiled_but_failing_on_other_batches(model, **_):
        compile_module(model, backend="eager")
        graph = model._compiled_call_impl

        def call(x, *args, **kwargs):
            if len(x) != 4096:
                raise RuntimeError("inductor refused the recompiled graph")
            return graph(x, *args, **kwargs)

        model._compiled_call_impl = call
        return model

    monkeypatch.setattr(engine, "compile_module", compiled_but_failing_on_other_batches)
    got = train(tiny(tmp_path / "run", epochs=1, batch_size=4096, compile=True), log=_quiet)  # one short batch
    warnings = [line for line in capfd.readouterr().err.splitlines() if "warning: --compile" in line.lower()]
    assert len(warnings) == 1 and "resnet20 could not be compiled (RuntimeError: inductor refused" in warnings[0]
    assert got["compile"] is False and got["epochs"] == 1


def test_compiled_spatial_attention_keeps_bf16_gradients_finite(tmp_path):
    """Regression: with the channel max of `channel_pool` taken in bf16, the backward of a compiled spatial_resnet20
    under bf16 autocast went non-finite at the second step on cluttered canvases (eager stayed finite), which failed
    every spatial run of the ``cram`` preset in its first epoch. It still does at the smallest settings here: one block
    per stage, the smallest canvas that holds a scaled garment, batches of 16, two steps."""
    make_garments(tmp_path, n_train=200, n_test=20)
    bundle = load_dataset("cluttered-fashion-mnist", tmp_path, canvas=48, val_size=10)
    torch.manual_seed(0)
    spatial = {"attn_layer": functools.partial(create_attn, "spatial")}  # one block per stage: a third of the compile
    model = CifarResNet(BasicBlock, [1, 1, 1], num_classes=10, in_chans=1, block_args=spatial).train()
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step, (x, y) in zip(range(2), batches(bundle.train, bundle, 16, train=True), strict=False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None), f"step {step}"
        optimizer.step()


def test_hooks_added_after_the_first_compiled_call_are_called():
    """CRAM's equivariance term reads the training forward's rectangles through hooks added after the engine's compile
    probe has made the first call; by default dynamo does not guard on module hooks and skipped them ("no CRAM
    rectangles for x" failed every such run of the ``cram`` preset). `compile_module` makes it guard on them."""
    from torch import nn

    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), CRAM(8), nn.ReLU(), CRAM(8))  # two CRAMs: cheap to trace
    model = compile_module(net.train(), backend="eager")
    x = torch.randn(2, 1, 12, 12)
    model(x)  # traced without hooks, as the compile probe is
    with capture_rectangles(model) as seen:
        model(x)
    assert len(seen) == sum(isinstance(m, CRAM) for m in model.modules()) > 0


def test_compiling_changes_no_process_wide_dynamo_setting():
    """`compile_module` scopes its dynamo settings to the compiled model's own calls."""
    from attnlab._compat import dynamo_config

    config = dynamo_config()
    before = (config.recompile_limit, config.skip_nnmodule_hook_guards)
    seen = []
    model = compile_module(torch.nn.Linear(2, 2), backend="eager")
    model.register_forward_hook(lambda *_: seen.append((config.recompile_limit, config.skip_nnmodule_hook_guards)))
    model(torch.randn(1, 2))
    assert (config.recompile_limit, config.skip_nnmodule_hook_guards) == before
    assert seen and seen[0][0] >= 64 and seen[0][1] is False
