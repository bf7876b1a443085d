"""Bring your own model and data: what ``dfmu forget/compare --arch ... --weights ... --data ...`` load.

**Architecture** (:func:`load_arch`): ``"package.module:callable"`` (importable) or
``"path/to/file.py:callable"``; ``callable(**kwargs)`` must return an ``nn.Module``.

**Weights**: :func:`dfmu_ext.weights.load_state_dict_file` (``weights_only=True``; a bare state_dict
or a dict holding one under ``"state_dict"``), strictly matched to the architecture.

**A Hugging Face model** (:func:`hf_from_config`, the CLI's ``--hf-config PATH``): a
``transformers`` config (a ``config.json`` or the folder holding it), built with random weights by
the class its ``architectures`` names (else ``AutoModelForSequenceClassification``, then
``AutoModelForImageClassification``); the weights then come from ``--weights`` as for any model.

**Data** (:func:`load_data`): read by :mod:`dfmu_ext.zoo.custom_data` (the formats are described
there); ``load_data`` and ``parse_normalize`` stay importable from here.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import torch
from torch import nn

from ..model_io import adapted, as_pairs
from ..splits import take_batch
from ..weights import WeightsError, check_finite, fit_state_dict, load_state_dict_file
from .custom_data import InputError, load_data, parse_normalize  # noqa: F401  (docs and tests use custom.load_data)
from .data import DatasetInfo

__all__ = ["InputError", "load_arch", "parse_arch_kwargs", "load_model", "load_data", "parse_normalize",
           "check_model_fits_data", "hf_from_config"]


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


def hf_from_config(config: str) -> nn.Module:
    """A ``transformers`` model with random weights, built from a local config (file or folder)."""
    try:
        import transformers
    except ImportError:
        raise InputError("--hf-config needs transformers: pip install 'dfmu_ext[hf]'") from None
    if not os.path.exists(config):
        raise InputError(f"--hf-config {config!r} does not exist")
    try:
        cfg = transformers.AutoConfig.from_pretrained(config, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--hf-config {config!r} is not a transformers config: {first}") from None
    for name in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls(cfg)
    for auto in (transformers.AutoModelForSequenceClassification, transformers.AutoModelForImageClassification):
        try:
            return auto.from_config(cfg)
        except ValueError:
            continue
    raise InputError(f"--hf-config {config!r}: no classification model is known for model type {cfg.model_type!r}")


def load_model(spec: str, kwargs: dict, weights_path: str, device="cpu") -> tuple[nn.Module, dict]:
    """``(model with the weights loaded, state_dict)``; :class:`InputError` / ``WeightsError`` for bad input."""
    model = build_arch(spec, kwargs)
    state = load_state_dict_file(weights_path)
    check_finite(state, f"the weights in {weights_path!r}")
    fit_state_dict(model, state, f"the weights in {weights_path!r}")
    return model.to(device), state




def check_model_fits_data(model: nn.Module, train_set, info: DatasetInfo, device="cpu") -> None:
    """One forward pass of two training samples: the output must be ``(2, K)`` logits with K >= the
    data's class count (a ``transformers`` output's ``logits``). Raises :class:`InputError` otherwise."""
    x, _ = take_batch(as_pairs(train_set), [0, 1] if len(train_set) > 1 else [0])
    x = x.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapted(model):
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
