"""FT and l1-sparse: fine-tune on the retain budget (the latter with a decaying L1 penalty)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._common import TrainBatches, seeded, train_mode
from ..result import UnlearnResult
from ..steps import StepOptions
from ._plumbing import LossLog, Setup, check_epochs, make_result, sgd, steps_per_epoch
from .registry import register


def _retain_finetune(method: str, model, train_set, forget_classes, retain_fraction, *, forget_indices, epochs, lr,
                     batch_size,
                     momentum, weight_decay, l1_alpha, device, seed, progress, steps) -> UnlearnResult:
    check_epochs(epochs, batch_size)
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices, steps)
    budget, dev = setup.budget, setup.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = sgd(model, lr, momentum, weight_decay)
    total_steps = max(1, epochs * steps_per_epoch(len(budget), batch_size))
    log = LossLog(dev)
    step = 0
    with seeded(setup.seed, dev):
        with train_mode(model):
            for epoch in range(epochs):
                for x, y in TrainBatches(budget, batch_size, setup.seed + epoch, dev,
                                         desc=f"{method} {epoch + 1}/{epochs}", progress=progress, engine=setup.engine):
                    with setup.engine.autocast():
                        loss = F.cross_entropy(model(x), y)
                    if l1_alpha:
                        alpha_t = l1_alpha * max(0.0, 1.0 - step / total_steps)
                        loss = loss + alpha_t * torch.stack([p.abs().sum() for p in params]).sum()
                    opt.zero_grad(set_to_none=True)
                    setup.engine.backward_step(loss, opt)
                    step += 1
                    log.add(loss, x.shape[0])
                log.end_epoch(method)
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
            "weight_decay": weight_decay, "steps": step, "loss": log.epochs}
    if l1_alpha:
        info["alpha"] = l1_alpha
    return make_result(setup, model, method, len(budget), 0, info)


@register("FT", budgeted=True, default_epochs=10)
def finetune(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
             forget_indices=None, epochs: int = 10, lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9,
             weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = False,
             steps: StepOptions | None = None) -> UnlearnResult:
    """FT: fine-tune with cross-entropy on the retain budget (catastrophic forgetting of the rest)."""
    return _retain_finetune("FT", model, train_set, forget_classes, retain_fraction,
                            forget_indices=forget_indices, epochs=epochs, lr=lr,
                            batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, l1_alpha=0.0,
                            device=device, seed=seed, progress=progress, steps=steps)


@register("l1-sparse", budgeted=True, default_epochs=10)
def l1_sparse(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
              forget_indices=None, alpha: float = 5e-4, epochs: int = 10, lr: float = 0.01, batch_size: int = 128,
              momentum: float = 0.9, weight_decay: float = 5e-4, device=None, seed: int = 0,
              progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    """l1-sparse: FT with loss ``CE + alpha_t * sum_p |theta_p|``, ``alpha_t`` decaying linearly per
    step from ``alpha`` to 0 over the run (the recipe's sweep range is 1e-5 ... 1e-3)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    return _retain_finetune("l1-sparse", model, train_set, forget_classes, retain_fraction,
                            forget_indices=forget_indices, epochs=epochs, lr=lr,
                            batch_size=batch_size, momentum=momentum, weight_decay=weight_decay, l1_alpha=alpha,
                            device=device, seed=seed, progress=progress, steps=steps)
