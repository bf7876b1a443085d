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
instead of samples, searched in blocks (:func:`nearest_positions`) and stored sparsely
(:class:`SparseTargets`: at most k tokens per position, where a dense q is positions x vocabulary).
Grammar positions get their own next token back (every neighbour agrees); fact positions get the
spread of the other people's answers. The neighbours are searched among the retain
budget's positions only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._common import eval_mode
from ..model_io import Inputs, adapted
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
        own_token_share: the share of its weight each target keeps on the forget sequence's own
            next token (:meth:`SparseTargets.own_token_scaled`; 0 removes it). The neighbours' mean
            gives a forgotten fact's answer its share among the values (median 0.03-0.06 at the first
            answer token on the people corpus), where Retrain answers one value confidently and
            gives the fact's own 0.000-0.002. At 0 the membership AUC fell on 8 of 8 held-out
            people-corpus splits (0.85 -> 0.77; Retrain 0.52) and relearning on 7; where an attribute
            takes few values (4-6) it forgets below chance (keep suite: 0.02 against Retrain's
            0.21). Not the default for that reason (benchmarks/RESULTS.md; measured on the plain mean,
            ``own_token_if_top=False``).
        own_token_if_top: each neighbour's next-token distribution keeps the forget sequence's own
            next token only where it is that neighbour's most likely token
            (:func:`dfmu_ext.lm.neighbours.template_targets`): the prior's share of it is kept, the
            share read back from the rest of the sequence is not. False: the plain mean (the
            default before 2026-12-06).
        own_token_floor: :math:`\varepsilon`: on the forget side's steps, where a target gives the
            forget sequence's own next token less than :math:`\varepsilon`, that token's probability
            is pushed down to :math:`\varepsilon` and no further (:func:`own_token_floor_loss`).
            None: off. The soft cross-entropy pulls a token by :math:`p - q`: where :math:`q` gives
            the forgotten answer nothing, by its own few percent, and the model kept it at a median
            0.034 where Retrain gives 0.000 (the people corpus): the membership attack's signal.
            3e-3 is about what the original gives a never-seen person's answer there (median
            negative log-likelihood 5.1-6.3).
        own_token_floor_weight: :math:`\lambda`, the floor term's weight beside the soft
            cross-entropy's 1.
        strict_stage: with ``nonmembers=``, a second forget-side stage on stricter targets (one
            made-up person's answer, :meth:`dfmu_ext.tasks.causal_lm.CausalLMTask.stricter_targets`)
            while the non-members still tell the forget sequences apart (:func:`dfmu_ext.unlearn`).
        relearn_step, relearn_moves, relearn_rest_share: :math:`s`, which weights move, :math:`r`: on the
            forget side's steps the term is :math:`r\,L_f(\theta) + (1 - r)\,L_f(\theta')`, :math:`\theta'`
            one simulated relearning step of :math:`s` per weight away on the weights the fine-tune leaves
            ``"frozen"`` (or on the ``"trained"`` ones); why each, and their defaults:
            :mod:`dfmu_ext.lm.relearning`. :math:`s` = 0: off. Single process only.
    """

    weight: float = 1.0
    k: int = 200
    k_share: float = 0.1    # k is at most this share of the reference positions (at least MIN_K): a rule from
                            # the sizes, so that a small budget's targets stay those of its nearest positions
    batch_size: int = 16
    references: int = 512
    samples: int | None = None
    steps: int | None = None
    source: str = "neighbours"  # q from the forget sequences' swapped neighbours (lm.neighbours), or "positions"
    per_sequence: int = 8       # neighbours per forget sequence that q averages over
    own_token_share: float = 1.0  # 1: the neighbours' mean as it is
    own_token_if_top: bool = True  # each neighbour keeps the own next token only as its best guess
    own_token_floor: float | None = 3e-3   # the forget side pushes the own token down to this, no further
    own_token_floor_weight: float = 0.3
    strict_stage: bool = True     # (only with non-members: see unlearn's forget side)
    relearn_step: float = 0.0
    relearn_moves: str = "frozen"
    relearn_rest_share: float = 0.0

    def validate(self) -> None:
        for name, allowed in (("source", ("neighbours", "positions")), ("relearn_moves", ("frozen", "trained"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"forget term: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("own_token_if_top", "strict_stage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"forget term: {name} must be True or False, got {getattr(self, name)!r}")
        if self.own_token_floor is not None and not 0.0 < self.own_token_floor < 1.0:
            raise ValueError(f"forget term: own_token_floor must be in (0, 1) or None, got {self.own_token_floor}")
        step, rest = self.relearn_step, self.relearn_rest_share
        if not (isinstance(step, (int, float)) and not isinstance(step, bool) and 0.0 <= step < 1.0):
            raise ValueError(f"forget term: relearn_step must be in [0, 1), got {step!r}")
        if not (isinstance(rest, (int, float)) and not isinstance(rest, bool) and 0.0 <= rest <= 1.0):
            raise ValueError(f"forget term: relearn_rest_share must be in [0, 1], got {rest!r}")
        if self.own_token_floor_weight < 0:
            raise ValueError(f"forget term: own_token_floor_weight must be >= 0, got {self.own_token_floor_weight}")
        if not 0.0 <= self.own_token_share <= 1.0:
            raise ValueError(f"forget term: own_token_share must be in [0, 1], got {self.own_token_share}")
        if self.per_sequence < 1:
            raise ValueError(f"forget term: per_sequence must be >= 1, got {self.per_sequence}")
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


def scored_features(model: nn.Module, layer: nn.Module, inputs: Inputs, labels: torch.Tensor,
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features, next_tokens, scored)``: the L2-normalised float32 input of ``layer`` at every
    scored position (label[t+1] != -100, in row-major order), their next tokens, and the ``(N, T-1)``
    bool mask of those positions. Batch by batch, so only the scored positions' features are kept
    (never every position's)."""
    nxt = labels[:, 1:].cpu()
    scored = nxt != IGNORE_INDEX
    feats: list[torch.Tensor] = []
    for start in range(0, inputs.shape[0], batch_size):
        f = position_features(model, layer, inputs[start:start + batch_size], batch_size)
        feats.append(F.normalize(f[:, :-1][scored[start:start + batch_size]], dim=1))
    return torch.cat(feats), nxt[scored], scored


