"""Baseline class-unlearning methods, written from the recipes in DESIGN.md ("Baselines").

Every method has the signature of :func:`dfmu_ext.unlearn`::

    method(model, train_set, forget_classes, retain_fraction, *, device=None, seed=0,
           progress=True, **method_specific_keywords) -> UnlearnResult

and modifies ``model`` in place (Retrain re-initialises it and trains it again). The data rules:

* a method that reads retain data reads ONLY the class-stratified ``retain_fraction`` of the retain
  set (``datautil.stratified_fraction(retain_set, retain_fraction, seed)``, the same slice DFMU
  uses for the same seed); its epochs are passes over that budget;
* forget data is read in full by the methods that use it (GA, RL, SalUn, SSD, SCRUB);
* ``retain_samples_used`` / ``forget_samples_used`` count the distinct samples read.

A seed makes every method reproducible: shuffles come from generators seeded with ``seed`` and
the global RNG is re-seeded inside a forked RNG state (the caller's random stream is untouched).

Methods (``METHODS`` maps the table names to the functions):

=========== ==========================================================================================
Retrain     the original training recipe on the retain budget (default: all of it), fresh weights
FT          fine-tune on retain, CE, 10 epochs, SGD lr 0.01
GA          gradient ascent on the forget CE, 5 epochs, lr 5e-4 (reads no retain data)
RL          forget samples relabelled at random (a remaining class, redrawn per batch) + retain, CE
l1-sparse   FT with CE + alpha_t * ||theta||_1, alpha_t decaying linearly from alpha to 0
SalUn       weight saliency mask (top 50% |grad forget CE|, one global ranking), then RL with
            masked gradients (SGD momentum 0.9, wd 5e-4, 10 epochs)
SSD         selective synaptic dampening: theta *= min(lambda I_D / I_f, 1) where I_f > alpha I_D
SCRUB       teacher-student: max-steps (-KL) on forget for msteps epochs, min-steps on retain
            (0.99 CE + 0.001 KL, T=4), 3 epochs, SGD lr 5e-4
head-mask   zero the forget classes' classifier rows, pin their bias very low (reads no data)
DFMU        dfmu_ext.unlearn
=========== ==========================================================================================

Optimisers are SGD with momentum 0.9 and weight decay 5e-4 at a constant learning rate unless a
recipe says otherwise. Batches of a single sample are skipped when training (BatchNorm).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from . import models as models_mod
from . import training
from .blocks import classifier_of
from .datautil import make_loader, split_forget_retain, stratified_fraction
from .pruning import build_mask_plan, head_mask_for, suppress_head
from .result import UnlearnResult
from .unlearn import _check_train_set, _normalise_classes, unlearn

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

__all__ = ["retrain", "finetune", "gradient_ascent", "random_label", "l1_sparse", "salun", "ssd", "scrub",
           "head_mask", "dfmu", "reinitialize", "METHODS", "FRACTION_INDEPENDENT", "EPOCH_METHODS"]


# --------------------------------------------------------------------------------------------
# shared plumbing
# --------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _Setup:
    """Validated inputs shared by every method."""

    def __init__(self, model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float, device,
                 seed: int):
        self.start = time.perf_counter()
        self.classes = _normalise_classes(forget_classes)
        if not 0.0 < float(retain_fraction) <= 1.0:
            raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
        self.retain_fraction = float(retain_fraction)
        _check_train_set(train_set, self.classes)
        if device is not None:
            model.to(device)
        self.device = _model_device(model)
        self.head_name, self.head = classifier_of(model)
        if max(self.classes) >= self.head.out_features:
            raise ValueError(f"forget classes {self.classes} are not among the model's "
                             f"{self.head.out_features} classes")
        if len(self.classes) >= self.head.out_features:
            raise ValueError("every class would be forgotten: nothing would remain to classify")
        self.num_classes = self.head.out_features
        self.seed = int(seed)
        self.forget_set, self.retain_set = split_forget_retain(train_set, self.classes)
        self._budget = None

    @property
    def budget(self):
        """The stratified retain slice (the same as DFMU's for the same seed)."""
        if self._budget is None:
            self._budget = stratified_fraction(self.retain_set, self.retain_fraction, seed=self.seed)
        return self._budget

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.start


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    devices = ([device.index if device.index is not None else torch.cuda.current_device()]
               if device.type == "cuda" else [])
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(dataset: Dataset, batch_size: int, seed: int, device: torch.device, desc: str, progress: bool,
             *, shuffle: bool = True, train: bool = True):
    """(x, y) batches on ``device``; in training, a batch of one sample is skipped (BatchNorm)."""
    loader = make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed)
    bar = tqdm(loader, desc=desc, leave=False, unit="batch", disable=not progress) if tqdm is not None else loader
    try:
        for x, y in bar:
            if train and x.shape[0] < 2:
                continue
            yield x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True).long()
    finally:
        if tqdm is not None:
            bar.close()


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def _check_epochs(epochs: int, batch_size: int) -> None:
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


