"""Tests for dfmu_ext.data: digits split, Fashion-MNIST IDX parsing and errors, CIFAR-10 pickles."""
from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dfmu_ext.zoo import data, sources
from dfmu_ext.zoo.data import DatasetInfo, available_datasets, default_dataset, load_dataset, read_idx

FMNIST_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> Path:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


# ---------------------------------------------------------------- digits

def test_digits_shapes_split_and_normalisation():
    train, test, info = load_dataset("digits")
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert xtr.shape == (1437, 1, 8, 8) and xte.shape == (360, 1, 8, 8)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.int64 and yte.dtype == torch.int64
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    counts = torch.bincount(yte, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class
    assert abs(xtr.mean().item()) < 1e-4 and abs(xtr.std().item() - 1) < 1e-2
    assert info == DatasetInfo("digits", 10, 1, (8, 8), tuple(str(i) for i in range(10)),
                               info.source, info.mean, info.std)
    assert len(info.class_names) == info.num_classes


def test_digits_split_is_fixed_and_disjoint():
    (tr1, te1, _), (tr2, te2, _) = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(tr1.tensors[0], tr2.tensors[0]) and torch.equal(te1.tensors[1], te2.tensors[1])
    # no test image appears in the training split
    a = {tuple(r) for r in tr1.tensors[0].flatten(1).tolist()}
    dup = sum(tuple(r) in a for r in te1.tensors[0].flatten(1).tolist())
    assert dup < 5  # digits has a handful of exact duplicate images across the whole set


def test_info_is_frozen_and_names_normalised():
    _, _, info = load_dataset("DIGITS")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- Fashion-MNIST

@pytest.mark.skipif(data.find_fashion_mnist() is None, reason="Fashion-MNIST files not installed")
def test_fashion_mnist_real_files():
    train, test, info = load_dataset("fashion-mnist")
    assert train.tensors[0].shape == (60000, 1, 28, 28) and test.tensors[0].shape == (10000, 1, 28, 28)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10
    assert torch.bincount(test.tensors[1]).tolist() == [1000] * 10
    assert info.num_classes == 10 and info.in_channels == 1 and info.image_size == (28, 28)
    assert info.class_names[0] == "T-shirt/top" and os.path.isdir(info.source)
    assert abs(info.mean[0] - 0.2860) < 1e-3 and abs(info.std[0] - 0.3530) < 1e-3
    # second call hits the in-process cache: same tensors, no re-parse
    train2, _, _ = load_dataset("fashion-mnist", root=info.source)
    assert train2.tensors[0] is train.tensors[0]


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    p = _write_idx(tmp_path / "x-idx3-ubyte", imgs, compress=compress)
    np.testing.assert_array_equal(read_idx(p, 2051), imgs)
    labels = np.arange(7, dtype=np.uint8)
    q = _write_idx(tmp_path / "y-idx1-ubyte", labels, compress=compress)
    np.testing.assert_array_equal(read_idx(q, 2049), labels)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    p = _write_idx(tmp_path / "a", np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(p, 2049)
    raw = gzip.decompress(p.read_bytes())
    q = tmp_path / "b"
    q.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="payload"):
        read_idx(q, 2051)
    g = tmp_path / "c.gz"
    g.write_bytes(p.read_bytes()[:20])  # truncated gzip stream
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(g, 2051)


def test_fashion_mnist_missing_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", root=tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "DFMU_DATA" in msg and str(tmp_path) in msg
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", root=tmp_path, download_hint=False)
    assert "apt-get" not in str(e.value)


def test_fashion_mnist_corrupt_files(tmp_path):
    for stem in FMNIST_STEMS:
        (tmp_path / (stem + ".gz")).write_bytes(b"not a gzip file")
    with pytest.raises(ValueError, match="corrupt"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_wrong_sizes(tmp_path):
    for stem in FMNIST_STEMS:
        if "images" in stem:
            _write_idx(tmp_path / stem, np.zeros((10, 28, 28), np.uint8))
        else:
            _write_idx(tmp_path / stem, np.zeros((10,), np.uint8))
    with pytest.raises(ValueError, match="expected \\(60000, 28, 28\\)"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_fashion_mnist_env_dir_searched_first(tmp_path, monkeypatch):
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    for stem in FMNIST_STEMS:
        (sub / (stem + ".gz")).write_bytes(b"garbage")
    monkeypatch.setenv("DFMU_DATA", str(tmp_path))
    assert data.find_fashion_mnist() == sub
    with pytest.raises(ValueError, match=str(sub)):
        load_dataset("fashion-mnist")


def test_default_dataset_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.delenv("DFMU_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sources, "_FMNIST_SYSTEM_DIR", str(tmp_path / "absent"))
    assert default_dataset() == "digits"
    assert available_datasets() == ["digits", "topics"]  # both are generated or bundled: always there


# ---------------------------------------------------------------- CIFAR-10

def _write_cifar(folder: Path, n_per_batch: int = 6, n_test: int = 4, meta: bool = True) -> np.ndarray:
    """A tiny folder in the 'CIFAR-10 python version' layout; returns all train rows."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, 6):
        d = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        rows.append(d)
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"data": d,
                 b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
                 b"filenames": [b"x.png"] * n_per_batch}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=2)
    test = {b"data": rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8),
            b"labels": list(range(n_test))}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f, protocol=2)
    if meta:
        names = [f"class{i}".encode() for i in range(10)]
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({b"label_names": names, b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(rows)


def test_cifar_synthetic_folder(tmp_path):
    rows = _write_cifar(tmp_path / "cifar-10-batches-py")
    train, test, info = load_dataset("cifar10", root=tmp_path)  # parent folder is accepted too
    x, y = train.tensors
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert test.tensors[0].shape == (4, 3, 32, 32) and test.tensors[1].tolist() == [0, 1, 2, 3]
    assert info.in_channels == 3 and info.image_size == (32, 32) and info.num_classes == 10
    assert info.class_names[3] == "class3"
    # channel-major rows: undoing the normalisation gives back row[c*1024 + h*32 + w] / 255
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    raw = torch.from_numpy(rows.reshape(-1, 3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(x * std + mean, raw, atol=1e-5, rtol=0)


def test_cifar_env_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMU_DATA", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="cifar-10-python"):
        load_dataset("cifar10")
    _write_cifar(tmp_path / "cifar-10-batches-py", meta=False)
    train, _, info = load_dataset("cifar-10")
    assert len(train) == 30 and info.class_names[0] == "airplane"
    assert "cifar10" in available_datasets()


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(folder)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        load_dataset("cifar10", root=folder)
    assert not marker.exists()