def nearest_positions(queries: torch.Tensor, keys: torch.Tensor, k: int, max_elements: int = 1 << 24) -> torch.Tensor:
    r"""``(P_q, k)`` int64: each query's ``k`` keys of the largest dot product (cosine similarity of
    L2-normalised rows), best first, ties towards the lower key index; ``k`` is capped at the keys.

    The ``(P_q, P_k)`` similarity matrix is never made whole: blocks of at most ``max_elements``
    similarities (query rows x key columns) are merged into a running best-k per query by a stable
    descending sort of [running best, block] — the running best holds lower indices than the block
    and is itself ordered (value desc, index asc), so the stable sort keeps the tie rule."""
    if keys.shape[0] == 0:
        raise ValueError("the neighbour search needs at least one reference position")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"feature widths differ: queries {queries.shape[1]}, keys {keys.shape[1]}")
    k = min(int(k), keys.shape[0])
    cols = min(keys.shape[0], max(1, max_elements))
    rows = max(1, max_elements // cols)
    out = torch.empty(queries.shape[0], k, dtype=torch.long)
    for r0 in range(0, queries.shape[0], rows):
        q = queries[r0:r0 + rows]
        best_v = torch.empty(q.shape[0], 0, dtype=q.dtype, device=q.device)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for c0 in range(0, keys.shape[0], cols):
            sim = q @ keys[c0:c0 + cols].T
            ids = torch.arange(c0, c0 + sim.shape[1], device=q.device).expand(q.shape[0], -1)
            v = torch.cat([best_v, sim], dim=1)
            order = v.sort(dim=1, descending=True, stable=True).indices[:, :k]
            best_v, best_i = v.gather(1, order), torch.cat([best_i, ids], dim=1).gather(1, order)
        out[r0:r0 + rows] = best_i.cpu()
    return out


class SparseTargets:
    r"""The targets :math:`q` of forget sequences, ``(N, T-1, vocab)`` in meaning, stored per scored
    position: the distinct next tokens of its neighbours (``ids``, ``(P, k)`` int64, sorted) and their
    shares (``weights``, ``(P, k)`` float32, count / k; 0 on the slots a repeated token leaves free),
    and ``index`` ``(N, T-1)`` int64: the row of ``ids`` of each position, -1 where nothing is scored.
    :math:`P \cdot k` numbers instead of :math:`N (T-1) V` (TOFU forget10 with a 128k vocabulary:
    26 GB dense). ``q[rows]`` selects forget sequences as the dense tensor's would. ``floored``
    (optional, ``(P,)`` int64): per position the token :func:`own_token_floor_loss` floors, -1 for
    none (:meth:`with_floor`)."""

    def __init__(self, ids: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, vocab: int,
                 floored: torch.Tensor | None = None):
        if ids.dim() != 2 or ids.shape != weights.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must be one (P, k) shape")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"target token ids must lie in [0, vocab={vocab})")
        scored = index >= 0
        if index.dim() != 2 or not torch.equal(index[scored], torch.arange(ids.shape[0])):
            raise ValueError("index must be (N, T-1), numbering the P scored positions 0..P-1 in row-major order")
        if floored is not None and floored.shape != (ids.shape[0],):
            raise ValueError(f"floored must be ({ids.shape[0]},), one token or -1 per position; "
                             f"got {tuple(floored.shape)}")
        self.ids, self.weights, self.index, self.vocab = ids, weights, index, int(vocab)
        self.floored = floored

    @property
    def scored(self) -> torch.Tensor:
        return self.index >= 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.index.shape[0]), int(self.index.shape[1]), self.vocab)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, rows) -> "SparseTargets":
        sel = self.index[rows]
        if sel.dim() != 2:  # an int would drop the sequence dim, which these targets always have
            raise TypeError("select forget rows with a list, a 1-d tensor or a slice")
        keep = sel >= 0
        index = torch.full_like(sel, -1)
        index[keep] = torch.arange(int(keep.sum()))
        at = sel[keep]
        return SparseTargets(self.ids[at], self.weights[at], index, self.vocab,
                             None if self.floored is None else self.floored[at])

    def to_dense(self) -> torch.Tensor:
        """The ``(N, T-1, vocab)`` float32 tensor (for tests and small vocabularies only)."""
        q = torch.zeros(*self.shape)
        rows = torch.zeros(self.ids.shape[0], self.vocab)
        rows.scatter_add_(1, self.ids, self.weights)
        q[self.scored] = rows
        return q

    def own_token_scaled(self, labels: torch.Tensor, share: float) -> "SparseTargets":
        r"""These targets with each position's own next token (``labels[:, 1:]``, the forget
        sequence's: its fact) kept at ``share`` of its weight and the rest renormalised,
        :math:`q'(v) \propto q(v)\,(\text{share if } v = y \text{ else } 1)`; a position whose
        whole weight is on its own token is left as it is (nothing else to move it to)."""
        own = self._own(labels)
        hit = self.ids == own[:, None]
        weights = torch.where(hit, self.weights * share, self.weights)
        total = weights.sum(1, keepdim=True)
        movable = (self.weights * ~hit).sum(1, keepdim=True) > 0
        weights = torch.where(movable, weights / total.clamp_min(1e-30), self.weights)
        return SparseTargets(self.ids, weights, self.index, self.vocab, self.floored)

    def _own(self, labels: torch.Tensor) -> torch.Tensor:
        """``(P,)``: each position's own next token, ``labels[:, 1:]`` (the forget sequence's fact)."""
        if labels.shape[0] != self.index.shape[0] or labels.shape[1] != self.index.shape[1] + 1:
            raise ValueError(f"labels {tuple(labels.shape)} do not fit targets for {tuple(self.index.shape)} positions")
        return labels[:, 1:].cpu()[self.scored.cpu()].to(self.ids.device)

    def with_floor(self, labels: torch.Tensor, floor: float) -> "SparseTargets":
        """These targets with ``floored`` set: each position's own next token (``labels[:, 1:]``) where
        its weight here is below ``floor``, -1 where it is not (the targets keep it there)."""
        own = self._own(labels)
        weight = (self.weights * (self.ids == own[:, None])).sum(1)
        return SparseTargets(self.ids, self.weights, self.index, self.vocab,
                             torch.where(weight < floor, own, torch.full_like(own, -1)))

    @staticmethod
    def from_neighbours(next_tokens: torch.Tensor, scored: torch.Tensor, vocab: int) -> "SparseTargets":
        """From each scored position's ``k`` neighbours' next tokens ``(P, k)``: the histogram
        :math:`q(v) = \\#\\{j : y_j = v\\} / k` as its distinct tokens and shares."""
        k = next_tokens.shape[1]
        ids = next_tokens.sort(dim=1).values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        group = first.long().cumsum(1) - 1                   # which distinct token each slot belongs to
        counts = torch.zeros(ids.shape, dtype=torch.float32).scatter_add_(1, group, torch.ones(ids.shape))
        weights = torch.where(first, counts.gather(1, group) / k, torch.zeros(()))  # count / k, rounded once
        index = torch.full(scored.shape, -1, dtype=torch.long)
        index[scored] = torch.arange(int(scored.sum()))
        return SparseTargets(ids, weights, index, vocab)