class _LossLog:
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


class _LastFinite:
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


def _result(setup: _Setup, model: nn.Module, method: str, retain_used: int, forget_used: int,
            info: dict, timings: dict | None = None, masks: dict | None = None) -> UnlearnResult:
    timings = dict(timings or {})
    timings["total"] = setup.elapsed()
    info = {"retain_fraction": setup.retain_fraction, "forget_classes": setup.classes, "seed": setup.seed, **info}
    return UnlearnResult(model=model, masks=masks or {}, timings=timings, retain_samples_used=int(retain_used),
                         forget_samples_used=int(forget_used), method=method, info=info)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher_T || student_T) * T^2 (the usual distillation scaling), averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1),
                    reduction="batchmean") * (T * T)


# --------------------------------------------------------------------------------------------
# Retrain
# --------------------------------------------------------------------------------------------

_MODEL_NAMES = {models_mod.SmallCNN: "cnn", models_mod.ResNet18: "resnet18", models_mod.MLP: "mlp"}


def _infer_model_name(model: nn.Module) -> str:
    for cls, name in _MODEL_NAMES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"no default training recipe is known for {type(model).__name__}: pass "
                     "model_name=... or config=TrainConfig(...) (the recipe the original was trained with)")


@torch.no_grad()
def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights in place: ``reset_parameters()`` on every module that has it (BatchNorm also
    resets its running statistics), then the package models' own initialisation (He init for
    convolutions) so that a package model starts exactly as its constructor would start it."""
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    if type(model).__module__ == models_mod.__name__:
        models_mod._init_weights(model)
    return model


def retrain(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 1.0, *,
            model_name: str | None = None, config: training.TrainConfig | None = None,
            model_factory: Callable[[], nn.Module] | None = None, device=None, seed: int = 0,
            progress: bool = True) -> UnlearnResult:
    """Retrain from scratch on the retain data with the original training recipe (the gold standard).

    The recipe is ``config`` if given, else ``training.default_train_config(model_name, device)``
    (``model_name`` inferred for the package's models). The fresh model is ``model_factory()`` if
    given (its weights are then copied into ``model`` when the state dicts match), else ``model``
    itself re-initialised in place (:func:`reinitialize`). ``retain_fraction`` defaults to 1.0
    (all retain data: the reference every other number is compared with); a smaller value trains
    on the stratified slice instead.
    """
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    if config is None:
        config = training.default_train_config(model_name or _infer_model_name(model), setup.device.type)
    budget = setup.budget
    t0 = time.perf_counter()
    with _seeded(setup.seed, setup.device):
        fresh = model_factory().to(setup.device) if model_factory is not None else reinitialize(model)
    hist = training.train_model(fresh, budget, config, device=setup.device, seed=setup.seed, progress=progress,
                                desc="retrain")
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
    return _result(setup, out_model, "Retrain", len(budget), 0, info, {"train": t1 - t0})


# --------------------------------------------------------------------------------------------
# FT and l1-sparse (fine-tune on the retain budget)
# --------------------------------------------------------------------------------------------

def _retain_finetune(method: str, model, train_set, forget_classes, retain_fraction, *, epochs, lr, batch_size,
                     momentum, weight_decay, l1_alpha, device, seed, progress) -> UnlearnResult:
    _check_epochs(epochs, batch_size)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    budget, dev = setup.budget, setup.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _sgd(model, lr, momentum, weight_decay)
    total_steps = max(1, epochs * _steps_per_epoch(len(budget), batch_size))
    log = _LossLog(dev)
    step = 0
    was_training = model.training
    with _seeded(setup.seed, dev):
        model.train()
        try:
            for epoch in range(epochs):
                for x, y in _batches(budget, batch_size, setup.seed + epoch, dev, f"{method} {epoch + 1}/{epochs}",
                                     progress):
                    loss = F.cross_entropy(model(x), y)
                    if l1_alpha:
                        alpha_t = l1_alpha * max(0.0, 1.0 - step / total_steps)
                        loss = loss + alpha_t * torch.stack([p.abs().sum() for p in params]).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    log.add(loss, x.shape[0])
                log.end_epoch(method)
        finally:
            model.train(was_training)
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
            "weight_decay": weight_decay, "steps": step, "loss": log.epochs}
    if l1_alpha:
        info["alpha"] = l1_alpha
    return _result(setup, model, method, len(budget), 0, info)


def finetune(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
             epochs: int = 10, lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9,
             weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """FT: fine-tune with cross-entropy on the retain budget (catastrophic forgetting of the rest)."""
    return _retain_finetune("FT", model, train_set, forget_classes, retain_fraction, epochs=epochs, lr=lr,
                            batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, l1_alpha=0.0,
                            device=device, seed=seed, progress=progress)


def l1_sparse(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
              alpha: float = 5e-4, epochs: int = 10, lr: float = 0.01, batch_size: int = 128,
              momentum: float = 0.9, weight_decay: float = 5e-4, device=None, seed: int = 0,
              progress: bool = True) -> UnlearnResult:
    """l1-sparse: FT with loss ``CE + alpha_t * sum_p |theta_p|``, ``alpha_t`` decaying linearly per
    step from ``alpha`` to 0 over the run (the recipe's sweep range is 1e-5 ... 1e-3)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return _retain_finetune("l1-sparse", model, train_set, forget_classes, retain_fraction, epochs=epochs, lr=lr,
                            batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, l1_alpha=alpha,
                            device=device, seed=seed, progress=progress)


# --------------------------------------------------------------------------------------------
# GA
# --------------------------------------------------------------------------------------------

def gradient_ascent(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
                    epochs: int = 5, lr: float = 5e-4, batch_size: int = 128, momentum: float = 0.9,
                    weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """GA: maximise the cross-entropy on the forget set. Reads no retain data (``retain_fraction``
    is ignored). The recipe's lr is 1e-4; 5e-4 is the default since 1e-4 barely moves the model."""
    _check_epochs(epochs, batch_size)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    forget, dev = setup.forget_set, setup.device
    opt = _sgd(model, lr, momentum, weight_decay)
    log = _LossLog(dev)
    was_training = model.training
    last_finite = _LastFinite(model)
    diverged = None
    with _seeded(setup.seed, dev):
        model.train()
        try:
            for epoch in range(epochs):
                for x, y in _batches(forget, batch_size, setup.seed + epoch, dev, f"GA {epoch + 1}/{epochs}",
                                     progress):
                    ce = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    (-ce).backward()
                    opt.step()
                    log.add(ce, x.shape[0])
                if not log.end_epoch("GA", allow_divergence=True):
                    last_finite.restore()
                    diverged = epoch + 1
                    break
                last_finite.keep()
        finally:
            model.train(was_training)
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "forget_ce": log.epochs,
            "ascent_diverged_in_epoch": diverged}
    return _result(setup, model, "GA", 0, len(forget), info)


# --------------------------------------------------------------------------------------------
# RL and SalUn
# --------------------------------------------------------------------------------------------

def _relabel_loop(method: str, setup: _Setup, model: nn.Module, *, epochs, lr, batch_size, momentum, weight_decay,
                  progress, grad_mask: list[torch.Tensor] | None = None) -> dict:
    """Train on forget (labels redrawn uniformly from the remaining classes each batch) + retain budget.

    With ``grad_mask`` (one 0/1 tensor per trainable parameter), weight decay is added to the
    gradient *before* it is multiplied by the mask and the optimizer runs without decay, so weights
    outside the mask stay exactly as they were (momentum never builds up for them either).
    """
    dev = setup.device
    data = ConcatDataset([setup.forget_set, setup.budget])
    cls = torch.as_tensor(setup.classes, dtype=torch.long, device=dev)
    remaining = torch.tensor([c for c in range(setup.num_classes) if c not in setup.classes], dtype=torch.long)
    gen = torch.Generator().manual_seed(setup.seed + 104729)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _sgd(model, lr, momentum, 0.0 if grad_mask is not None else weight_decay)
    log = _LossLog(dev)
    steps = 0
    was_training = model.training
    model.train()
    try:
        for epoch in range(epochs):
            for x, y in _batches(data, batch_size, setup.seed + epoch, dev, f"{method} {epoch + 1}/{epochs}",
                                 progress):
                is_f = torch.isin(y, cls)
                rand = remaining[torch.randint(len(remaining), (y.shape[0],), generator=gen)].to(dev)
                y = torch.where(is_f, rand, y)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if grad_mask is not None:
                    with torch.no_grad():
                        for p, m in zip(params, grad_mask):
                            if p.grad is None:
                                continue
                            if weight_decay:
                                p.grad.add_(p, alpha=weight_decay)
                            p.grad.mul_(m)
                opt.step()
                steps += 1
                log.add(loss, x.shape[0])
            log.end_epoch(method)
    finally:
        model.train(was_training)
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
            "weight_decay": weight_decay, "steps": steps, "loss": log.epochs}


