r"""Neighbours of the forget sequences, made from them without any other data: the knowledge most at
risk when an entity or an attribute is unlearned, and the one the retain budget covers least.

A retain budget of a few percent of the people holds the facts of a few percent of the people, so
what keeps the rest (distillation, the edit's retain subspace) sees only them; the edit is free to
move along every direction the other people's facts are read through. The forget sequences
themselves show where those directions are: a forget sequence with its *distinctive* prompt token
swapped for another token is the same question about someone (or something) else.

1. **Distinctive tokens.** The swappable positions of a forget sequence are its prompt (the real
   positions before its first scored label) when it has one beyond its first token, else all of
   its real positions (a statement scored throughout). A token :math:`v` there is distinctive when
   the share of forget sequences holding it is more than ``ratio`` times the share of budget
   sequences holding it anywhere,

   .. math:: r_F(v) > \rho\, r_B(v),

   — a forgotten person's name (held by their sequences, by no retain one), a forgotten attribute's
   word (held by every forget sequence, by few of the budget), but not the template's words (held by
   both alike). A forget sequence swaps only its *most* distinctive tokens: those the forget sequences
   hold the most times more often than the budget does — the largest
   :math:`r_F(v) / \frac{c_B(v) + 1}{n_B + 2}` among its own (:math:`c_B` of the :math:`n_B` budget
   sequences hold :math:`v`, smoothed; all on a tie) — and the distinctive tokens held by exactly the
   same forget sequences as one of them (the other pieces of a name). Forgetting people, a name is
   held by every fact of its person and by no budget sequence, while an attribute's word is held by
   one fact of each forgotten person and by its share of the budget: the name is swapped, and the
   same question about someone else is kept.
   Forgetting an attribute of everyone, its word is held by every forget sequence and each name by
   one. A budget of a few dozen sequences may hold no question about some attribute, or rarely hold
   a template word, which then pass :math:`r_F > \rho\, r_B` as a name does (the 2x filter alone
   cannot tell 5 of 75 against 2 of 263 from 15 of 75 against 0); swapped and trained beside the
   name, every other entity's answers through that word moved (benchmarks/RESULTS.md, "The
   row's most distinctive tokens").
2. **Swaps.** A neighbour is one forget sequence with each of its distinctive tokens (every
   swappable occurrence) replaced by a substitute of its own: with probability ½ a token the budget
   holds (another person's name, another attribute), else a token drawn uniformly from the
   vocabulary — never a distinctive token, nor one that more than half the budget holds (the
   template's words). All of them: with one name token kept ("Anna <other>") the model may still
   answer about the forgotten Anna Berg, and that answer would be kept; the people who truly share
   a name token are retain data, and the budget's nearest half holds them.
   A neighbour's positions before its first swap read exactly the forget sequence, so only the
   positions from it on count (:attr:`Neighbours.where`): what is kept there is the original
   model's distribution, never the forgotten answer.

The neighbours are used where the retain budget is (:mod:`dfmu_ext.tasks.causal_lm`): their
activations join the edit's retain subspace, and the fine-tune's distillation to the original reads
them beside the budget. Neighbourhood prompts are how model-editing work measures an edit's
locality (Meng et al. 2022); here they are what is kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .._common import eval_mode
from ..model_io import Inputs
from .targets import SparseTargets
from .task import IGNORE_INDEX, forward_logits


def swappable_positions(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N, T)`` bool: each sequence's prompt (the real positions before its first scored label)
    when that holds more than its first token, else every real position."""
    scored = labels != IGNORE_INDEX
    n, t = labels.shape
    first = torch.where(scored.any(1), scored.float().argmax(1), torch.full((n,), t))
    prompt = (torch.arange(t)[None, :] < first[:, None]) & mask.bool()
    whole = (prompt.sum(1) <= 1)[:, None]
    return torch.where(whole, mask.bool(), prompt)


def _presence(ids: torch.Tensor, where: torch.Tensor, vocab: int) -> torch.Tensor:
    """``(vocab,)`` the share of rows whose ``where`` positions hold each token."""
    bags = torch.zeros(ids.shape[0], vocab)
    bags.scatter_(1, ids.clamp(0, vocab - 1), where.float())
    return (bags > 0).float().mean(0) if ids.shape[0] else torch.zeros(vocab)


