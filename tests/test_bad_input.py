"""The catalogue of bad input: what a user may get wrong, and the one line attnlab answers with (exit code 2).

Each row is (command line, expected message). The test runs the CLI in-process, checks the exit code, that stderr is
one line holding the message, and that nothing already in the output folder was touched. This list is also the
documentation of these errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attnlab.cli import main
from attnlab.detection.config import DetectConfig
from attnlab.errors import AttnlabError
from attnlab.models import create_model
from attnlab.models.options import OPTIONS
from attnlab.train.config import TrainConfig

SYNTH = [
    "--dataset",
    "synthetic",
    "--data-arg",
    "shape=[1,12,12]",
    "--data-arg",
    "size=128",
    "--data-arg",
    "test_size=32",
    "--data-arg",
    "num_classes=4",
    "--val-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "1",
]


def _idx_images(path: Path, n: int, declared: int | None = None, magic: int = 0x803) -> None:
    header = struct.pack(">IIII", magic, declared or n, 28, 28)
    path.write_bytes(gzip.compress(header + bytes(n * 28 * 28)))


def _idx_labels(path: Path, n: int) -> None:
    path.write_bytes(gzip.compress(struct.pack(">II", 0x801, n) + bytes(n)))


def _mnist_dir(root: Path, images: int = 10, declared: int | None = None, magic: int = 0x803) -> Path:
    folder = root / "idx"
    folder.mkdir()
    for split in ("train", "t10k"):
        _idx_images(folder / f"{split}-images-idx3-ubyte.gz", images, declared, magic)
        _idx_labels(folder / f"{split}-labels-idx1-ubyte.gz", images)
    return folder


COMPARE = ["--dataset", "synthetic", "--data-arg", "shape=[1,12,12]", "--epochs", "1", "--out", "{fresh}"]

# --config files with a bad setting: name → (YAML text or bytes, expected message)
BAD = {
    "epochs_text": ("epochs: three\n", "epochs must be a 64-bit integer, got 'three'"),
    "epochs_null": ("epochs: null\n", "epochs must be a 64-bit integer, got None"),
    "epochs_float": ("batch_size: 12.5\n", "batch_size must be a 64-bit integer, got 12.5"),
    "lr_list": ("lr: [0.1]\n", "lr must be a finite number, got [0.1]"),
    "lr_nan": ("lr: .nan\n", "lr must be a finite number, got nan"),
    "augment_text": ("augment: 'yes'\n", "augment must be true or false, got 'yes'"),
    "seed_huge": ("seed: 18446744073709551616\n", "seed must be a 64-bit integer, got 18446744073709551616"),
    "seed_negative": ("seed: -1\n", "seed must be ≥ 0, got -1"),
    "data_dir_mapping": ("data_dir: {a: 1}\n", "data_dir must be a string or null, got {'a': 1}"),
    "model_date": ("model: 2020-01-01\n", "model must be a string, got datetime.date(2020, 1, 1)"),
    "model_binary": ("model: !!binary /w==\n", "model must be a string, got b'\\xff'"),
    "model_kwargs_list": ("model_kwargs: [1, 2]\n", "model_kwargs must be a mapping, got [1, 2]"),
    "transforms_number": ("mechanisms: {cram: {transforms: 3}}\n", "mechanisms.cram: transforms must be a list of"),
    "mechanisms_list": ("mechanisms: [cram]\n", "mechanisms must be a mapping"),
    "key_number": ("3: epochs\n", "setting names must be strings, got 3"),
    "dropout": ("model: se_resnet20\nmodel_kwargs: {drop_rate: 1.5}\n", "drop_rate must be a finite number in"),
    "attn_where": ("model: se_resnet20\nmodel_kwargs: {attn_where: 5}\n", "attn_where: stage 5 does not exist"),
    "not_utf8": (b"epochs: 3\nmodel: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 17)"),
    "dataset_list": ("dataset: [synthetic]\n", "dataset must be a string, got ['synthetic']"),
}

# (arguments, expected message); {tmp} is replaced by a fresh temporary folder, {run} by a finished run in it.
CATALOGUE = [
    # names
    (["train", "--model", "resnet21", *SYNTH], "unknown model 'resnet21'; did you mean"),
    (["train", "--model", "resnet20", "--model-arg", "attn_layer=sse", *SYNTH], "unknown attention 'sse'"),
    (["train", "--model", "resnet20", "--model-arg", "merge=mull", *SYNTH], "unknown merge 'mull'"),
    (["train", "--dataset", "fashion-minst"], "unknown dataset 'fashion-minst'; did you mean fashion-mnist"),
    (["train", "--dataset", "imagefolder:"], "imagefolder needs a folder"),
    (["train", *SYNTH, "--data-arg", "canvas=64"], "dataset 'synthetic' has no option 'canvas'"),
    # the data does not fit the model
    (["train", *SYNTH, "--in-chans", "3"], "in_chans=3 but synthetic images have 1 channel"),
    (["train", *SYNTH, "--data-arg", "shape=[1,6,6]"], "resnet20 cannot take 6×6 images: input 6×6 is too small"),
    # missing or corrupt data
    (["train", "--dataset", "mnist", "--data-dir", "{tmp}/nothing"], "mnist"),
    (["train", "--dataset", "mnist", "--data-dir", "{mnist_truncated}"], "truncated"),
    (["train", "--dataset", "mnist", "--data-dir", "{mnist_bad_magic}"], "magic"),
    (["train", *SYNTH, "--subset", "100000"], "subset=100000"),
    # bad flags and configs
    (["train", "--epochs", "0", *SYNTH[:-2]], "epochs must be ≥ 1"),
    (["train", "--lr", "-1", *SYNTH], "lr must be > 0"),
    (["train", "--epochs", "many"], "invalid int value: 'many'"),
    (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["train", "--config", "{tmp}/missing.yaml"], "cannot read config"),
    (["train", "--config", "{bad_yaml}"], "invalid YAML at line"),
    (["train", "--config", "{list_yaml}"], "a config must be a mapping"),
    (["train", "--config", "{unknown_key_yaml}"], "unknown setting 'epoch'; did you mean epochs"),
    (["train", *SYNTH, "--precision", "fp16"], "precision fp16 needs CUDA; on CPU use --precision bf16"),
    (["train", *SYNTH, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["train", *SYNTH, "--device", "cuda"], "CUDA is not available"),
    (["train", *SYNTH, "--device", "tpu"], "device must be cpu or cuda"),
    (
        ["train", *SYNTH, "--mechanism", "cram.equivariance=0.1"],
        "mechanisms.cram.equivariance needs a model with CRAM layers; this model has none",
    ),
    (["train", *SYNTH, "--mechanism", "crm.equivariance=0.1"], "unknown mechanism 'crm'; did you mean cram"),
    (["train", *SYNTH, "--mechanism", "equivariance=0.1"], "expected MECHANISM.OPTION=VALUE"),
    (["train", *SYNTH, "--model", "cram_resnet20", "--mechanism", "cram.weight=1"], "unknown option 'weight'"),
    # output folder
    (["train", *SYNTH, "--out", "{run}"], "holds an earlier run; pass --resume"),
    (["train", *SYNTH, "--lr", "0.3", "--out", "{run}", "--resume"], "lr=0.1 but this command asks for 0.3"),
    (["train", *SYNTH, "--out", "{a_file}"], "exists and is not a directory"),
    (["train", *SYNTH, "--out", "{a_file}/run"], "a_file is not a directory"),
    # settings of the wrong type or out of range, from a --config file, flags or options: one schema checks them all
    *[(["train", "--config", f"{{cfg_{name}}}", "--out", "{fresh}"], message) for name, (_, message) in BAD.items()],
    (
        ["train", *SYNTH, "--model-arg", "drop_rate=2", "--out", "{fresh}"],
        "drop_rate must be a finite number in [0, 1]",
    ),
    (["train", *SYNTH, "--model", "se_resnet20", "--model-arg", "attn_where=5", "--out", "{fresh}"], "stage 5 does"),
    (["train", *SYNTH, "--model-arg", "zero_init_last=maybe"], "zero_init_last must be true or false, got 'maybe'"),
    (["train", *SYNTH, "--model-arg", "merge=gate", "--model-arg", "merge_args={{offset: x}}"], "offset must be a"),
    (["train", *SYNTH, "--model-arg", "aw={{gate: 3}}"], "aw: gate must be a string, got 3"),
    (["train", *SYNTH, "--model-arg", "attn_layer=se", "--model-arg", "attn_kwargs={{rd_ratio: []}}"], "rd_ratio must"),
    (["train", *SYNTH, "--data-arg", "num_classes=four"], "dataset 'synthetic': num_classes must be a 64-bit integer"),
    (["analyze", "smoothness", "--checkpoint", "{run}", "--out", "{fresh}", "--option", "pairs=[1]"], "pairs must be"),
    (["analyze", "landscape", "--checkpoint", "{run}", "--out", "{fresh}", "--option", "span=.inf"], "span must be a"),
    (["compare", "--models", "resnet20[drop_rate=3]", *COMPARE], "'resnet20[drop_rate=3]': resnet20: drop_rate"),
    (["compare", "--models", "resnet20,resnet20[epochs=x]", *COMPARE], "epochs must be a 64-bit integer, got 'x'"),
    (["compare", "--preset", "quick", "--config", "{cfg_epochs_text}", "--out", "{fresh}"], "epochs must be a 64-bit"),
    (["compare", "--models", "resnet20", "--config", "{cfg_dataset_list}", "--out", "{fresh}"], "dataset must be a"),
    # detection: the same schema for its own config
    (["detect", "train", "--config", "{cfg_epochs_text}", "--out", "{fresh}"], "epochs must be a 64-bit integer"),
    (["detect", "train", "--config", "{cfg_model_kwargs_list}", "--out", "{fresh}"], "model_kwargs must be a mapping"),
    (["detect", "train", "--config", "{cfg_seed_huge}", "--out", "{fresh}"], "seed must be a 64-bit integer"),
    (["detect", "train", "--model-arg", "drop_rate=7", "--out", "{fresh}"], "drop_rate must be a finite number in"),
    (["detect", "train", "--val-size", "2.5", "--out", "{fresh}"], "val_size"),
    (["detect", "train", "--out", "{a_file}"], "exists and is not a directory"),
    (["detect", "train", "--out", "{a_file}/x"], "a_file is not a directory"),
    # output paths: a file where a folder belongs, a folder where a file belongs, a path under a file
    (["analyze", "smoothness", "--checkpoint", "{run}", "--out", "{a_file}"], "exists and is not a directory"),
    (["analyze", "smoothness", "--checkpoint", "{run}", "--out", "{a_file}/x"], "a_file is not a directory"),
    (["bench", "--models", "resnet20", "--csv", "{tmp}"], "is a directory"),
    (["bench", "--models", "resnet20", "--csv", "{a_file}/x.csv"], "a_file is not a directory"),
    (["compare", "--models", "resnet20", *COMPARE[:-2], "--out", "{a_file}"], "exists and is not a directory"),
    (["compare", "--models", "resnet20", *COMPARE[:-2], "--out", "{a_file}/x"], "a_file is not a directory"),
    (["report", "{a_file}"], "exists and is not a directory"),
    (["report", "{a_file}/x"], "a_file is not a directory"),
    (["bench", "--models", "resnet20", "--batch-size", "0"], "batch_size must be a 64-bit integer ≥ 1, got 0"),
    (["bench", "--models", "resnet20", "--repeats", "0"], "repeats must be a 64-bit integer ≥ 1, got 0"),
    (["bench", "--models", " , "], "--models names no model"),
    (["bench", "--models", "resnet20", "--device", "tpu"], "expected cpu or cuda"),
    # eval and other commands
    (["eval", "--checkpoint", "{tmp}/nowhere"], "no such run folder or weights file"),
    (["eval", "--checkpoint", "{run}", "--batch-size", "0"], "expected a positive integer, got '0'"),
    (["detect", "eval", "--checkpoint", "{run}", "--batch-size", "x"], "expected a positive integer, got 'x'"),
    (["eval", "--checkpoint", "{run}", "--dataset", "mnist", "--data-dir", "{mnist_ok}"], "the model takes 1 and 4"),
    (["models", "nothing*"], "no model matches 'nothing*'"),
    (["models", "--input-size", "3x32"], "expected C,H,W"),
    (["bench", "--models", "resnet20,se_resnet2"], "unknown model 'se_resnet2'"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-input")
    run = root / "run"
    assert main(["train", *SYNTH, "--out", str(run), "--lr", "0.1"]) == 0
    (root / "bad.yaml").write_text("epochs: 3\nmodel: [unclosed\n")
    (root / "list.yaml").write_text("- epochs\n- 3\n")
    (root / "unknown.yaml").write_text("epoch: 3\n")
    (root / "a_file").write_text("precious")
    for name, (text, _) in BAD.items():
        (root / f"{name}.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    (t := root / "t").mkdir()
    (b := root / "b").mkdir()
    (o := root / "o").mkdir()
    return {
        "tmp": str(root),
        "run": str(run),
        "bad_yaml": str(root / "bad.yaml"),
        "list_yaml": str(root / "list.yaml"),
        "unknown_key_yaml": str(root / "unknown.yaml"),
        "a_file": str(root / "a_file"),
        "fresh": str(root / "fresh"),
        **{f"cfg_{name}": str(root / f"{name}.yaml") for name in BAD},
        "mnist_truncated": str(_mnist_dir(t, images=10, declared=60000)),
        "mnist_bad_magic": str(_mnist_dir(b, magic=0x802)),
        "mnist_ok": str(_mnist_dir(o, images=5010)),  # MNIST carves 5000 for validation
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", CATALOGUE, ids=[" ".join(a[:3]) + " …" for a, _ in CATALOGUE])
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, files, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --out (runs/latest) lands in a scratch folder
    monkeypatch.delenv("ATTNLAB_DATA", raising=False)
    argv = [a.format(**files) for a in argv]
    before = _snapshot(Path(files["tmp"]))
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("attnlab: error: "), err
    assert message in err, err
    assert _snapshot(Path(files["tmp"])) == before, "bad input changed existing files"
    assert not Path(files["fresh"]).exists(), "bad input created the output folder"


def test_real_process_prints_no_traceback_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attnlab", "train", "--model", "resnet21"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.startswith("attnlab: error: unknown model 'resnet21'") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------- a folder the user cannot write


@contextlib.contextmanager
def _without_rights() -> Iterator[Path]:
    """A folder the (effective) user cannot write: mode 0o555, and as root (who ignores modes) the effective user
    dropped to nobody for the duration, so the kernel itself refuses — real permissions, also in CI running as root."""
    base = Path(tempfile.mkdtemp())
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    root = os.geteuid() == 0
    try:
        if root:
            os.seteuid(NOBODY)
        yield locked
    finally:
        if root:
            os.seteuid(0)
        locked.chmod(0o755)
        shutil.rmtree(base)


NOBODY = 65534
UNWRITABLE = [
    ["train", *SYNTH, "--out", "{locked}/run"],
    ["analyze", "smoothness", "--checkpoint", "{run}", "--out", "{locked}/out"],
    ["analyze", "smoothness", "--checkpoint", "{run}", "--out", "{locked}"],
    ["bench", "--models", "resnet20", "--csv", "{locked}/bench.csv"],
    ["compare", "--models", "resnet20", "--dataset", "synthetic", "--out", "{locked}/cmp"],
    ["report", "{locked}"],
]


@pytest.mark.parametrize("argv", UNWRITABLE, ids=[a[0] + " " + a[-1].split("/")[-1] for a in UNWRITABLE])
def test_unwritable_output_folder_gives_one_line(argv, files, capsys):
    import attnlab.analysis
    import attnlab.experiment
    import attnlab.report
    import attnlab.train.cost  # noqa: F401  (imported before the user changes: nobody may not write __pycache__)

    with _without_rights() as locked:
        code = main([a.format(locked=locked, **files) for a in argv])
        assert sorted(locked.iterdir()) == []
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not writable" in err, err


# ---------------------------------------------------------------------------------------------------- a closed pipe


@pytest.mark.parametrize("lines", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_closed_pipe_ends_quietly(lines):
    """``attnlab models --flops | head -1`` (and ``head -0``): the reader leaves while rows are still being measured;
    attnlab stops with exit 0 and says nothing."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "attnlab", "models", "*resnet20", "--flops"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(lines):
        assert proc.stdout.readline().startswith("model")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and err == "", err


