"""Retrain: the original training recipe from fresh weights on the retain data — the gold standard."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import seeded
from ..result import UnlearnResult
from ..steps import StepOptions
from ..zoo import training
from ..zoo.models import init_weights, model_name_of
from ._plumbing import Setup, make_result


@torch.no_grad()
def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights in place: ``reset_parameters()`` on every module that has it (BatchNorm also
    resets its running statistics), then the package models' own initialisation (He init for
    convolutions) so that a package model starts exactly as its constructor would start it."""
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    if model_name_of(model) is not None:
        init_weights(model)
    return model


def retrain(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 1.0, *,
            forget_indices=None, model_name: str | None = None, config: training.TrainConfig | None = None,
            model_factory: Callable[[], nn.Module] | None = None, device=None, seed: int = 0,
            progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    """Retrain from scratch on the retain data with the original training recipe (the gold standard).

    The recipe is ``config`` if given, else ``training.default_train_config(model_name, device)``
    (``model_name`` inferred for the package's models). The fresh model is ``model_factory()`` if
    given (its weights are then copied into ``model`` when the state dicts match), else ``model``
    itself re-initialised in place (:func:`reinitialize`). ``retain_fraction`` defaults to 1.0
    (all retain data: the reference every other number is compared with); a smaller value trains
    on the stratified slice instead.
    """
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices)
    if config is None:
        model_name = model_name or model_name_of(model)
        if model_name is None:
            raise ValueError(f"no default training recipe is known for {type(model).__name__}: pass model_name=... "
                             "or config=TrainConfig(...) (the recipe the original was trained with)")
        config = training.default_train_config(model_name, setup.device.type)
    budget = setup.budget
    t0 = time.perf_counter()
    with seeded(setup.seed, setup.device):
        fresh = model_factory().to(setup.device) if model_factory is not None else reinitialize(model)
    hist = training.train_model(fresh, budget, config, device=setup.device, seed=setup.seed, progress=progress,
                                desc="retrain", steps=steps)
    out_model = fresh
    if model_factory is not None:
        try:
            model.load_state_dict(fresh.state_dict())
            out_model = model
        except (RuntimeError, KeyError):
            pass  # a different architecture: the result's model is the factory's
    t1 = time.perf_counter()
    info = {"config": config.to_dict(), "loss": hist["loss"], "train_accuracy": hist["accuracy"],
            "steps": hist["steps"]}
    return make_result(setup, out_model, "Retrain", len(budget), 0, info, {"train": t1 - t0})