def _ids_mask(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    ids = x["input_ids"].cpu()
    return ids, x.get("attention_mask", torch.ones_like(ids)).cpu().bool()


def _rates(forget: tuple[Inputs, torch.Tensor], budget: tuple[Inputs, torch.Tensor], vocab: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_F, r_B)``: each token's share of forget sequences (at :func:`swappable_positions`) and of
    budget sequences (anywhere real)."""
    (xf, yf), (xb, _) = forget, budget
    f_ids, f_mask = _ids_mask(xf)
    b_ids, b_mask = _ids_mask(xb)
    return _presence(f_ids, swappable_positions(yf.cpu(), f_mask), vocab), _presence(b_ids, b_mask, vocab)


def _distinctive(r_f: torch.Tensor, r_b: torch.Tensor, rows: int, ratio: float, recurring: bool) -> torch.Tensor:
    special = (r_f > 0) & (r_f > ratio * r_b)
    if recurring:
        special &= r_f * rows >= 1.5
    return torch.nonzero(special).flatten()


def log_share_ratio(count: torch.Tensor, n: int, r_f: torch.Tensor) -> torch.Tensor:
    r""":math:`\log r_F - \log \frac{c_B + 1}{n_B + 2}` elementwise (float64): how many times more often the
    forget sequences hold a token than the budget does, the budget's share Laplace-smoothed so that a token
    it never holds counts as held once in :math:`n_B + 2` (a small budget's zero is weak evidence)."""
    return r_f.double().clamp_min(1e-12).log() - ((count.double().round() + 1) / (n + 2)).log()


def most_distinctive(ids: torch.Tensor, holds: torch.Tensor, r_f: torch.Tensor, r_b: torch.Tensor,
                     budget_rows: int) -> torch.Tensor:
    """``holds`` (``(N, T)``, the distinctive tokens' positions) kept at each row's most distinctive
    tokens: the largest :func:`log_share_ratio` in the row, and any token of the row held by exactly
    the forget rows that hold one of those.

    Why the ratio and not the evidence that the budget holds a token less (a binomial tail, before):
    the evidence grows with how common a token is, so a template word the forget set holds 2.5 times as
    often as the budget ("what": 36 of 75 against 25 of 131) out-scored names held 15 of 75 against 1-3
    of 131, and stayed in place of them (benchmarks/RESULTS.md)."""
    vocab = r_f.shape[0]
    tok = ids.clamp(0, vocab - 1)
    cand = torch.unique(tok[holds])
    score = torch.full((vocab,), float("inf"), dtype=torch.float64)
    if cand.numel():
        score[cand] = -log_share_ratio((r_b[cand] * budget_rows).round(), budget_rows, r_f[cand])
    at = torch.where(holds, score[tok], torch.full((), float("inf"), dtype=torch.float64))
    best = at.amin(1, keepdim=True)
    top = holds & (at <= best + 1e-9 * best.abs())
    slot = torch.full((vocab,), -1, dtype=torch.long)     # each candidate's row in rows_of (not the vocabulary's)
    slot[cand] = torch.arange(cand.numel())
    rows_of = torch.zeros(cand.numel(), ids.shape[0], dtype=torch.bool)   # which forget rows hold each one there
    rows_of[slot[tok[holds]], torch.nonzero(holds)[:, 0]] = True
    keep = top.clone()
    for i in torch.nonzero(holds.any(1)).flatten().tolist():
        chosen = slot[torch.unique(tok[i][top[i]])].tolist()
        for t in torch.nonzero(holds[i] & ~top[i]).flatten().tolist():
            keep[i, t] = any(torch.equal(rows_of[slot[tok[i, t]]], rows_of[c]) for c in chosen)
    return keep


def distinctive_tokens(forget: tuple[Inputs, torch.Tensor], budget: tuple[Inputs, torch.Tensor], vocab: int,
                       ratio: float = 2.0, recurring: bool = False) -> torch.Tensor:
    r"""The token ids :math:`v` with :math:`r_F(v) > \rho\, r_B(v)` (``ratio`` :math:`\rho`): their share
    of forget sequences (at :func:`swappable_positions`) against their share of budget sequences;
    with ``recurring`` only those held by two forget sequences or more (sorted, ``int64``)."""
    r_f, r_b = _rates(forget, budget, vocab)
    return _distinctive(r_f, r_b, int(forget[1].shape[0]), ratio, recurring)


def distinctive_positions(forget: tuple[Inputs, torch.Tensor], budget: tuple[Inputs, torch.Tensor], vocab: int,
                          ratio: float = 2.0):
    """What both kinds of neighbours start from: ``(ids, special, r_b, swappable, holds)`` — the forget
    rows' token ids, the distinctive tokens (:func:`distinctive_tokens`), each token's share of
    ``budget``'s sequences, the rows' swappable positions and where each row's most distinctive tokens
    sit (:func:`most_distinctive`); None when no token is distinctive.

    ``budget`` is what the shares are measured on, so it should be a fair sample of the retain data:
    the budget's random draw, not its nearest part. The nearest part holds, by its choice, the retain
    people who share a forgotten name's pieces, and holds the templates in other shares than the forget
    set does: at 10% of the people forgotten, "was" and "born" (36 of 150 forget rows, 27 of 254 budget
    rows) then out-scored the names, the names stayed in their neighbours, and the targets read the
    forgotten answers back on 78 of 168 answer positions (benchmarks/RESULTS.md)."""
    (xf, yf), (xb, _) = forget, budget
    ids, mask = _ids_mask(xf)
    r_f, r_b = _rates(forget, budget, vocab)
    special = _distinctive(r_f, r_b, ids.shape[0], ratio, recurring=False)
    if special.numel() == 0:
        return None
    swappable = swappable_positions(yf.cpu(), mask)
    holds = most_distinctive(ids, torch.isin(ids, special) & swappable, r_f, r_b, int(xb["input_ids"].shape[0]))
    return ids, special, r_b, swappable, holds


@dataclass
class Neighbours:
    """Swapped neighbours of forget sequences: ``inputs`` and ``labels`` in the forget batch's shape,
    ``source`` ``(M,)`` the forget row each came from, ``first`` ``(M,)`` its first swapped position,
    ``tokens`` the distinctive tokens swapped out, ``shared`` those of them some budget sequence
    holds too (a name piece other entities have)."""

    inputs: Inputs
    labels: torch.Tensor
    source: torch.Tensor
    first: torch.Tensor
    tokens: torch.Tensor
    shared: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.source.shape[0])

    @cached_property   # read at every fine-tune step: made once
    def where(self) -> torch.Tensor:
        """``(M, T)`` bool: the real positions whose context holds the swap (position ``t`` reads
        tokens ``<= t``), the only ones where a neighbour differs from its forget sequence."""
        t = self.labels.shape[1]
        real = self.inputs.get("attention_mask", torch.ones_like(self.labels)).bool()
        return (torch.arange(t)[None, :] >= self.first[:, None]) & real

    def head(self, count: int) -> "Neighbours":
        """The first ``count`` (which cover the forget rows evenly, see :func:`swapped_neighbours`)."""
        return Neighbours(self.inputs[:count], self.labels[:count], self.source[:count], self.first[:count],
                          self.tokens, self.shared)


def swapped_neighbours(forget: tuple[Inputs, torch.Tensor], budget: tuple[Inputs, torch.Tensor], vocab: int,
                       per_sequence: int, seed: int = 0, ratio: float = 2.0,
                       rates: tuple[Inputs, torch.Tensor] | None = None) -> Neighbours | None:
    """``per_sequence`` neighbours of each forget sequence that holds a distinctive token, seeded
    (neighbour ``j`` of row ``i`` at ``j * rows + i``: any prefix covers the rows evenly); the tokens'
    shares are measured on ``rates`` (default ``budget``; see :func:`distinctive_positions`), the
    substitutes drawn from ``budget``. None when no forget sequence holds a distinctive token or no
    token is left to swap in."""
    if per_sequence < 1:
        return None
    (xf, yf), (xb, _) = forget, budget
    found = distinctive_positions(forget, budget if rates is None else rates, vocab, ratio)
    if found is None:
        return None
    ids, special, r_b, swappable, holds = found   # holds: (N, T) the positions a swap may change
    b_ids, b_mask = _ids_mask(xb)
    allowed = r_b <= 0.5                                     # not the template's words
    allowed[special] = False
    if not bool(allowed.any()):
        return None
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[b_ids[b_mask].clamp(0, vocab - 1)] = True
    from_budget = torch.nonzero(allowed & seen).flatten()
    from_vocab = torch.nonzero(allowed).flatten()
    rows = torch.nonzero(holds.any(1)).flatten()
    if rows.numel() == 0:
        return None
    g = torch.Generator().manual_seed(int(seed) + 7919)
    source = rows.repeat(per_sequence)
    # per forget row, once (each is the source of per_sequence neighbours): the positions of each of its
    # distinctive tokens (every one: "Anna <other>" may still be Anna Berg) and its first swapped position
    where_of = {i: [(ids[i] == token) & swappable[i] for token in torch.unique(ids[i][holds[i]]).tolist()]
                for i in rows.tolist()}
    first_of = {i: int(holds[i].float().argmax()) for i in rows.tolist()}
    out_ids, first = [], []
    for i in source.tolist():
        row = ids[i].clone()
        for at in where_of[i]:   # the draws in the same order as ever: the same neighbours for a seed
            pool = from_budget if from_budget.numel() and bool(torch.rand((), generator=g) < 0.5) else from_vocab
            row[at] = pool[torch.randint(pool.numel(), (1,), generator=g)]
        out_ids.append(row)
        first.append(first_of[i])
    inputs = Inputs({**{k: v.cpu()[source].clone() for k, v in xf.items() if k != "input_ids"},
                     "input_ids": torch.stack(out_ids)})
    tokens = torch.unique(ids[holds])
    return Neighbours(inputs, yf.cpu()[source].clone(), source, torch.tensor(first), tokens,
                      tokens[seen[tokens.clamp(0, vocab - 1)]])


def rows_per_forward(vocab: int, length: int, most: int = 64, max_elements: int = 1 << 25) -> int:
    """How many sequences of ``length`` tokens one forward takes when its ``(rows, length, vocab)``
    logits should stay within ``max_elements`` (at least one, at most ``most``): at a 128k vocabulary
    and 128 tokens, 64 rows' logits alone are 2 GB in bf16."""
    return max(1, min(most, max_elements // max(1, vocab * length)))


def _own_token_if_top(p: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Rows ``p`` ``(P, vocab)`` with ``own`` ``(P,)`` zeroed where it is not the row's most likely token,
    renormalised (its weight was all a row had only where it is the top, so a row is never empty)."""
    drop = torch.nonzero(p.argmax(1) != own).flatten()
    p = p.index_put((drop, own[drop]), torch.zeros((), dtype=p.dtype, device=p.device))
    return p / p.sum(1, keepdim=True)


@torch.no_grad()
def template_targets(model: nn.Module, forget: tuple[Inputs, torch.Tensor], neighbours: Neighbours,
                     top: int = 32, batch_size: int = 64, max_elements: int = 1 << 25,
                     own_token_if_top: bool = True) -> SparseTargets | None:
    r"""The forget targets read off the neighbours: at each scored position :math:`t` of forget
    sequence :math:`i`, the model's next-token distribution averaged over the neighbours :math:`n`
    of :math:`i` whose context at :math:`t` holds their swap (the same question about someone else),

    .. math::
        q_{i,t} = \operatorname{top}_K \Big(\frac{1}{|N_{i,t}|}\sum_{n \in N_{i,t}}
                  p_\theta(\cdot \mid x_{n,\le t})\Big),

    kept to its ``top`` K tokens and renormalised (a :class:`SparseTargets`; a scored position no
    neighbour differs at gets no target). What a model answers about an entity it does not know is
    its prior for the template; the nearest retain positions in the model's features are no such
    estimate for memorised facts, since the features of a memorised entity already point at its
    answers (benchmarks/RESULTS.md, "Neighbours"). None when no scored position gets a target.

    With ``own_token_if_top`` (the default) each neighbour's distribution keeps the forget sequence's
    own next token :math:`y = y_{i,t+1}` only where it is that neighbour's most likely token:

    .. math::
        \tilde p_n(v) \propto p_\theta(v \mid x_{n,\le t})\,
            \big[v \ne y \ \lor\ y = \arg\max p_\theta(\cdot \mid x_{n,\le t})\big],

    and :math:`\tilde p_n` is averaged in place of :math:`p_\theta`. A made-up person whose best guess
    is the forgotten value keeps it (the prior: with 4-6 values an attribute, about one neighbour in
    five); the few percent the others give it are the forgotten fact read back through the rest of
    the sequence (the people corpus: median 0.03-0.06 of each target at the first answer token,
    Retrain 0.000-0.002). On 8 held-out people-corpus splits the membership AUC fell on all 8 and
    relearning on 6, and the keep suite's results did not move (benchmarks/RESULTS.md, "Each
    neighbour keeps the forgotten answer only as its best guess").

    Memory: nothing positions x vocabulary is held for the whole forget set (TOFU forget10 at a
    128k vocabulary: 26 GB). The forget rows go in groups whose scored positions x vocabulary fit
    ``max_elements`` float32 sums; each group's neighbours run ``batch_size`` at a time (fewer when
    their logits would exceed ``max_elements``), softmaxed only at the positions that count, and the
    group's mean is cut to its top K before the next group starts."""
    xf, yf = forget
    scored = yf[:, 1:] != IGNORE_INDEX
    n_pos = int(scored.sum())
    index = torch.full(scored.shape, -1, dtype=torch.long)
    index[scored] = torch.arange(n_pos)          # row-major: a range of rows is a range of positions
    if len(neighbours) == 0 or n_pos == 0:
        return None
    device = next(model.parameters()).device
    with eval_mode(model):
        vocab = int(forward_logits(model, neighbours.inputs[:1].to(device)).shape[-1])
        k = min(top, vocab)
        ids_out = torch.zeros(n_pos, k, dtype=torch.long)
        weights_out = torch.zeros(n_pos, k)
        has = torch.zeros(n_pos, dtype=torch.bool)
        cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(scored.sum(1), 0)])  # positions before row r
        step = rows_per_forward(vocab, scored.shape[1] + 1, batch_size, max_elements)
        group = max(1, max_elements // vocab)      # positions per group's sums
        row = 0
        while row < scored.shape[0]:   # rows [row, end): as many as fit the group (at least one)
            end = max(row + 1, int(torch.searchsorted(cum, cum[row] + group, right=True)) - 1)
            lo, hi = int(cum[row]), int(cum[end])
            mine = torch.nonzero((neighbours.source >= row) & (neighbours.source < end)).flatten()
            if hi > lo and mine.numel():
                sums = torch.zeros(hi - lo, vocab, device=device)
                counts = torch.zeros(hi - lo)
                for start in range(0, mine.numel(), step):
                    pick = mine[start:start + step]
                    src = neighbours.source[pick]
                    at = scored[src] & neighbours.where[pick][:, :-1]
                    if not bool(at.any()):
                        continue
                    logits = forward_logits(model, neighbours.inputs[pick.tolist()].to(device))[:, :-1]
                    rows = index[src][at] - lo
                    p = torch.softmax(logits[at.to(device)].float(), dim=-1)
                    if own_token_if_top:
                        p = _own_token_if_top(p, neighbours.labels[pick][:, 1:][at].to(device))
                    sums.index_add_(0, rows.to(device), p)
                    counts.index_add_(0, rows, torch.ones(rows.shape[0]))
                    del logits
                got = counts > 0
                if bool(got.any()):
                    w, ids = (sums.cpu()[got] / counts[got][:, None]).topk(k, dim=1)
                    order = ids.sort(dim=1).indices
                    where = torch.arange(lo, hi)[got]
                    ids_out[where] = ids.gather(1, order)
                    weights_out[where] = (w / w.sum(1, keepdim=True).clamp_min(1e-12)).gather(1, order)
                    has[where] = True
                del sums
            row = end
    if not bool(has.any()):
        return None
    kept = torch.full(scored.shape, -1, dtype=torch.long)
    kept[scored] = torch.where(has, torch.cumsum(has.long(), 0) - 1, torch.full_like(has, -1, dtype=torch.long))
    return SparseTargets(ids_out[has], weights_out[has], kept, vocab)


@torch.no_grad()
def informative(q: SparseTargets, model: nn.Module, inputs: Inputs, min_kl: float,
                batch_size: int = 64) -> SparseTargets | None:
    r"""``q`` kept at the positions where it asks for a change: :math:`\mathrm{KL}(q_{i,t} \| p_\theta)
    > ` ``min_kl`` under ``model`` (the original). A statement's template words are answered alike for
    every entity, so their targets are the model's own outputs; kept, they would dilute the forget
    loss and its stop with positions that need nothing. None when no position is left."""
    device = next(model.parameters()).device
    gaps = []
    step = rows_per_forward(q.vocab, q.index.shape[1] + 1, batch_size)
    with eval_mode(model):
        for start in range(0, len(q), step):
            rows = list(range(start, min(start + step, len(q))))
            part = q[rows]
            if not bool(part.scored.any()):
                continue
            logp = torch.log_softmax(forward_logits(model, inputs[rows].to(device))[:, :-1][part.scored.to(device)]
                                     .float(), dim=-1).cpu()
            w = part.weights
            gaps.append((w * (w.clamp_min(1e-30).log() - logp.gather(1, part.ids))).sum(1))
    if not gaps:
        return None
    keep = torch.cat(gaps) > min_kl
    if not bool(keep.any()):
        return None
    index = torch.full_like(q.index, -1)
    index[q.scored] = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, torch.full_like(keep, -1, dtype=torch.long))
    return SparseTargets(q.ids[keep], q.weights[keep], index, q.vocab)
