"""Tests of attnlab.data on files they generate (IDX, CIFAR pickles, PNG folders), plus one real-data smoke test."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import attnlab.data.cifar as cifar_module
import attnlab.data.idx as idx_module
from attnlab.data import DataBundle, Split, batches, list_datasets, load_dataset, num_batches
from attnlab.data.augment import draw_params, flip, random_crop
from attnlab.data.bundle import channel_stats, seeded_generator
from attnlab.data.cifar import SafeUnpickler, safe_unpickle
from attnlab.data.cluttered import place, tight_boxes
from attnlab.data.idx import read_idx
from attnlab.errors import AttnlabError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("ATTNLAB_DATA", raising=False)


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else 0x800 + array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    data = idx_bytes(array, magic)
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def identity_images(n: int, rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """Random images whose first two pixels encode their index, so a sample can be recognised after splitting."""
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return images


def image_ids(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


def make_idx_folder(folder: Path, n_train: int = 300, n_test: int = 50, gz: bool = False, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_STEMS[0]: identity_images(n_train, rng),
        IDX_STEMS[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_STEMS[2]: identity_images(n_test, rng),
        IDX_STEMS[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / stem, array, gz=gz)
    return arrays


@settings(max_examples=15, deadline=None)
@given(n=st.integers(0, 5), h=st.integers(1, 6), w=st.integers(1, 6), gz=st.booleans())
def test_read_idx_round_trip(tmp_path_factory, n, h, w, gz):
    folder = tmp_path_factory.mktemp("idx")
    images = np.random.default_rng(n * 100 + h * 10 + w).integers(0, 256, (n, h, w), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(folder / "img", images, gz), "images"), images)
    assert np.array_equal(read_idx(write_idx(folder / "lab", labels, gz), "labels"), labels)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_returns_the_files_arrays(tmp_path, gz):
    arrays = make_idx_folder(tmp_path, gz=gz)
    bundle = load_dataset("mnist", tmp_path, val_size=0)
    assert torch.equal(bundle.train.images, torch.from_numpy(arrays[IDX_STEMS[0]]).unsqueeze(1))
    assert torch.equal(bundle.train.labels, torch.from_numpy(arrays[IDX_STEMS[1]]).long())
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(arrays[IDX_STEMS[2]]))
    assert bundle.num_classes == 10 and bundle.image_size == (28, 28) and bundle.in_chans == 1
    assert bundle.hflip is False and bundle.crop_padding == 2
    assert load_dataset("fashion-mnist", tmp_path, val_size=0).hflip is True


def test_idx_wrong_magic(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((2, 3, 3), np.uint8), magic=0x00000801)
    with pytest.raises(AttnlabError) as e:
        read_idx(path, "images")
    one_line_error(e, str(path), "wrong magic number 0x00000801", "0x00000803")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((5, 4, 4), np.uint8))[:-7]
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(AttnlabError) as e:
        read_idx(path, "images")
    one_line_error(e, str(path), "truncated: header declares 5×4×4 images", f"holds {16 + 80 - 7} of 96 bytes")


def test_idx_trailing_bytes_and_corrupt_gzip(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\0\0")
    with pytest.raises(AttnlabError) as e:
        read_idx(path, "labels")
    one_line_error(e, str(path), "2 bytes after the 3 labels")
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(300, np.uint8)))[:-10])
    with pytest.raises(AttnlabError) as e:
        read_idx(path, "labels")
    one_line_error(e, str(path), "corrupt gzip")


def test_idx_count_mismatch_and_label_range(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / IDX_STEMS[1], np.zeros(299, np.uint8))
    with pytest.raises(AttnlabError) as e:
        load_dataset("mnist", tmp_path)
    one_line_error(e, str(tmp_path / IDX_STEMS[1]), "299 labels", "300 images")
    write_idx(tmp_path / IDX_STEMS[1], np.full(300, 10, np.uint8))
    with pytest.raises(AttnlabError) as e:
        load_dataset("mnist", tmp_path)
    one_line_error(e, "label 10 out of range")


def test_idx_missing_file_is_named(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / IDX_STEMS[2]).unlink()
    with pytest.raises(AttnlabError) as e:
        load_dataset("fashion-mnist", tmp_path)
    one_line_error(e, str(tmp_path / IDX_STEMS[2]), "missing")


def test_idx_not_found_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "FASHION_MNIST", dataclasses.replace(idx_module.FASHION_MNIST, system_dirs=()))
    with pytest.raises(AttnlabError) as e:
        load_dataset("fashion-mnist", tmp_path)
    one_line_error(e, str(tmp_path), "apt-get install dataset-fashion-mnist", "--data-dir", "--download")


def test_idx_search_order_and_layouts(tmp_path, monkeypatch):
    first = make_idx_folder(tmp_path / "arg", seed=1)
    make_idx_folder(tmp_path / "env" / "FashionMNIST" / "raw", seed=2, gz=True)
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path / "env"))
    from_arg = load_dataset("fashion-mnist", tmp_path / "arg", val_size=0)
    assert torch.equal(from_arg.test.images[:, 0], torch.from_numpy(first[IDX_STEMS[2]]))
    from_env = load_dataset("fashion-mnist", tmp_path / "empty", val_size=0)  # falls through to ATTNLAB_DATA
    assert "FashionMNIST/raw" in from_env.origin
    second = make_idx_folder(tmp_path / "env2" / "mnist", seed=3)
    monkeypatch.setenv("ATTNLAB_DATA", str(tmp_path / "env2"))
    from_sub = load_dataset("mnist", val_size=0)
    assert torch.equal(from_sub.train.labels, torch.from_numpy(second[IDX_STEMS[1]]).long())


def test_idx_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeFashionMNIST:  # stands in for torchvision's class: same attributes, writes files instead of fetching
        resources = idx_module.FASHION_MNIST.torchvision_class.resources
        classes = idx_module.FASHION_MNIST.torchvision_class.classes

        def __init__(self, root, train, download):
            calls.append((root, download))
            make_idx_folder(Path(root) / "FashionMNIST" / "raw", gz=True)

    FakeFashionMNIST.__name__ = "FashionMNIST"
    family = dataclasses.replace(idx_module.FASHION_MNIST, torchvision_class=FakeFashionMNIST, system_dirs=())
    monkeypatch.setattr(idx_module, "FASHION_MNIST", family)
    with pytest.raises(AttnlabError):
        load_dataset("fashion-mnist", tmp_path)
    assert calls == []
    bundle = load_dataset("fashion-mnist", tmp_path, val_size=0, download=True)
    assert calls == [(str(tmp_path), True)] and len(bundle.train) == 300


# ---------------------------------------------------------------- CIFAR


class Python2StylePickler(pickle.Pickler):
    """Pickles arrays as Python 2's numpy did: their bytes as a (latin-1) string, which the loader must turn back."""

    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
            return self.reconstruct, (np.ndarray, (0,), b"b"), state
        return NotImplemented


