r"""Partner neighbours: the retain entities that share a piece of a forgotten entity, asked the
forgotten entity's questions (``LMFinetuneConfig(partners=1024)``, the default; 0 turns them off).

Where names are built from shared pieces (the people corpus: every first and every last name is held
by several people), what forgetting "Belhal Anis" costs most is the facts of the people who share a
piece with them — "Belhal Drahal" most of all when "Drahal" is another forgotten person's piece. The
swapped neighbours (:mod:`dfmu_ext.lm.neighbours`) never swap in a forget set's distinctive token, so
none of them is such a person; and the budget holds those people's facts only for the attributes it
happens to hold.

A partner neighbour is a forget sequence whose run of most distinctive tokens (its entity, e.g. the
two tokens of a name) is replaced by a run read off a budget sequence that holds one of those tokens at
the same offset in a run of the same length: with the forget run :math:`(v_s, \dots, v_{e-1})` and a
budget sequence :math:`b` holding :math:`v_{s+o}` at position :math:`p`, the run
:math:`b[p-o : p-o+e-s]`. "what pet does Belhal Anis keep ?" and a budget sequence "what does Belhal
Drahal do for a living ?" give "what pet does Belhal Drahal keep ?": a real retain person, asked the
forgotten person's question, whose answer the original knows. The fine-tune distils the original on
them (from the first position that differs), beside the swapped neighbours; the forget targets are
read off the swapped neighbours only (a partner's answer is a real person's fact, not a template's
prior). Nothing is made where no budget sequence holds a distinctive token (names of their own).
Measured on the people corpus (benchmarks/RESULTS.md, "The people corpus: where the guard's drop sits,
and partner neighbours").
"""
from __future__ import annotations

import torch

from ..model_io import Inputs
from .neighbours import Neighbours, _ids_mask, distinctive_positions


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of consecutive True entries of a 1-d bool tensor."""
    out, start = [], None
    for t, flag in enumerate(flags.tolist() + [False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            out.append((start, t))
            start = None
    return out


def _spans(run: tuple[int, ...], b_ids: torch.Tensor, b_mask: torch.Tensor) -> list[tuple[int, ...]]:
    """The budget's runs of ``len(run)`` real tokens that hold one of ``run``'s tokens at its offset,
    other than ``run`` itself (sorted: the same partners for the same data)."""
    found = set()
    for offset, token in enumerate(run):
        for b, p in torch.nonzero((b_ids == token) & b_mask).tolist():
            a = p - offset
            if a < 0 or a + len(run) > b_ids.shape[1] or not bool(b_mask[b, a:a + len(run)].all()):
                continue
            span = tuple(b_ids[b, a:a + len(run)].tolist())
            if span != run:
                found.add(span)
    return sorted(found)


def partner_neighbours(forget: tuple[Inputs, torch.Tensor], budget: tuple[Inputs, torch.Tensor], vocab: int,
                       most: int, ratio: float = 2.0, rates: tuple[Inputs, torch.Tensor] | None = None
                       ) -> Neighbours | None:
    """At most ``most`` partner neighbours of the forget sequences (the module's docstring), taken
    round-robin over the forget rows so that any prefix covers them evenly; ``first`` is each one's
    first position that differs from its forget sequence; the tokens' shares measured on ``rates``
    (default ``budget``: :func:`~dfmu_ext.lm.neighbours.distinctive_positions`). None when there is none."""
    (xf, yf), (xb, _) = forget, budget
    found = distinctive_positions(forget, budget if rates is None else rates, vocab, ratio) if most >= 1 else None
    if found is None:
        return None
    ids, holds = found[0], found[4]
    b_ids, b_mask = _ids_mask(xb)
    known: dict[tuple[int, ...], list] = {}
    per_row = []   # (forget row, run start, run end, the budget's runs for it)
    for i in torch.nonzero(holds.any(1)).flatten().tolist():
        for s, e in _runs(holds[i]):
            run = tuple(ids[i, s:e].tolist())
            if run not in known:
                known[run] = _spans(run, b_ids, b_mask)
            if known[run]:
                per_row.append((i, s, e, known[run]))
    rows, source, first = [], [], []
    depth = 0
    while len(rows) < most and any(depth < len(spans) for *_, spans in per_row):
        for i, s, e, spans in per_row:
            if depth < len(spans) and len(rows) < most:
                row = ids[i].clone()
                row[s:e] = torch.tensor(spans[depth], dtype=row.dtype)
                rows.append(row)
                source.append(i)
                first.append(s + int(torch.nonzero(row[s:e] != ids[i, s:e]).flatten()[0]))
        depth += 1
    if not rows:
        return None
    src = torch.tensor(source)
    inputs = Inputs({**{k: v.cpu()[src].clone() for k, v in xf.items() if k != "input_ids"},
                     "input_ids": torch.stack(rows)})
    return Neighbours(inputs, yf.cpu()[src].clone(), src, torch.tensor(first), torch.zeros(0, dtype=torch.long))


def joined(partners: Neighbours | None, near: Neighbours | None) -> Neighbours | None:
    """The partners' rows, then the swapped neighbours' (whose distinctive tokens the result keeps:
    the entity rows the fine-tune may train are the forget set's own)."""
    if partners is None or near is None:
        return near if partners is None else partners
    inputs = Inputs({k: torch.cat([partners.inputs[k], near.inputs[k]]) for k in near.inputs})
    return Neighbours(inputs, torch.cat([partners.labels, near.labels]), torch.cat([partners.source, near.source]),
                      torch.cat([partners.first, near.first]), near.tokens, near.shared)
