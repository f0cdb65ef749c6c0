"""``precision`` (which replaced ``amp``): the default follows the hardware, and the old name keeps working — an old
run whose config.yaml says ``amp: bf16`` resumes, and counts as finished with the same settings for a comparison."""

from __future__ import annotations

import pytest
import yaml
from tiny_runs import SYNTH, metrics, tiny

from attnlab.cli import build_parser, main
from attnlab.errors import AttnlabError
from attnlab.experiment import make_plan, run_compare
from attnlab.train import TrainConfig, train
from attnlab.train import config as config_module
from attnlab.train.config import first_difference, native_bf16, upgrade_settings


def _quiet(_line: str) -> None:
    pass


def _as_old_config(run) -> None:
    """Rewrite a run's config.yaml as attnlab wrote it before ``precision`` and ``compile`` existed."""
    path = run / "config.yaml"
    values = yaml.safe_load(path.read_text())
    old = {}
    for key, value in values.items():
        if key == "precision":
            old["amp"] = "off" if value == "fp32" else value
        elif key != "compile":
            old[key] = value
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert "amp" in yaml.safe_load(path.read_text())


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    assert TrainConfig().precision == ("bf16" if native_bf16("cpu") else "fp32")
    monkeypatch.setattr(config_module, "native_bf16", lambda device: False)
    assert TrainConfig().precision == "fp32" and TrainConfig(precision="bf16").precision == "bf16"
    monkeypatch.setattr(config_module, "native_bf16", lambda device: True)
    assert TrainConfig().precision == "bf16"


def test_old_amp_values_mean_what_they_meant():
    assert upgrade_settings({"amp": "off"}) == {"precision": "fp32"}
    assert upgrade_settings({"amp": "bf16", "device": "cpu"}) == {"precision": "bf16", "device": "cpu"}
    assert upgrade_settings({"amp": "auto"}) == {"precision": "bf16"}  # on CPU --amp auto was bf16
    assert TrainConfig.from_dict({"amp": "fp16", "device": "cuda"}).precision == "fp16"
    with pytest.raises(AttnlabError, match="amp: bf16 and precision: fp32 disagree"):
        upgrade_settings({"amp": "bf16", "precision": "fp32"})
    assert first_difference({"amp": "bf16", "lr": 0.1}, {"precision": "bf16", "lr": 0.1}, frozenset()) is None
    assert first_difference({"amp": "off"}, {"precision": "bf16"}, frozenset()) == ("precision", "fp32", "bf16")


def test_amp_flag_is_the_old_name_of_precision():
    parse = build_parser().parse_args
    assert parse(["train", "--amp"]).precision == "auto"
    assert parse(["train", "--amp", "off"]).precision == "fp32"
    assert parse(["train", "--amp", "bf16"]).precision == "bf16"
    assert parse(["train", "--precision", "fp32"]).precision == "fp32"
    assert parse(["train"]).precision is None  # not given: the config file's or the default


def test_an_old_run_with_amp_in_its_config_resumes(tmp_path):
    out = tmp_path / "old"
    train(tiny(out, epochs=1, precision="bf16"), log=_quiet)
    (out / "summary.json").unlink()  # an unfinished run, as a killed claim experiment leaves it
    _as_old_config(out)
    code = main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"])
    assert code == 0 and [m["epoch"] for m in metrics(out)] == [1, 2]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["precision"] == "bf16" and "amp" not in saved  # rewritten under the new name, same meaning


def test_an_old_finished_run_with_amp_counts_as_the_same_settings_for_compare_resume(tmp_path):
    recipe = {"epochs": 1, "batch_size": 64, "val_size": 64, "lr": 0.05}

    def plan(**settings):
        return make_plan(
            models="resnet20", datasets=["synthetic"], seeds=1, recipe={**recipe, **settings}, dataset_options=SYNTH
        )

    out = tmp_path / "compare"
    assert len(run_compare(plan(precision="bf16"), out, log=_quiet).trained) == 1
    (run,) = out.glob("runs/*/*/seed0")
    _as_old_config(run)
    for settings in ({"precision": "bf16"}, {"amp": "bf16"}, {"precision": "bf16", "compile": True}):
        outcome = run_compare(plan(**settings), out, resume=True, log=_quiet)
        assert outcome.trained == [] and len(outcome.skipped) == 1, settings
    with pytest.raises(AttnlabError, match="finished with precision='bf16' but this comparison asks for 'fp32'"):
        run_compare(plan(precision="fp32"), out, resume=True, log=_quiet)


def test_bench_rows_say_which_precision_ran(monkeypatch):
    from attnlab.train.cost import benchmark_models

    def bench(precision):
        kwargs = dict(input_size=(1, 12, 12), batch_size=4, num_classes=4, repeats=1, warmup=0)
        return benchmark_models(["resnet20"], precision=precision, **kwargs)[0]

    assert (bench("fp32")["precision"], bench("fp32")["compiled"]) == ("fp32", False)
    monkeypatch.setattr(config_module, "native_bf16", lambda device: False)
    assert bench("auto")["precision"] == "fp32"
    with pytest.raises(AttnlabError, match="precision fp16 needs CUDA"):
        bench("fp16")
