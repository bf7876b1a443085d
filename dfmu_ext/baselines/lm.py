r"""Causal-LM unlearning baselines (entity unlearning, TOFU-like): Retrain, GA, GradDiff, NPO and
selective pruning, under the baselines' calling convention

``fn(model, train_set, forget_classes=None, retain_fraction, *, forget_indices, device, seed, progress, ...)``

``train_set`` holds causal-LM samples (:mod:`dfmu_ext.lm.task`), ``forget_indices`` name the
sequences to forget (a causal LM has no classes: ``forget_classes`` must be None), the retain set is
every other sequence and the retain *budget* a seeded random ``retain_fraction`` of it
(:func:`lm_split`, the same slice DFMU reads for the same seed). The model is modified in place;
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

import hashlib
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .._common import eval_mode, model_device, seeded, synchronize, train_mode
from ..finetune import AdamW
from ..lm.task import batches, check_scored, forward_logits, lm_loss, sequence_nll, split_forget, \
    take
from ..result import UnlearnResult
from ..steps import StepEngine, StepOptions
from ..zoo.lm_training import LMTrainConfig, train_causal_lm
from ._plumbing import LastFinite, LossLog

__all__ = ["lm_split", "lm_retrain", "lm_gradient_ascent", "lm_graddiff", "npo", "npo_loss", "selective_pruning",
           "UNLEARN_LR", "GRADDIFF_LR", "NPO_BETA"]

#: Default lr of GA / GradDiff / NPO: TOFU's unlearning lr equals its training lr (1e-5 for models
#: fine-tuned at 1e-5); ours are trained at ~1e-3 (see the module docstring).
UNLEARN_LR = 1e-4
GRADDIFF_LR = 2e-4
#: NPO's inverse temperature (Zhang et al. 2024; OpenUnlearning's TOFU default).
NPO_BETA = 0.1


# --------------------------------------------------------------------------------------------
# plumbing: the split, validated inputs, the result
# --------------------------------------------------------------------------------------------

def lm_split(train_set, forget_indices, retain_fraction: float, seed: int = 0) -> tuple[Subset, Subset, Subset]:
    """``(forget, retain, budget)`` subsets of a causal-LM ``train_set``: the sequences at
    ``forget_indices``, every other one, and a seeded random ``retain_fraction`` of those (at least
    one, sorted). One-line ValueErrors for empty, non-integer, out-of-range or duplicate indices,
    indices covering every sequence, or a fraction outside (0, 1].

    The same split as DFMU's (:func:`dfmu_ext.lm.task.split_forget`), so that for one seed every
    method reads the same budget.
    """
    return split_forget(train_set, forget_indices, retain_fraction, seed)


class _Setup:
    """Validated inputs shared by the LM baselines (nothing is changed before they pass)."""

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

    def result(self, model: nn.Module, method: str, retain_used: int, forget_used: int, info: dict,
               timings: dict | None = None, **fields) -> UnlearnResult:
        synchronize(self.device)
        timings = {**(timings or {}), "total": time.perf_counter() - self.start}
        return UnlearnResult(model=model, timings=timings, retain_samples_used=int(retain_used),
                             forget_samples_used=int(forget_used), method=method, info={**self.describe(), **info},
                             **fields)


def _check_recipe(epochs: int, lr: float, batch_size: int, weight_decay: float = 0.0,
                  warmup_epochs: float = 0.0) -> None:
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


def _forget_loop(setup: _Setup, model: nn.Module, name: str, objective: Callable, *, epochs: int, lr: float,
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


# --------------------------------------------------------------------------------------------
# Retrain
# --------------------------------------------------------------------------------------------

def _reset_in_place(model: nn.Module) -> str:
    """Fresh weights for ``model`` in place; returns how. The model's own ``reset_parameters()``
    if it defines one; else a Hugging Face model's ``init_weights()`` (its ``_is_hf_initialized``
    marks cleared first, so that every module is initialised again); else ``reset_parameters()`` of
    every module that holds parameters. ValueError when some parameter would keep its trained value."""
    reset = getattr(model, "reset_parameters", None)
    if callable(reset):
        reset()
        return "reset_parameters"
    init = getattr(model, "init_weights", None)
    if callable(init) and hasattr(model, "_init_weights") and hasattr(model, "config"):
        for t in list(model.modules()) + list(model.parameters()) + list(model.buffers()):
            if hasattr(t, "_is_hf_initialized"):
                try:
                    delattr(t, "_is_hf_initialized")
                except AttributeError:
                    pass
        init()
        return "init_weights"
    missing = [name or type(model).__name__ for name, m in model.named_modules()
               if any(True for _ in m.parameters(recurse=False)) and not callable(getattr(m, "reset_parameters", None))]
    if missing:
        raise ValueError(f"cannot re-initialise module {missing[0]!r} (no reset_parameters): pass model_factory= "
                         f"(a zero-arg callable returning a fresh model)")
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    return "modules' reset_parameters"


def lm_retrain(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 1.0, *,
               forget_indices=None, model_factory: Callable[[], nn.Module] | None = None,
               train_fn: Callable[[nn.Module, object], object] | None = None,
               train_config: LMTrainConfig | None = None, epochs: int | None = None, device=None, seed: int = 0,
               progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    """Retrain: a fresh model trained on the retain data only — the gold standard.

    The fresh model is ``model_factory()`` (built under ``seed``) or, without a factory, ``model``
    itself re-initialised in place: its own ``reset_parameters()``, else a Hugging Face model's
    ``init_weights()``, else every module's ``reset_parameters()`` (PyTorch's default init, which
    may differ from a model's own constructor: pass ``model_factory`` for the exact start); one-line
    ValueError when no path covers every parameter. It is trained by ``train_fn(fresh, retain)``
    (the original's recipe, given by the corpus) or, without one, by
    :func:`dfmu_ext.zoo.lm_training.train_causal_lm` with ``train_config`` (default
    :class:`~dfmu_ext.zoo.lm_training.LMTrainConfig`; ``epochs`` overrides its epochs, 0 only
    re-initialises) — all under ``seed``. The trained weights
    are then copied into ``model`` (in place; ValueError if the factory's model does not fit).
    ``retain_fraction`` 1.0 (the default) trains on every retain sequence, a smaller one on the budget.
    """
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    setup = _Setup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    config = train_config or LMTrainConfig()
    if epochs:
        config = LMTrainConfig(**{**config.to_dict(), "epochs": epochs})
    config = LMTrainConfig(**{**config.to_dict(), "seed": setup.seed})
    data = setup.retain_set if setup.retain_fraction == 1.0 else setup.budget
    t0 = time.perf_counter()
    with seeded(setup.seed, setup.device):
        if model_factory is not None:
            fresh = model_factory().to(setup.device)
            how = "model_factory"
        else:
            how = _reset_in_place(model)
            fresh = model
        history = None
        if train_fn is not None:
            train_fn(fresh, data)
        elif epochs != 0:
            history = train_causal_lm(fresh, data, config, setup.device, progress=progress)["loss"]
    if fresh is not model:
        try:
            model.load_state_dict(fresh.state_dict())
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"model_factory() made a model whose weights do not fit the given model: "
                             f"{str(e).splitlines()[0]}") from None
    synchronize(setup.device)
    t1 = time.perf_counter()
    info = {"init": how, "train_fn": getattr(train_fn, "__name__", repr(train_fn)) if train_fn else "train_causal_lm",
            "loss": history}
    if train_fn is None:
        info["train_config"] = config.to_dict() if epochs != 0 else None
    return setup.result(model, "Retrain", len(data), 0, info, {"train": t1 - t0})


# --------------------------------------------------------------------------------------------
# GA, GradDiff, NPO
# --------------------------------------------------------------------------------------------

def lm_gradient_ascent(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                       forget_indices=None, epochs: int = 10, lr: float = UNLEARN_LR, batch_size: int = 32,
                       weight_decay: float = 0.01, warmup_epochs: float = 1.0, device=None, seed: int = 0,
                       progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    r"""GA: minimise :math:`-L_f`, i.e. maximise the forget sequences' next-token loss (the module's
    recipe). Reads no retain data (``retain_fraction`` only shapes the split's checks)."""
    _check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")

    def objective(m, _pos, xf, yf, _retain):
        lf = lm_loss(forward_logits(m, xf), yf)
        return -lf, lf

    t0 = time.perf_counter()
    info, _ = _forget_loop(setup, model, "GA", objective, epochs=epochs, lr=lr, batch_size=batch_size,
                           weight_decay=weight_decay, warmup_epochs=warmup_epochs, use_retain=False,
                           progress=progress)
    return setup.result(model, "GA", 0, len(setup.forget_set), info, {"unlearn": time.perf_counter() - t0})


def lm_graddiff(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                forget_indices=None, epochs: int = 10, lr: float = GRADDIFF_LR, batch_size: int = 32,
                gamma: float = 1.0, alpha: float = 1.0, weight_decay: float = 0.01, warmup_epochs: float = 1.0,
                device=None, seed: int = 0, progress: bool = False,
                steps: StepOptions | None = None) -> UnlearnResult:
    r"""GradDiff: minimise :math:`-\gamma L_f + \alpha L_r` (:math:`\gamma = \alpha = 1`), each step
    one forget batch and a retain batch of the same size from the budget."""
    _check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    setup = _Setup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")

    def objective(m, _pos, xf, yf, retain):
        lf = lm_loss(forward_logits(m, xf), yf)
        lr_ = lm_loss(forward_logits(m, retain[0]), retain[1])
        return -gamma * lf + alpha * lr_, lf

    t0 = time.perf_counter()
    info, retain_used = _forget_loop(setup, model, "GradDiff", objective, epochs=epochs, lr=lr,
                                     batch_size=batch_size, weight_decay=weight_decay,
                                     warmup_epochs=warmup_epochs, use_retain=True, progress=progress)
    info.update(gamma=gamma, alpha=alpha)
    return setup.result(model, "GradDiff", retain_used, len(setup.forget_set), info,
                        {"unlearn": time.perf_counter() - t0})


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    r"""NPO's forget loss :math:`-\frac{2}{\beta}\,\overline{\log\sigma\big(-\beta(\log\pi_\theta(y|x) -
    \log\pi_{ref}(y|x))\big)}` over the sequences (``logp``, ``ref_logp``: (N,) summed answer
    log-probabilities). It equals :math:`\frac{2}{\beta}\log 2` at :math:`\theta = \theta_{ref}`, falls
    towards 0 as the forget answers become less likely than under the reference, and its gradient is
    GA's weighted by :math:`2\sigma(\beta\,\Delta)`, which vanishes once a sequence is unlikely
    enough (NPO's bounded, slower collapse)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


@torch.no_grad()
def _reference_logps(model: nn.Module, dataset, batch_size: int, engine: StepEngine) -> torch.Tensor:
    """(N,) summed answer log-probabilities of ``dataset`` under ``model`` now, in eval mode."""
    out = []
    with eval_mode(model):
        for x, y in batches(dataset, batch_size, device=engine.device):
            with engine.autocast():
                out.append(-sequence_nll(forward_logits(model, x), y).float())
    return torch.cat(out)


def npo(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
        forget_indices=None, epochs: int = 10, lr: float = UNLEARN_LR, batch_size: int = 32, beta: float = NPO_BETA,
        alpha: float = 1.0, gamma: float = 1.0, weight_decay: float = 0.01, warmup_epochs: float = 1.0,
        device=None, seed: int = 0, progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    r"""NPO (Negative Preference Optimization, Zhang et al. 2024), OpenUnlearning's TOFU variant:
    minimise :math:`\gamma\,` :func:`npo_loss` :math:`+ \alpha L_r` (:math:`\beta = 0.1`,
    :math:`\gamma = \alpha = 1`; ``alpha=0`` is plain NPO, which still reads one retain batch per step).

    The reference :math:`\pi_{ref}` is the model before unlearning, frozen, in eval mode. Since it
    never changes, its log-probabilities of the forget sequences are computed once before the first
    step instead of keeping a second copy of the model: the same numbers, half the forwards and no
    copy in memory."""
    _check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    setup = _Setup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")
    t0 = time.perf_counter()
    ref = _reference_logps(model, setup.forget_set, batch_size, setup.engine)

    def objective(m, pos, xf, yf, retain):
        logp = -sequence_nll(forward_logits(m, xf), yf)
        forget_term = npo_loss(logp, ref[pos], beta)
        loss = gamma * forget_term
        if alpha:
            loss = loss + alpha * lm_loss(forward_logits(m, retain[0]), retain[1])
        return loss, -logp.detach().sum() / (yf[:, 1:] != -100).sum()

    use_retain = bool(alpha)
    info, retain_used = _forget_loop(setup, model, "NPO", objective, epochs=epochs, lr=lr, batch_size=batch_size,
                                     weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                                     use_retain=use_retain, progress=progress)
    info.update(beta=beta, alpha=alpha, gamma=gamma)
    return setup.result(model, "NPO", retain_used, len(setup.forget_set), info,
                        {"unlearn": time.perf_counter() - t0})


# --------------------------------------------------------------------------------------------
# selective pruning
# --------------------------------------------------------------------------------------------

POSITIONS = ("tokens", "scored")


@torch.no_grad()
def _mean_abs_activation(model: nn.Module, dataset, layers, batch_size: int, device: torch.device,
                         positions: str) -> dict[str, torch.Tensor]:
    """Per neuron layer, ``(units,)`` float64 mean |activation| of its neurons (the down projection's
    input) over the chosen positions of ``dataset``: every non-pad token (``"tokens"``, the paper's)
    or the positions that predict a scored label (``"scored"``)."""
    sums = {l.name: torch.zeros(l.units, dtype=torch.float64, device=device) for l in layers}
    count = torch.zeros((), dtype=torch.float64, device=device)
    weight: list[torch.Tensor] = []

    def capture(name):
        def hook(_module, args):
            h = args[0]
            w = weight[0]
            if h.dim() != 3 or h.shape[:2] != w.shape:
                raise ValueError(f"{name}: expected (N, T, units) inputs for a (N, T) batch, got {tuple(h.shape)}")
            sums[name] += (h.detach().abs().double() * w.to(h.device, torch.float64).unsqueeze(-1)).sum((0, 1))
        return hook

    handles = [l.layer.register_forward_pre_hook(capture(l.name)) for l in layers]
    try:
        with eval_mode(model):
            for x, y in batches(dataset, batch_size, device=device):
                if positions == "tokens":
                    mask = x.get("attention_mask")
                    w = mask.clone() if mask is not None else torch.ones_like(x["input_ids"])
                else:
                    w = torch.zeros_like(y)
                    w[:, :-1] = (y[:, 1:] != -100)
                weight[:] = [w]
                count += w.double().sum()
                forward_logits(model, x)
    finally:
        for h in handles:
            h.remove()
    if float(count) == 0:
        raise ValueError("no position to measure the neurons on (every token is padding or unscored)")
    return {k: v / count for k, v in sums.items()}


def selective_pruning(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                      forget_indices=None, ffn_frac: float = 0.05, rounds: int = 5, eps: float = 1e-8,
                      positions: str = "tokens", batch_size: int = 32, device=None, seed: int = 0,
                      progress: bool = False) -> UnlearnResult:
    r"""Selective pruning (Pochinkov & Schoots 2024, "Dissecting language models: machine unlearning
    via selective pruning"), on the MLP neurons.

    Per round: for each MLP neuron :math:`c` (an input feature of a down projection,
    :func:`dfmu_ext.lm.neurons.mlp_neuron_layers`), its importance on a data set is the mean absolute
    activation over its positions (the paper's "abs"; ``positions="tokens"``: every non-pad token,
    ``"scored"``: the positions predicting a scored label), on the forget set (:math:`I_f`) and on the
    retain budget (:math:`I_r`); score :math:`s_c = I_{f,c} / (I_{r,c} + \epsilon)`; the ``ffn_frac``
    fraction of *all* MLP neurons (one global ranking over the layers) with the highest score among
    those not yet pruned is removed (the down projection's column zeroed,
    :func:`dfmu_ext.lm.neurons.neuron_mask_plan`). ``rounds`` rounds, importances re-measured after each
    (a pruned neuron's activation is unchanged but it is never picked again). Defaults: 2% per round as
    in the paper, 5 rounds (10% of the neurons). No gradient and no training: the only cost is
    forwards.
    """
    from ..lm.neurons import mlp_neuron_layers, neuron_mask_plan

    if not 0.0 < float(ffn_frac) <= 1.0:
        raise ValueError(f"ffn_frac must be in (0, 1], got {ffn_frac}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    setup = _Setup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed)
    dev = setup.device
    t0 = time.perf_counter()
    x0, _ = take(setup.forget_set, [0])
    layers = mlp_neuron_layers(model, x0.to(dev))
    masks = {l.name: torch.ones(l.units, device=dev) for l in layers}
    total_units = sum(l.units for l in layers)
    per_round = max(1, int(round(float(ffn_frac) * total_units)))
    scoring = pruning = 0.0
    history = []
    bar = tqdm(total=int(rounds), desc="selective pruning", leave=False, unit="round", disable=not progress)
    with seeded(setup.seed, dev):
        for _ in range(int(rounds)):
            ta = time.perf_counter()
            i_f = _mean_abs_activation(model, setup.forget_set, layers, batch_size, dev, positions)
            i_r = _mean_abs_activation(model, setup.budget, layers, batch_size, dev, positions)
            synchronize(dev)
            tb = time.perf_counter()
            score = torch.cat([i_f[l.name] / (i_r[l.name] + eps) for l in layers])
            alive = torch.cat([masks[l.name] > 0 for l in layers])
            score = torch.where(alive, score, torch.full_like(score, -math.inf))
            k = min(per_round, int(alive.sum()))
            if k == 0:
                break
            order = torch.sort(score, descending=True, stable=True).indices[:k]
            flat = torch.cat([masks[l.name] for l in layers])
            flat[order] = 0.0
            offset = 0
            for l in layers:
                masks[l.name] = flat[offset:offset + l.units].clone()
                offset += l.units
            neuron_mask_plan(layers, masks).apply()
            synchronize(dev)
            tc = time.perf_counter()
            scoring += tb - ta
            pruning += tc - tb
            history.append({"pruned": k, "min_score_pruned": float(score[order[-1]])})
            bar.update(1)
    bar.close()
    info = {"ffn_frac": float(ffn_frac), "rounds": int(rounds), "eps": eps, "positions": positions,
            "rounds_run": len(history), "per_round": history, "neuron_layers": [l.name for l in layers],
            "unlearn_seconds": time.perf_counter() - t0}
    masks = {k: v.cpu() for k, v in masks.items()}
    return setup.result(model, "SelectivePruning", len(setup.budget), len(setup.forget_set), info,
                        {"scoring": scoring, "pruning": pruning}, masks=masks,
                        pruned_units={k: int((m < 1).sum()) for k, m in masks.items()},
                        total_units={l.name: l.units for l in layers})
