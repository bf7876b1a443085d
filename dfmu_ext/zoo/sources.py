"""Readers of the data sets' files (Fashion-MNIST IDX, CIFAR pickles, scikit-learn's digits) into
normalised float32 ``TensorDataset`` splits, and :class:`DatasetInfo`. :mod:`.data` is the entry
point (``load_dataset``); nothing here downloads."""
from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_DIRNAME = "cifar-10-batches-py"

@dataclass(frozen=True)
class DatasetInfo:
    """What downstream code needs to know about a loaded data set without touching its tensors.

    ``mean``/``std`` are the per-channel statistics used for normalisation (kept so that a report
    can show images, or a user can normalise new inputs the same way).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    class_names: tuple[str, ...]
    source: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    fine: object = None  # coarse-label data sets: the fine labels behind them (zoo.coarse.FineLabels)


def normalise_splits(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                      tuple[float, ...], tuple[float, ...]]:
    """Normalise both splits with the train split's per-channel mean/std (float64 accumulation)."""
    dims = (0, 2, 3)
    mean = train_x.to(torch.float64).mean(dims)
    std = train_x.to(torch.float64).std(dims).clamp_min(1e-6)
    m = mean.to(torch.float32).view(1, -1, 1, 1)
    s = std.to(torch.float32).view(1, -1, 1, 1)
    return ((train_x - m) / s).contiguous(), ((test_x - m) / s).contiguous(), \
        tuple(mean.tolist()), tuple(std.tolist())


def install_hint(lines: list[str], download_hint: bool) -> str:
    return ("\n" + "\n".join(lines)) if download_hint else ""


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

def read_idx(path: str | os.PathLike, expect_magic: int) -> np.ndarray:
    """Parse one IDX file (gzip or raw) into a uint8 array.

    The format is a big-endian magic number (2049 for label vectors, 2051 for image tensors; the
    low byte is the number of dimensions) followed by one big-endian uint32 per dimension and the
    raw bytes. Raises ``ValueError`` on a wrong magic number or a truncated/corrupt file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:  # truncated or not gzip at all
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short to be an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expect_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expect_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, header says {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fashion_candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        # An explicit root is a statement of intent: never silently fall back to other copies.
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs = []
    env = os.environ.get("DFMU_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += [Path(_FMNIST_SYSTEM_DIR), Path.home() / ".cache" / "dfmu" / "fashion-mnist"]
    return dirs


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The first directory in the search order that holds all four IDX files, else None."""
    for d in _fashion_candidates(root):
        if all(_idx_file(d, stem) is not None for stem in _FMNIST_FILES.values()):
            return d
    return None


@functools.lru_cache(maxsize=4)
def _load_fashion_dir(directory: str) -> tuple[torch.Tensor, ...]:
    """Parse + normalise once per process: gunzip and parsing 70k images takes about a second."""
    d = Path(directory)
    arrays = {}
    for key, stem in _FMNIST_FILES.items():
        p = _idx_file(d, stem)
        if p is None:  # removed between find and load
            raise FileNotFoundError(f"{d / (stem + '.gz')} is missing")
        arrays[key] = read_idx(p, 2051 if key.endswith("images") else 2049)
    for split, n in (("train", 60000), ("test", 10000)):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if imgs.shape != (n, 28, 28):
            raise ValueError(f"{d}: {split} images have shape {imgs.shape}, expected ({n}, 28, 28)")
        if labels.shape != (n,):
            raise ValueError(f"{d}: {split} labels have shape {labels.shape}, expected ({n},)")
        if labels.max() > 9:
            raise ValueError(f"{d}: {split} labels contain {int(labels.max())}, expected 0..9")
    tr_x = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255.0).unsqueeze(1)
    te_x = torch.from_numpy(arrays["test_images"].astype(np.float32) / 255.0).unsqueeze(1)
    tr_x, te_x, mean, std = normalise_splits(tr_x, te_x)
    tr_y = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    te_y = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    return tr_x, tr_y, te_x, te_y, torch.tensor(mean), torch.tensor(std)


def load_fashion_mnist(root, download_hint: bool):
    d = find_fashion_mnist(root)
    if d is None:
        searched = ", ".join(str(p) for p in _fashion_candidates(root))
        raise FileNotFoundError(
            "Fashion-MNIST not found: no directory holds all four files "
            f"({', '.join(s + '.gz' for s in _FMNIST_FILES.values())}). Searched: {searched}."
            + install_hint(["To get it: `sudo apt-get install dataset-fashion-mnist` (installs them under "
                     f"{_FMNIST_SYSTEM_DIR}),",
                     "or put the four files in $DFMU_DATA (or $DFMU_DATA/fashion-mnist), or pass root=.",
                     "Offline alternative: dataset 'digits' (scikit-learn, always available)."],
                    download_hint))
    try:
        tr_x, tr_y, te_x, te_y, mean, std = _load_fashion_dir(str(d.resolve()))
    except ValueError as exc:
        raise ValueError(f"Fashion-MNIST files in {d} are corrupt: {exc}"
                         + install_hint(["Reinstall with `sudo apt-get install --reinstall dataset-fashion-mnist` "
                                  "or replace the four files in $DFMU_DATA."], download_hint)) from exc
    info = DatasetInfo("fashion-mnist", 10, 1, (28, 28), FASHION_MNIST_CLASSES, str(d),
                       tuple(mean.tolist()), tuple(std.tolist()))
    return TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), info


#: Samples per class of ``fashion-mnist-6k``.
FASHION_MNIST_6K_PER_CLASS = 600


