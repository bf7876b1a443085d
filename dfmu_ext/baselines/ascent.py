"""GA: gradient ascent on the forget set's cross-entropy (reads no retain data)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._common import TrainBatches, seeded, train_mode
from ..result import UnlearnResult
from ..steps import StepOptions
from ._plumbing import LastFinite, LossLog, Setup, check_epochs, make_result, sgd
from .registry import register


@register("GA", budgeted=False, default_epochs=5)
def gradient_ascent(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
                    forget_indices=None, epochs: int = 5, lr: float = 5e-4, batch_size: int = 128,
                    momentum: float = 0.9,
                    weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = False,
                    steps: StepOptions | None = None) -> UnlearnResult:
    """GA: maximise the cross-entropy on the forget set. Reads no retain data (``retain_fraction``
    is ignored). The recipe's lr is 1e-4; 5e-4 is the default since 1e-4 barely moves the model."""
    check_epochs(epochs, batch_size)
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices, steps)
    forget, dev = setup.forget_set, setup.device
    opt = sgd(model, lr, momentum, weight_decay)
    log = LossLog(dev)
    last_finite = LastFinite(model)
    diverged = None
    with seeded(setup.seed, dev):
        with train_mode(model):
            for epoch in range(epochs):
                for x, y in TrainBatches(forget, batch_size, setup.seed + epoch, dev,
                                         desc=f"GA {epoch + 1}/{epochs}", progress=progress, engine=setup.engine):
                    with setup.engine.autocast():
                        ce = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    setup.engine.backward_step(-ce, opt)
                    log.add(ce, x.shape[0])
                if not log.end_epoch("GA", allow_divergence=True):
                    last_finite.restore()
                    diverged = epoch + 1
                    break
                last_finite.keep()
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "forget_ce": log.epochs,
            "ascent_diverged_in_epoch": diverged}
    return make_result(setup, model, "GA", 0, len(forget), info)
