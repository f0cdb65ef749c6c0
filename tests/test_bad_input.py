"""The catalogue of bad input: what a user may get wrong, and the one line attnlab answers with (exit code 2).

Each row is (command line, expected message). The test runs the CLI in-process, checks the exit code, that stderr is
one line holding the message, and that nothing already in the output folder was touched. This list is also the
documentation of these errors.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.cli import main

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
    (["train", *SYNTH, "--data-arg", "shape=[1,6,6]"], "too small for resnet20"),
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
    (["train", *SYNTH, "--amp", "fp16"], "precision fp16 needs CUDA"),  # --amp: the old name of --precision
    (["train", *SYNTH, "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["train", *SYNTH, "--amp", "on"], "argument --amp: invalid choice: 'on' (choose from off, auto, bf16, fp16)"),
    (["train", *SYNTH, "--device", "cuda"], "CUDA is not available"),
    (["train", *SYNTH, "--device", "tpu"], "device must be cpu or cuda"),
    (["train", *SYNTH, "--equivariance", "0.1"], "--equivariance needs a model with CRAM layers"),
    # output folder
    (["train", *SYNTH, "--out", "{run}"], "holds an earlier run; pass --resume"),
    (["train", *SYNTH, "--lr", "0.3", "--out", "{run}", "--resume"], "lr=0.1 but this command asks for 0.3"),
    (["train", *SYNTH, "--out", "{a_file}"], "exists and is not a directory"),
    (["train", *SYNTH, "--out", "{read_only}/run"], "cannot create it"),
    # eval and other commands
    (["eval", "--checkpoint", "{tmp}/nowhere"], "no such run folder or weights file"),
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
    read_only = root / "read_only"
    read_only.mkdir(mode=0o500)
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
        "read_only": str(read_only),
        "mnist_truncated": str(_mnist_dir(t, images=10, declared=60000)),
        "mnist_bad_magic": str(_mnist_dir(b, magic=0x802)),
        "mnist_ok": str(_mnist_dir(o, images=5010)),  # MNIST carves 5000 for validation
    }


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, message", CATALOGUE, ids=[" ".join(a[:3]) + " …" for a, _ in CATALOGUE])
def test_bad_input_gives_one_line_and_exit_code_2(argv, message, files, capsys, monkeypatch, tmp_path):
    if "{read_only}" in " ".join(argv) and hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0:
        monkeypatch.setattr("os.access", lambda *a, **k: False)  # root ignores permissions; simulate the check
        monkeypatch.setattr(Path, "mkdir", _refuse_mkdir)
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


def _refuse_mkdir(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(self))


def test_real_process_prints_no_traceback_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "attnlab", "train", "--model", "resnet21"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.startswith("attnlab: error: unknown model 'resnet21'") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
