"""Bring your own model and data: what ``dfmu forget/compare --arch ... --weights ... --data ...`` load.

**Architecture** (:func:`load_arch`): ``"package.module:callable"`` (importable) or
``"path/to/file.py:callable"``; ``callable(**kwargs)`` must return an ``nn.Module``.

**Weights**: :func:`dfmu_ext.weights.load_state_dict_file` (``weights_only=True``; a bare state_dict
or a dict holding one under ``"state_dict"``), strictly matched to the architecture.

**Data** (:func:`load_data`), returned as ``(train_set, test_set, info)`` of ``TensorDataset``:

* a ``.pt`` file (``torch.save`` of a dict, read with ``weights_only=True``) or a ``.npz`` file with
  ``train_x``, ``train_y``, ``test_x``, ``test_y``: ``*_x`` floating point, ``(N, ...)`` with the same
  per-sample shape in both splits, fed to the model **exactly as given** (never re-normalised);
  ``*_y`` integer class ids ``(N,)`` in ``[0, num_classes)``. Optional ``class_names`` (a list of
  strings in a ``.pt``, a string array in a ``.npz``) sets the class count and names; otherwise
  the classes are ``0 .. max label``.
* an image folder tree ``ROOT/train/<class>/*.png`` and ``ROOT/test/<class>/*.png`` (also
  ``.jpg``/``.jpeg``/``.bmp``), read with Pillow as float32 in ``[0, 1]``, ``(N, C, H, W)`` with C = 1
  when every image is greyscale, else 3 (RGB); all images of one size. Classes are the sorted folder
  names of ``train/`` (id = position); ``normalize=(mean, std)`` then maps ``x -> (x - mean) / std``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..weights import WeightsError, check_finite, fit_state_dict, load_state_dict_file
from .data import DatasetInfo

__all__ = ["InputError", "DATA_KEYS", "IMAGE_EXTENSIONS", "load_arch", "parse_arch_kwargs", "load_model",
           "load_data", "parse_normalize", "check_model_fits_data"]

DATA_KEYS = ("train_x", "train_y", "test_x", "test_y")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


class InputError(ValueError):
    """A user-supplied architecture, weights or data set that cannot be used (one-line message)."""


# --------------------------------------------------------------------------------------------
# architecture and weights
# --------------------------------------------------------------------------------------------

def parse_arch_kwargs(text: str | None) -> dict:
    """``--arch-kwargs`` JSON -> dict (``{}`` when empty)."""
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"--arch-kwargs is not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(out, dict):
        raise InputError(f"--arch-kwargs must be a JSON object like '{{\"width\": 16}}', got {text!r}")
    return out


def load_arch(spec: str):
    """The callable named by ``"module:callable"`` or ``"file.py:callable"``."""
    mod_name, sep, attr = str(spec).rpartition(":")
    if not sep or not mod_name or not attr:
        raise InputError(f"--arch must be MODULE:CALLABLE or FILE.py:CALLABLE, got {spec!r}")
    if mod_name.endswith(".py"):
        if not os.path.isfile(mod_name):
            raise InputError(f"--arch file {mod_name!r} does not exist")
        name = "_dfmu_user_arch_" + os.path.splitext(os.path.basename(mod_name))[0]
        loader_spec = importlib.util.spec_from_file_location(name, mod_name)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        loader_spec.loader.exec_module(module)  # errors in the user's file keep their traceback
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                raise InputError(f"--arch module {mod_name!r} cannot be imported (not found on sys.path)") from None
            raise
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise InputError(f"--arch: {mod_name!r} has no callable {attr!r}")
    return fn


def build_arch(spec: str, kwargs: dict) -> nn.Module:
    """``callable(**kwargs)`` of ``spec``, checked to be an ``nn.Module``."""
    fn = load_arch(spec)
    try:
        model = fn(**kwargs)
    except TypeError as exc:
        if kwargs and "argument" in str(exc):
            raise InputError(f"--arch {spec} does not accept --arch-kwargs {kwargs}: {exc}") from None
        raise
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_model(spec: str, kwargs: dict, weights_path: str, device="cpu") -> tuple[nn.Module, dict]:
    """``(model with the weights loaded, state_dict)``; :class:`InputError` / ``WeightsError`` for bad input."""
    model = build_arch(spec, kwargs)
    state = load_state_dict_file(weights_path)
    check_finite(state, f"the weights in {weights_path!r}")
    fit_state_dict(model, state, f"the weights in {weights_path!r}")
    return model.to(device), state


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


def _class_names(blob: dict, path: str) -> list[str] | None:
    names = blob.get("class_names")
    if names is None:
        return None
    if isinstance(names, np.ndarray):
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or not names:
        raise InputError(f"{path!r}: class_names must be a non-empty list of strings")
    return [str(n) for n in names]


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
    return _finish(t["train_x"], t["train_y"], t["test_x"], t["test_y"], _class_names(blob, path),
                   os.path.splitext(os.path.basename(path))[0], os.path.abspath(path), path)


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
    if os.path.isdir(path):
        return _load_image_folder(path, normalize)
    if not os.path.isfile(path):
        raise InputError(f"data {path!r} does not exist")
    if not path.endswith((".pt", ".pth", ".npz")):
        raise InputError(f"--data must be a .pt or .npz file or an image folder, got {path!r}")
    return _load_tensor_file(path, normalize)


def check_model_fits_data(model: nn.Module, train_set: TensorDataset, info: DatasetInfo, device="cpu") -> None:
    """One forward pass of two training samples: the output must be ``(2, K)`` logits with K >= the
    data's class count. Raises :class:`InputError` otherwise."""
    x = train_set.tensors[0][:2].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError) as exc:  # shape/dtype mismatches surface as these
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"the model does not accept the data's inputs of shape {tuple(x.shape)}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise InputError(f"the model must return (N, classes) logits; on inputs {tuple(x.shape)} it returned "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if out.shape[1] < info.num_classes:
        raise InputError(f"the model has {out.shape[1]} outputs but the data has {info.num_classes} classes")


__all__ += ["WeightsError", "build_arch"]