def load_fashion_mnist_6k(root=None, download_hint: bool = True):
    """A fixed class-stratified 6,000-image subset of Fashion-MNIST's training split (600 per class,
    the same for every seed) and the whole test split: small enough that the CNN recipe for it
    (:func:`dfmu_ext.zoo.models.default_train_config`) memorises its training samples, so that a
    model retrained without a random share of them really differs from the original on that share."""
    train, test, info = load_fashion_mnist(root, download_hint)
    x, y = train.tensors
    gen = torch.Generator().manual_seed(6000)
    keep = []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        keep.append(members[torch.randperm(members.numel(), generator=gen)[:FASHION_MNIST_6K_PER_CLASS]])
    keep = torch.sort(torch.cat(keep)).values
    sub = DatasetInfo("fashion-mnist-6k", 10, 1, (28, 28), FASHION_MNIST_CLASSES, info.source, info.mean, info.std)
    return TensorDataset(x[keep], y[keep]), test, sub


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------

class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: a data folder must not be able to run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy>=2 moved it
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(d, dict) or b"data" not in d or not (b"labels" in d or b"fine_labels" in d):
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: data shape {data.shape} / {labels.shape[0]} labels, "
                         "expected (N, 3072) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    return data, labels


def pickle_dir_candidates(root, dirname: str) -> list[Path]:
    """Where a data set shipped as a folder of python pickles (``dirname``, e.g. cifar-10-batches-py)
    is looked for: ``root`` (and ``root/dirname``) when given, no fallback; else ``$DFMU_DATA/dirname``,
    ``$DFMU_DATA`` and ``~/.cache/dfmu/dirname``."""
    if root is not None:
        return [Path(root), Path(root) / dirname]
    dirs = []
    env = os.environ.get("DFMU_DATA")
    if env:
        dirs += [Path(env) / dirname, Path(env)]
    dirs.append(Path.home() / ".cache" / "dfmu" / dirname)
    return dirs


def _cifar_candidates(root) -> list[Path]:
    return pickle_dir_candidates(root, _CIFAR_DIRNAME)


def find_cifar10(root: str | os.PathLike | None = None) -> Path | None:
    """The first directory in the search order holding data_batch_1..5 and test_batch, else None."""
    for d in _cifar_candidates(root):
        if all((d / n).is_file() for n in (*_CIFAR_TRAIN, _CIFAR_TEST)):
            return d
    return None


@functools.lru_cache(maxsize=2)
def _load_cifar_dir(directory: str) -> tuple[torch.Tensor, ...]:
    d = Path(directory)
    parts = [_read_cifar_batch(d / n) for n in _CIFAR_TRAIN]
    tr_data = np.concatenate([p[0] for p in parts])
    tr_lab = np.concatenate([p[1] for p in parts])
    te_data, te_lab = _read_cifar_batch(d / _CIFAR_TEST)
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), so a plain reshape gives NCHW.
    tr_x = torch.from_numpy(tr_data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    te_x = torch.from_numpy(te_data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    tr_x, te_x, mean, std = normalise_splits(tr_x, te_x)
    names = CIFAR10_CLASSES
    meta = d / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                m = ArrayUnpickler(f, encoding="bytes").load()
            got = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in m[b"label_names"])
            if len(got) == 10:
                names = got
        except Exception:  # the names are cosmetic; a bad meta file must not block loading
            pass
    return (tr_x, torch.from_numpy(tr_lab), te_x, torch.from_numpy(te_lab),
            torch.tensor(mean), torch.tensor(std), names)


def load_cifar10(root, download_hint: bool):
    d = find_cifar10(root)
    if d is None:
        searched = ", ".join(str(p) for p in _cifar_candidates(root))
        raise FileNotFoundError(
            f"CIFAR-10 not found: no directory holds {', '.join(_CIFAR_TRAIN)} and {_CIFAR_TEST}. "
            f"Searched: {searched}."
            + install_hint(["To get it: download and unpack the 'CIFAR-10 python version' archive "
                     "(cifar-10-python.tar.gz) on a machine with network access,",
                     f"then pass root=<folder> or put {_CIFAR_DIRNAME}/ in $DFMU_DATA."], download_hint))
    tr_x, tr_y, te_x, te_y, mean, std, names = _load_cifar_dir(str(d.resolve()))
    info = DatasetInfo("cifar10", 10, 3, (32, 32), tuple(names), str(d),
                       tuple(mean.tolist()), tuple(std.tolist()))
    return TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), info


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _load_digits_tensors() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    # Fixed, stratified split so that every run and every test sees the same 1437/360 partition.
    tr_idx, te_idx = train_test_split(idx, test_size=360, stratify=y, random_state=0)
    tr_idx, te_idx = np.sort(tr_idx), np.sort(te_idx)
    tr_x = torch.from_numpy(x[tr_idx]).reshape(-1, 1, 8, 8)
    te_x = torch.from_numpy(x[te_idx]).reshape(-1, 1, 8, 8)
    tr_x, te_x, mean, std = normalise_splits(tr_x, te_x)
    return (tr_x, torch.from_numpy(y[tr_idx]), te_x, torch.from_numpy(y[te_idx]),
            torch.tensor(mean), torch.tensor(std))


def load_digits():
    tr_x, tr_y, te_x, te_y, mean, std = _load_digits_tensors()
    info = DatasetInfo("digits", 10, 1, (8, 8), tuple(str(i) for i in range(10)),
                       "sklearn.datasets.load_digits", tuple(mean.tolist()), tuple(std.tolist()))
    return TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), info


# --------------------------------------------------------------------------------------------
# public entry points
# --------------------------------------------------------------------------------------------
