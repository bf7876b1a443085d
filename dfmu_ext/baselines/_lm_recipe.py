r"""The causal-LM unlearning baselines' shared recipe: the fine-tuning loop of GA, GradDiff and NPO
(:mod:`.lm_ascent`, :mod:`.lm_npo`) and its measured learning rates. The causal-LM baselines (entity
unlearning, TOFU-like: Retrain in :mod:`.scratch`, GA, GradDiff, NPO, selective pruning in
:mod:`.lm_pruning`) follow the baselines' calling convention

``fn(model, train_set, forget_classes=None, retain_fraction, *, forget_indices, device, seed, progress, ...)``

``train_set`` holds causal-LM samples (:mod:`dfmu_ext.lm.task`), ``forget_indices`` name the
sequences to forget (a causal LM has no classes: ``forget_classes`` must be None), the retain set is
every other sequence and the retain *budget* a seeded random ``retain_fraction`` of it
(:func:`._plumbing.lm_split`, the same slice DFMU reads for the same seed). The model is modified in place;
arguments are checked before anything changes.

Notation: for a batch, :math:`L_f` / :math:`L_r` are the mean next-token NLL per scored token of the
forget / retain sequences (:func:`dfmu_ext.lm.task.lm_loss`, the Hugging Face models' own loss) and
:math:`\log\pi_\theta(y|x) = -\ell_n` a forget sequence's answer log-probability (summed over its
scored tokens, :func:`dfmu_ext.lm.task.sequence_nll`).

**The fine-tuning recipe** (GA, GradDiff, NPO) is TOFU's / OpenUnlearning's: AdamW, weight decay
0.01, ``epochs = 10`` passes over the forget set, each step one forget batch (and, for the methods
with a retain term, one retain batch of the same size drawn from the budget), learning rate warmed
up linearly over the first epoch then decayed linearly (the Hugging Face Trainer's "linear"
schedule TOFU runs). TOFU's lr 1e-5 is the lr its 7B models were *fine-tuned* with, i.e. the
unlearning lr equals the training lr; our models are trained from scratch at lr ~1e-3, and that
1:1 ratio destroys them (below). The defaults were picked on development splits of the ``people``
corpus (the zoo's Llama, original seed 0, forget people drawn with seeds 100 and 101 — never the
report's people; benchmarks/RESULTS.md) by the mean distance to Retrain over forget, paraphrased
and retain accuracy, forget answer probability and membership AUC: :data:`UNLEARN_LR` = 1e-4 for GA
and NPO, 2e-4 for GradDiff (its retain term tolerates more), ``ffn_frac=0.05`` for selective
pruning. The useful range is narrow and model-dependent. An earlier sweep (plain model, 4 layers of
width 128 trained 40 epochs at 1e-3; 10 of 200 people forgotten, 50 steps; forget / retain Q/A
accuracy, Retrain 0.06 / 1.00):

=========  =============  =============  =============  =============
lr         1e-4           2e-4           3e-4           1e-3
=========  =============  =============  =============  =============
GA         0.58 / 0.94    0.05 / 0.23    0.00 / 0.00    0.00 / 0.00
GradDiff   0.81 / 1.00    0.17 / 0.78    0.00 / 0.36    0.00 / 0.48
NPO        0.65 / 0.95    0.05 / 0.44    0.00 / 0.04    0.00 / 0.65
=========  =============  =============  =============  =============

(on a 2-layer width-64 model with 6 of 60 people forgotten, 30 steps, lr 1e-3 left every method at
retain accuracy 0.00, and the transition was between 1e-4 and 3e-4 as well).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .._common import seeded, train_mode
from ..finetune import AdamW
from ..lm.task import take
from ._plumbing import LastFinite, LMSetup, LossLog

__all__ = ["UNLEARN_LR", "GRADDIFF_LR", "check_recipe", "forget_loop"]

#: Default lr of GA / GradDiff / NPO: TOFU's unlearning lr equals its training lr (1e-5 for models
#: fine-tuned at 1e-5); ours are trained at ~1e-3 (see the module docstring).
UNLEARN_LR = 1e-4
GRADDIFF_LR = 2e-4


def check_recipe(epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0,
                  warmup_epochs: float = 0.0, gamma: float = 0.0, alpha: float = 0.0) -> None:
    """One-line ValueErrors for a recipe's bad numbers (before anything changes); ``gamma`` and
    ``alpha`` are the forget and retain terms' weights."""
    if not gamma >= 0 or not alpha >= 0:
        raise ValueError(f"gamma and alpha must be >= 0, got {gamma}, {alpha}")
    if int(epochs) < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not weight_decay >= 0 or not warmup_epochs >= 0:
        raise ValueError(f"weight_decay and warmup_epochs must be >= 0, got {weight_decay}, {warmup_epochs}")


