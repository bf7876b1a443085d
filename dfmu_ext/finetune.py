"""The short masked fine-tune on the retain budget, with early stopping once accuracy has recovered.

After every optimizer step the masks are re-applied (one fused op call) to the weights *and* the
optimizer's momentum, so pruned units stay exactly zero and never regrow.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ._common import TrainBatches, model_device, train_mode
from .distributed import Comm
from .model_io import cat
from .pruning import MaskPlan
from .result import FinetuneHistory
from .steps import StepEngine, StepOptions
from .targets import ForgetTargetConfig


@dataclass
class FinetuneConfig:
    epochs: int = 1
    lr: float = 0.003                   # measured: 0.01 lost 11 points of retain accuracy on digits
                                        # (30% budget), 0.003 lost 1.6; equal on Fashion-MNIST (0.910)
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    early_stop: bool = True
    recovery_tolerance: float = 0.005   # stop once running accuracy >= target - tolerance
    window: int = 1024                  # samples in the running-accuracy window
    min_fraction: float = 1.0           # never stop inside the first epoch: train-mode accuracy
                                        # overstates recovery (measured: stopping at 0.8 epoch cost 2 points of TA)
    min_steps: int = 50                 # run whole epochs until at least this many optimizer steps: a
                                        # tiny budget (160 samples: 2 steps an epoch) cannot recover otherwise

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1 and min_steps >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class MomentumSGD:
    r"""SGD with momentum and weight decay, the same updates as ``torch.optim.SGD`` (no dampening,
    no Nesterov), on multi-tensor ``torch._foreach_*`` ops:

    .. math::  d = g + \lambda\,\theta, \qquad b \leftarrow \mu\, b + d \;(b_0 = d), \qquad
               \theta \leftarrow \theta - \eta\, b

    Why not ``torch.optim.SGD``: creating the first ``torch.optim`` optimizer in a process imports
    ``torch._dynamo`` (2.3 s on torch 2.14, measured), more than the whole fine-tune of a small model —
    a one-time cost every ``dfmu forget`` would pay. ``state[p]["momentum_buffer"]`` has the layout
    ``torch.optim`` uses, so :meth:`MaskPlan.apply` masks the momentum too.
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.state: dict = {}

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum:
            fresh = [i for i, p in enumerate(params) if p not in self.state]
            old = [i for i, p in enumerate(params) if p in self.state]
            if old:
                bufs = [self.state[params[i]]["momentum_buffer"] for i in old]
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, [grads[i] for i in old])
            for i in fresh:
                self.state[params[i]] = {"momentum_buffer": torch.clone(grads[i]).detach()}
            grads = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_add_(params, grads, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class AdamW(MomentumSGD):
    r"""AdamW (decoupled weight decay; Loshchilov & Hutter) on ``torch._foreach_*`` ops, for the same
    reason as :class:`MomentumSGD` (no ``torch.optim`` import on the unlearning path):

    .. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
              \theta \leftarrow \theta(1 - \eta\lambda) - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    ``state[p]`` holds ``exp_avg`` and ``exp_avg_sq`` (``torch.optim``'s names and shapes), so
    :meth:`dfmu_ext.pruning.MaskPlan.apply` masks the moments too. ``lr`` may be changed between steps.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, 0.0, weight_decay)
        self.betas, self.eps, self.t = betas, float(eps), 0

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        self.t += 1
        b1, b2 = self.betas
        for p in params:
            if p not in self.state:
                self.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if self.weight_decay:
            torch._foreach_mul_(params, 1 - self.lr * self.weight_decay)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, (1 - b2 ** self.t) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, m, denom, value=-self.lr / (1 - b1 ** self.t))


def _epochs(config: FinetuneConfig, n: int, batch_size: int, extra_steps: int = 0) -> int:
    """``config.epochs``, raised to reach ``config.min_steps + extra_steps`` optimizer steps when the
    budget is small."""
    steps = (config.min_steps or 0) + extra_steps
    if config.epochs == 0 or not steps:
        return config.epochs
    per_epoch = max(1, -(-n // batch_size))
    return max(config.epochs, -(-steps // per_epoch))


class ForgetBatches:
    """The forget term's inputs: ``(x, t)`` pairs of forget samples and their soft targets, served
    ``batch_size`` at a time in a seeded order that reshuffles after every pass."""

    def __init__(self, x: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int, device, engine=None):
        if x.shape[0] != targets.shape[0] or x.shape[0] == 0:
            raise ValueError(f"forget term: {x.shape[0]} samples for {targets.shape[0]} targets")
        self.x, self.targets = x, targets
        self.batch_size = min(int(batch_size), x.shape[0])
        self.gen = torch.Generator().manual_seed(seed + 104729)
        self.device, self.engine = device, engine
        self.order, self.pos = torch.randperm(x.shape[0], generator=self.gen), 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > self.order.numel():
            self.order, self.pos = torch.randperm(self.x.shape[0], generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        x = self.x[idx].to(self.device, non_blocking=True)
        return (self.engine.batch(x) if self.engine is not None else x), self.targets[idx].to(self.device)


def masked_finetune(model: nn.Module, dataset: Dataset, plan: MaskPlan, config: FinetuneConfig | None = None, *,
                    target_accuracy: float | None = None, device=None, seed: int = 0,
                    progress: bool = False, comm: Comm | None = None,
                    steps: StepOptions | None = None, forget: tuple[torch.Tensor, torch.Tensor] | None = None,
                    forget_term: ForgetTargetConfig | None = None) -> FinetuneHistory:
    """SGD on ``dataset`` with ``plan`` re-applied after each step; returns what it did.

    ``target_accuracy`` (the model's accuracy on retain samples before pruning) enables the early
    stop: once the running train accuracy over the last ``window`` samples reaches it (minus the
    tolerance), fine-tuning ends. Under a process-group ``comm`` each rank trains on its sampler's
    share with a per-rank batch of ``comm.local_batch_size(batch_size)``, through ``comm.wrap(model)``
    (DDP), and the early-stop window sees each step's (correct, seen) summed over ranks, so every
    rank stops at the same step. ``steps`` sets precision and memory layout (:mod:`dfmu_ext.steps`).

    ``forget = (x_f, t)`` adds the forget term (``forget_term``, default ``ForgetTargetConfig()``) to
    the first ``forget_term.steps`` steps (the forget phase): each also runs ``forget_term.batch_size``
    of the forget samples ``x_f`` (in the same forward as the retain batch, so BatchNorm sees one
    batch) and adds ``forget_term.weight * mean_i(-sum_c t_ic log p_ic)``, the cross-entropy to their
    soft targets ``t`` (:mod:`dfmu_ext.targets`). The steps after it are retain-only (the recovery
    phase), and the run may take ``forget_term.steps`` more steps than
    ``min_steps`` asks, so that the early stop can wait for the retain accuracy to come back (measured:
    the forget term on every step cost the siblings of a forgotten sub-class 1-2.5 points more). Only
    the samples in ``x_f`` are read from the forget set.
    """
    config = config or FinetuneConfig()
    config.validate()
    comm = comm or Comm()
    device = torch.device(device) if device is not None else model_device(model)
    start = time.perf_counter()
    history = FinetuneHistory()
    if config.epochs == 0 or len(dataset) == 0:
        return history
    engine = StepEngine(model, device, steps)
    engine.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = MomentumSGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sampler = comm.sampler(dataset, seed)
    net = comm.wrap(model)
    term = forget_term or ForgetTargetConfig()
    forget_batches = (ForgetBatches(forget[0], forget[1], term.batch_size, seed, device, engine)
                      if forget is not None and term.weight > 0 and term.steps > 0 else None)
    extra_steps = term.steps if forget_batches is not None else 0
    recent: deque = deque()
    recent_correct = 0
    recent_total = 0
    try:
        with train_mode(model):
            for epoch in range(_epochs(config, len(dataset), config.batch_size, extra_steps)):  # global batch: same on every rank
                if sampler is not None:
                    sampler.set_epoch(epoch)
                batches = TrainBatches(dataset, comm.local_batch_size(config.batch_size), seed + epoch, device,
                                       sampler=sampler, desc=f"fine-tune {epoch + 1}",
                                       progress=progress, engine=engine)
                steps_per_epoch = len(batches)
                for step, (x, y) in enumerate(batches):
                    with engine.autocast():
                        if forget_batches is None or history.steps >= term.steps:
                            logits = net(x)
                            loss = F.cross_entropy(logits, y)
                        else:  # one forward: BatchNorm normalises retain and forget samples together
                            xf, tf = forget_batches.next()
                            both = net(cat([x, xf]))
                            logits = both[:x.shape[0]]
                            soft = -(tf * F.log_softmax(both[x.shape[0]:].float(), dim=1)).sum(1).mean()
                            loss = F.cross_entropy(logits, y) + term.weight * soft
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fine-tune loss became {loss.item()} at step {history.steps}")
                    optimizer.zero_grad(set_to_none=True)
                    engine.backward_step(loss, optimizer)
                    plan.apply(optimizer)
                    history.steps += 1
                    correct, seen = comm.reduce_counts(int((logits.detach().argmax(1) == y).sum()), int(x.shape[0]))
                    history.samples += seen
                    recent.append((correct, seen))
                    recent_correct += correct
                    recent_total += seen
                    while recent and recent_total - recent[0][1] >= config.window:
                        c, n = recent.popleft()
                        recent_correct -= c
                        recent_total -= n
                    if history.steps % 10 == 0:
                        history.loss.append(float(loss.item()))
                    warm = epoch > 0 or step + 1 >= config.min_fraction * steps_per_epoch
                    if (config.early_stop and target_accuracy is not None and warm and recent_total >= config.window
                            and recent_correct / recent_total >= target_accuracy - config.recovery_tolerance):
                        history.stopped_early = True
                        break
                if history.stopped_early:
                    history.epochs_run = epoch + (step + 1) / max(steps_per_epoch, 1)
                    break
                history.epochs_run = float(epoch + 1)
    finally:
        optimizer.zero_grad(set_to_none=True)
    history.seconds = time.perf_counter() - start
    return history
