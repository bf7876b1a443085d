"""Coarse-label data sets, for forgetting a sub-class (a kind of thing inside a class).

A model is trained on the coarse labels; a deletion request names one *fine* class inside a coarse
class (Sneaker inside footwear). ``DatasetInfo.fine`` keeps the fine labels, their names and the
coarse class of each, so the sub-class's samples can be found.

* ``fashion-mnist-coarse``: Fashion-MNIST's ten classes in five groups —
  tops = {T-shirt/top, Pullover, Coat, Shirt}, bottoms = {Trouser}, dress = {Dress},
  footwear = {Sandal, Sneaker, Ankle boot}, bag = {Bag}. Siblings look alike, so a model retrained
  without one fine class still gives it its coarse label: a *sanity check* (nothing should change),
  not a test of forgetting.
* ``fashion-mnist-mixed3`` and ``fashion-mnist-mixed2``: groupings built the way CIFAR-20's
  superclasses are, whose siblings do not look alike — every look-alike pair (T-shirt/Shirt,
  Pullover/Coat, Sandal/Sneaker, Sneaker/Ankle boot) is split across coarse classes. A model retrained
  without a fine class gives it the coarse label of its look-alikes, far from the original's
  (measured in benchmarks/RESULTS.md): these scenarios can fail.
* ``cifar20``: CIFAR-100's 100 fine classes under its 20 superclasses (SSD's CIFAR-20 setting),
  read from the "CIFAR-100 python version" files (``cifar-100-python/{train,test,meta}``) found in
  ``root``, ``$DFMU_DATA`` or ``~/.cache/dfmu``; nothing is downloaded.
"""
from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .sources import (FASHION_MNIST_CLASSES, ArrayUnpickler, DatasetInfo, install_hint, load_fashion_mnist,
                      normalise_splits, pickle_dir_candidates)

__all__ = ["FineLabels", "FASHION_MNIST_COARSE", "FASHION_MNIST_MIXED", "FASHION_MNIST_GROUPINGS", "load_fashion_mnist_coarse", "load_cifar20", "find_cifar100",
           "subclass_indices"]

#: coarse class name -> the Fashion-MNIST classes it holds.
FASHION_MNIST_COARSE = {"tops": (0, 2, 4, 6), "bottoms": (1,), "dress": (3,), "footwear": (5, 7, 9), "bag": (8,)}

#: Groupings whose siblings do not look alike (coarse name -> fine Fashion-MNIST classes).
FASHION_MNIST_MIXED = {
    "fashion-mnist-mixed3": {"tshirt-pullover-sandal-bag": (0, 2, 5, 8), "shirt-coat-sneaker-trouser": (6, 4, 7, 1),
                             "dress-boot": (3, 9)},
    "fashion-mnist-mixed2": {"tshirt-trouser-coat-sneaker-bag": (0, 1, 4, 7, 8),
                             "pullover-dress-sandal-shirt-boot": (2, 3, 5, 6, 9)},
}
#: Every coarse-label grouping of Fashion-MNIST, by data set name.
FASHION_MNIST_GROUPINGS = {"fashion-mnist-coarse": FASHION_MNIST_COARSE, **FASHION_MNIST_MIXED}

_CIFAR100_DIRNAME = "cifar-100-python"


@dataclass(frozen=True)
class FineLabels:
    """The fine labels behind a coarse-label data set."""

    train: torch.Tensor             # (N_train,) int64 fine label per training sample
    test: torch.Tensor              # (N_test,) int64 fine label per test sample
    names: tuple[str, ...]          # fine class names
    coarse_of: tuple[int, ...]      # coarse class of each fine class


