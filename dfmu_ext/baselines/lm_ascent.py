r"""GA and GradDiff for causal LMs: gradient ascent on the forget sequences' next-token loss, alone
(GA) or with a retain term (GradDiff), on the shared recipe of :mod:`._lm_recipe` (AdamW, linear
warmup and decay, its measured learning rates)."""
from __future__ import annotations

import time

from torch import nn

from ..lm.task import check_scored, forward_logits, lm_loss, take
from ..result import UnlearnResult
from ..steps import StepOptions
from ._lm_recipe import GRADDIFF_LR, UNLEARN_LR, check_recipe, forget_loop
from ._plumbing import LMSetup
from .registry import register

__all__ = ["lm_gradient_ascent", "lm_graddiff"]


@register("GA", "causal-lm")
def lm_gradient_ascent(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                       forget_indices=None, epochs: int = 10, lr: float = UNLEARN_LR, batch_size: int = 32,
                       weight_decay: float = 0.01, warmup_epochs: float = 1.0, device=None, seed: int = 0,
                       progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    r"""GA: minimise :math:`-L_f`, i.e. maximise the forget sequences' next-token loss (the module's
    recipe). Reads no retain data (``retain_fraction`` only shapes the split's checks)."""
    check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")

    def objective(m, _pos, xf, yf, _retain):
        lf = lm_loss(forward_logits(m, xf), yf)
        return -lf, lf

    t0 = time.perf_counter()
    info, _ = forget_loop(setup, model, "GA", objective, epochs=epochs, lr=lr, batch_size=batch_size,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs, use_retain=False,
                           progress=progress)
    return setup.result(model, "GA", 0, len(setup.forget_set), info, {"unlearn": time.perf_counter() - t0})


@register("GradDiff", "causal-lm", budgeted=True, default_epochs=10)
def lm_graddiff(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                forget_indices=None, epochs: int = 10, lr: float = GRADDIFF_LR, batch_size: int = 32,
                gamma: float = 1.0, alpha: float = 1.0, weight_decay: float = 0.01, warmup_epochs: float = 1.0,
                device=None, seed: int = 0, progress: bool = False,
                steps: StepOptions | None = None) -> UnlearnResult:
    r"""GradDiff: minimise :math:`-\gamma L_f + \alpha L_r` (:math:`\gamma = \alpha = 1`), each step
    one forget batch and a retain batch of the same size from the budget."""
    check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")

    def objective(m, _pos, xf, yf, retain):
        lf = lm_loss(forward_logits(m, xf), yf)
        lr_ = lm_loss(forward_logits(m, retain[0]), retain[1])
        return -gamma * lf + alpha * lr_, lf

    t0 = time.perf_counter()
    info, retain_used = forget_loop(setup, model, "GradDiff", objective, epochs=epochs, lr=lr,
                                     batch_size=batch_size, weight_decay=weight_decay,
                                     warmup_epochs=warmup_epochs, use_retain=True, progress=progress)
    info.update(gamma=gamma, alpha=alpha)
    return setup.result(model, "GradDiff", retain_used, len(setup.forget_set), info,
                        {"unlearn": time.perf_counter() - t0})
