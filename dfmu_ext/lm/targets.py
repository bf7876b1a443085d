r"""What a language model trained without the forget sequences would predict on them: the targets of
the LM forget term.

A model that never saw a person answers a question about them the way it answers the same question
about *other* people: its next-token distribution is that of the contexts that look like this one
in the retain data (the city names after "... born in", not this person's city). Early features are
where the original and a retrained model barely differ, so neighbours found there estimate Retrain's
next-token distribution without training anything. For each scored position :math:`(i, t)` of a forget
sequence,

.. math::  q_{i,t}(v) = \frac{1}{k} \sum_{(j,s) \in \mathrm{kNN}_k(i,t)} [y_{j,s+1} = v],

the histogram of the next tokens of its :math:`k` nearest scored retain positions by cosine similarity
of :math:`\phi`, the input of the model's first MLP down projection (the first block's neurons, after
its attention has mixed the context in) — :func:`dfmu_ext.targets.neighbour_targets` over positions
instead of samples. Grammar positions get their own next token back (every neighbour agrees); fact
positions get the spread of the other people's answers. The neighbours are searched among the retain
budget's positions only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._common import eval_mode
from ..model_io import Inputs, adapted
from ..targets import neighbour_targets
from .task import IGNORE_INDEX


#: The fewest neighbours a forget position's target is made of.
MIN_K = 5


@dataclass
class LMForgetTermConfig:
    r"""The forget term of the LM fine-tune: ``loss = L(retain batch) + weight * CE(q, p)`` on a batch
    of forget sequences, the soft cross-entropy averaged over their scored positions.

    Attributes:
        weight: 0 turns the term off.
        k: neighbour positions per forget position.
        batch_size: forget sequences per step (cycled).
        references: retain sequences of the budget whose scored positions are searched.
        samples: forget sequences the term reads (seeded; the scoring pass's first); None: all.
        k_share: the neighbours are at most ``k_share`` of the reference positions (and at least
            :data:`MIN_K`). With k = 200 on a budget of 46 scored positions (a question-answer corpus
            without filler) every forget position got the histogram of all 46 — every attribute's
            answers mixed — and the term moved nothing; 10% keeps k = 200 on the people corpus
            (thousands of positions) and gives k = 5 there.
        steps: the fine-tune steps that carry the term (the first ones); None: every step.
    """

    weight: float = 1.0
    k: int = 200
    k_share: float = 0.1    # k is at most this share of the reference positions (at least MIN_K): a rule from
                            # the sizes, so that a small budget's targets stay those of its nearest positions
    batch_size: int = 16
    references: int = 512
    samples: int | None = None
    steps: int | None = None

    def validate(self) -> None:
        if self.weight < 0 or self.k < 1 or self.batch_size < 1 or self.references < 1 or not 0 < self.k_share <= 1:
            raise ValueError("forget term: weight must be >= 0, k, batch_size and references >= 1, k_share in (0, 1]")
        if self.steps is not None and self.steps < 0:
            raise ValueError(f"forget term: steps must be >= 0 or None, got {self.steps}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"forget term: samples must be >= 1 or None, got {self.samples}")

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """Raised by the feature hook: the rest of the forward is not needed."""


@torch.no_grad()
def position_features(model: nn.Module, layer: nn.Module, inputs: Inputs, batch_size: int = 256) -> torch.Tensor:
    """``(N, T, D)`` float32: the input of ``layer`` (a down projection) at every position; the forward
    stops there."""
    out: list[torch.Tensor] = []
    captured: list[torch.Tensor] = []

    def grab(_module, args):
        captured.append(args[0].detach().float())
        raise _Stop

    handle = layer.register_forward_pre_hook(grab)
    try:
        with adapted(model), eval_mode(model):
            for start in range(0, inputs.shape[0], batch_size):
                captured.clear()
                try:
                    model(inputs[start:start + batch_size])
                except _Stop:
                    pass
                if not captured:
                    raise RuntimeError("the first MLP did not run in the model's forward")
                out.append(captured[0].cpu())
    finally:
        handle.remove()
    return torch.cat(out)


def _scored(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, next tokens and (sequence, position) of every scored position (label[t+1] != -100)."""
    nxt = labels[:, 1:].cpu()
    where = (nxt != IGNORE_INDEX).nonzero()
    feats = F.normalize(features[:, :-1][where[:, 0], where[:, 1]], dim=1)
    return feats, nxt[where[:, 0], where[:, 1]], where


def forget_targets(model: nn.Module, layer: nn.Module, forget: tuple[Inputs, torch.Tensor],
                   references: tuple[Inputs, torch.Tensor], vocab: int, k: int, k_share: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scored)``: ``q`` ``(N_f, T-1, vocab)`` the neighbour targets :math:`q_{i,t}` at the forget
    sequences' scored positions (zero elsewhere), ``scored`` ``(N_f, T-1)`` bool where they are. The
    neighbours are ``min(k, max(MIN_K, k_share * reference positions))``."""
    xf, yf = forget
    xr, yr = references
    f_feats, _, f_where = _scored(position_features(model, layer, xf), yf)
    r_feats, r_next, _ = _scored(position_features(model, layer, xr), yr)
    k = min(k, max(MIN_K, round(k_share * r_feats.shape[0])))
    hist = neighbour_targets(f_feats, r_feats, r_next, vocab, k)
    q = torch.zeros(yf.shape[0], yf.shape[1] - 1, vocab)
    q[f_where[:, 0], f_where[:, 1]] = hist
    scored = torch.zeros(yf.shape[0], yf.shape[1] - 1, dtype=torch.bool)
    scored[f_where[:, 0], f_where[:, 1]] = True
    return q, scored


def soft_target_loss(logits: torch.Tensor, q: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{mean}_{(i,t)\ \mathrm{scored}} -\sum_v q_{i,t}(v) \log p_\theta(v \mid x_{i,\le t})`."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    per_position = -(q.to(logp.device) * logp).sum(-1)
    scored = scored.to(logp.device)
    return per_position[scored].sum() / scored.sum().clamp_min(1)