def dumps_like_python2(obj: object, protocol: int) -> bytes:
    """Protocol 2 as in the official archive (numpy 1.x module ``numpy.core``, string payload); else today's pickle."""
    if protocol != 2:
        return pickle.dumps(obj, protocol=protocol)
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def make_cifar(root: Path, kind: str = "cifar10", per_batch: int = 6, protocol: int = 2, seed: int = 0) -> dict:
    dataset = cifar_module.CIFAR10 if kind == "cifar10" else cifar_module.CIFAR100
    num_classes = 10 if kind == "cifar10" else 100
    folder = root / dataset.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    out = {}
    for split, files in (("train", dataset.train_list), ("test", dataset.test_list)):
        images, labels = [], []
        for name, _md5 in files:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            batch_labels = rng.integers(0, num_classes, per_batch).tolist()
            entry = {"batch_label": name, label_key: batch_labels, "data": data, "filenames": ["a.png"] * per_batch}
            if kind == "cifar100":
                entry["coarse_labels"] = [0] * per_batch
            (folder / name).write_bytes(dumps_like_python2(entry, protocol))
            images.append(data)
            labels += batch_labels
        out[split] = (np.concatenate(images).reshape(-1, 3, 32, 32), np.array(labels))
    out["classes"] = [f"c{i}" for i in range(num_classes)]
    meta = {dataset.meta["key"]: out["classes"], "num_cases_per_batch": per_batch}
    (folder / dataset.meta["filename"]).write_bytes(dumps_like_python2(meta, protocol))
    return out


