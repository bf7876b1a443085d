"""SCRUB: a student pushed away from the teacher on the forget set and kept close on the retain set."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._common import TrainBatches, seeded, train_mode
from ..model_io import copy_model
from ..result import UnlearnResult
from ..steps import StepOptions
from ._plumbing import LastFinite, LossLog, Setup, check_epochs, kl_distill, make_result, sgd
from .registry import register


@register("SCRUB", budgeted=True, default_epochs=3)
def scrub(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
          forget_indices=None, epochs: int = 3, msteps: int = 2, lr: float = 5e-4, T: float = 4.0, gamma: float = 0.99,
          kd_alpha: float = 0.001, batch_size: int = 128, momentum: float = 0.9, weight_decay: float = 5e-4,
          device=None, seed: int = 0, progress: bool = False,
          steps: StepOptions | None = None) -> UnlearnResult:
    """SCRUB: the student (``model``) starts as a copy of the frozen teacher (the original). Each
    epoch < ``msteps`` first runs max-steps on the forget set (minimise ``-KL(teacher || student)``
    at temperature ``T``), then every epoch runs min-steps on the retain budget
    (``gamma * CE + kd_alpha * KL``). SGD lr 5e-4, 3 epochs, msteps 2."""
    check_epochs(epochs, batch_size)
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices, steps)
    dev, budget = setup.device, setup.budget
    teacher = copy_model(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = sgd(model, lr, momentum, weight_decay)
    max_log, min_log = LossLog(dev), LossLog(dev)
    max_epochs = min(msteps, epochs)
    last_finite = LastFinite(model)
    diverged = None
    with seeded(setup.seed, dev):
        with train_mode(model):
            for epoch in range(epochs):
                if epoch < msteps and diverged is None:
                    for x, y in TrainBatches(setup.forget_set, batch_size, setup.seed + 7 * epoch + 1, dev,
                                             desc=f"SCRUB max {epoch + 1}/{max_epochs}", progress=progress,
                                             engine=setup.engine):
                        with torch.no_grad(), setup.engine.autocast():
                            t_logits = teacher(x)
                        with setup.engine.autocast():
                            kl = kl_distill(model(x).float(), t_logits.float(), T)
                        opt.zero_grad(set_to_none=True)
                        setup.engine.backward_step(-kl, opt)
                        max_log.add(kl, x.shape[0])
                    if not max_log.end_epoch("SCRUB max-step", allow_divergence=True):
                        last_finite.restore()
                        opt = sgd(model, lr, momentum, weight_decay)  # its momentum holds NaN
                        diverged = epoch + 1
                for x, y in TrainBatches(budget, batch_size, setup.seed + 7 * epoch, dev,
                                         desc=f"SCRUB min {epoch + 1}/{epochs}", progress=progress,
                                         engine=setup.engine):
                    with torch.no_grad(), setup.engine.autocast():
                        t_logits = teacher(x)
                    with setup.engine.autocast():
                        logits = model(x).float()
                        loss = gamma * F.cross_entropy(logits, y) + kd_alpha * kl_distill(logits, t_logits.float(), T)
                    opt.zero_grad(set_to_none=True)
                    setup.engine.backward_step(loss, opt)
                    min_log.add(loss, x.shape[0])
                min_log.end_epoch("SCRUB min-step")
                last_finite.keep()
    info = {"epochs": epochs, "msteps": msteps, "lr": lr, "T": T, "gamma": gamma, "kd_alpha": kd_alpha,
            "batch_size": batch_size, "max_kl": max_log.epochs, "min_loss": min_log.epochs,
            "ascent_diverged_in_epoch": diverged}
    return make_result(setup, model, "SCRUB", len(budget), len(setup.forget_set) if max_epochs > 0 else 0, info)