def random_label(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
                 epochs: int = 10, lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9,
                 weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """RL: cross-entropy on the forget samples with random labels (drawn from the remaining
    classes, afresh each batch) together with the retain budget under their true labels."""
    _check_epochs(epochs, batch_size)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    with _seeded(setup.seed, setup.device):
        info = _relabel_loop("RL", setup, model, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                             weight_decay=weight_decay, progress=progress)
    return _result(setup, model, "RL", len(setup.budget), len(setup.forget_set), info)


def saliency_mask(model: nn.Module, forget_set: Dataset, keep: float = 0.5, *, batch_size: int = 128,
                  device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency: ``|d CE(forget) / d theta|`` summed over the forget set (model in
    eval mode, so BatchNorm statistics are untouched); the top ``keep`` share of ALL trainable
    weights in one global ranking gets 1, the rest 0. Returns ``{param name: 0/1 float mask}``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    dev = torch.device(device) if device is not None else _model_device(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for _, p in named]
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(forget_set, batch_size, 0, dev, "SalUn saliency", progress, shuffle=False, train=False):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y, reduction="sum").backward()
            for g, (_, p) in zip(grads, named):
                if p.grad is not None:
                    g.add_(p.grad)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    flat = torch.cat([g.abs().flatten() for g in grads])
    k = max(1, int(round(keep * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = 1.0
    out, offset = {}, 0
    for g, (name, p) in zip(grads, named):
        out[name] = chosen[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
    return out


def salun(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
          keep: float = 0.5, epochs: int = 10, lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9,
          weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """SalUn: :func:`saliency_mask` (top ``keep`` = 50% of weights by forget-gradient magnitude),
    then RL in which every gradient (weight decay included) is multiplied by the mask, so only the
    salient weights change. SGD momentum 0.9, weight decay 5e-4, 10 epochs."""
    _check_epochs(epochs, batch_size)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    with _seeded(setup.seed, setup.device):
        t0 = time.perf_counter()
        mask = saliency_mask(model, setup.forget_set, keep, batch_size=batch_size, device=setup.device,
                             progress=progress)
        t1 = time.perf_counter()
        info = _relabel_loop("SalUn", setup, model, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                             weight_decay=weight_decay, progress=progress, grad_mask=list(mask.values()))
        t2 = time.perf_counter()
    total = sum(m.numel() for m in mask.values())
    info.update(keep=keep, masked_fraction=float(sum(m.sum().item() for m in mask.values()) / max(total, 1)),
                saliency_mask=mask)
    return _result(setup, model, "SalUn", len(setup.budget), len(setup.forget_set), info,
                   {"saliency": t1 - t0, "finetune": t2 - t1})


# --------------------------------------------------------------------------------------------
# SSD
# --------------------------------------------------------------------------------------------

def squared_grad_importance(model: nn.Module, dataset: Dataset, *, batch_size: int = 128, device=None,
                            progress: bool = False, desc: str = "importance", shuffle: bool = False,
                            seed: int = 0) -> list[torch.Tensor]:
    """Per-parameter ``mean over batches of (d CE_batch / d theta)^2``, the model in eval mode
    (BatchNorm statistics untouched); one tensor per trainable parameter, in ``parameters()`` order.
    The batch composition matters (the gradient of a mixed batch is squared as a whole), so
    ``shuffle`` draws batches at random (seeded by ``seed``) as a training loader would."""
    dev = torch.device(device) if device is not None else _model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    batches = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in _batches(dataset, batch_size, seed, dev, desc, progress, shuffle=shuffle, train=False):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            for a, p in zip(acc, params):
                if p.grad is not None:
                    a.addcmul_(p.grad, p.grad)
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return [a / max(batches, 1) for a in acc]


def ssd(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
        alpha: float = 10.0, lam: float = 1.0, batch_size: int = 8, device=None, seed: int = 0,
        progress: bool = True) -> UnlearnResult:
    """SSD (selective synaptic dampening): importances ``I_f`` on the forget set and ``I_D`` on the
    training data with :func:`squared_grad_importance`; every parameter entry with
    ``I_f > alpha * I_D`` is multiplied by ``min(lam * I_D / I_f, 1)``. No training: weights are
    only dampened, never grown or flipped.

    ``I_D`` stands for "all training data" under the budget: the retain budget plus the same
    stratified ``retain_fraction`` of the forget set, in shuffled (seeded) batches, so that the
    forget classes keep their natural share of D (with the whole forget set beside a 13% retain
    slice they would make up half of it and mask the very parameters SSD must find). At
    ``retain_fraction=1`` this is exactly the whole training set.

    ``batch_size`` matters: a forget-only batch's gradient is coherent while a mixed batch's
    gradient at a trained model is mostly noise shrinking like 1/B, so large batches inflate
    ``I_f / I_D``. Measured on digits (SmallCNN width 8, class 3, fraction 0.3 and 1.0): batch 128
    dampened 12-15% of the weights and left 7-13% retain accuracy, batch 32 4-6% / 36-52%,
    batch 8 1-2% with forget accuracy 0 and retain accuracy unchanged (99.6%), batch 1 nothing
    (forget accuracy stayed 100%). Hence the default 8."""
    if alpha <= 0 or lam < 0:
        raise ValueError(f"need alpha > 0 and lam >= 0, got alpha={alpha}, lam={lam}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    dev = setup.device
    forget_share = stratified_fraction(setup.forget_set, setup.retain_fraction, seed=setup.seed)
    data = ConcatDataset([forget_share, setup.budget])
    with _seeded(setup.seed, dev):
        t0 = time.perf_counter()
        i_f = squared_grad_importance(model, setup.forget_set, batch_size=batch_size, device=dev, progress=progress,
                                      desc="SSD forget importance")
        i_d = squared_grad_importance(model, data, batch_size=batch_size, device=dev, progress=progress,
                                      desc="SSD data importance", shuffle=True, seed=setup.seed)
        t1 = time.perf_counter()
        dampened = 0
        total = 0
        with torch.no_grad():
            params = [p for p in model.parameters() if p.requires_grad]
            for p, f_imp, d_imp in zip(params, i_f, i_d):
                sel = f_imp > alpha * d_imp
                factor = torch.where(sel, (lam * d_imp / f_imp.clamp_min(torch.finfo(f_imp.dtype).tiny)).clamp(max=1.0),
                                     torch.ones_like(p))
                p.mul_(factor)
                dampened += int(sel.sum())
                total += p.numel()
        t2 = time.perf_counter()
    info = {"alpha": alpha, "lambda": lam, "batch_size": batch_size, "dampened": dampened,
            "dampened_fraction": dampened / max(total, 1)}
    return _result(setup, model, "SSD", len(setup.budget), len(setup.forget_set), info,
                   {"importance": t1 - t0, "dampening": t2 - t1})


# --------------------------------------------------------------------------------------------
# SCRUB
# --------------------------------------------------------------------------------------------

def scrub(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
          epochs: int = 3, msteps: int = 2, lr: float = 5e-4, T: float = 4.0, gamma: float = 0.99,
          kd_alpha: float = 0.001, batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4,
          device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """SCRUB: the student (``model``) starts as a copy of the frozen teacher (the original). Each
    epoch < ``msteps`` first runs max-steps on the forget set (minimise ``-KL(teacher || student)``
    at temperature ``T``), then every epoch runs min-steps on the retain budget
    (``gamma * CE + kd_alpha * KL``). SGD lr 5e-4, 3 epochs, msteps 2."""
    _check_epochs(epochs, batch_size)
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    dev, budget = setup.device, setup.budget
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = _sgd(model, lr, momentum, weight_decay)
    max_log, min_log = _LossLog(dev), _LossLog(dev)
    max_epochs = min(msteps, epochs)
    was_training = model.training
    last_finite = _LastFinite(model)
    diverged = None
    with _seeded(setup.seed, dev):
        model.train()
        try:
            for epoch in range(epochs):
                if epoch < msteps and diverged is None:
                    for x, y in _batches(setup.forget_set, batch_size, setup.seed + 7 * epoch + 1, dev,
                                         f"SCRUB max {epoch + 1}/{max_epochs}", progress):
                        with torch.no_grad():
                            t_logits = teacher(x)
                        kl = _kl(model(x), t_logits, T)
                        opt.zero_grad(set_to_none=True)
                        (-kl).backward()
                        opt.step()
                        max_log.add(kl, x.shape[0])
                    if not max_log.end_epoch("SCRUB max-step", allow_divergence=True):
                        last_finite.restore()
                        opt = _sgd(model, lr, momentum, weight_decay)  # its momentum holds NaN
                        diverged = epoch + 1
                for x, y in _batches(budget, batch_size, setup.seed + 7 * epoch, dev,
                                     f"SCRUB min {epoch + 1}/{epochs}", progress):
                    with torch.no_grad():
                        t_logits = teacher(x)
                    logits = model(x)
                    loss = gamma * F.cross_entropy(logits, y) + kd_alpha * _kl(logits, t_logits, T)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    min_log.add(loss, x.shape[0])
                min_log.end_epoch("SCRUB min-step")
                last_finite.keep()
        finally:
            model.train(was_training)
    info = {"epochs": epochs, "msteps": msteps, "lr": lr, "T": T, "gamma": gamma, "kd_alpha": kd_alpha,
            "batch_size": batch_size, "max_kl": max_log.epochs, "min_loss": min_log.epochs,
            "ascent_diverged_in_epoch": diverged}
    return _result(setup, model, "SCRUB", len(budget), len(setup.forget_set) if max_epochs > 0 else 0, info)


# --------------------------------------------------------------------------------------------
# head-mask and DFMU
# --------------------------------------------------------------------------------------------

def head_mask(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
              device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """Head-mask: zero the classifier's forget-class rows and pin their bias to
    ``pruning.SUPPRESSED_LOGIT`` (the trivial method: features untouched). Reads no samples;
    ``train_set`` is only used to validate the classes."""
    setup = _Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    mask = head_mask_for(setup.head, setup.classes)
    build_mask_plan([], {}, setup.head, mask).apply()
    suppress_head(setup.head, setup.classes)
    return _result(setup, model, "head-mask", 0, 0, {}, masks={setup.head_name: mask})


def dfmu(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
         device=None, seed: int = 0, progress: bool = True, **kwargs) -> UnlearnResult:
    """DFMU (:func:`dfmu_ext.unlearn`), under the baselines' calling convention."""
    return unlearn(model, train_set, forget_classes, retain_fraction, device=device, seed=seed, progress=progress,
                   **kwargs)


METHODS: dict[str, Callable[..., UnlearnResult]] = {
    "Retrain": retrain,
    "FT": finetune,
    "GA": gradient_ascent,
    "RL": random_label,
    "l1-sparse": l1_sparse,
    "SalUn": salun,
    "SSD": ssd,
    "SCRUB": scrub,
    "head-mask": head_mask,
    "DFMU": dfmu,
}

#: Methods whose result does not depend on ``retain_fraction`` (Retrain is run on all retain data,
#: GA reads only forget data, head-mask reads nothing): a comparison runs them once per seed.
FRACTION_INDEPENDENT = frozenset({"Retrain", "GA", "head-mask"})

#: Methods with an ``epochs`` keyword (a comparison may cap it for quick runs).
EPOCH_METHODS = frozenset({"FT", "GA", "RL", "l1-sparse", "SalUn", "SCRUB"})