@pytest.mark.parametrize("kind,protocol", [("cifar10", 2), ("cifar10", 5), ("cifar100", 2)])
def test_cifar_reads_the_real_layout(tmp_path, kind, protocol):
    made = make_cifar(tmp_path, kind, protocol=protocol)
    first = next(tmp_path.glob("*/data_batch_1" if kind == "cifar10" else "*/train")).read_bytes()
    assert (b"numpy.core.multiarray\n_reconstruct" in first) == (protocol == 2)  # the archive's own global names
    bundle = load_dataset(kind, tmp_path, val_size=0)
    assert torch.equal(bundle.train.images, torch.from_numpy(made["train"][0]))
    assert torch.equal(bundle.train.labels, torch.from_numpy(made["train"][1]))
    assert torch.equal(bundle.test.images, torch.from_numpy(made["test"][0]))
    assert bundle.classes == made["classes"] and bundle.image_size == (32, 32) and bundle.crop_padding == 4


def test_cifar_reads_the_tar_gz_in_place(tmp_path):
    made = make_cifar(tmp_path / "src")
    (tmp_path / "dst").mkdir()
    with tarfile.open(tmp_path / "dst" / cifar_module.CIFAR10.filename, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    bundle = load_dataset("cifar10", tmp_path / "dst", val_size=0)
    assert torch.equal(bundle.test.images, torch.from_numpy(made["test"][0]))
    assert not (tmp_path / "dst" / "cifar-10-batches-py").exists()


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_malicious_pickle_without_running_it(tmp_path):
    make_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({"data": Exploit(marker), "labels": []}, protocol=2))
    pickle.loads(pickle.dumps(Exploit(tmp_path / "control"), protocol=2))  # the payload does work when unpickled
    assert (tmp_path / "control").exists()
    with pytest.raises(AttnlabError) as e:
        load_dataset("cifar10", tmp_path)
    one_line_error(e, str(batch), "refused to unpickle", "system")
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("subprocess", "Popen"), ("numpy", "load")])
def test_safe_unpickler_refuses_other_globals(module, name):
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()
    with pytest.raises(AttnlabError, match=f"refused to unpickle {module}.{name}"):
        safe_unpickle(payload, "x")
    assert issubclass(SafeUnpickler, pickle.Unpickler)


def test_cifar_missing_and_corrupt_batches(tmp_path):
    make_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(AttnlabError) as e:
        load_dataset("cifar10", tmp_path)
    one_line_error(e, str(batch), "corrupt pickle")
    batch.unlink()
    with pytest.raises(AttnlabError) as e:
        load_dataset("cifar10", tmp_path)
    one_line_error(e, str(batch), "missing")
    with pytest.raises(AttnlabError) as e:
        load_dataset("cifar100", tmp_path / "nothing")
    one_line_error(e, "cifar-100-python", "--data-dir", "--download")


def test_cifar_download_uses_torchvision_url_and_md5(tmp_path, monkeypatch):
    seen = []

    def fake_download(url, download_root, filename, md5):
        seen.append((url, filename, md5))
        make_cifar(Path(download_root))

    monkeypatch.setattr(cifar_module, "download_and_extract_archive", fake_download)
    assert len(load_dataset("cifar10", tmp_path, download=True, val_size=0).train) == 30
    tv = cifar_module.CIFAR10
    assert seen == [(tv.url, tv.filename, tv.tgz_md5)]


# ---------------------------------------------------------------- image folders


def make_image_folder(root: Path, classes: dict[str, list[tuple[int, int, int]]], size=(10, 6)) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", size, colour).save(root / name / f"{i}.png")


def test_imagefolder_with_test_folder(tmp_path):
    make_image_folder(tmp_path / "train", {"cat": [(200, 10, 10)] * 3, "dog": [(10, 200, 10)] * 2})
    make_image_folder(tmp_path / "test", {"dog": [(10, 10, 200)]})  # a held-out folder may lack classes
    bundle = load_dataset(f"imagefolder:{tmp_path}", val_size=0, image_size=8)
    assert bundle.classes == ["cat", "dog"] and bundle.image_size == (8, 8) and bundle.in_chans == 3
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1]
    assert bundle.test.labels.tolist() == [1]
    assert (bundle.test.images[0] == torch.tensor([10, 10, 200], dtype=torch.uint8)[:, None, None]).all()
    grey = load_dataset(f"imagefolder:{tmp_path}", val_size=0, image_size=(4, 5), mode="L")
    assert grey.train.images.shape == (5, 1, 4, 5)
    make_image_folder(tmp_path / "test", {"bird": [(1, 2, 3)]})
    with pytest.raises(AttnlabError) as e:
        load_dataset(f"imagefolder:{tmp_path}")
    one_line_error(e, "'bird' is not among the training classes")


