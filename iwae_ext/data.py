"""Data sets of the papers, offline first, with checksums and clear errors.

``load_dataset(name, data_dir=None, download=False)`` returns a :class:`Dataset`: float32
splits of shape [N, D] with values in [0, 1], the image shape, and how the data is binarised:

==================== ============ ============================================================
name                 binarization source (``data_dir``, then the places listed)
==================== ============ ============================================================
binarized_mnist      static       bundled with the package (Larochelle & Murray's fixed
                                  binarisation; 50,000 / 10,000 / 10,000); the default
binarized_mnist_amat static       the original ``binarized_mnist_{train,valid,test}.amat``
mnist                dynamic      MNIST IDX files (gzip or raw), 60,000 / 10,000
fashion_mnist        dynamic      Fashion-MNIST IDX files, also /usr/share/datasets/fashion-mnist
omniglot             dynamic      ``chardata.mat`` of the IWAE paper (24,345 / 8,070; 1,345 of
                                  the training images held out for validation)
frey                 none         ``frey_faces.npz`` or ``frey_rawface.mat`` (1,965 faces of
                                  28x20, grey levels / 255; split 1,565 / 200 / 200, seeded)
==================== ============ ============================================================

"dynamic" binarisation draws a fresh Bernoulli(pixel) image every time a minibatch is drawn
(:meth:`Dataset.batch` with a ``torch.Generator``), the protocol of the IWAE paper.

The data root is ``data_dir``, else the environment variable ``IWAE_EXT_DATA``, else
``~/.cache/iwae_ext``; a data set's files are looked for in ``<root>/<name>/`` (also with - for _) and ``<root>/``.
Offline, a missing file raises :class:`DatasetNotFoundError` naming the file, the directory to
put it in and its URL; ``download=True`` fetches the original URL and verifies the checksum.
A file whose checksum or structure is wrong raises :class:`CorruptDataError`. Nothing is ever
unpickled: NumPy archives load with ``allow_pickle=False``, MATLAB files with scipy.io.loadmat.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset", "DataError", "DatasetNotFoundError", "CorruptDataError", "DATASETS",
    "load_dataset", "data_root", "read_idx", "read_amat",
]

# name -> (binarization, likelihood the data suits)
DATASETS = {
    "binarized_mnist": ("static", "bernoulli"),
    "binarized_mnist_amat": ("static", "bernoulli"),
    "mnist": ("dynamic", "bernoulli"),
    "fashion_mnist": ("dynamic", "bernoulli"),
    "omniglot": ("dynamic", "bernoulli"),
    "frey": ("none", "gaussian"),
}


class DataError(Exception):
    """A data set could not be loaded."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data file is missing (and was not downloaded)."""


class CorruptDataError(DataError, ValueError):
    """A data file's checksum or structure is wrong."""


@dataclass(frozen=True)
class _File:
    name: str
    url: str | None
    digest: tuple[str, str] | None = None  # (algorithm, hex digest): sha256, md5 or gitblob


def _catalog(base_url: str, algorithm: str, files: dict) -> dict:
    """{split: _File} from {split: (file name, digest)}, all under one URL and one algorithm."""
    return {split: _File(name, base_url + name, (algorithm, digest)) for split, (name, digest) in files.items()}


_BUNDLED_BMNIST_SHA256 = "7a049ae3a0d88e964af4b41bbdb14e4303595e1c5de65f8bd2455cdcebb3514b"
_AMAT = _catalog("http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/", "sha256", {
    "train": ("binarized_mnist_train.amat", "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"),
    "valid": ("binarized_mnist_valid.amat", "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"),
    "test": ("binarized_mnist_test.amat", "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"),
})
_MNIST = _catalog("https://ossci-datasets.s3.amazonaws.com/mnist/", "md5", {
    "train": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "test": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
})
_FASHION = _catalog("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "sha256", {
    "train": ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    "test": ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
})
_OMNIGLOT = _File("chardata.mat",
                  "https://github.com/yburda/iwae/raw/master/datasets/OMNIGLOT/chardata.mat",
                  ("gitblob", "016a3536ffe5e1d38e42563a18d7a78bfaf643ec"))
_FREY_NPZ = _File("frey_faces.npz", None,
                  ("sha256", "1c58fcb13050c85ee5d82af2775551de2559542826981e3dc5f535c3a7ca910a"))
