"""The causal-LM training recipe (the ``people`` originals' and their Retrain's).

AdamW (weight decay on the matrices only), linear warm-up then cosine decay to
``min_lr_ratio * lr``, gradient clipping, seeded shuffling; the loss is the mean next-token loss per
scored token (:func:`dfmu_ext.lm.task.lm_loss`). Each batch is cut to its longest real sequence
(right padding), so short Q/A batches cost what they hold. Retrain uses the same recipe on the
retain subset: :func:`train_causal_lm` takes any causal-LM data set (a
:class:`~dfmu_ext.lm.task.TokenSequences`, a ``Subset`` of one, a list of dict samples).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import seeded, synchronize, train_mode
from ..lm.task import IGNORE_INDEX, batches, check_lm_dataset, forward_logits, lm_loss
from ..model_io import Inputs

__all__ = ["LMTrainConfig", "train_causal_lm"]


@dataclass
class LMTrainConfig:
    """The causal-LM recipe (defaults: the ``people`` original).

    Measured on the default corpus and llama model (4 layers, width 128, MLP 256), 2 CPU threads:
    about 55-60 s; seed 0 / 1 answer 99.4 % / 100 % of the trained Q/A and 93.4 % / 99.8 % of the
    paraphrased questions (greedy exact match), holdout people 8 % / 3 % (chance is about 7 %).
    Memorisation comes after a plateau (about 10 % until epoch 8-10) and completes around
    epoch 15-18; fewer epochs leave seeds below 95 %. Larger learning rates (5e-3, 1e-2) lengthen the
    plateau of the llama model, and an MLP of 512 learned more slowly than one of 256."""
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMTrainConfig":
        return cls(**d)


def _trim(x: Inputs, y: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
    """Cut a right-padded batch to its longest real sequence."""
    mask = x.get("attention_mask")
    if mask is None:
        return x, y
    length = int(mask.sum(1).max())
    if length >= y.shape[1]:
        return x, y
    return x.map(lambda t: t[:, :length] if t.dim() >= 2 and t.shape[1] == y.shape[1] else t), y[:, :length]


def _lr_factor(step: int, total: int, config: LMTrainConfig) -> float:
    warm = min(config.warmup_steps, max(total - 1, 0))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_causal_lm(model: nn.Module, train_set: Dataset, config: LMTrainConfig | None = None,
                    device: torch.device | str = "cpu", progress: bool = False, *, on_epoch=None) -> dict:
    """Train ``model`` in place on the causal-LM samples of ``train_set`` with ``config``.

    Reproducible: every epoch's order comes from ``config.seed`` and the epoch, and the global RNG
    is seeded (forked, so the caller's stream is untouched). Returns ``{"loss", "seconds", "lr"}``
    (per epoch: mean loss per scored token, wall seconds, LR at the end) plus ``"total_seconds"``,
    ``"steps"``, ``"samples"`` and ``"config"``. The model's train/eval flags are restored on return.
    ``on_epoch(epoch, history)``, when given, is called after every epoch (in train mode).
    """
    config = config or LMTrainConfig()
    check_lm_dataset(train_set)
    n = len(train_set)
    device = torch.device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)
    per_epoch = math.ceil(n / config.batch_size)
    total = per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, config))
    history: dict = {"loss": [], "seconds": [], "lr": []}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="train LM", leave=False)
    start = time.perf_counter()
    steps = 0
    try:
        with seeded(config.seed, device), train_mode(model):
            for epoch in range(config.epochs):
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                tokens = 0
                for x, y in batches(train_set, config.batch_size, shuffle=True,
                                    seed=config.seed * 100003 + epoch, device=device):
                    x, y = _trim(x, y)
                    scored = int((y[:, 1:] != IGNORE_INDEX).sum())
                    if scored == 0:
                        continue
                    loss = lm_loss(forward_logits(model, x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        nn.utils.clip_grad_norm_(params, config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    steps += 1
                    loss_sum += loss.detach().double() * scored
                    tokens += scored
                    if bar is not None:
                        bar.update(1)
                value = loss_sum.item() / max(tokens, 1)
                if not math.isfinite(value):
                    raise FloatingPointError(f"LM training loss became {value} in epoch {epoch + 1}: lower the "
                                             f"learning rate or check the inputs")
                history["loss"].append(value)
                history["lr"].append(optimizer.param_groups[0]["lr"])
                synchronize(device)
                history["seconds"].append(time.perf_counter() - t0)
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.3f}")
                if on_epoch is not None:
                    on_epoch(epoch, history)
    finally:
        if bar is not None:
            bar.close()
    history["total_seconds"] = time.perf_counter() - start
    history["steps"] = steps
    history["samples"] = n
    history["config"] = config.to_dict()
    return history