def test_imagefolder_carves_test_from_the_pool(tmp_path):
    make_image_folder(tmp_path, {"a": [(i, 0, 0) for i in range(6)], "b": [(0, i, 0) for i in range(4)]})
    bundle = load_dataset(f"imagefolder:{tmp_path}", val_size=2, test_size=3, image_size=4)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (5, 2, 3)
    colours = [tuple(img[:, 0, 0].tolist()) for s in (bundle.train, bundle.val, bundle.test) for img in s.images]
    assert sorted(colours) == sorted([(i, 0, 0) for i in range(6)] + [(0, i, 0) for i in range(4)])
    again = load_dataset(f"imagefolder:{tmp_path}", val_size=2, test_size=3, image_size=4, seed=7)
    assert torch.equal(again.test.images, bundle.test.images)  # the test split does not depend on the run's seed


def test_imagefolder_errors(tmp_path):
    with pytest.raises(AttnlabError, match="no such folder"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(AttnlabError, match="needs a folder"):
        load_dataset("imagefolder")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AttnlabError) as e:
        load_dataset(f"imagefolder:{tmp_path}")
    one_line_error(e, "bad.png", "unreadable image")


# ---------------------------------------------------------------- synthetic, names, options


def test_synthetic_is_deterministic_and_learnable():
    a = load_dataset("synthetic", shape=(3, 16, 16), size=400, test_size=200)
    b = load_dataset("synthetic", shape=(3, 16, 16), size=400, test_size=200)
    c = load_dataset("synthetic", shape=(3, 16, 16), size=400, test_size=200, data_seed=1)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.shape == (360, 3, 16, 16) and len(a.val) == 40 and len(a.test) == 200
    assert torch.bincount(a.test.labels).tolist() == [20] * 10
    # learnable: class means of the training images classify the test images far above chance (10%)
    x_train, x_test = a.train.images.flatten(1).float(), a.test.images.flatten(1).float()
    means = torch.stack([x_train[a.train.labels == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == a.test.labels).float().mean().item()
    assert accuracy > 0.9
    pixel_accuracy = (torch.cdist(x_test[:, :1], means[:, :1]).argmin(1) == a.test.labels).float().mean().item()
    assert pixel_accuracy < 0.4  # but no single pixel gives it away


def test_names_and_options_are_checked():
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic", "cluttered-fashion-mnist"} <= set(
        list_datasets()
    )
    with pytest.raises(AttnlabError) as e:
        load_dataset("fashion-mnsit")
    one_line_error(e, "unknown dataset 'fashion-mnsit'", "fashion-mnist")
    with pytest.raises(AttnlabError) as e:
        load_dataset("mnist", shape=(1, 28, 28))
    one_line_error(e, "dataset 'mnist' has no option 'shape'")
    with pytest.raises(AttnlabError) as e:
        load_dataset("synthetic", canvas=64)
    one_line_error(e, "no option 'canvas'", "shape")
    for bad in ({"shape": (3, 32)}, {"num_classes": 1}, {"size": 0}):
        with pytest.raises(AttnlabError):
            load_dataset("synthetic", **bad)


# ---------------------------------------------------------------- splits and statistics


def test_val_is_carved_from_train_the_same_for_every_seed(tmp_path):
    make_idx_folder(tmp_path, n_train=300)
    runs = [load_dataset("mnist", tmp_path, val_size=50, seed=s) for s in (0, 1, 2)]
    for run in runs:
        train, val = image_ids(run.train.images), image_ids(run.val.images)
        assert len(train) == 250 and len(val) == 50
        assert set(train.tolist()).isdisjoint(val.tolist())
        assert sorted(train.tolist() + val.tolist()) == list(range(300))
        assert torch.equal(run.val.images, runs[0].val.images)
    assert len(load_dataset("mnist", tmp_path, val_size=0.1).val) == 30
    for bad in (300, -1, 1.0, True, "5"):
        with pytest.raises(AttnlabError):
            load_dataset("mnist", tmp_path, val_size=bad)
    with pytest.raises(AttnlabError) as e:
        load_dataset("mnist", tmp_path)  # default 5000 is more than this pool
    one_line_error(e, "val_size=5000")


def test_subset(tmp_path):
    make_idx_folder(tmp_path, n_train=300)
    full = set(image_ids(load_dataset("mnist", tmp_path, val_size=50).train.images).tolist())
    a, b, c = (load_dataset("mnist", tmp_path, val_size=50, subset=40, seed=s) for s in (0, 0, 1))
    ids = image_ids(a.train.images).tolist()
    assert len(ids) == 40 == len(set(ids)) and set(ids) <= full
    assert torch.equal(a.train.images, b.train.images) and not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.val.images, c.val.images)
    for bad in (0, -3, 251):
        with pytest.raises(AttnlabError) as e:
            load_dataset("mnist", tmp_path, val_size=50, subset=bad)
        one_line_error(e, "subset", "250")


