"""Weights as files: a deterministic hash of a state_dict, loading a state_dict file safely, and
fitting it to a model with a readable diff.

**The weights hash** (:func:`state_dict_sha256`, format ``"state_dict-sha256-v1"``) is the SHA-256 of,
for every entry of the state_dict in sorted key order::

    key (UTF-8) 0x00  dtype (e.g. "torch.float32") 0x00  shape (e.g. "64,1,3,3"; "" for a scalar) 0x00
    number of data bytes (decimal) 0x00  the raw element bytes (C-contiguous, little-endian)

It depends only on names, dtypes, shapes and values — not on the file's container (a bare
state_dict, a ``{"state_dict": ...}`` checkpoint and a ``dfmu`` checkpoint of the same weights
hash alike), the device, or the pickling. Every entry must be a tensor.

A Hugging Face ``save_pretrained`` folder (or a ``.safetensors`` file) is read as the tensors its
``*.safetensors`` files hold (all shards together; :func:`safetensors_state_dict`): its hash is over
the saved tensors, equal to the loaded model's ``state_dict`` hash when no weights are tied.
"""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Mapping

import torch
from torch import nn

__all__ = ["HASH_FORMAT", "WeightsError", "state_dict_sha256", "load_state_dict_file", "fit_state_dict",
           "check_finite", "safetensors_state_dict"]

HASH_FORMAT = "state_dict-sha256-v1"


class WeightsError(ValueError):
    """A weights file that is missing, unreadable, foreign, non-finite or does not fit the model."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    data = raw.numpy().tobytes()
    if sys.byteorder == "big" and t.element_size() > 1:  # pragma: no cover - little-endian everywhere we run
        import numpy as np
        data = np.frombuffer(data, dtype=f">u{t.element_size()}").astype(f"<u{t.element_size()}").tobytes()
    return data


def state_dict_sha256(weights) -> str:
    """The hex SHA-256 of a state_dict (or of ``module.state_dict()``), defined in the module docstring."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    if not isinstance(state, Mapping):
        raise TypeError(f"expected an nn.Module or a state_dict, got {type(state).__name__}")
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor")
        data = _tensor_bytes(t)
        head = "\0".join([str(key), str(t.dtype), ",".join(str(s) for s in t.shape), str(len(data))]) + "\0"
        h.update(head.encode("utf-8"))
        h.update(data)
    return h.hexdigest()


def safetensors_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of every ``*.safetensors`` file of a folder (the
    shards of a ``save_pretrained`` folder), as one ``{name: tensor}`` dict on the CPU. Raises
    :class:`WeightsError` for a folder without one, an unreadable file or a name in two shards."""
    from safetensors.torch import load_file

    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise WeightsError(f"{path!r} holds no .safetensors weights (a save_pretrained folder has model.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(f, device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"{f!r} is not a readable .safetensors file: {first}") from None
        twice = sorted(set(part) & set(state))
        if twice:
            raise WeightsError(f"{path!r}: tensor {twice[0]!r} is stored in two .safetensors files")
        state.update(part)
    return state


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``, loaded with ``weights_only=True``: a bare ``{name: tensor}`` dict or
    a checkpoint dict holding one under ``"state_dict"`` (as ``dfmu train`` writes); a ``.safetensors``
    file or a folder of them (:func:`safetensors_state_dict`). Raises :class:`WeightsError` with a
    one-line reason for a missing, truncated, corrupt or foreign file."""
    if os.path.isdir(path) or (os.path.isfile(path) and path.endswith(".safetensors")):
        return safetensors_state_dict(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol note: the error below says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and unpickling errors of many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path!r} is not a readable weights file (truncated, corrupt, or not saved "
                           f"with torch.save of tensors only?): {first}") from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not blob:
        raise WeightsError(f"{path!r} holds no state_dict (expected {{name: tensor}} or a dict with a "
                           f"'state_dict' entry, got {type(blob).__name__})")
    bad = [k for k, v in blob.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path!r} is not a state_dict: entries {bad[:3]} are not named tensors")
    return blob


def check_finite(state: Mapping[str, torch.Tensor], where: str = "the weights") -> None:
    """Raise :class:`WeightsError` naming the first tensors holding NaN or Inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{where} hold NaN or Inf values in {len(bad)} tensor(s), e.g. {', '.join(bad[:3])}")


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "the weights") -> None:
    """Load ``state`` into ``model`` with strict key matching; on a mismatch raise :class:`WeightsError`
    saying which keys are missing, unexpected and of the wrong shape (a few of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
        if shape:
            parts.append(f"{len(shape)} of the wrong shape: {_few(shape)}")
        raise WeightsError(f"{where} do not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
