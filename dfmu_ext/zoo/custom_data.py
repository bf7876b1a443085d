"""Read a data set of your own: what ``dfmu forget/compare --data ...`` load (:mod:`dfmu_ext.zoo.custom`
loads the model; it re-exports :func:`load_data` and :func:`parse_normalize`).

**Data** (:func:`load_data`), returned as ``(train_set, test_set, info)``:

* a ``.pt`` file (``torch.save`` of a dict, read with ``weights_only=True``) or a ``.npz`` file with
  ``train_x``, ``train_y``, ``test_x``, ``test_y``: ``*_x`` floating point, ``(N, ...)`` with the same
  per-sample shape in both splits, fed to the model **exactly as given** (never re-normalised);
  ``*_y`` integer class ids ``(N,)`` in ``[0, num_classes)``. Optional ``class_names`` (a list of
  strings in a ``.pt``, a string array in a ``.npz``) sets the class count and names; otherwise
  the classes are ``0 .. max label``. Optional fine labels make sub-classes forgettable
  (``--forget-subclass``, as on the package's coarse-label sets): ``train_fine`` and ``test_fine``
  (integer ``(N,)``, one fine-class id per sample of each split, both or neither) and
  ``fine_names`` (like ``class_names``; otherwise ``0 .. max fine label``). Every fine class must
  lie inside one class (its samples share one label); it lands in ``info.fine``.
* an image folder tree ``ROOT/train/<class>/*.png`` and ``ROOT/test/<class>/*.png`` (also
  ``.jpg``/``.jpeg``/``.bmp``), read with Pillow as float32 in ``[0, 1]``, ``(N, C, H, W)`` with C = 1
  when every image is greyscale, else 3 (RGB); all images of one size. Classes are the sorted folder
  names of ``train/`` (id = position); ``normalize=(mean, std)`` then maps ``x -> (x - mean) / std``.
* a folder saved by Hugging Face ``datasets`` (``DatasetDict.save_to_disk``) with ``train`` and
  ``test`` splits: read with ``load_from_disk`` (``datasets`` must be installed) into dict samples
  (:class:`dfmu_ext.splits.DictDataset`), every column but the label (``label`` or ``labels``)
  passed to the model by name; every column must be numeric with one shape per sample (pad token
  ids to one length first). Class names come from the label column's ``ClassLabel`` names.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..model_io import DEFAULT_LABEL_KEYS
from ..splits import DictDataset
from .coarse import FineLabels
from .data import DatasetInfo

__all__ = ["InputError", "DATA_KEYS", "FINE_KEYS", "IMAGE_EXTENSIONS", "load_data", "parse_normalize"]

DATA_KEYS = ("train_x", "train_y", "test_x", "test_y")
#: Optional fine labels of a .pt/.npz file (both or neither), for forgetting a sub-class.
FINE_KEYS = ("train_fine", "test_fine")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class InputError(ValueError):
    """A user-supplied architecture, weights or data set that cannot be used (one-line message)."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def parse_normalize(text: str | None) -> tuple[list[float], list[float]] | None:
    """``"MEAN,STD"`` (every channel) or ``"M1,..,MC,S1,..,SC"`` -> (means, stds)."""
    if not text:
        return None
    try:
        vals = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--normalize must be MEAN,STD (numbers), got {text!r}") from None
    if len(vals) < 2 or len(vals) % 2:
        raise InputError(f"--normalize must be MEAN,STD or C means then C stds, got {text!r}")
    half = len(vals) // 2
    means, stds = vals[:half], vals[half:]
    if any(not np.isfinite(v) for v in vals) or any(s <= 0 for s in stds):
        raise InputError(f"--normalize needs finite means and positive stds, got {text!r}")
    return means, stds