# ------------------------------------------------------------------------------------------ YAML values of every type

yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=4)
    | st.dates()
    | st.sampled_from(["cpu", "cosine", "skip", "hflip", "0.1", "3", "resnet20", "synthetic"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
CONFIGS = [TrainConfig, DetectConfig]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.__name__ for c in CONFIGS])
def test_any_yaml_value_of_any_setting_is_a_config_or_one_line(config, tmp_path_factory):
    """Every setting, any YAML value: a valid config (which round-trips through its own config.yaml) or an
    AttnlabError of one line naming the setting — never another exception, never a silently changed value."""
    keys = st.sampled_from(sorted({f.name for f in dataclasses.fields(config)}))
    settings(max_examples=300)(given(key=keys, value=yaml_values)(_yaml_setting))(config, tmp_path_factory)


def _yaml_setting(config, tmp_path_factory, key, value):
    path = tmp_path_factory.getbasetemp() / "hypothesis.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    try:
        cfg = config.from_yaml(path)
    except AttnlabError as e:
        assert "\n" not in str(e) and key in str(e), str(e)
        return
    kept = getattr(cfg, key)
    assert kept == value or (isinstance(value, str) and kept == [v.strip() for v in value.split(",") if v.strip()])
    assert type(value) is not float or type(kept) is float
    assert config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@settings(max_examples=150)
@given(key=st.sampled_from(sorted(OPTIONS)), value=yaml_values)
def test_any_value_of_any_model_option_builds_or_is_one_line(key, value):
    """Every model option, any YAML value: the network is built, or an AttnlabError of one line names the option."""
    try:
        create_model("se_resnet20", **{key: value})
    except AttnlabError as e:
        assert "\n" not in str(e) and (key in str(e) or str(e).startswith(CONFIGURES.get(key, key))), str(e)
    except TypeError as e:  # block_args go to timm's blocks as they are: Python's own "unexpected keyword" error
        assert key == "block_args" and "\n" not in str(e), str(e)


CONFIGURES = {"attn_kwargs": "attention 'se'", "merge_args": "merge '", "aw": "aw: "}
"""Mapping options whose errors name what they configure rather than themselves."""