def test_normalisation_stats_match_float64_numpy(tmp_path):
    bundle = load_dataset("synthetic", size=300, shape=(3, 9, 7))
    x = bundle.train.images.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(bundle.mean, x.mean(axis=(0, 2, 3)), rtol=0, atol=1e-13)
    np.testing.assert_allclose(bundle.std, x.std(axis=(0, 2, 3)), rtol=0, atol=1e-13)
    constant = torch.full((4, 2, 3, 3), 7, dtype=torch.uint8)
    assert channel_stats(constant) == ((7 / 255, 7 / 255), (1.0, 1.0))


# ---------------------------------------------------------------- batches


def make_bundle(n: int, shape=(2, 6, 5), crop_padding: int = 2, hflip: bool = True, seed: int = 0) -> DataBundle:
    """Random images with label = sample index, so a sample can be followed through shuffling and augmentation."""
    images = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    split = Split(images, torch.arange(n))
    mean, std = channel_stats(images) if n else ((0.5,) * shape[0], (0.25,) * shape[0])
    return DataBundle("test", split, split, split, n, [str(i) for i in range(n)], mean, std, crop_padding, hflip)


def collect(bundle: DataBundle, batch_size: int, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    pairs = list(batches(bundle.train, bundle, batch_size, **kw))
    return [x for x, _ in pairs], [y for _, y in pairs]


def test_eval_batches_are_the_normalised_split_in_order():
    bundle = make_bundle(23)
    xs, ys = collect(bundle, 5, train=False)
    assert [len(y) for y in ys] == [5, 5, 5, 5, 3] and torch.equal(torch.cat(ys), torch.arange(23))
    assert all(x.dtype == torch.float32 and x.shape[1:] == (2, 6, 5) for x in xs)
    mean, std = np.array(bundle.mean)[:, None, None], np.array(bundle.std)[:, None, None]
    ref = (bundle.train.images.numpy() / 255 - mean) / std
    np.testing.assert_allclose(torch.cat(xs).numpy(), ref, rtol=0, atol=1e-5)
    xs_cl, _ = collect(bundle, 5, train=False, channels_last=True)
    assert xs_cl[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(xs_cl[0], xs[0])


def test_train_batches_are_reproducible_and_change_with_epoch_and_seed():
    bundle = make_bundle(40)
    first = collect(bundle, 8, train=True, epoch=3, seed=5)
    again = collect(bundle, 8, train=True, epoch=3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))
    assert all(y.dtype == torch.int64 for y in first[1])
    for other in ({"epoch": 4, "seed": 5}, {"epoch": 3, "seed": 6}):
        assert not torch.equal(torch.cat(collect(bundle, 8, train=True, **other)[1]), torch.cat(first[1]))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 9),
    world_size=st.integers(1, 4),
    drop_last=st.sampled_from([None, True, False]),
    epoch=st.integers(0, 3),
)
def test_train_shards_are_disjoint_equal_and_cover_the_epoch(n, batch_size, world_size, drop_last, epoch):
    bundle = make_bundle(n, shape=(1, 3, 3))
    per_rank = [
        collect(bundle, batch_size, train=True, epoch=epoch, rank=r, world_size=world_size, drop_last=drop_last)[1]
        for r in range(world_size)
    ]
    expected = num_batches(n, batch_size, train=True, world_size=world_size, drop_last=drop_last)
    assert all(len(batches_) == expected for batches_ in per_rank)
    seen = [i for batches_ in per_rank for y in batches_ for i in y.tolist()]
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))
    shard = n // world_size
    kept = shard if not (drop_last or (drop_last is None and shard >= batch_size)) else expected * batch_size
    assert len(seen) == kept * world_size
    for r in range(world_size):  # evaluation shards: rank::world_size, in order, nothing dropped
        ys = collect(bundle, batch_size, train=False, rank=r, world_size=world_size)[1]
        assert len(ys) == num_batches(n, batch_size, train=False, world_size=world_size, rank=r)
        assert (torch.cat(ys).tolist() if ys else []) == list(range(r, n, world_size))