def _as_tensor(value, key: str, path: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise InputError(f"{path!r}: {key} must be a tensor/array of numbers, got {type(value).__name__}"
                     + (f" of {value.dtype}" if isinstance(value, np.ndarray) else ""))


def _read_tensor_file(path: str) -> dict:
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                blob = {k: z[k] for k in z.files}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/format errors of many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path!r} is not a readable data file (truncated or corrupt?): {first}") from None
    if not isinstance(blob, dict):
        raise InputError(f"{path!r} must hold a dict with keys {', '.join(DATA_KEYS)}, got {type(blob).__name__}")
    return blob


def _class_names(blob: dict, path: str, key: str = "class_names") -> list[str] | None:
    names = blob.get(key)
    if names is None:
        return None
    if isinstance(names, np.ndarray):
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or not names:
        raise InputError(f"{path!r}: {key} must be a non-empty list of strings")
    return [str(n) for n in names]


def _fine_split(blob: dict, split: str, y: torch.Tensor, path: str) -> torch.Tensor:
    key = f"{split}_fine"
    f = _as_tensor(blob[key], key, path)
    if f.is_floating_point() or f.is_complex() or f.dtype == torch.bool:
        raise InputError(f"{path!r}: {key} must hold integer fine-class ids, got {f.dtype}")
    if f.dim() != 1 or f.shape[0] != y.shape[0]:
        raise InputError(f"{path!r}: {key} must be ({y.shape[0]},) to match {split}_y, got shape {tuple(f.shape)}")
    return f.long()


def _fine_labels(blob: dict, train_y: torch.Tensor, test_y: torch.Tensor, path: str) -> FineLabels | None:
    """``train_fine``/``test_fine``/``fine_names`` checked against the class labels (None when absent).
    A fine class's coarse class is the one label its samples share; unused fine ids get -1."""
    given = [k for k in FINE_KEYS if k in blob]
    if len(given) == 1:
        other = FINE_KEYS[1 - FINE_KEYS.index(given[0])]
        raise InputError(f"{path!r}: {given[0]} needs {other} too (fine labels for both splits, or neither)")
    if not given:
        if "fine_names" in blob:
            raise InputError(f"{path!r}: fine_names needs train_fine and test_fine (the fine label of every sample)")
        return None
    train_f, test_f = _fine_split(blob, "train", train_y, path), _fine_split(blob, "test", test_y, path)
    names = _class_names(blob, path, "fine_names")
    both_f, both_y = torch.cat([train_f, test_f]), torch.cat([train_y.long(), test_y.long()])
    low, top = int(both_f.min()), int(both_f.max())
    count = len(names) if names is not None else top + 1
    if low < 0 or top >= count:
        raise InputError(f"{path!r}: fine labels must lie in [0, {count}), found {low}..{top}")
    names = names or [str(i) for i in range(count)]
    coarse_of = [-1] * count
    for f, c in torch.unique(torch.stack([both_f, both_y], 1), dim=0).tolist():
        if coarse_of[f] != -1:
            raise InputError(f"{path!r}: fine class {names[f]!r} has samples labelled {coarse_of[f]} and {c}: "
                             "every fine class must lie inside one class")
        coarse_of[f] = c
    return FineLabels(train_f, test_f, tuple(names), tuple(coarse_of))