def forget_targets(model: nn.Module, layer: nn.Module, forget: tuple[Inputs, torch.Tensor],
                   references: tuple[Inputs, torch.Tensor], vocab: int, k: int, k_share: float = 1.0,
                   max_elements: int = 1 << 24) -> tuple[SparseTargets, torch.Tensor]:
    """``(q, scored)``: ``q`` the neighbour targets :math:`q_{i,t}` at the forget sequences' scored
    positions (a :class:`SparseTargets`, ``(N_f, T-1, vocab)`` in meaning, zero elsewhere), ``scored``
    ``(N_f, T-1)`` bool where they are. The neighbours are ``min(k, max(MIN_K, k_share * reference
    positions))``, searched in blocks of at most ``max_elements`` similarities
    (:func:`nearest_positions`)."""
    xf, yf = forget
    xr, yr = references
    f_feats, _, scored = scored_features(model, layer, xf, yf)
    r_feats, r_next, _ = scored_features(model, layer, xr, yr)
    k = min(k, max(MIN_K, round(k_share * r_feats.shape[0])))
    idx = nearest_positions(f_feats, r_feats, k, max_elements)
    return SparseTargets.from_neighbours(r_next[idx], scored, vocab), scored


def soft_target_loss(logits: torch.Tensor, q, scored: torch.Tensor, floor: float | None = None,
                     floor_weight: float = 1.0) -> torch.Tensor:
    r""":math:`\mathrm{mean}_{(i,t)\ \mathrm{scored}} -\sum_v q_{i,t}(v) \log p_\theta(v \mid x_{i,\le t})`.

    With :class:`SparseTargets` the sum is a gather of the scored positions' log-softmax at the
    targets' token ids: the one positions x vocab tensor kept is the log-softmax of the scored
    positions (what the loss needs). A dense ``(N, T-1, vocab)`` ``q`` is still taken. With ``floor``
    (sparse targets with ``floored`` tokens), ``floor_weight`` times :func:`own_token_floor_loss` is
    added, read off the same log-softmax (no second positions x vocab tensor)."""
    scored = scored.to(logits.device)
    if not isinstance(q, SparseTargets):
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        per_position = -(q.to(logp.device) * logp).sum(-1)
        return per_position[scored].sum() / scored.sum().clamp_min(1)
    logp, row = _scored_log_probs(logits, q, scored)
    if logp is None:
        return logits.sum() * 0.0
    picked = logp.gather(1, q.ids.to(logits.device)[row])
    total = -(q.weights.to(logits.device)[row] * picked).sum()
    if floor is not None:
        total = total + floor_weight * _floor_sum(logp, q, row, floor)
    return total / scored.sum().clamp_min(1)