def subclass_indices(info: DatasetInfo, fine: int | str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train indices, test indices, coarse class) of the fine class ``fine`` (an id or a name)."""
    fl = info.fine
    if fl is None:
        raise ValueError(f"{info.name} has no sub-classes: use a coarse-label data set "
                         "(fashion-mnist-mixed3, cifar20, ...) or data of your own with train_fine and test_fine")
    if isinstance(fine, str) and not fine.strip().lstrip("-").isdigit():
        lookup = {n.lower(): i for i, n in enumerate(fl.names)}
        if fine.strip().lower() not in lookup:
            raise ValueError(f"unknown sub-class {fine!r}; choose one of {', '.join(fl.names)}")
        fine = lookup[fine.strip().lower()]
    fine = int(fine)
    if not 0 <= fine < len(fl.names):
        raise ValueError(f"sub-class id {fine} is outside [0, {len(fl.names)})")
    return (torch.nonzero(fl.train == fine).flatten(), torch.nonzero(fl.test == fine).flatten(),
            fl.coarse_of[fine])


def load_fashion_mnist_coarse(root=None, download_hint: bool = True, grouping: str = "fashion-mnist-coarse"):
    """Fashion-MNIST under the coarse labels of ``grouping`` (a key of :data:`FASHION_MNIST_GROUPINGS`:
    the look-alike groups of :data:`FASHION_MNIST_COARSE`, or a mixed grouping)."""
    if grouping not in FASHION_MNIST_GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(FASHION_MNIST_GROUPINGS)}")
    groups = FASHION_MNIST_GROUPINGS[grouping]
    train, test, info = load_fashion_mnist(root, download_hint)
    coarse_of = [0] * 10
    for c, (_, members) in enumerate(groups.items()):
        for f in members:
            coarse_of[f] = c
    table = torch.tensor(coarse_of)
    fine = FineLabels(train.tensors[1], test.tensors[1], FASHION_MNIST_CLASSES, tuple(coarse_of))
    coarse_info = DatasetInfo(grouping, len(groups), info.in_channels, info.image_size,
                              tuple(groups), info.source, info.mean, info.std, fine=fine)
    return (TensorDataset(train.tensors[0], table[train.tensors[1]]),
            TensorDataset(test.tensors[0], table[test.tensors[1]]), coarse_info)


def _cifar100_candidates(root) -> list[Path]:
    return pickle_dir_candidates(root, _CIFAR100_DIRNAME)


def find_cifar100(root=None) -> Path | None:
    """The first directory in the search order holding CIFAR-100's train, test and meta files."""
    for d in _cifar100_candidates(root):
        if all((d / n).is_file() for n in ("train", "test", "meta")):
            return d
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a CIFAR-100 python file ({exc})") from exc
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict")
    return d


def _split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if not {b"data", b"fine_labels", b"coarse_labels"} <= set(d):
        raise ValueError(f"{path}: expected keys b'data', b'fine_labels' and b'coarse_labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
    coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or not data.shape[0] == fine.size == coarse.size:
        raise ValueError(f"{path}: data shape {data.shape} with {fine.size} labels, expected (N, 3072) and N labels")
    if fine.size and (fine.min() < 0 or fine.max() > 99 or coarse.min() < 0 or coarse.max() > 19):
        raise ValueError(f"{path}: labels outside 0..99 (fine) or 0..19 (coarse)")
    return data, fine, coarse


@functools.lru_cache(maxsize=1)
def _load_cifar100_dir(directory: str):
    d = Path(directory)
    tr, tr_f, tr_c = _split(d / "train")
    te, te_f, te_c = _split(d / "test")
    meta = _unpickle(d / "meta")
    fine_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"fine_label_names", []))
    coarse_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"coarse_label_names", []))
    if len(fine_names) != 100 or len(coarse_names) != 20:
        fine_names, coarse_names = tuple(map(str, range(100))), tuple(map(str, range(20)))
    coarse_of = [0] * 100
    for f, c in zip(tr_f.tolist(), tr_c.tolist()):
        coarse_of[f] = c
    tr_x = torch.from_numpy(tr.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    te_x = torch.from_numpy(te.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    tr_x, te_x, mean, std = normalise_splits(tr_x, te_x)
    return (tr_x, torch.from_numpy(tr_c), te_x, torch.from_numpy(te_c), torch.from_numpy(tr_f),
            torch.from_numpy(te_f), mean, std, fine_names, coarse_names, tuple(coarse_of))


def load_cifar20(root=None, download_hint: bool = True):
    """CIFAR-100 under its 20 coarse labels, the fine labels kept in ``info.fine``."""
    d = find_cifar100(root)
    if d is None:
        searched = ", ".join(str(p) for p in _cifar100_candidates(root))
        raise FileNotFoundError(
            f"CIFAR-100 not found: no directory holds its train, test and meta files. Searched: {searched}."
            + install_hint(["To get it: download and unpack the 'CIFAR-100 python version' archive "
                     "(cifar-100-python.tar.gz) on a machine with network access,",
                     f"then pass root=<folder> or put {_CIFAR100_DIRNAME}/ in $DFMU_DATA."], download_hint))
    tr_x, tr_y, te_x, te_y, tr_f, te_f, mean, std, fine_names, coarse_names, coarse_of = \
        _load_cifar100_dir(str(d.resolve()))
    info = DatasetInfo("cifar20", 20, 3, (32, 32), coarse_names, str(d), tuple(mean), tuple(std),
                       fine=FineLabels(tr_f, te_f, fine_names, coarse_of))
    return TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), info
