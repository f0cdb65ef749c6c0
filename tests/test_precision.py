"""``precision``: the default follows the hardware; the old name ``amp`` is refused like any unknown setting."""

from __future__ import annotations

import pytest

from attnlab.cli import build_parser
from attnlab.errors import AttnlabError
from attnlab.train import TrainConfig
from attnlab.train import config as config_module
from attnlab.train.config import native_bf16


def _quiet(_line: str) -> None:
    pass


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    assert TrainConfig().precision == ("bf16" if native_bf16("cpu") else "fp32")
    monkeypatch.setattr(config_module, "native_bf16", lambda device: False)
    assert TrainConfig().precision == "fp32" and TrainConfig(precision="bf16").precision == "bf16"
    monkeypatch.setattr(config_module, "native_bf16", lambda device: True)
    assert TrainConfig().precision == "bf16"


def test_precision_flag_and_the_old_amp_name_refused():
    parse = build_parser().parse_args
    assert parse(["train", "--precision", "fp32"]).precision == "fp32"
    assert parse(["train"]).precision is None  # not given: the config file's or the default
    with pytest.raises(AttnlabError, match="unknown setting 'amp'"):
        TrainConfig.from_dict({"amp": "bf16"})
    with pytest.raises(AttnlabError, match="unrecognized arguments: --amp"):
        parse(["train", "--amp", "bf16"])


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
