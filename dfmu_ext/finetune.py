r"""The short masked fine-tune on the retain budget: one loop for every task.

The task supplies an :class:`Objective` (its batches, optimizer and loss); :func:`run_finetune` runs
the steps, re-applies the masks after every optimizer step (one fused op call) to the weights *and*
the optimizer's state, so pruned units stay exactly zero and never regrow, and stops early once the
retain accuracy has recovered (when the task measures one).

Distillation from the original (:func:`distill_loss`) is the knowledge-preserving part of the loss:
on the budget's samples the fine-tuned model is pulled towards the original's outputs, not only the
labels, so what the original knew beyond the labels (its confidence over the other classes, the
other facts a token distribution carries) is kept for data the budget does not hold.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Comm
from .pruning import MaskPlan
from .result import FinetuneHistory


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
    distill: float | None = None        # weight of the KL to the original's outputs on the budget batch;
                                        # None: the task's (classifiers: 0 for whole classes, 1 for samples)

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0 or (self.distill or 0) < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1, min_steps >= 0 and distill >= 0")

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


def epochs_for(config, n: int, batch_size: int, extra_steps: int = 0) -> int:
    """``config.epochs``, raised to reach ``config.min_steps + extra_steps`` optimizer steps when the
    budget is small."""
    steps = (config.min_steps or 0) + extra_steps
    if config.epochs == 0 or not steps:
        return config.epochs
    per_epoch = max(1, -(-n // batch_size))
    return max(config.epochs, -(-steps // per_epoch))


#: Elements (rows x classes) of one chunk of the distillation's float32 work: ~16 MB per temporary,
#: so a (N, T, vocab) batch never has a float32 copy of its own, only a few chunks'.
DISTILL_CHUNK = 1 << 22


class _DistillKL(torch.autograd.Function):
    r"""Sum over the kept rows of :math:`\mathrm{KL}(p^t_i \,\|\, q_i)`, ``p^t = softmax(teacher)``,
    ``q = softmax(student)``, over 2-D ``(rows, C)`` logits, row-chunked in float32 (float64 for float64
    input). The loss is a scalar, so its gradient is known up to the incoming factor once the forward
    has both softmaxes: each chunk's

    .. math:: \partial/\partial s_{ic} = q_{ic} - p^t_{ic}, \qquad
              \partial/\partial t_{ic} = p^t_{ic}\,\big(\log p^t_{ic} - \log q_{ic} - \mathrm{KL}_i\big)

    is written there, in the logits' dtype, for the kept rows only; that is all the backward keeps (no
    logits, no float32 copies) and it only scales it. ``rows`` (a 1-D index tensor, or None for all)
    picks the rows; rows outside get zero gradient. ``grad`` False (no autograd): nothing is kept."""

    @staticmethod
    def forward(ctx, student, teacher, rows, grad: bool):
        dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        n = student.shape[0] if rows is None else rows.numel()
        want_s, want_t = (grad and ctx.needs_input_grad[0]), (grad and ctx.needs_input_grad[1])
        gs = student.new_empty((n, student.shape[1])) if want_s else None
        gt = teacher.new_empty((n, teacher.shape[1])) if want_t else None
        total = torch.zeros((), dtype=dtype, device=student.device)
        step = max(1, DISTILL_CHUNK // max(1, student.shape[1]))
        for a in range(0, n, step):
            idx = slice(a, a + step) if rows is None else rows[a:a + step]
            log_q, log_p = student[idx].to(dtype).log_softmax(-1), teacher[idx].to(dtype).log_softmax(-1)
            p = log_p.exp()
            # 0 log 0 = 0: a class the teacher rules out (-inf logit) adds nothing, not NaN
            term = torch.where(p > 0, p * (log_p - log_q), 0.0)
            kl = term.sum(-1, keepdim=True)
            total += kl.sum()
            if want_t:
                gt[a:a + step] = torch.where(p > 0, p * (log_p - log_q - kl), 0.0)
            if want_s:
                gs[a:a + step] = log_q.exp_().sub_(p)
        ctx.save_for_backward(gs, gt, rows)
        ctx.shapes = (student.shape, teacher.shape)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gs, gt, rows = ctx.saved_tensors
        out = []   # g * grad: a 0-dim float factor, applied in float and rounded once to g's dtype
        for g, shape in zip((gs, gt), ctx.shapes):
            if g is None or rows is None:
                out.append(None if g is None else g * grad)
            else:
                out.append(g.new_zeros(shape).index_copy_(0, rows, g).mul_(grad))  # no (rows, C) temporary
        return out[0], out[1], None, None


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    r"""The mean KL divergence from the original's output distribution to the model's,

    .. math:: \mathrm{mean}_i \sum_c p^{\mathrm{orig}}_{ic}\,(\log p^{\mathrm{orig}}_{ic} - \log p_{ic}),

    over the rows of ``(..., C)`` logits (every row, or those where the boolean ``where`` is true:
    a causal LM's real positions; ``where`` has the leading shape of the logits, or a prefix of it).
    Its gradient in the model's logits is :math:`(\mathrm{softmax}(s_i) - p^{\mathrm{orig}}_i)/R` on
    the :math:`R` kept rows, 0 elsewhere. The value is float32 (float64 for float64 logits); no row
    counting gives a zero loss that still has a graph.

    Memory: low-precision logits are upcast in row chunks of :data:`DISTILL_CHUNK` elements, and the
    backward keeps one ``(rows, C)`` tensor in the logits' dtype, the gradient itself
    (:class:`_DistillKL`), where an eager ``log_softmax``/``kl_div`` held up to seven float32 copies at
    once (the kept rows' copies, both log-softmaxes, the ``exp``, the difference, the product)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    teacher = teacher.to(student.device)
    c = student.shape[-1]
    s2, t2 = student.reshape(-1, c), teacher.reshape(-1, c)
    rows = None
    if where is not None:  # the kept rows by index: nothing of size positions x vocabulary is copied for them
        where = where.to(student.device, torch.bool)
        lead = student.shape[:-1]
        if where.shape != lead[:where.dim()]:
            raise ValueError(f"where {tuple(where.shape)} does not fit logits {tuple(student.shape)}")
        where = where.reshape(where.shape + (1,) * (len(lead) - where.dim())).expand(lead)
        rows = where.reshape(-1).nonzero().squeeze(1)
    n = s2.shape[0] if rows is None else rows.numel()
    if n == 0:
        return student.sum() * 0.0
    return _DistillKL.apply(s2, t2, rows, torch.is_grad_enabled()) / n


class Objective:
    """One task's fine-tune: its optimizer, its batches and its loss (the task builds it).

    Attributes:
        optimizer: a :class:`MomentumSGD`/:class:`AdamW` over the trained parameters.
        epochs: how many passes over the budget the fine-tune runs (before any early stop).
        comm: the process group's :class:`dfmu_ext.distributed.Comm` (counts summed over ranks).
        forget_side: True while :func:`run_finetune` runs the forget side's steps (``forget="always"``),
            False otherwise; an objective may add terms there (a causal LM's own-token floor,
            :func:`dfmu_ext.lm.targets.own_token_floor_loss`).
    """

    optimizer = None
    epochs: int = 0
    comm: Comm = Comm()

    def context(self):
        """The context the steps run in (train mode, frozen parameters, seeding)."""
        raise NotImplementedError

    def batches(self, epoch: int, progress: bool):
        """The budget's batches of one epoch (a sized iterable)."""
        raise NotImplementedError

    def loss(self, batch, forget_phase: bool) -> tuple[torch.Tensor, int | None, int]:
        """``(loss, correct, seen)`` of one batch; the forget term is added while ``forget_phase``."""
        raise NotImplementedError

    forget_steps: int | None = 0    # how many first steps carry the forget term (None: all)
    forget_side: bool = False       # set by run_finetune

    def backward_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()


def run_finetune(objective: Objective, plan: MaskPlan, config, *, target_accuracy: float | None = None,
                 progress: bool = False, max_steps: int | None = None, forget: bool | str = True,
                 history: FinetuneHistory | None = None) -> FinetuneHistory:
    """Run ``objective`` for its epochs with ``plan`` re-applied after every step; returns what it did.

    ``target_accuracy`` (the model's accuracy on retain samples before pruning) enables the early
    stop of ``config`` (``early_stop``, ``window``, ``recovery_tolerance``, ``min_fraction``): once
    the running train accuracy over the last ``window`` samples reaches it (minus the tolerance),
    fine-tuning ends; steps of a fixed-length forget phase (``objective.forget_steps``) do not count
    towards that window, so the fine-tune never ends while the forget term still pushes. Under a
    process group every rank sees each step's (correct, seen) summed over ranks, so every rank stops
    at the same step. ``max_steps`` ends the run after that many steps
    (the retention guard's recovery), ``forget=False`` leaves the forget term out (``"always"`` puts
    it on every step: the forget side's extra steps), and ``history`` is continued when given.
    """
    history = history or FinetuneHistory()
    start = time.perf_counter() - history.seconds
    comm, optimizer = objective.comm, objective.optimizer
    stop_early = bool(getattr(config, "early_stop", False)) and target_accuracy is not None
    recent: deque = deque()
    recent_correct = recent_total = done = 0
    first_step = history.steps
    # a forget phase of fixed length (the fine-tune's first ``forget_steps``): its steps' retain accuracy
    # does not count towards the early stop, so the fine-tune never ends while the forget term pushes
    # (digits sub-classes: it ended after 9-33 of 80 steps, siblings 3-4 points under Retrain's)
    phased = forget is True and bool(objective.forget_steps)
    objective.forget_side = forget == "always"   # (an objective may add terms there: the LM's own-token floor)
    try:
        with objective.context():
            for epoch in (range(objective.epochs) if max_steps is None else itertools.count()):
                batches = objective.batches(epoch, progress)
                steps_per_epoch = len(batches)
                for step, batch in enumerate(batches):
                    phase = forget == "always" or (forget and (objective.forget_steps is None
                                                               or history.steps < objective.forget_steps))
                    loss, correct, seen = objective.loss(batch, phase)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"fine-tune loss became {loss.item()} at step {history.steps}")
                    optimizer.zero_grad(set_to_none=True)
                    objective.backward_step(loss)
                    plan.apply(optimizer)
                    history.steps += 1
                    done += 1
                    if history.steps % 10 == 0:
                        history.loss.append(float(loss.item()))
                    if correct is None:
                        history.samples += seen
                    else:
                        correct, seen = comm.reduce_counts(correct, seen)
                        history.samples += seen
                    if correct is not None and not (phased and history.steps <= objective.forget_steps):
                        recent.append((correct, seen))
                        recent_correct += correct
                        recent_total += seen
                        while recent and recent_total - recent[0][1] >= config.window:
                            c, n = recent.popleft()
                            recent_correct -= c
                            recent_total -= n
                    warm = epoch > 0 or step + 1 >= getattr(config, "min_fraction", 1.0) * steps_per_epoch
                    if (stop_early and warm and recent_total >= config.window
                            and recent_correct / recent_total >= target_accuracy - config.recovery_tolerance):
                        history.stopped_early = True
                        break
                    if max_steps is not None and done >= max_steps:
                        break
                if history.stopped_early or (max_steps is not None and done >= max_steps):
                    if max_steps is None:
                        history.epochs_run = epoch + (step + 1) / max(steps_per_epoch, 1)
                    break
                if max_steps is None:
                    history.epochs_run = float(epoch + 1)
    finally:
        optimizer.zero_grad(set_to_none=True)
        objective.forget_side = False
    if max_steps is not None:
        history.recovery_steps += history.steps - first_step
    history.seconds = time.perf_counter() - start
    return history
