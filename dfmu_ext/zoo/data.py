"""The data sets by name: ``load_dataset("fashion-mnist" | "cifar10" | "digits" |
"fashion-mnist-6k" | "fashion-mnist-coarse" | "fashion-mnist-mixed3" | "fashion-mnist-mixed2" | "cifar20" |
"topics")`` -> ``(train, test, info)``, the names, aliases, the default, and the default model of each.

Image sets are loaded into memory as normalised float32 ``TensorDataset``s (the readers are in
:mod:`.sources`, the coarse-label sets in :mod:`.coarse`), so the pipeline indexes tensors directly.
``topics`` (:mod:`.text`) is generated: token-id dict samples, ``{"input_ids", "attention_mask",
"labels"}``, the text classification task the zoo's transformer is trained on.
Nothing downloads: a missing data set fails with a message that says how to install it.
"""
from __future__ import annotations

import os

from torch.utils.data import TensorDataset

from . import coarse, text
from .sources import (DatasetInfo, find_cifar10, find_fashion_mnist, load_cifar10, load_digits,
                      load_fashion_mnist, load_fashion_mnist_6k, read_idx)

__all__ = [
    "DatasetInfo",
    "DATASET_NAMES",
    "load_dataset",
    "available_datasets",
    "default_dataset",
    "default_model",
    "TOKEN_DATASETS",
    "find_fashion_mnist",
    "find_cifar10",
    "read_idx",
    "canonical_name",
]

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "cifar10", "digits", "fashion-mnist-6k", "fashion-mnist-coarse",
                                  "fashion-mnist-mixed3", "fashion-mnist-mixed2", "cifar20", "topics")

#: Data sets of token ids (dict samples), whose default model is the transformer.
TOKEN_DATASETS = ("topics",)

_ALIASES = {
    "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10",
    "digits": "digits",
    "fashion-mnist-6k": "fashion-mnist-6k", "fmnist-6k": "fashion-mnist-6k",
    "fashion-mnist-mixed3": "fashion-mnist-mixed3", "fmnist-mixed3": "fashion-mnist-mixed3",
    "fashion-mnist-mixed2": "fashion-mnist-mixed2", "fmnist-mixed2": "fashion-mnist-mixed2",
    "fashion-mnist-coarse": "fashion-mnist-coarse", "fmnist-coarse": "fashion-mnist-coarse",
    "cifar20": "cifar20", "cifar-20": "cifar20",
    "topics": "topics", "text": "topics",
}


def canonical_name(name: str) -> str:
    """A data set name or alias ("FMNIST", "cifar-10", ...) -> one of ``DATASET_NAMES``; "auto" ->
    :func:`default_dataset`."""
    if name.strip().lower() == "auto":
        return default_dataset()
    key = name.strip().lower().replace("_", "-")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _ALIASES[key]


def load_dataset(name: str, root: str | os.PathLike | None = None,
                 download_hint: bool = True) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Load ``name`` (one of ``DATASET_NAMES``) as ``(train, test, info)``; the coarse-label sets
    ("fashion-mnist-coarse", "fashion-mnist-mixed3", "fashion-mnist-mixed2", "cifar20") come from
    :mod:`.coarse`; "fashion-mnist-6k" is a fixed 6,000-image subset (the memorisation scenario's).

    Inputs are float32 ``(N, C, H, W)`` normalised with the train split's per-channel mean/std;
    labels are int64. ``root`` names the folder to read (no fallback to other locations when
    given); otherwise ``$DFMU_DATA`` and the standard locations are searched. ``download_hint``
    adds installation instructions to the error raised when the files are absent or corrupt.

    Parsed tensors are cached per process and shared between calls: treat them as read-only.
    """
    key = canonical_name(name)
    if key == "fashion-mnist":
        return load_fashion_mnist(root, download_hint)
    if key == "cifar10":
        return load_cifar10(root, download_hint)
    if key in coarse.FASHION_MNIST_GROUPINGS:
        return coarse.load_fashion_mnist_coarse(root, download_hint, grouping=key)
    if key == "cifar20":
        return coarse.load_cifar20(root, download_hint)
    if key == "fashion-mnist-6k":
        return load_fashion_mnist_6k(root, download_hint)
    if key == "topics":
        return text.load_topics()
    return load_digits()


def available_datasets() -> list[str]:
    """Names of the data sets that can be loaded right now (files found; digits always)."""
    out = []
    if find_fashion_mnist() is not None:
        out.append("fashion-mnist")
    if find_cifar10() is not None:
        out.append("cifar10")
    out.append("digits")
    out.append("topics")
    return out


def default_dataset() -> str:
    """"fashion-mnist" when its files are present, else the always-available "digits"."""
    return "fashion-mnist" if find_fashion_mnist() is not None else "digits"


def default_model(dataset: str | None) -> str:
    """The zoo model a data set is trained with by default: "transformer" for token data sets, else "cnn"."""
    return "transformer" if dataset is not None and canonical_name(dataset) in TOKEN_DATASETS else "cnn"
