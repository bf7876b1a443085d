"""The classifier training recipe: used to train the model to unlearn from, and by the Retrain baseline.

Retrain is the gold standard every unlearning number is compared with, so it must be *the same*
recipe as the original model's (same optimiser, schedule, epochs, model keywords), only on the
retain set. Keeping the recipe in one dataclass (``TrainConfig``) makes that explicit. The recipe
of each model of the zoo (which ``TrainConfig`` a ``cnn`` gets on a CPU) is the zoo's
(:func:`dfmu_ext.zoo.models.default_train_config`), known here through :mod:`.families`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import TrainBatches, seeded, synchronize, train_mode
from ..eval.predict import accuracy
from ..model_io import model_entry
from ..steps import StepEngine, StepOptions

__all__ = ["TrainConfig", "train_model", "make_optimizer", "make_scheduler"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    """One training recipe.

    Attributes:
        epochs: passes over the training set.
        lr: peak learning rate.
        batch_size: samples per step.
        momentum: SGD momentum (ignored by AdamW).
        weight_decay: decoupled for AdamW, L2 for SGD (applied to all parameters, as in the
            SalUn / l1-sparse reference code).
        optimizer: "sgd" or "adamw".
        schedule: "cosine" (per-step cosine decay from ``lr`` to 0), "onecycle" or "constant".
        nesterov: Nesterov momentum for SGD.
        label_smoothing: passed to the cross-entropy loss.
        model_kwargs: ``build_model`` keywords that belong to the recipe (e.g. the reduced
            ResNet width used on CPUs), so that Retrain rebuilds exactly the original architecture.
    """

    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    schedule: str = "cosine"
    nesterov: bool = False
    label_smoothing: float = 0.0
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")

    def to_dict(self) -> dict:
        """Plain dict for reports and JSON."""
        return asdict(self)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``config`` over all trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.nesterov)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """A per-step LR schedule: stepping per batch keeps short (1-3 epoch) runs smooth."""
    total_steps = max(1, total_steps)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


@model_entry
def train_model(model: nn.Module, train_set: Dataset, config: TrainConfig,
                device: torch.device | str = "cpu", seed: int = 0, progress: bool = False,
                desc: str = "train", *, eval_set: Dataset | None = None,
                log_every: int = 20, steps: StepOptions | None = None) -> dict:
    """Train ``model`` in place on ``train_set`` with ``config``; returns the per-epoch history.

    Reproducible: the shuffle order comes from a generator seeded with ``seed`` and the global
    RNG is seeded inside a forked RNG state (so that stochastic layers are reproducible without
    disturbing the caller's random stream). Two runs from the same initial weights give identical
    weights on the CPU.

    A final batch of a single sample is skipped (BatchNorm cannot train on it). Losses are summed
    on the device and read back every ``log_every`` steps and at the end of each epoch (reading
    every step would synchronise the GPU every step); a NaN/inf raises ``FloatingPointError``.

    Returns ``{"loss", "accuracy", "seconds", "lr"}`` (lists, one entry per epoch: mean train loss,
    running train accuracy, wall seconds, LR at the epoch's end), ``"eval_accuracy"`` when
    ``eval_set`` is given, plus ``"total_seconds"``, ``"steps"``, ``"samples"`` and ``"config"``.
    The model's train/eval mode is restored on return.
    """
    n = len(train_set)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    device = torch.device(device)
    model.to(device)
    # One loader for all epochs: its seeded generator continues, so every epoch has its own order.
    engine = StepEngine(model, device, steps)
    engine.prepare(model)
    batches = TrainBatches(train_set, config.batch_size, seed, device, desc=desc, progress=progress, engine=engine)
    steps_per_epoch = len(batches) - (1 if n > 1 and n % config.batch_size == 1 else 0)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch * config.epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    history: dict = {"loss": [], "accuracy": [], "seconds": [], "lr": []}
    if eval_set is not None:
        history["eval_accuracy"] = []
    start = time.perf_counter()
    steps = 0
    with seeded(seed, device), train_mode(model):
        for epoch in range(config.epochs):
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            batches.desc = f"{desc} {epoch + 1}/{config.epochs}"
            for i, (x, y) in enumerate(batches):
                with engine.autocast():
                    out = model(x)
                    loss = criterion(out, y)
                optimizer.zero_grad(set_to_none=True)
                engine.backward_step(loss, optimizer)
                scheduler.step()
                steps += 1
                b = y.shape[0]
                seen += b
                loss_sum += loss.detach().double() * b
                correct += (out.detach().argmax(1) == y).sum()
                if (i + 1) % log_every == 0:
                    _check_finite(loss_sum, epoch, i)
            _check_finite(loss_sum, epoch, steps_per_epoch - 1)
            history["loss"].append(loss_sum.item() / max(seen, 1))
            history["accuracy"].append(correct.item() / max(seen, 1))
            history["lr"].append(optimizer.param_groups[0]["lr"])
            synchronize(device)
            history["seconds"].append(time.perf_counter() - t0)
            if eval_set is not None:
                history["eval_accuracy"].append(accuracy(model, eval_set, device=device))
    history["total_seconds"] = time.perf_counter() - start
    history["steps"] = steps
    history["samples"] = n
    history["config"] = config.to_dict()
    return history


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int) -> None:
    value = loss_sum.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"training loss became {value} by epoch {epoch + 1}, step {step + 1}: lower the learning "
            "rate or check the inputs for NaN/inf")