def _adamw(model: nn.Module, lr: float, weight_decay: float) -> AdamW:
    """AdamW over the trainable parameters: :class:`dfmu_ext.finetune.AdamW` (``torch.optim``'s update
    on foreach ops), the optimizer DFMU's LM fine-tune uses, so no method pays the 2-3 s one-time
    import that creating the first ``torch.optim`` optimizer costs, and the times compare fairly."""
    return AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def _linear_schedule(step: int, warmup: int, total: int) -> float:
    """The lr factor of step ``step`` (0-based): ``(step+1)/warmup`` during the warmup, then linear
    decay that reaches ``1/(total-warmup)`` at the last step (never 0, so no step is wasted)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(total - step, 1) / max(total - warmup, 1)


class _RetainDraws:
    """Retain batches from ``budget``: seeded shuffled passes, one after the other; counts the
    distinct sequences read."""

    def __init__(self, budget, seed: int, device: torch.device):
        self.budget, self.seed, self.device = budget, seed, device
        self.order: list[int] = []
        self.passes = 0
        self.seen = torch.zeros(len(budget), dtype=torch.bool)

    def next(self, n: int):
        n = min(n, len(self.budget))
        while len(self.order) < n:
            gen = torch.Generator().manual_seed(self.seed * 7919 + self.passes)
            self.order += torch.randperm(len(self.budget), generator=gen).tolist()
            self.passes += 1
        idx, self.order = self.order[:n], self.order[n:]
        self.seen[idx] = True
        x, y = take(self.budget, idx)
        return x.to(self.device), y.to(self.device)

    @property
    def used(self) -> int:
        return int(self.seen.sum())


def forget_loop(setup: LMSetup, model: nn.Module, name: str, objective: Callable, *, epochs: int, lr: float,
                 batch_size: int, weight_decay: float, warmup_epochs: float, use_retain: bool,
                 progress: bool) -> tuple[dict, int]:
    """The shared unlearning loop: ``epochs`` seeded passes over the forget set in batches of
    ``batch_size``; each step minimises ``objective(model, forget_positions, xf, yf, retain_batch)``
    -> ``(loss, forget_nll)`` with AdamW and the linear warmup/decay schedule. An epoch whose loss
    is not finite brings back the last finite epoch's weights and stops (``info["diverged_in_epoch"]``).
    Returns (info, retain sequences read)."""
    forget, dev, engine = setup.forget_set, setup.device, setup.engine
    n = len(forget)
    per_epoch = -(-n // batch_size)
    total = per_epoch * epochs
    warmup = min(int(round(warmup_epochs * per_epoch)), total)
    opt = _adamw(model, lr, weight_decay)
    draws = _RetainDraws(setup.budget, setup.seed, dev) if use_retain else None
    log, forget_log = LossLog(dev), LossLog(dev)
    last_finite = LastFinite(model)
    diverged, step = None, 0
    bar = tqdm(total=total, desc=name, leave=False, unit="step", disable=not progress)
    with seeded(setup.seed, dev), train_mode(model):
        for epoch in range(epochs):
            gen = torch.Generator().manual_seed(setup.seed + epoch)
            order = torch.randperm(n, generator=gen).tolist()
            for start in range(0, n, batch_size):
                pos = order[start:start + batch_size]
                xf, yf = take(forget, pos)
                xf, yf = xf.to(dev), yf.to(dev)
                retain = draws.next(len(pos)) if draws is not None else None
                opt.lr = lr * _linear_schedule(step, warmup, total)
                with engine.autocast():
                    loss, forget_nll = objective(model, pos, xf, yf, retain)
                opt.zero_grad(set_to_none=True)
                engine.backward_step(loss, opt)
                log.add(loss, len(pos))
                forget_log.add(forget_nll, len(pos))
                step += 1
                bar.update(1)
            forget_log.end_epoch(name, allow_divergence=True)
            if not log.end_epoch(name, allow_divergence=True):
                last_finite.restore()
                diverged = epoch + 1
                break
            last_finite.keep()
    bar.close()
    opt.zero_grad(set_to_none=True)
    info = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
            "warmup_epochs": warmup_epochs, "steps": step, "loss": log.epochs, "forget_nll": forget_log.epochs,
            "diverged_in_epoch": diverged, "engine": engine.describe()}
    return info, (draws.used if draws is not None else 0)
