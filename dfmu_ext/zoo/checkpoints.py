"""Checkpoints of the package's models, and the cache of trained originals.

A checkpoint is ``{"format": CKPT_FORMAT, "meta": {...}, "state_dict": {...}}`` with plain types
only, so it loads with ``torch.load(..., weights_only=True)``; ``meta`` says how to rebuild the
model (name, keywords, classes, input shape) and how it was trained. Files are written atomically.

The cache of originals: the model a comparison or the demo unlearns from is trained once per
(dataset, model, device type, seed, epochs) and kept in ``$DFMU_CACHE`` (default
``~/.cache/dfmu``) as ``{dataset}-{model}-{device}-seed{seed}[-e{epochs}].pt`` (``-e{epochs}`` only
when ``--epochs`` overrides the recipe), e.g. ``digits-mlp-cpu-seed0.pt``. Every process and user
pointing at the same folder shares those files. Concurrent use is safe: the file is written
atomically, and :func:`cached_original` holds an exclusive ``fcntl.flock`` on ``<file>.lock`` while it
checks, trains and writes, so when two processes need the same original one trains it and the
other waits, then reads it. Delete a file (or the folder) to retrain.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os

import torch
from torch import nn

from .._io import atomic_write_bytes
from ..weights import WeightsError, check_finite, fit_state_dict
from . import data as data_mod
from ..training.classifier import TrainConfig, train_model
from .models import build_model, default_train_config

__all__ = ["CKPT_FORMAT", "CheckpointError", "save_checkpoint", "read_checkpoint", "load_checkpoint", "cache_dir", "cache_path",
           "train_original", "cached_original", "original_meta"]

CKPT_FORMAT = "dfmu_ext.checkpoint.v1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def save_checkpoint(path: str, model: nn.Module, meta: dict) -> None:
    """Atomically write the weights plus ``meta`` (plain types only, so it loads with ``weights_only=True``)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CKPT_FORMAT, "meta": meta, "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str, build, what: str = "model") -> tuple[nn.Module, dict]:
    """``(model on the CPU, meta)`` from a checkpoint of :func:`save_checkpoint`, the model made by
    ``build(meta)`` and the weights fitted strictly; :class:`CheckpointError` (one line) for a missing,
    truncated, corrupt or foreign file, a meta ``build`` cannot use, or weights that do not fit."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises zip, pickle and unpickling errors of many kinds
        raise CheckpointError(f"{path!r} is not a readable checkpoint (truncated or corrupt?): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path!r} is not a dfmu checkpoint (written by `dfmu train`)")
    meta = blob["meta"]
    state = blob.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path!r} is a damaged dfmu checkpoint (no meta or no state_dict of tensors)")
    try:
        model = build(meta)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path!r}: its metadata names no {what} this package can build: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        check_finite(state, f"the weights in {path!r}")
        fit_state_dict(model, state, f"{path!r}: the weights")
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    return model, meta


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``(model on device, meta)`` from a checkpoint written by :func:`save_checkpoint` for a
    package model (:func:`read_checkpoint`'s errors)."""
    def build(meta: dict) -> nn.Module:
        if meta.get("kind") == "causal-lm":
            raise ValueError("it holds a causal language model (use --task lm, or zoo.lm_training.load_causal_lm)")
        return build_model(meta["model"], meta["in_channels"], meta["num_classes"], tuple(meta["image_size"]),
                           **meta.get("model_kwargs", {}))

    model, meta = read_checkpoint(path, build)
    return model.to(device), meta


def cache_dir() -> str:
    """``$DFMU_CACHE``, default ``~/.cache/dfmu``."""
    return os.path.expanduser(os.environ.get("DFMU_CACHE", "~/.cache/dfmu"))


def cache_path(dataset: str, model_name: str, device: torch.device, seed: int, epochs: int | None = None) -> str:
    """Where the original for these settings is cached (a non-default recipe gets its own name)."""
    suffix = f"-e{epochs}" if epochs else ""
    return os.path.join(cache_dir(), f"{dataset}-{model_name}-{torch.device(device).type}-seed{seed}{suffix}.pt")


def original_meta(model_name: str, info: data_mod.DatasetInfo, seed: int, config: TrainConfig,
                  train_seconds: float) -> dict:
    """The checkpoint meta of an original trained with ``config`` on the data set ``info`` describes."""
    return {"model": model_name, "model_kwargs": dict(config.model_kwargs), "dataset": info.name,
            "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size),
            "seed": seed, "train_seconds": train_seconds, "train_config": config.to_dict()}


def train_original(dataset: str, model_name: str, device: torch.device, seed: int, *, epochs: int | None = None,
                   progress: bool = False, log=None) -> tuple[nn.Module, dict]:
    """Train ``model_name`` on ``dataset`` with the package recipe (``epochs`` overrides its epochs)."""
    train_set, _, info = data_mod.load_dataset(dataset)
    config = default_train_config(model_name, device.type, dataset=info.name)
    if epochs:
        config.epochs = int(epochs)
    torch.manual_seed(seed)
    model = build_model(model_name, info.in_channels, info.num_classes, info.image_size,
                        **config.model_kwargs).to(device)
    if log is not None:
        log(f"training {model_name} on {info.name} ({len(train_set)} samples, {config.epochs} epochs, {device})")
    hist = train_model(model, train_set, config, device=device, seed=seed, progress=progress)
    return model, original_meta(model_name, info, seed, config, hist["total_seconds"])


def cached_original(dataset: str, model_name: str, device: torch.device, seed: int, *, epochs: int | None = None,
                    use_cache: bool = True, progress: bool = False, log=None) -> tuple[nn.Module, dict]:
    """The original for these settings: read from the cache, else trained (and cached when ``use_cache``).

    The cache file is :func:`cache_path`; ``<file>.lock`` serialises processes that need the same
    original (one trains, the others wait and then read it)."""
    path = cache_path(dataset, model_name, device, seed, epochs)
    if not use_cache:
        return train_original(dataset, model_name, device, seed, epochs=epochs, progress=progress, log=log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _file_lock(path + ".lock", log, path):
        return _cached_original_locked(path, dataset, model_name, device, seed, epochs, progress, log)


@contextlib.contextmanager
def _file_lock(lock_path: str, log, what: str):
    """An exclusive ``flock`` on ``lock_path`` (created if missing; never deleted, so every process
    locks the same inode). Waits for another holder, saying so once."""
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting for another process to finish {what} ...")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _cached_original_locked(path, dataset, model_name, device, seed, epochs, progress, log):
    if os.path.isfile(path):
        model, meta = load_checkpoint(path, device)
        if meta.get("dataset") == data_mod.canonical_name(dataset) and meta.get("model") == model_name:
            if log is not None:
                log(f"seed {seed}: using the cached original model {path}")
            return model, meta
    model, meta = train_original(dataset, model_name, device, seed, epochs=epochs, progress=progress, log=log)
    save_checkpoint(path, model, meta)
    if log is not None:
        log(f"cached the original model at {path}")
    return model, meta
