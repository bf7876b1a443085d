"""What every baseline shares, for both tasks: validated inputs and the retain budget
(:class:`Setup` for classifiers, :class:`LMSetup` for causal LMs, one result and timing in their
base), the recipes' optimiser, per-epoch loss bookkeeping, the rollback for runaway ascent."""
from __future__ import annotations

import hashlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._common import check_classes_in_head, model_device, resolve_forget_set, synchronize
from ..blocks import classifier_of
from ..lm.task import split_forget
from ..result import UnlearnResult
from ..splits import stratified_fraction
from ..steps import StepEngine, StepOptions


class _SetupBase:
    """The clock, the device and the result every method's setup shares; a task's setup sets
    ``start`` first, then ``device``, ``seed``, ``retain_fraction`` and defines :meth:`describe`."""

    start: float
    device: torch.device

    def describe(self) -> dict:
        """The result's ``info`` entries that say what was forgotten and with which budget."""
        raise NotImplementedError

    def elapsed(self) -> float:
        """Wall seconds since the call started, queued GPU work included."""
        synchronize(self.device)
        return time.perf_counter() - self.start

    def result(self, model: nn.Module, method: str, retain_used: int, forget_used: int, info: dict,
               timings: dict | None = None, **fields) -> UnlearnResult:
        """The method's :class:`UnlearnResult`, its total time taken now; ``fields`` go to the result
        (``masks``, ``pruned_units``, ...)."""
        timings = {**(timings or {}), "total": self.elapsed()}
        return UnlearnResult(model=model, timings=timings, retain_samples_used=int(retain_used),
                             forget_samples_used=int(forget_used), method=method, info={**self.describe(), **info},
                             **fields)


class Setup(_SetupBase):
    """Validated inputs shared by every classifier method."""

    def __init__(self, model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float, device,
                 seed: int, forget_indices=None, steps: StepOptions | None = None):
        self.start = time.perf_counter()
        if not 0.0 < float(retain_fraction) <= 1.0:
            raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
        self.retain_fraction = float(retain_fraction)
        self.forget = resolve_forget_set(train_set, forget_classes, forget_indices)
        self.classes = self.forget.classes  # None when samples are forgotten
        self.head_name, self.head = classifier_of(model)
        if self.classes is not None:
            check_classes_in_head(self.classes, self.head.out_features)
        if device is not None:
            model.to(device)
        self.device = model_device(model)
        self.num_classes = self.head.out_features
        self.seed = int(seed)
        self.forget_set, self.retain_set = self.forget.split(train_set)
        self._budget = None
        self.engine = StepEngine(model, self.device, steps)  # precision and layout of training steps
        self.engine.prepare(model)

    @property
    def budget(self):
        """The stratified retain slice (the same as DFMU's for the same seed)."""
        if self._budget is None:
            self._budget = stratified_fraction(self.retain_set, self.retain_fraction, seed=self.seed)
        return self._budget

    def describe(self) -> dict:
        return {"retain_fraction": self.retain_fraction, **self.forget.describe(), "seed": self.seed}


def lm_split(train_set, forget_indices, retain_fraction: float, seed: int = 0):
    """``(forget, retain, budget)`` subsets of a causal-LM ``train_set``: the sequences at
    ``forget_indices``, every other one, and a seeded random ``retain_fraction`` of those (at least
    one, sorted). One-line ValueErrors for empty, non-integer, out-of-range or duplicate indices,
    indices covering every sequence, or a fraction outside (0, 1].

    The same split as DFMU's (:func:`dfmu_ext.lm.task.split_forget`), so that for one seed every
    method reads the same budget.
    """
    return split_forget(train_set, forget_indices, retain_fraction, seed)


class LMSetup(_SetupBase):
    """Validated inputs shared by the causal-LM methods (nothing is changed before they pass): a
    causal LM forgets sequences (``forget_indices``), never classes."""

    def __init__(self, model: nn.Module, train_set, forget_classes, retain_fraction: float, forget_indices,
                 device, seed: int, steps: StepOptions | None = None):
        self.start = time.perf_counter()
        if forget_classes is not None:
            raise ValueError("forget_classes is for classifiers: a causal LM forgets sequences, give forget_indices= "
                             "(positions in train_set)")
        self.retain_fraction = float(retain_fraction)
        self.seed = int(seed)
        self.forget_set, self.retain_set, self.budget = lm_split(train_set, forget_indices, retain_fraction, seed)
        if device is not None:
            model.to(device)
        self.device = model_device(model)
        self.engine = StepEngine(model, self.device, steps)

    def describe(self) -> dict:
        idx = torch.as_tensor(self.forget_set.indices, dtype=torch.long)
        digest = hashlib.sha256(idx.numpy().astype("<i8").tobytes()).hexdigest()
        return {"task": "causal-lm", "retain_fraction": self.retain_fraction, "forget_samples": int(idx.numel()),
                "forget_indices_sha256": digest, "seed": self.seed}


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the model's trainable parameters (the recipes' optimiser)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def check_epochs(epochs: int, batch_size: int) -> None:
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n`` samples (a trailing single-sample batch is skipped)."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


class LossLog:
    """Per-epoch mean loss, summed on the device and read back once per epoch (no per-step sync)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.epochs: list[float] = []
        self._sum = torch.zeros((), device=device, dtype=torch.float64)
        self._n = 0

    def add(self, loss: torch.Tensor, n: int) -> None:
        self._sum += loss.detach().double() * n
        self._n += n

    def end_epoch(self, what: str, allow_divergence: bool = False) -> bool:
        """Closes the epoch; returns whether its loss was finite. A non-finite loss raises
        FloatingPointError unless ``allow_divergence`` (ascent steps, which may run away)."""
        value = self._sum.item() / max(self._n, 1)
        finite = not self._n or math.isfinite(value)
        if not finite and not allow_divergence:
            raise FloatingPointError(f"{what}: the loss became {value} in epoch {len(self.epochs) + 1}; "
                                     "lower the learning rate")
        self.epochs.append(value)
        self._sum.zero_()
        self._n = 0
        return finite


class LastFinite:
    """The model's state at the end of the last epoch whose ascent loss stayed finite.

    Gradient *ascent* (GA, SCRUB's max-steps) has no minimum: with the recipe's learning rate it can
    run to inf/NaN, more so on small networks. Practitioners stop it there; so do we: on a
    non-finite epoch the weights of the last finite epoch come back and ascent stops
    (``info["ascent_diverged_in_epoch"]`` records where).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.keep()

    def keep(self) -> None:
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.state)


def make_result(setup: Setup, model: nn.Module, method: str, retain_used: int, forget_used: int,
                info: dict, timings: dict | None = None, masks: dict | None = None) -> UnlearnResult:
    """The method's :class:`UnlearnResult`, its total time taken now (:meth:`Setup.result`)."""
    return setup.result(model, method, retain_used, forget_used, info, timings, masks=masks or {})


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2 (the usual distillation scaling), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                    reduction="batchmean") * (T * T)