def _check_split(x: torch.Tensor, y: torch.Tensor, split: str, path: str) -> torch.Tensor:
    if not x.is_floating_point():
        raise InputError(f"{path!r}: {split}_x must be floating point (it is fed to the model as given), "
                         f"got {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"{path!r}: {split}_x must be (N, ...) with N > 0 samples, got shape {tuple(x.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"{path!r}: {split}_y must hold integer class ids, got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"{path!r}: {split}_y must be ({x.shape[0]},) to match {split}_x, got shape "
                         f"{tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{path!r}: {split}_x holds NaN or Inf values")
    return y.long()


def _finish(train_x, train_y, test_x, test_y, names, name: str, source: str, path: str,
            mean=(), std=()) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    train_y = _check_split(train_x, train_y, "train", path)
    test_y = _check_split(test_x, test_y, "test", path)
    if tuple(train_x.shape[1:]) != tuple(test_x.shape[1:]):
        raise InputError(f"{path!r}: train_x samples are {tuple(train_x.shape[1:])} but test_x samples are "
                         f"{tuple(test_x.shape[1:])}")
    top = int(max(train_y.max(), test_y.max()))
    low = int(min(train_y.min(), test_y.min()))
    num_classes = len(names) if names is not None else top + 1
    if low < 0 or top >= num_classes:
        raise InputError(f"{path!r}: labels must lie in [0, {num_classes}), found {low}..{top}")
    names = names or [str(i) for i in range(num_classes)]
    shape = tuple(train_x.shape[1:])
    info = DatasetInfo(name, num_classes, int(shape[0]) if len(shape) >= 2 else 1,
                       tuple(int(s) for s in shape[1:]) if len(shape) >= 2 else tuple(int(s) for s in shape),
                       tuple(names), source, tuple(mean), tuple(std))
    return TensorDataset(train_x.contiguous(), train_y), TensorDataset(test_x.contiguous(), test_y), info


def _load_tensor_file(path: str, normalize) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    if normalize is not None:
        raise InputError("--normalize applies to image folders only: tensors in a .pt/.npz file are fed to the "
                         "model exactly as given")
    blob = _read_tensor_file(path)
    missing = [k for k in DATA_KEYS if k not in blob]
    if missing:
        found = ", ".join(sorted(map(str, blob))) or "nothing"
        raise InputError(f"{path!r} lacks {', '.join(missing)} (needs {', '.join(DATA_KEYS)}; found {found})")
    t = {k: _as_tensor(blob[k], k, path) for k in DATA_KEYS}
    train_set, test_set, info = _finish(t["train_x"], t["train_y"], t["test_x"], t["test_y"],
                                        _class_names(blob, path), os.path.splitext(os.path.basename(path))[0],
                                        os.path.abspath(path), path)
    fine = _fine_labels(blob, train_set.tensors[1], test_set.tensors[1], path)
    if fine is not None:
        info = dataclasses.replace(info, fine=fine)
    return train_set, test_set, info


def _image_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def _load_image_folder(root: str, normalize) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    from PIL import Image, UnidentifiedImageError

    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise InputError(f"image folder {root!r} lacks {split}/ (expected {root}/train/<class>/*.png and "
                             f"{root}/test/<class>/*.png)")
    names = sorted(d for d in os.listdir(os.path.join(root, "train")) if os.path.isdir(os.path.join(root, "train", d)))
    if len(names) < 2:
        raise InputError(f"{os.path.join(root, 'train')!r} must hold one folder per class (at least 2), "
                         f"found {len(names)}")
    extra = sorted(set(d for d in os.listdir(os.path.join(root, "test"))
                       if os.path.isdir(os.path.join(root, "test", d))) - set(names))
    if extra:
        raise InputError(f"{root!r}: test/ has classes that train/ lacks: {', '.join(extra[:3])}")
    files = {s: [] for s in ("train", "test")}
    for split in files:
        for cid, cname in enumerate(names):
            folder = os.path.join(root, split, cname)
            if os.path.isdir(folder):
                files[split] += [(f, cid) for f in _image_files(folder)]
        if not files[split]:
            raise InputError(f"{os.path.join(root, split)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    images = {}
    grey = True
    for split, items in files.items():
        images[split] = []
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    im.load()
                    grey = grey and im.mode in ("1", "L", "I", "I;16", "F")
                    images[split].append(im.copy())
            except (OSError, UnidentifiedImageError) as exc:
                raise InputError(f"cannot read image {f!r}: {exc}") from None
    mode = "L" if grey else "RGB"
    arrays = {}
    size = None
    for split, ims in images.items():
        out = []
        for (f, _), im in zip(files[split], ims):
            if size is None:
                size = im.size
            elif im.size != size:
                raise InputError(f"images must all have one size: {f!r} is {im.size[0]}x{im.size[1]}, others "
                                 f"{size[0]}x{size[1]}")
            a = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
            out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        arrays[split] = torch.from_numpy(np.stack(out))
    channels = arrays["train"].shape[1]
    mean, std = (), ()
    if normalize is not None:
        m, s = normalize
        if len(m) == 1:
            m, s = m * channels, s * channels
        if len(m) != channels:
            raise InputError(f"--normalize gives {len(m)} means for images with {channels} channel(s)")
        mt, st = torch.tensor(m).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1)
        arrays = {k: (v - mt) / st for k, v in arrays.items()}
        mean, std = tuple(m), tuple(s)
    labels = {k: torch.tensor([c for _, c in files[k]], dtype=torch.long) for k in files}
    return _finish(arrays["train"], labels["train"], arrays["test"], labels["test"], names,
                   os.path.basename(os.path.abspath(root)), os.path.abspath(root), root, mean, std)


def load_data(path: str, normalize: tuple[Sequence[float], Sequence[float]] | None = None
              ) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """``(train_set, test_set, info)`` from a ``.pt``/``.npz`` file or an image folder tree (see the
    module docstring). Raises :class:`InputError` with a one-line reason for unusable data."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "dataset_dict.json")):
        if normalize is not None:
            raise InputError("--normalize applies to image folders only, not to a saved datasets folder")
        return _load_hf_disk(path)
    if os.path.isdir(path):
        return _load_image_folder(path, normalize)
    if not os.path.isfile(path):
        raise InputError(f"data {path!r} does not exist")
    if not path.endswith((".pt", ".pth", ".npz")):
        raise InputError(f"--data must be a .pt or .npz file or an image folder, got {path!r}")
    return _load_tensor_file(path, normalize)


def _hf_split(split, path: str, name: str) -> tuple[DictDataset, list[str] | None]:
    label_key = next((k for k in DEFAULT_LABEL_KEYS if k in split.column_names), None)
    if label_key is None:
        raise InputError(f"{path!r}: the {name} split has no label column ({' or '.join(DEFAULT_LABEL_KEYS)}; "
                         f"columns: {', '.join(split.column_names)})")
    names = getattr(split.features[label_key], "names", None)
    try:
        table = split.with_format("torch")[:]  # every column at once; ragged ones come back as lists
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path!r}: the {name} split cannot be read as tensors: {str(exc).splitlines()[0]}") from None
    columns = {}
    for col, values in table.items():
        if col == label_key:
            continue
        if not isinstance(values, torch.Tensor):
            raise InputError(f"{path!r}: column {col!r} of the {name} split is not numeric with one shape per sample "
                             "(pad token ids to one length)")
        columns[col] = values
    return DictDataset(columns, table[label_key], label_key), names


def _load_hf_disk(path: str):
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path!r} is a saved Hugging Face datasets folder: pip install 'dfmu_ext[hf]'") from None
    try:
        saved = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise InputError(f"{path!r} cannot be read by datasets.load_from_disk: {str(exc).splitlines()[0]}") from None
    missing = [s for s in ("train", "test") if s not in saved]
    if missing:
        raise InputError(f"{path!r} has no {' and '.join(missing)} split (it has: {', '.join(saved)})")
    train, names = _hf_split(saved["train"], path, "train")
    test, _ = _hf_split(saved["test"], path, "test")
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"{path!r}: the train and test splits must not be empty")
    k = int(max(train.targets.max(), test.targets.max())) + 1
    if int(min(train.targets.min(), test.targets.min())) < 0:
        raise InputError(f"{path!r}: labels must be class ids >= 0")
    names = list(names) if names else [str(c) for c in range(k)]
    first = next(iter(train.columns.values()))
    info = DatasetInfo(name=os.path.basename(os.path.normpath(path)), num_classes=max(k, len(names)),
                       in_channels=1, image_size=tuple(first.shape[1:3]) or (1, 1), class_names=tuple(names),
                       source=f"datasets.load_from_disk({path!r})")
    return train, test, info
