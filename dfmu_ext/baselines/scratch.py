"""Retrain: the original training recipe from fresh weights on the retain data — the gold standard,
for classifiers (:func:`retrain`) and causal LMs (:func:`lm_retrain`).

Both take ``model_factory=`` (a fresh model) and ``train_fn=`` (the recipe), so a recipe of one's own
serves as Retrain; without them, the model is re-initialised in place and trained with the package's
recipe (:mod:`dfmu_ext.training`).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import seeded, synchronize
from ..result import UnlearnResult
from ..steps import StepOptions
from ..training.causal_lm import LMTrainConfig, train_causal_lm
from ..training.classifier import TrainConfig, train_model
from ..training.families import family_named, family_of
from ._plumbing import LMSetup, Setup, make_result
from .registry import register

__all__ = ["reinitialize", "retrain", "lm_retrain"]


@torch.no_grad()
def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights in place: ``reset_parameters()`` on every module that has it (BatchNorm also
    resets its running statistics), then the initialisation of the model's family
    (:func:`dfmu_ext.training.families.family_of`; the zoo's models: He init for convolutions) so that
    a package model starts exactly as its constructor would start it."""
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    family = family_of(model)
    if family is not None and family.init is not None:
        family.init(model)
    return model


@register("Retrain", budgeted=False, fixed_fraction=1.0)
def retrain(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 1.0, *,
            forget_indices=None, model_name: str | None = None, config: TrainConfig | None = None,
            model_factory: Callable[[], nn.Module] | None = None,
            train_fn: Callable[[nn.Module, Dataset], object] | None = None, device=None, seed: int = 0,
            progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    """Retrain from scratch on the retain data with the original training recipe (the gold standard).

    The fresh model is ``model_factory()`` if given (built under ``seed``; its weights are then copied
    into ``model`` when the state dicts match, else the result's model is the factory's), else
    ``model`` itself re-initialised in place (:func:`reinitialize`). It is trained by
    ``train_fn(fresh, retain)`` if given (a recipe of one's own, run under ``seed``; a returned dict's
    ``loss`` / ``accuracy`` / ``steps`` go to ``info``), else by
    :func:`dfmu_ext.training.classifier.train_model` with ``config``; without ``config``, the default
    recipe of the model's family (:mod:`dfmu_ext.training.families`: ``model_name``, else the
    model's class; the zoo registers its models). ``retain_fraction`` defaults to 1.0 (all retain
    data: the reference every other number is compared with); a smaller value trains on the
    stratified slice instead.
    """
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices)
    if train_fn is None and config is None:
        family = family_named(model_name) if model_name is not None else family_of(model)
        if family is None:
            raise ValueError(f"no default training recipe is known for {type(model).__name__}: pass model_name=..., "
                             "config=TrainConfig(...) (the recipe the original was trained with) or train_fn=...")
        config = family.recipe(setup.device.type)
    budget = setup.budget
    t0 = time.perf_counter()
    with seeded(setup.seed, setup.device):
        fresh = model_factory().to(setup.device) if model_factory is not None else reinitialize(model)
    if train_fn is not None:
        with seeded(setup.seed, setup.device):
            hist = train_fn(fresh, budget)
    else:
        hist = train_model(fresh, budget, config, device=setup.device, seed=setup.seed, progress=progress,
                           desc="retrain", steps=steps)
    out_model = fresh
    if model_factory is not None:
        try:
            model.load_state_dict(fresh.state_dict())
            out_model = model
        except (RuntimeError, KeyError):
            pass  # a different architecture: the result's model is the factory's
    synchronize(setup.device)
    t1 = time.perf_counter()
    hist = hist if isinstance(hist, dict) else {}
    info = {"config": config.to_dict() if train_fn is None else None,
            "train_fn": getattr(train_fn, "__name__", repr(train_fn)) if train_fn else "train_model",
            "loss": hist.get("loss"), "train_accuracy": hist.get("accuracy"), "steps": hist.get("steps")}
    return make_result(setup, out_model, "Retrain", len(budget), 0, info, {"train": t1 - t0})


