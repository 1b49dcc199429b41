"""Data loaders: shapes, checksums, layouts, corrupt and missing files, binarisation."""
import gzip
import hashlib
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from iwae_ext import data
from iwae_ext.data import CorruptDataError, Dataset, DatasetNotFoundError, load_dataset

# the real Fashion-MNIST and Frey files: $IWAE_EXT_TEST_DATA, else ../shared/data beside the checkout
SHARED = os.environ.get("IWAE_EXT_TEST_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="the Fashion-MNIST and Frey files are not present: set IWAE_EXT_TEST_DATA")


@pytest.fixture(scope="module")
def bmnist():
    return load_dataset("binarized_mnist")


def test_bundled_binarized_mnist(bmnist):
    assert {k: tuple(v.shape) for k, v in bmnist.splits.items()} == {
        "train": (50000, 784), "valid": (10000, 784), "test": (10000, 784)}
    assert bmnist.binarization == "static" and bmnist.image_shape == (28, 28)
    x = bmnist.split("train")
    assert x.dtype == torch.float32 and set(torch.unique(x).tolist()) == {0.0, 1.0}
    assert abs(float(x.mean()) - 0.1306) < 1e-3
    # static data: batch() returns the stored values, whatever the generator
    idx = torch.arange(5)
    assert torch.equal(bmnist.batch("train", idx, torch.Generator().manual_seed(1)), x[:5])


def test_bundled_checksum_is_verified(tmp_path, monkeypatch):
    assert data._digest(str(data.resources.files("iwae_ext") / "_data" / "binarized_mnist.npz"),
                        "sha256") == data._BUNDLED_BMNIST_SHA256
    monkeypatch.setattr(data, "_BUNDLED_BMNIST_SHA256", "0" * 64)
    with pytest.raises(CorruptDataError, match="sha256 checksum mismatch"):
        load_dataset("binarized_mnist")


def test_amat_reproduces_the_published_test_file(bmnist, tmp_path):
    """Writing the bundled test split as .amat gives the published file byte for byte, and the
    .amat loader reads it back."""
    path = tmp_path / "binarized_mnist_test.amat"
    test = bmnist.split("test").to(torch.uint8).numpy()
    with open(path, "w") as f:
        for row in test:
            f.write(" ".join(map(str, row)) + "\n")
    data._verify(str(path), data._AMAT["test"])
    np.testing.assert_array_equal(data.read_amat(str(path)), test)
    with open(path, "ab") as f:
        f.write(b"0 1\n")
    with pytest.raises(CorruptDataError, match="checksum mismatch"):
        data._verify(str(path), data._AMAT["test"])
    with pytest.raises(CorruptDataError, match="whole number"):
        data.read_amat(str(path))


def _write_idx(path, images, compress):
    raw = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">III", *images.shape) + images.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_roundtrip_and_errors(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    path = tmp_path / "x.idx"
    _write_idx(path, images, compress)
    np.testing.assert_array_equal(data.read_idx(str(path)), images)
    # truncated: the header promises more bytes than there are
    raw = open(path, "rb").read()
    bad = tmp_path / "bad.idx"
    if compress:
        bad.write_bytes(raw[: len(raw) // 2])  # a truncated gzip stream
        with pytest.raises(CorruptDataError, match="corrupt or truncated"):
            data.read_idx(str(bad))
    else:
        bad.write_bytes(raw[:-5])
        with pytest.raises(CorruptDataError, match="corrupt or truncated"):
            data.read_idx(str(bad))
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(CorruptDataError, match="magic"):
        data.read_idx(str(bad))


@needs_shared
def test_fashion_mnist_dynamic_binarisation():
    ds = load_dataset("fashion_mnist", data_dir=SHARED)
    assert ds.binarization == "dynamic"
    assert tuple(ds.split("train").shape) == (60000, 784) and tuple(ds.split("test").shape) == (10000, 784)
    x = ds.split("train")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    idx = torch.arange(200)
    a = ds.batch("train", idx, torch.Generator().manual_seed(3))
    b = ds.batch("train", idx, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    c1, c2 = ds.batch("train", idx, gen), ds.batch("train", idx, gen)
    assert torch.equal(a, b) and torch.equal(a, c1)  # seeded: repeatable
    assert not torch.equal(c1, c2)  # a fresh draw each time a minibatch is drawn
    assert set(torch.unique(a).tolist()) <= {0.0, 1.0}
    # E[draw] = pixel intensity: the mean of many draws matches within its standard error
    p = x[idx]
    draws = torch.stack([ds.batch("train", idx, gen) for _ in range(400)])
    se = (p * (1 - p) / 400).sqrt().clamp_min(1e-3)
    assert float(((draws.mean(0) - p).abs() / se).max()) < 6.0


@needs_shared
def test_fashion_checksum_mismatch_is_reported(tmp_path):
    d = tmp_path / "fashion_mnist"
    d.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(os.path.join(SHARED, "fashion-mnist", name), d / name)
    with open(d / "t10k-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CorruptDataError, match="t10k-images-idx3-ubyte.gz.*checksum mismatch"):
        load_dataset("fashion_mnist", data_dir=tmp_path)


@needs_shared
def test_frey_npz_and_mat_agree(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    ds = load_dataset("frey", data_dir=SHARED)
    assert ds.image_shape == (28, 20) and ds.likelihood == "gaussian" and ds.binarization == "none"
    assert [ds.split(s).shape[0] for s in ("train", "valid", "test")] == list(data.FREY_SPLIT)
    faces = np.load(os.path.join(SHARED, "frey_faces.npz"), allow_pickle=False)["faces"]
    scipy_io.savemat(tmp_path / "frey_rawface.mat", {"ff": faces.T})
    from_mat = load_dataset("frey", data_dir=tmp_path)
    for s in ("train", "valid", "test"):
        assert torch.equal(from_mat.split(s), ds.split(s))
    assert abs(float(ds.split("train").max()) - 238 / 255) < 1e-6


def test_omniglot_layout_and_validation_split(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    train = rng.random((1400, 28, 28))
    test = rng.random((10, 28, 28))
    # chardata.mat stores 784 x N arrays whose columns are images flattened column-major
    col = lambda imgs: imgs.transpose(0, 2, 1).reshape(len(imgs), 784).T  # noqa: E731
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": col(train), "testdata": col(test)})
    with pytest.raises(CorruptDataError, match="gitblob checksum mismatch"):
        load_dataset("omniglot", data_dir=tmp_path)
    monkeypatch.setattr(data, "_OMNIGLOT", data._File("chardata.mat", None, None))
    ds = load_dataset("omniglot", data_dir=tmp_path)
    assert ds.split("valid").shape[0] == data.OMNIGLOT_VALIDATION
    assert ds.split("train").shape[0] == 1400 - data.OMNIGLOT_VALIDATION
    np.testing.assert_allclose(ds.split("test").numpy(), test.reshape(10, 784).astype(np.float32))
    together = torch.cat([ds.split("train"), ds.split("valid")])
    assert torch.allclose(together.sum(), torch.tensor(train.sum(), dtype=torch.float32), rtol=1e-5)


def test_missing_file_names_it_and_the_directory(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", data_dir=tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "mnist") in msg and "download" in msg
    monkeypatch.setenv("IWAE_EXT_DATA", str(tmp_path / "env_root"))
    with pytest.raises(DatasetNotFoundError, match="env_root"):
        load_dataset("omniglot")


def test_download_verifies_checksum(tmp_path, monkeypatch):
    """download=True fetches the URL (file:// here, offline) into <root>/<name>/ and checks it."""
    images = np.random.default_rng(1).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for split in ("train", "test"):
        path = src / f"{split}.gz"
        _write_idx(path, images, True)
        files[split] = data._File(f"{split}-images.gz", path.as_uri(),
                                  ("sha256", hashlib.sha256(path.read_bytes()).hexdigest()))
    monkeypatch.setattr(data, "_MNIST", files)
    root = tmp_path / "root"
    ds = load_dataset("mnist", data_dir=root, download=True)
    assert (root / "mnist" / "train-images.gz").is_file()
    np.testing.assert_allclose(ds.split("test").numpy(), images.reshape(3, -1) / 255.0, rtol=1e-6)
    # a download whose checksum is wrong is rejected and leaves nothing behind
    bad = {s: data._File(f.name, f.url, ("sha256", "0" * 64)) for s, f in files.items()}
    monkeypatch.setattr(data, "_MNIST", bad)
    with pytest.raises(CorruptDataError, match="checksum mismatch"):
        load_dataset("mnist", data_dir=tmp_path / "root2", download=True)
    assert not any((tmp_path / "root2" / "mnist").iterdir())


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*binarized_mnist"):
        load_dataset("cifar")


def test_dataset_from_arrays_rejects_bad_input():
    good = np.random.default_rng(0).random((10, 4, 4))
    ds = Dataset.from_arrays("toy", good, good[:3])
    assert ds.image_shape == (4, 4) and ds.x_dim == 16
    nan = good.copy()
    nan[4, 1, 2] = np.nan
    with pytest.raises(ValueError, match="'train' has NaN.*row 4"):
        Dataset.from_arrays("toy", nan, good)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        Dataset.from_arrays("toy", good * 3, good)
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        Dataset("toy", {"train": torch.rand(5, 16), "test": torch.rand(5, 15)}, (4, 4))
    with pytest.raises(ValueError, match="statically binarized"):
        Dataset.from_arrays("toy", good, good, binarization="static")
    with pytest.raises(KeyError, match="no split 'valid'"):
        ds.split("valid")