def _scored_log_probs(logits: torch.Tensor, q: SparseTargets, scored: torch.Tensor):
    """``(logp, row)``: the float32 log-softmax at the scored positions with a target, and their rows
    of ``q``; ``(None, None)`` when there are none."""
    if q.index.shape != scored.shape:
        raise ValueError(f"targets for {tuple(q.index.shape)} positions, scored mask {tuple(scored.shape)}")
    index = q.index.to(logits.device)
    at = scored & (index >= 0)                           # a scored position without a target adds 0
    if not bool(at.any()):
        return None, None
    # one copy of the positions' logits, cast inside log_softmax (the float32 copy is not kept for backward)
    return F.log_softmax(logits[:, :-1][at], dim=-1, dtype=torch.float32), index[at]


def _floor_sum(logp: torch.Tensor, q: SparseTargets, row: torch.Tensor, floor: float) -> torch.Tensor:
    r""":math:`\sum_F \max(0, \log p(y) - \log \varepsilon)` over the rows of ``logp`` with a floored token."""
    if q.floored is None:
        raise ValueError("own_token_floor_loss needs targets with floored tokens (SparseTargets.with_floor)")
    token = q.floored.to(logp.device)[row]
    on = token >= 0
    picked = logp[on].gather(1, token[on][:, None]).squeeze(1)
    return torch.relu(picked - math.log(floor)).sum()


def own_token_floor_loss(logits: torch.Tensor, q: SparseTargets, scored: torch.Tensor, floor: float) -> torch.Tensor:
    r"""The own-token floor: with :math:`F` the positions of ``q.floored`` (the forget sequence's own
    next token :math:`y_{i,t+1}` where the target gives it less than :math:`\varepsilon` = ``floor``),

    .. math::
        \frac{1}{|S|} \sum_{(i,t) \in F} \max\big(0,\ \log p_\theta(y_{i,t+1} \mid x_{i,\le t})
        - \log \varepsilon\big),

    :math:`S` the scored positions (the soft cross-entropy's count, so the two add as one mean). Its
    pull on the token's logit is :math:`1 - p` until :math:`p \le \varepsilon`, then none: the answer
    goes as unlikely as an unseen person's, not below (gradient ascent without the floor). The forget
    term adds it through :func:`soft_target_loss` (``floor=``), on one log-softmax."""
    scored = scored.to(logits.device)
    logp, row = _scored_log_probs(logits, q, scored)
    if logp is None:
        return logits.sum() * 0.0
    return _floor_sum(logp, q, row, floor) / scored.sum().clamp_min(1)