_FREY_MAT = _File("frey_rawface.mat", "http://www.cs.nyu.edu/~roweis/data/frey_rawface.mat")
_EXTRA_DIRS = {"fashion_mnist": ["/usr/share/datasets/fashion-mnist"]}
OMNIGLOT_VALIDATION = 1345  # held out of the training images, seeded permutation (seed 123)
FREY_SPLIT = (1565, 200, 200)  # train / valid / test, seeded permutation (seed 0)


@dataclass
class Dataset:
    """Splits of one data set: float32 tensors [N, D] with values in [0, 1].

    ``binarization``: "static" (the stored values are 0/1), "dynamic" (every draw is a fresh
    Bernoulli(pixel) sample) or "none" (continuous data, e.g. Frey Face).
    """

    name: str
    splits: dict[str, Tensor]
    image_shape: tuple[int, ...]
    binarization: str = "none"
    likelihood: str = "bernoulli"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.binarization not in ("static", "dynamic", "none"):
            raise ValueError(f"Dataset: binarization must be static, dynamic or none, "
                             f"got {self.binarization!r}")
        if "train" not in self.splits or "test" not in self.splits:
            raise ValueError(f"Dataset {self.name!r}: splits must include 'train' and 'test', "
                             f"got {sorted(self.splits)}")
        dim = int(np.prod(self.image_shape))
        for split, x in self.splits.items():
            if not isinstance(x, Tensor):
                raise TypeError(f"Dataset {self.name!r}: split {split!r} must be a torch.Tensor, "
                                f"got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != dim:
                raise ValueError(f"Dataset {self.name!r}: split {split!r} must have shape [N, {dim}] "
                                  f"(image shape {tuple(self.image_shape)}), got {tuple(x.shape)}")
            if x.shape[0] == 0:
                raise ValueError(f"Dataset {self.name!r}: split {split!r} is empty")
            if not x.is_floating_point():
                raise TypeError(f"Dataset {self.name!r}: split {split!r} must be floating point, "
                                f"got {x.dtype}")
            if not torch.isfinite(x).all():
                bad = int((~torch.isfinite(x)).any(1).nonzero()[0])
                raise ValueError(f"Dataset {self.name!r}: split {split!r} has NaN or infinite "
                                  f"values (first in row {bad})")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ValueError(f"Dataset {self.name!r}: split {split!r} must have values in "
                                  f"[0, 1], got [{lo}, {hi}]")
            if self.binarization == "static" and not ((x == 0) | (x == 1)).all():
                raise ValueError(f"Dataset {self.name!r}: split {split!r} is declared statically "
                                  f"binarized but has values other than 0 and 1")

    @classmethod
    def from_arrays(cls, name: str, train, test, valid=None, image_shape=None,
                    binarization: str = "none", likelihood: str = "bernoulli") -> "Dataset":
        """A Dataset from arrays of shape [N, D] or [N, H, W] with values in [0, 1]."""
        splits = {}
        for split, a in (("train", train), ("valid", valid), ("test", test)):
            if a is None:
                continue
            t = torch.as_tensor(np.asarray(a) if not isinstance(a, Tensor) else a)
            if t.dim() == 3:
                image_shape = image_shape or tuple(t.shape[1:])
                t = t.reshape(t.shape[0], -1)
            splits[split] = t.to(torch.float32)
        if image_shape is None:
            image_shape = (splits["train"].shape[-1],) if "train" in splits else ()
        return cls(name, splits, tuple(image_shape), binarization, likelihood)

    @property
    def x_dim(self) -> int:
        return int(np.prod(self.image_shape))

    def split(self, split: str) -> Tensor:
        if split not in self.splits:
            raise KeyError(f"Dataset {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]

    def batch(self, split: str, index: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Rows ``index`` of a split; binarised with a fresh Bernoulli draw when dynamic."""
        x = self.split(split)[index]
        if self.binarization == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x

    def mean(self, split: str = "train") -> Tensor:
        """Per-pixel mean of a split (for the decoder's output bias)."""
        return self.split(split).mean(0)

    def __repr__(self):
        sizes = ", ".join(f"{k} {v.shape[0]}" for k, v in self.splits.items())
        return (f"Dataset({self.name!r}: {sizes}; image {tuple(self.image_shape)}, "
                f"binarization {self.binarization})")


def data_root(data_dir: str | os.PathLike | None = None) -> str:
    """The data root: ``data_dir``, else $IWAE_EXT_DATA, else ~/.cache/iwae_ext."""
    root = data_dir or os.environ.get("IWAE_EXT_DATA") or os.path.join("~", ".cache", "iwae_ext")
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def load_dataset(name: str = "binarized_mnist", data_dir=None, download: bool = False) -> Dataset:
    """Load a data set by name (see the module docstring for names and sources)."""
    key = name.lower().replace("-", "_")
    loaders = {
        "binarized_mnist": _load_bundled_bmnist,
        "binarized_mnist_amat": _load_amat_bmnist,
        "mnist": lambda d, dl: _load_idx_dataset("mnist", _MNIST, d, dl),
        "fashion_mnist": lambda d, dl: _load_idx_dataset("fashion_mnist", _FASHION, d, dl),
        "omniglot": _load_omniglot,
        "frey": _load_frey,
    }
    if key not in loaders:
        raise ValueError(f"load_dataset: unknown data set {name!r}; choose one of {sorted(loaders)}")
    return loaders[key](data_dir, download)


# ---------------------------------------------------------------------------- files


def _digest(path: str, algorithm: str) -> str:
    if algorithm == "gitblob":
        h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: str, spec: _File):
    if spec.digest is None:
        return
    algorithm, want = spec.digest
    got = _digest(path, algorithm)
    if got != want:
        raise CorruptDataError(
            f"{path}: {algorithm} checksum mismatch (expected {want}, got {got}); the file is "
            f"corrupt or truncated: delete it and place a fresh copy there"
            + (f" (or download it from {spec.url})" if spec.url else ""))


def _download(spec: _File, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, spec.name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=spec.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        _verify(tmp, spec)
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"downloading {spec.url} to {path} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _find(name: str, spec: _File, data_dir, download: bool, alternatives=()) -> str:
    """Path of a data file: looked for in <root>/<name>/, <root>/ and extra places."""
    root = data_root(data_dir)
    dirs = [os.path.join(root, name)]
    if "_" in name:  # fashion_mnist also as fashion-mnist, the name Debian and upstream use
        dirs.append(os.path.join(root, name.replace("_", "-")))
    dirs += [root] + _EXTRA_DIRS.get(name, [])
    for d in dirs:
        for candidate in (spec.name,) + tuple(alternatives):
            path = os.path.join(d, candidate)
            if os.path.isfile(path):
                return path
    if download:
        if spec.url is None:
            raise DatasetNotFoundError(f"{spec.name} has no download URL; place it in {dirs[0]}")
        return _download(spec, dirs[0])
    where = f" (URL: {spec.url}; or pass download=True / --download)" if spec.url else ""
    raise DatasetNotFoundError(
        f"data set {name!r}: file {spec.name} not found; put it in {dirs[0]}{where}. "
        f"The data root is set by data_dir / --data-dir or the environment variable IWAE_EXT_DATA; "
        f"looked in: {', '.join(dirs)}")


def _load_npz(path: str) -> dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # OSError, ValueError, zipfile.BadZipFile, EOFError
        raise CorruptDataError(f"{path}: not a readable NumPy archive ({type(e).__name__}: {e})") from e


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format; gzip-compressed or raw) as a uint8 array [N, rows, cols]."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CorruptDataError(f"{path}: cannot be read as {'gzip' if opener is gzip.open else 'IDX'} "
                               f"({e}); the file is corrupt or truncated") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptDataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise CorruptDataError(f"{path}: IDX element type {dtype_code:#x} is not unsigned byte (0x08)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise CorruptDataError(f"{path}: IDX header says {shape} = {size} bytes of data, the file has "
                               f"{len(raw) - header}; the file is corrupt or truncated")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_amat(path: str, dim: int = 784) -> np.ndarray:
    """A binarized-MNIST ``.amat`` text file (one image of 0/1 values per line) as uint8 [N, dim]."""
    try:
        with open(path, "rb") as f:
            values = np.array(f.read().split(), dtype=np.uint8)
    except ValueError as e:
        raise CorruptDataError(f"{path}: not an .amat file of 0/1 values ({e})") from e
    if values.size % dim:
        raise CorruptDataError(f"{path}: {values.size} values is not a whole number of {dim}-pixel "
                               f"images; the file is corrupt or truncated")
    if values.max(initial=0) > 1:
        raise CorruptDataError(f"{path}: values other than 0 and 1")
    return values.reshape(-1, dim)


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _loadmat(path: str) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy is in the 'data' extra
        raise DataError(f"reading {path} needs scipy: pip install scipy") from e
    try:
        return loadmat(path)
    except Exception as e:  # scipy raises several types for bad files
        raise CorruptDataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e


def _to_float(a: np.ndarray, scale: float = 1.0) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / np.float32(scale))


# ---------------------------------------------------------------------------- loaders


def _load_bundled_bmnist(data_dir, download) -> Dataset:
    ref = resources.files("iwae_ext") / "_data" / "binarized_mnist.npz"
    with resources.as_file(ref) as path:
        path = str(path)
        if not os.path.isfile(path):
            raise DatasetNotFoundError(f"the bundled {path} is missing: reinstall iwae_ext")
        _verify(path, _File("binarized_mnist.npz", None, ("sha256", _BUNDLED_BMNIST_SHA256)))
        arrays = _load_npz(path)
    splits = {k: _to_float(arrays[k]) for k in ("train", "valid", "test")}
    return Dataset("binarized_mnist", splits, (28, 28), "static", "bernoulli",
                   {"source": "bundled binarized_mnist.npz (Larochelle & Murray 2011)"})


def _load_amat_bmnist(data_dir, download) -> Dataset:
    splits, paths = {}, []
    for split, spec in _AMAT.items():
        path = _find("binarized_mnist", spec, data_dir, download)
        _verify(path, spec)
        splits[split] = _to_float(read_amat(path))
        paths.append(path)
    return Dataset("binarized_mnist_amat", splits, (28, 28), "static", "bernoulli", {"files": paths})


def _load_idx_dataset(name: str, files: dict, data_dir, download) -> Dataset:
    splits, paths = {}, []
    for split, spec in files.items():
        raw_name = spec.name[:-3]  # an uncompressed copy (checked structurally only)
        path = _find(name, spec, data_dir, download, alternatives=(raw_name,))
        if os.path.basename(path) == spec.name:
            _verify(path, spec)
        images = read_idx(path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise CorruptDataError(f"{path}: expected images of 28x28, got shape {images.shape}")
        splits[split] = _to_float(images.reshape(len(images), -1), 255.0)
        paths.append(path)
    return Dataset(name, splits, (28, 28), "dynamic", "bernoulli", {"files": paths})


def _load_omniglot(data_dir, download) -> Dataset:
    path = _find("omniglot", _OMNIGLOT, data_dir, download)
    _verify(path, _OMNIGLOT)
    mat = _loadmat(path)
    for key in ("data", "testdata"):
        if key not in mat or mat[key].ndim != 2 or mat[key].shape[0] != 784:
            raise CorruptDataError(f"{path}: expected a 784 x N array {key!r}")

    def images(a):  # stored column-major: transpose each 28x28 image to row-major
        return a.T.reshape(-1, 28, 28).reshape(-1, 784, order="F")

    train, test = images(mat["data"]), images(mat["testdata"])
    perm = np.random.RandomState(123).permutation(len(train))
    valid_idx, train_idx = perm[:OMNIGLOT_VALIDATION], perm[OMNIGLOT_VALIDATION:]
    splits = {"train": _to_float(train[train_idx]), "valid": _to_float(train[valid_idx]),
              "test": _to_float(test)}
    return Dataset("omniglot", splits, (28, 28), "dynamic", "bernoulli", {"files": [path]})


def _load_frey(data_dir, download) -> Dataset:
    try:
        path = _find("frey", _FREY_NPZ, data_dir, False)
        _verify(path, _FREY_NPZ)
        faces = _load_npz(path).get("faces")
        if faces is None:
            raise CorruptDataError(f"{path}: no array 'faces'")
    except DatasetNotFoundError:
        path = _find("frey", _FREY_MAT, data_dir, download)
        ff = _loadmat(path).get("ff")
        if ff is None:
            raise CorruptDataError(f"{path}: no array 'ff'")
        faces = ff.T
    if faces.shape != (1965, 560):
        raise CorruptDataError(f"{path}: expected 1965 faces of 560 pixels, got {faces.shape}")
    perm = np.random.RandomState(0).permutation(len(faces))
    n_train, n_valid, _ = FREY_SPLIT
    x = _to_float(faces, 255.0)
    splits = {"train": x[perm[:n_train]], "valid": x[perm[n_train:n_train + n_valid]],
              "test": x[perm[n_train + n_valid:]]}
    return Dataset("frey", splits, (28, 20), "none", "gaussian", {"files": [path]})