def test_augmentation_depends_on_the_position_not_the_number_of_ranks():
    bundle = make_bundle(10)
    (whole,), _ = collect(bundle, 10, train=True, epoch=2, seed=1)
    for rank in (0, 1):
        (part,), _ = collect(bundle, 5, train=True, epoch=2, seed=1, rank=rank, world_size=2)
        assert torch.equal(part, whole[rank::2])


def reference_augment(image: torch.Tensor, padding: int, dy: int, dx: int, mirrored: bool) -> torch.Tensor:
    """One image at a time, the way torchvision's RandomCrop(padding=p) + RandomHorizontalFlip describe it."""
    _, h, w = image.shape
    padded = torch.zeros(image.shape[0], h + 2 * padding, w + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = padded[:, dy : dy + h, dx : dx + w]
    return out.flip(2) if mirrored else out


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 6), h=st.integers(1, 7), w=st.integers(1, 7), padding=st.integers(0, 4), seed=st.integers(0, 9))
def test_batch_crop_and_flip_match_a_per_sample_reference(b, h, w, padding, seed):
    images = torch.randint(0, 256, (b, 2, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    offsets, flips = draw_params(b, padding, seeded_generator(seed))
    assert offsets.min() >= 0 and offsets.max() <= 2 * padding
    out = flip(random_crop(images, padding, offsets), flips)
    for i in range(b):
        ref = reference_augment(images[i], padding, *offsets[i].tolist(), bool(flips[i]))
        assert torch.equal(out[i], ref)


def test_train_batches_are_crops_and_flips_of_their_samples():
    bundle = make_bundle(12, shape=(1, 4, 4), crop_padding=1)
    mean, std = torch.tensor(bundle.mean)[:, None, None], torch.tensor(bundle.std)[:, None, None]
    options = [(dy, dx, m) for dy in range(3) for dx in range(3) for m in (False, True)]
    used = set()
    for x, y in zip(*collect(bundle, 4, train=True, epoch=1)):
        for image, label in zip(x, y.tolist()):
            src = bundle.train.images[label]
            matches = [
                o for o in options if torch.allclose(image, (reference_augment(src, 1, *o).float() / 255 - mean) / std)
            ]
            assert matches
            used.update(matches)
    assert any(m for *_, m in used) and len({o[:2] for o in used}) > 1  # flips and several offsets do occur
    no_flip = dataclasses.replace(bundle, hflip=False, crop_padding=0)
    x, y = collect(no_flip, 12, train=True)
    assert torch.allclose(x[0], (no_flip.train.images[y[0]].float() / 255 - mean) / std)


def test_batches_reject_bad_sharding():
    bundle = make_bundle(8)
    for kw in ({"rank": 2, "world_size": 2}, {"rank": -1}, {"world_size": 0}):
        with pytest.raises(AttnlabError):
            batches(bundle.train, bundle, 4, train=True, **kw)
    with pytest.raises(AttnlabError):
        batches(bundle.train, bundle, 0, train=False)


# ---------------------------------------------------------------- cluttered Fashion-MNIST


@settings(max_examples=25, deadline=None)
@given(
    top=st.integers(0, 5), left=st.integers(0, 5), height=st.integers(1, 4), width=st.integers(1, 4),
    scale=st.floats(0.75, 1.5), ox=st.floats(0, 10), oy=st.floats(0, 10),
)  # fmt: skip
def test_place_scales_and_moves_the_garment_where_asked(top, left, height, width, scale, ox, oy):
    source = torch.zeros(1, 1, 10, 10, dtype=torch.uint8)
    source[0, 0, top : top + height, left : left + width] = 200
    placed = place(source, 26, torch.tensor([scale]), torch.tensor([[ox, oy]]))
    x0, y0, x1, y1 = left, top, left + width, top + height
    expected = torch.tensor([ox + scale * x0, oy + scale * y0, ox + scale * x1, oy + scale * y1])
    box = tight_boxes(placed)[0]
    # bilinear sampling spreads each edge by up to half a source pixel (scale / 2) plus half a canvas pixel
    assert (box - expected).abs().max() <= scale / 2 + 0.5 + 1e-4, (box, expected)
    assert placed.sum() > 0


def test_place_at_unit_scale_and_integer_offset_is_an_exact_paste():
    source = torch.randint(1, 256, (3, 1, 7, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    origins = torch.tensor([[0.0, 0.0], [4.0, 2.0], [11.0, 9.0]])
    placed = place(source, 16, torch.ones(3), origins)
    for i, (x, y) in enumerate(origins.long().tolist()):
        expected = torch.zeros(1, 16, 16, dtype=torch.uint8)
        expected[:, y : y + 7, x : x + 5] = source[i]
        assert torch.equal(placed[i], expected)
    assert tight_boxes(placed).tolist() == [[0, 0, 5, 7], [4, 2, 9, 9], [11, 9, 16, 16]]


def make_garments(folder: Path, n_train: int = 60, n_test: int = 20) -> None:
    """Fake Fashion-MNIST: garment i is a rectangle of the constant value i + 1 (so its pieces are recognisable)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for images_stem, labels_stem, n in ((IDX_STEMS[0], IDX_STEMS[1], n_train), (IDX_STEMS[2], IDX_STEMS[3], n_test)):
        images = np.zeros((n, 28, 28), np.uint8)
        for i in range(n):
            top, left = rng.integers(0, 8, 2)
            images[i, top : top + rng.integers(14, 20), left : left + rng.integers(14, 20)] = i + 1
        write_idx(folder / images_stem, images)
        write_idx(folder / labels_stem, rng.integers(0, 10, n, dtype=np.uint8))


def test_cluttered_boxes_garments_and_clutter(tmp_path):
    make_garments(tmp_path)
    kw = {"val_size": 10, "canvas": 48}
    clean = load_dataset("cluttered-fashion-mnist", tmp_path, clutter=0, **kw)
    messy = load_dataset("cluttered-fashion-mnist", tmp_path, clutter=3, **kw)
    plain = load_dataset("fashion-mnist", tmp_path, val_size=10)
    assert clean.image_size == (48, 48) and clean.train.boxes.shape == (50, 4) and clean.test.boxes.shape == (20, 4)
    assert torch.equal(clean.train.labels, plain.train.labels) and torch.equal(clean.test.labels, plain.test.labels)
    for split, cluttered in ((clean.train, messy.train), (clean.test, messy.test)):
        assert torch.equal(split.boxes, cluttered.boxes)  # same garments in the same places
        assert (cluttered.images >= split.images).all()  # clutter combines by maximum
        ys, xs = torch.meshgrid(torch.arange(48), torch.arange(48), indexing="ij")
        for image, dirty, (x0, y0, x1, y1) in zip(split.images, cluttered.images, split.boxes.long().tolist()):
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            assert (image[0][~inside] == 0).all()  # nothing but the garment on a clean canvas
            assert image[0, y0, x0:x1].any() and image[0, y1 - 1, x0:x1].any()  # the box is tight
            assert image[0, y0:y1, x0].any() and image[0, y0:y1, x1 - 1].any()
            own = image[0][inside].max()
            outside = dirty[0][~inside]
            assert not (outside == own).any()  # pieces outside the box come from other garments
        assert (cluttered.images != split.images).flatten(1).any(1).float().mean() > 0.8
    again = load_dataset("cluttered-fashion-mnist", tmp_path, clutter=3, **kw)
    other = load_dataset("cluttered-fashion-mnist", tmp_path, clutter=3, data_seed=1, **kw)
    assert torch.equal(again.train.images, messy.train.images) and torch.equal(again.train.boxes, messy.train.boxes)
    assert not torch.equal(other.train.boxes, messy.train.boxes)
    with pytest.raises(AttnlabError) as e:
        load_dataset("cluttered-fashion-mnist", tmp_path, canvas=40, **{"val_size": 10})
    one_line_error(e, "canvas=40")


# ---------------------------------------------------------------- the real thing


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist package is not installed")
def test_real_fashion_mnist_from_the_debian_package():
    bundle = load_dataset("fashion-mnist")
    assert (len(bundle.train) + len(bundle.val), len(bundle.val), len(bundle.test)) == (60000, 5000, 10000)
    assert bundle.image_size == (28, 28) and bundle.in_chans == 1 and bundle.num_classes == 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10
    assert 0.28 < bundle.mean[0] < 0.29 and 0.35 < bundle.std[0] < 0.36  # the commonly quoted 0.2860 / 0.3530


def test_imagefolder_notes_resizing_and_a_carved_test_split(tmp_path):
    make_image_folder(tmp_path, {"a": [(i, 0, 0) for i in range(6)], "b": [(0, i, 0) for i in range(4)]})
    bundle = load_dataset(f"imagefolder:{tmp_path}", val_size=2, test_size=3, image_size=4)
    assert bundle.notes == (
        "10 of 10 images were resized to 4×4 (from 10×6; option image_size, default 64)",
        f"{tmp_path} has no test/ or val/ folder: 3 of its 10 images were set aside as the test split "
        "(option test_size=3, fixed seed)",
    )
    same_size = load_dataset(f"imagefolder:{tmp_path}", val_size=2, test_size=3, image_size=(6, 10))
    assert not any("resized" in note for note in same_size.notes)


def test_imagefolder_with_its_own_test_split_notes_nothing_when_sizes_match(tmp_path):
    make_image_folder(tmp_path / "train", {"cat": [(200, 10, 10)] * 3, "dog": [(10, 200, 10)] * 2}, size=(8, 8))
    make_image_folder(tmp_path / "test", {"dog": [(10, 10, 200)]}, size=(8, 8))
    assert load_dataset(f"imagefolder:{tmp_path}", val_size=0, image_size=8).notes == ()


@pytest.mark.parametrize(
    ("n", "batch", "world", "expected"),
    [
        (
            130,
            128,
            1,
            [
                "130 training images at batch size 128 make 1 optimiser step(s) per epoch; the model will "
                "hardly learn (lower --batch-size, e.g. to 32)"
            ],
        ),
        (
            1000,
            128,
            1,
            [
                "each epoch leaves out 104 of the 1000 training images (10%) to keep batches full at batch "
                "size 128; a batch size that divides 1000 uses them all"
            ],
        ),
        (1000, 100, 1, []),
        (
            1000,
            64,
            2,
            [
                "each epoch leaves out 104 of the 1000 training images (10%) to keep batches full at batch "
                "size 128; a batch size that divides 1000 uses them all"
            ],
        ),  # 7 steps of 2 ranks × 64
    ],
)
def test_batch_notes_warn_of_few_steps_and_dropped_images(n, batch, world, expected):
    from attnlab.data import batch_notes

    assert batch_notes(n, batch, world) == expected


def test_a_run_on_an_image_folder_logs_the_notes_and_the_batch_warning(tmp_path):
    from tiny_runs import tiny

    from attnlab.train import train

    make_image_folder(tmp_path / "pool", {"a": [(i, 0, 0) for i in range(40)], "b": [(0, i, 0) for i in range(40)]})
    lines: list[str] = []
    cfg = tiny(tmp_path / "run", dataset=f"imagefolder:{tmp_path / 'pool'}", dataset_options={"image_size": 8})
    train(dataclasses.replace(cfg, epochs=1, val_size=8, batch_size=32), log=lines.append)
    assert lines[0].startswith("note: 80 of 80 images were resized to 8×8 (from 10×6")
    assert lines[1].startswith(f"note: {tmp_path / 'pool'} has no test/ or val/ folder: 16 of its 80 images")
    assert lines[2].startswith("warning: 56 training images at batch size 32 make 1 optimiser step(s) per epoch")
