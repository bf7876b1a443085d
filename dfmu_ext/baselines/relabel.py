"""RL (random labels on the forget set + the retain budget) and SalUn (RL restricted to the weights
most salient to the forget loss)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from .._common import TrainBatches, eval_mode, model_device, seeded, train_mode
from ..result import UnlearnResult
from ..steps import StepOptions
from ._plumbing import LossLog, Setup, check_epochs, make_result, sgd
from .registry import register


class _TaggedForget(Dataset):
    """The forget samples with label ``y + K`` (K classes), so the training loop can tell them from
    the retain samples in a mixed batch whatever their labels (needed when samples, not classes, go)."""

    def __init__(self, forget_set: Dataset, num_classes: int):
        self.forget_set, self.offset = forget_set, num_classes

    def __len__(self) -> int:
        return len(self.forget_set)  # type: ignore[arg-type]

    def __getitem__(self, i):
        x, y = self.forget_set[i]
        return x, y + self.offset


def _relabel_loop(method: str, setup: Setup, model: nn.Module, *, epochs, lr, batch_size, momentum, weight_decay,
                  progress, grad_mask: list[torch.Tensor] | None = None) -> dict:
    """Train on forget (labels redrawn uniformly each batch from the remaining classes, or from all
    classes when samples are forgotten) + the retain budget.

    With ``grad_mask`` (one 0/1 tensor per trainable parameter), weight decay is added to the
    gradient *before* it is multiplied by the mask and the optimizer runs without decay, so weights
    outside the mask stay exactly as they were (momentum never builds up for them either).
    """
    dev = setup.device
    k = setup.num_classes
    data = ConcatDataset([_TaggedForget(setup.forget_set, k), setup.budget])
    remaining = torch.tensor([c for c in range(k) if c not in (setup.classes or [])], dtype=torch.long)
    gen = torch.Generator().manual_seed(setup.seed + 104729)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = sgd(model, lr, momentum, 0.0 if grad_mask is not None else weight_decay)
    log = LossLog(dev)
    steps = 0

    @torch.no_grad()
    def mask_gradients():  # SalUn: weight decay first, then only the salient weights move
        for p, m in zip(params, grad_mask):
            if p.grad is None:
                continue
            if weight_decay:
                p.grad.add_(p, alpha=weight_decay)
            p.grad.mul_(m)

    with train_mode(model):
        for epoch in range(epochs):
            for x, y in TrainBatches(data, batch_size, setup.seed + epoch, dev,
                                     desc=f"{method} {epoch + 1}/{epochs}", progress=progress, engine=setup.engine):
                is_f = y >= k
                rand = remaining[torch.randint(len(remaining), (y.shape[0],), generator=gen)].to(dev)
                y = torch.where(is_f, rand, y)
                with setup.engine.autocast():
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                setup.engine.backward_step(loss, opt, before_step=mask_gradients if grad_mask is not None else None)
                steps += 1
                log.add(loss, x.shape[0])
            log.end_epoch(method)
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "momentum": momentum,
            "weight_decay": weight_decay, "steps": steps, "loss": log.epochs}


@register("RL", budgeted=True, default_epochs=10)
def random_label(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
                 forget_indices=None, epochs: int = 10, lr: float = 0.01, batch_size: int = 128, momentum: float = 0.9,
                 weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = False,
                 steps: StepOptions | None = None) -> UnlearnResult:
    """RL: cross-entropy on the forget samples with random labels (drawn from the remaining
    classes, afresh each batch) together with the retain budget under their true labels."""
    check_epochs(epochs, batch_size)
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices, steps)
    with seeded(setup.seed, setup.device):
        info = _relabel_loop("RL", setup, model, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
                             weight_decay=weight_decay, progress=progress)
    return make_result(setup, model, "RL", len(setup.budget), len(setup.forget_set), info)


def saliency_mask(model: nn.Module, forget_set: Dataset, keep: float = 0.5, *, batch_size: int = 128,
                  device=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency: ``|d CE(forget) / d theta|`` summed over the forget set (model in
    eval mode, so BatchNorm statistics are untouched); the top ``keep`` share of ALL trainable
    weights in one global ranking gets 1, the rest 0. Returns ``{param name: 0/1 float mask}``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    dev = torch.device(device) if device is not None else model_device(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) for _, p in named]
    with eval_mode(model):
        try:
            for x, y in TrainBatches(forget_set, batch_size, 0, dev,
                                     desc="SalUn saliency", progress=progress, shuffle=False, skip_singletons=False):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y, reduction="sum").backward()
                for g, (_, p) in zip(grads, named):
                    if p.grad is not None:
                        g.add_(p.grad)
        finally:
            model.zero_grad(set_to_none=True)
    flat = torch.cat([g.abs().flatten() for g in grads])
    k = max(1, int(round(keep * flat.numel())))
    chosen = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    chosen[torch.topk(flat, k, sorted=False).indices] = 1.0
    out, offset = {}, 0
    for g, (name, p) in zip(grads, named):
        out[name] = chosen[offset:offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
    return out


@register("SalUn", budgeted=True, default_epochs=10)
def salun(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
          forget_indices=None, keep: float = 0.5, epochs: int = 10, lr: float = 0.01, batch_size: int = 128,
          momentum: float = 0.9,
          weight_decay: float = 5e-4, device=None, seed: int = 0, progress: bool = False,
          steps: StepOptions | None = None) -> UnlearnResult:
    """SalUn: :func:`saliency_mask` (top ``keep`` = 50% of weights by forget-gradient magnitude),
    then RL in which every gradient (weight decay included) is multiplied by the mask, so only the
    salient weights change. SGD momentum 0.9, weight decay 5e-4, 10 epochs."""
    check_epochs(epochs, batch_size)
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices, steps)
    with seeded(setup.seed, setup.device):
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
    return make_result(setup, model, "SalUn", len(setup.budget), len(setup.forget_set), info,
                       {"saliency": t1 - t0, "finetune": t2 - t1})