def _reset_in_place(model: nn.Module) -> str:
    """Fresh weights for ``model`` in place; returns how. The model's own ``reset_parameters()``
    if it defines one; else a Hugging Face model's ``init_weights()`` (its ``_is_hf_initialized``
    marks cleared first, so that every module is initialised again); else ``reset_parameters()`` of
    every module that holds parameters. ValueError when some parameter would keep its trained value."""
    reset = getattr(model, "reset_parameters", None)
    if callable(reset):
        reset()
        return "reset_parameters"
    init = getattr(model, "init_weights", None)
    if callable(init) and hasattr(model, "_init_weights") and hasattr(model, "config"):
        for t in list(model.modules()) + list(model.parameters()) + list(model.buffers()):
            if hasattr(t, "_is_hf_initialized"):
                try:
                    delattr(t, "_is_hf_initialized")
                except AttributeError:
                    pass
        init()
        return "init_weights"
    missing = [name or type(model).__name__ for name, m in model.named_modules()
               if any(True for _ in m.parameters(recurse=False)) and not callable(getattr(m, "reset_parameters", None))]
    if missing:
        raise ValueError(f"cannot re-initialise module {missing[0]!r} (no reset_parameters): pass model_factory= "
                         f"(a zero-arg callable returning a fresh model)")
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    return "modules' reset_parameters"


@register("Retrain", "causal-lm")
def lm_retrain(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 1.0, *,
               forget_indices=None, model_factory: Callable[[], nn.Module] | None = None,
               train_fn: Callable[[nn.Module, object], object] | None = None,
               train_config: LMTrainConfig | None = None, epochs: int | None = None, device=None, seed: int = 0,
               progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    """Retrain: a fresh model trained on the retain data only — the gold standard.

    The fresh model is ``model_factory()`` (built under ``seed``) or, without a factory, ``model``
    itself re-initialised in place: its own ``reset_parameters()``, else a Hugging Face model's
    ``init_weights()``, else every module's ``reset_parameters()`` (PyTorch's default init, which
    may differ from a model's own constructor: pass ``model_factory`` for the exact start); one-line
    ValueError when no path covers every parameter. It is trained by ``train_fn(fresh, retain)``
    (the original's recipe, given by the corpus) or, without one, by
    :func:`dfmu_ext.training.causal_lm.train_causal_lm` with ``train_config`` (default
    :class:`~dfmu_ext.training.causal_lm.LMTrainConfig`; ``epochs`` overrides its epochs, 0 only
    re-initialises) — all under ``seed``. The trained weights
    are then copied into ``model`` (in place; ValueError if the factory's model does not fit).
    ``retain_fraction`` 1.0 (the default) trains on every retain sequence, a smaller one on the budget.
    """
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    config = train_config or LMTrainConfig()
    if epochs:
        config = LMTrainConfig(**{**config.to_dict(), "epochs": epochs})
    config = LMTrainConfig(**{**config.to_dict(), "seed": setup.seed})
    data = setup.retain_set if setup.retain_fraction == 1.0 else setup.budget
    t0 = time.perf_counter()
    with seeded(setup.seed, setup.device):
        if model_factory is not None:
            fresh = model_factory().to(setup.device)
            how = "model_factory"
        else:
            how = _reset_in_place(model)
            fresh = model
        history = None
        if train_fn is not None:
            train_fn(fresh, data)
        elif epochs != 0:
            history = train_causal_lm(fresh, data, config, setup.device, progress=progress)["loss"]
    if fresh is not model:
        try:
            model.load_state_dict(fresh.state_dict())
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"model_factory() made a model whose weights do not fit the given model: "
                             f"{str(e).splitlines()[0]}") from None
    synchronize(setup.device)
    t1 = time.perf_counter()
    info = {"init": how, "train_fn": getattr(train_fn, "__name__", repr(train_fn)) if train_fn else "train_causal_lm",
            "loss": history}
    if train_fn is None:
        info["train_config"] = config.to_dict() if epochs != 0 else None
    return setup.result(model, "Retrain", len(data), 0, info, {"train": t1 - t0})
