r"""The causal LM's fine-tune and edit: :class:`LMFinetuneConfig`, the objective the shared loop runs
(:class:`LMObjective`: the budget's next-token loss, the forget term, the distillation to the
original on the budget and on the forget sequences' swapped neighbours), which parameters train
(the MLP layers, with ``"mlp+entity"`` the input embedding's rows of the forget set's distinctive
tokens, or all), and the retain-projected edit (:func:`projected_edit`, off by default).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .._common import eval_mode, seeded, train_mode
from ..finetune import AdamW, MomentumSGD, Objective, distill_loss, epochs_for
from ..lm.edit import EditConfig, ProjectedUpdates
from ..lm.neurons import mlp_projections
from ..lm.relearning import moved_parameters, relearning_step
from ..lm.reuse import exact_key, lookups_only
from ..lm.targets import LMForgetTermConfig, soft_target_loss
from ..lm.task import batches, forward_logits, input_embedding, lm_loss


@dataclass
class LMFinetuneConfig:
    """The masked fine-tune of a causal LM on the retain budget."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    min_steps: int = 10     # whole epochs until at least this many steps (a small budget is few batches)
    nearest: float = 0.5    # share of the retain budget taken nearest the forget set (lm.task.nearest_retain)
    train: str = "mlp+entity"  # "all"; the "mlp" layers that hold the neurons; those + the forget set's token rows
    # weight of the KL to the original's next-token distributions; 20 (was 5): the TOFU-shaped report's model
    # utility within 0.02 on 9 of 9 seeds (was 6), for a membership AUC 0.06 higher (RESULTS: "Distillation 20")
    distill: float = 20.0
    neighbours: int = 512   # swapped neighbours of the forget sequences distilled beside the budget; 0: none
    partners: int = 1024    # the most partner neighbours distilled beside them (lm.partners); 0: none
    reset_entity: bool = True  # routed (forget_into), the entity's rows start afresh: see reset_rows
    forget_into: str = "auto"  # the forget term's gradient: "entity" rows only, the "trained" parameters, or
                               # "auto": entity rows where no budget sequence holds a swapped token (see LMObjective)

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0 or self.distill < 0 \
                or self.neighbours < 0 or self.partners < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1, min_steps, distill, neighbours and "
                             "partners >= 0")
        for name, allowed in (("forget_into", ("auto", "trained", "entity")), ("train", ("all", "mlp", "mlp+entity"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"finetune.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.nearest <= 1.0:
            raise ValueError(f"finetune.nearest must be in [0, 1], got {self.nearest}")

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _training_only(model: nn.Module, params: list[torch.Tensor]):
    """Within the block only ``params`` require a gradient; every flag is restored on exit, also on error."""
    keep = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _Epoch:
    """One epoch's shuffled budget batches, sized (for the loop) and with an optional bar."""

    def __init__(self, budget, batch_size: int, seed: int, device, progress: bool, desc: str):
        self.budget, self.batch_size, self.seed, self.device = budget, batch_size, seed, device
        self.progress, self.desc = progress, desc

    def __len__(self) -> int:
        return max(1, -(-len(self.budget) // self.batch_size))

    def __iter__(self):
        it = batches(self.budget, self.batch_size, shuffle=True, seed=self.seed, device=self.device)
        yield from tqdm(it, total=len(self), desc=self.desc, leave=False, unit="step", disable=not self.progress)


class LMObjective(Objective):
    """The budget's mean next-token loss (+ the forget term on cycled forget rows, + distillation)
    with AdamW on the trained parameters (the MLP layers by default)."""

    def __init__(self, model: nn.Module, budget, config: LMFinetuneConfig, *, device, seed: int, forget=None,
                 forget_term: LMForgetTermConfig | None = None, layers=(), teacher: nn.Module | None = None,
                 neighbours=None):
        self.model, self.budget, self.config, self.device, self.seed = model, budget, config, device, seed
        self.teacher, self.term = teacher, forget_term or LMForgetTermConfig()
        self.teacher_cache: dict | None = {} if teacher is not None else None   # see _teacher_logits
        self.teacher_cached = 0
        self.neighbours = neighbours if teacher is not None and config.distill > 0 else None
        self.neighbour_cursor = 0
        self.forget = forget if forget is not None and self.term.weight > 0 else None
        self.forget_steps = self.term.steps if self.forget is not None else 0
        self.params = trained_parameters(model, config.train, layers)
        # "mlp+entity": the input embedding's rows of the forget set's distinctive tokens train too, no other row
        self.rows = None
        tokens = getattr(neighbours, "tokens", None)
        if config.train == "mlp+entity" and tokens is not None and tokens.numel():
            embedding = input_embedding(model)
            if embedding is not None and embedding.weight.requires_grad:
                mask = torch.zeros(embedding.weight.shape[0], 1, dtype=embedding.weight.dtype)
                mask[tokens] = 1
                self.rows = (embedding.weight, mask.to(embedding.weight.device))
                if all(p is not embedding.weight for p in self.params):
                    self.params.append(embedding.weight)
        # The forget term into the entity's own embedding rows only: what the model reads about the
        # entity changes and nothing it reads about anyone else. Only where the entity's tokens are
        # its own — no budget sequence holds one (a name piece others share would move them too).
        shared = getattr(neighbours, "shared", None)
        self.into_rows = self.rows is not None and (config.forget_into == "entity" or (
            config.forget_into == "auto" and shared is not None and shared.numel() == 0))
        self.terms: list = []   # the step's queued terms: (name, routed, forward[, input ids]) (see loss)
        self.budget_ids = None  # the budget batch's token ids (see _backward)
        self.lookups_only: bool | None = None   # whether the embedding enters the graph only by lookups
        if self.into_rows and config.reset_entity:
            reset_rows(self.rows[0], tokens, seed)
        self.optimizer = AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.epochs = epochs_for(config, len(budget), config.batch_size)
        self.cursor = 0

    def context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(seeded(self.seed, self.device))
        stack.enter_context(train_mode(self.model))
        stack.enter_context(_training_only(self.model, self.params))
        if self.rows is not None:
            weight, mask = self.rows
            stack.callback(weight.register_hook(lambda g: g * mask).remove)
        return stack

    def batches(self, epoch: int, progress: bool):
        return _Epoch(self.budget, self.config.batch_size, self.seed + epoch, self.device, progress, "fine-tune")

    def loss(self, batch, forget_phase: bool):
        r"""The budget batch's term, :math:`\ell_{\mathrm{LM}} + \lambda\,\mathrm{KL}` on one forward; the
        step's other terms — the forget term on forget rows, :math:`\lambda\,\mathrm{KL}` on swapped
        neighbours — are only queued here (:attr:`terms`) and run by :meth:`backward_step` one after
        the other, each forward, backward and freed before the next: the step's peak is its largest
        term's graph, not all of them. Since :math:`\nabla \sum_i L_i = \sum_i \nabla L_i`, the
        gradients accumulated in ``.grad`` are those of the whole loss (up to float summation order)."""
        x, y = batch
        logits = forward_logits(self.model, x)
        loss = lm_loss(logits, y)
        self.budget_ids = x["input_ids"] if "input_ids" in x else None
        self.terms = []
        if forget_phase and self.forget is not None:
            self.terms += self._forget_terms()
        if self.teacher is not None and self.config.distill > 0:
            loss = loss + self.config.distill * self._distill(x, logits)
            if self.neighbours is not None:   # where they differ from the forget sequences (lm.neighbours)
                self._queue_neighbours()
        return loss, None, int(x.shape[0])

    def _mine(self, rows: list[int], counted: torch.Tensor) -> tuple[list[int], float]:
        """Of a term's ``rows``, those this process computes and the factor its mean takes (``counted``:
        per row, what the term's mean counts): all of them, 1, here; a rank's share under torchrun."""
        return rows, 1.0

    def _forget_terms(self) -> list:
        r"""The forget term, queued; on the forget side under ``relearn_step``, ``relearn_rest_share`` of it at
        :math:`\theta` (first, on the same rows) and the rest one simulated relearning step away (:meth:`_around`)."""
        rest = self.term.relearn_rest_share if self.forget_side and self.term.relearn_step else 0.0
        moved = ("forget", self.into_rows, lambda: self._forget_term(1.0 - rest))
        return [("forget_rest", self.into_rows, lambda: self._forget_term(rest, False)), moved] if rest else [moved]

    def _forget_term(self, scale: float = 1.0, advance: bool = True) -> torch.Tensor:
        """``scale`` times the weighted soft cross-entropy to the targets on the next ``term.batch_size`` forget rows;
        on the forget side's steps with the own-token floor too (:func:`dfmu_ext.lm.targets.own_token_floor_loss`)."""
        xf, q, scored = self.forget
        rows, share = self._forget_rows(advance)
        # (the floored tokens are set on the neighbours' targets only; the older positions' estimate has none)
        on = self.forget_side and q.floored is not None and self.term.own_token_floor_weight > 0
        floor = self.term.own_token_floor if on else None
        logits = forward_logits(self.model, xf[rows].to(self.device))
        return scale * self.term.weight * share * soft_target_loss(logits, q[rows], scored[rows], floor=floor,
                                                                   floor_weight=self.term.own_token_floor_weight)

    def _forget_rows(self, advance: bool = True) -> tuple[list[int], float]:
        """The next ``term.batch_size`` forget rows (cycled) this process computes, and their mean's factor."""
        xf, _, scored = self.forget
        every = [(self.cursor + i) % xf.shape[0] for i in range(min(self.term.batch_size, xf.shape[0]))]
        if advance:
            self.cursor = (self.cursor + len(every)) % xf.shape[0]
        return self._mine(every, scored)

    def _around(self, name: str):
        """Where queued term ``name`` runs: the forget term on the forget side one simulated relearning step
        away (``forget_term.relearn_step``, :mod:`dfmu_ext.lm.relearning`; on the forget phase alone it did little)."""
        if name != "forget" or not self.forget_side or not self.term.relearn_step:
            return contextlib.nullcontext()
        xf, _, scored = self.forget
        rows, _ = self._forget_rows(advance=False)
        moved = moved_parameters(self.model, self.params, self.term.relearn_moves)
        return relearning_step(self.model, moved, xf[rows].to(self.device), scored[rows], self.term.relearn_step)

    def _queue_neighbours(self) -> None:
        """Queue the distillation on the next ``batch_size`` swapped neighbours (chosen now, so the
        cursor moves in step order; their forward runs in :meth:`backward_terms`)."""
        n = len(self.neighbours)
        every = [(self.neighbour_cursor + i) % n for i in range(min(self.config.batch_size, n))]
        self.neighbour_cursor = (self.neighbour_cursor + len(every)) % n
        rows, share = self._mine(every, self.neighbours.where)
        xn, where = self.neighbours.inputs[rows], self.neighbours.where[rows]
        self.terms.append(("neighbours", False, lambda: self._neighbour_term(xn, where, share), xn.get("input_ids")))

    def _neighbour_term(self, xn, where, share: float) -> torch.Tensor:
        r"""``distill`` :math:`\times` ``share`` :math:`\times` the KL to the original on neighbours
        ``xn`` at ``where`` (positions), one forward of the model on them."""
        xn = xn.to(self.device)
        return self.config.distill * share * self._distill(xn, forward_logits(self.model, xn), where)

    def backward_terms(self, keep: torch.Tensor | None) -> float:
        """The queued terms of the step (:meth:`loss`) run in order, each its forward then its backward
        into ``.grad``, freed before the next; the routed forget term (:attr:`into_rows`) keeps its
        gradient on ``keep`` only (the embedding, whose hook keeps the entity's rows). Returns the sum
        of their values; a non-finite one raises before any step."""
        terms, self.terms = self.terms, []
        total = 0.0
        for name, routed, term_fn, *ids in terms:
            with self._around(name):   # (its backward, too, before the weights are put back)
                term = term_fn()
                value = float(term.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"fine-tune loss became {value} (its {name} term)")
                if routed:
                    self._routed_backward(term, keep)
                else:
                    self._backward(term, ids[0] if ids else None)
                del term
            total += value
        return total

    def _backward(self, term: torch.Tensor, ids: torch.Tensor | None) -> None:
        r"""``term.backward()``, without the part that can only give the input embedding a zero gradient.

        With ``"mlp+entity"`` the embedding's gradient is kept on the entity's rows only (its hook), and
        a lookup gives a gradient to the rows of the tokens it looks up: a term whose input ``ids`` hold
        no entity token (the neighbours' batches; the budget's, unless it holds one) adds exactly zero
        to it. When the embedding enters the graph only through lookups (no tied head; checked once on
        the graph, :func:`dfmu_ext.lm.reuse.lookups_only`), the backward then runs for the other
        trained parameters only (``inputs=``): it stops at the lowest trained MLP instead of going on
        through the layers below it to the embedding (10-19% of a forward and backward, measured),
        and a zero gradient is put where there was none. The weights come out bit-identical (the
        optimizer reads a gradient of zeros either way). One process only: a process group keeps
        its own backward."""
        if self.rows is None or ids is None or self.comm.world_size > 1:
            term.backward()
            return
        weight, mask = self.rows
        if self.lookups_only is None:
            self.lookups_only = lookups_only(term, weight)
        if not self.lookups_only or bool(mask[ids.to(mask.device).clamp(0, mask.shape[0] - 1)].any()):
            term.backward()
            return
        others = [p for p in self.params if p is not weight]
        if others:
            torch.autograd.backward(term, inputs=others)
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

    def _routed_backward(self, term: torch.Tensor, keep: torch.Tensor | None) -> None:
        """``term``'s backward with its gradient kept on ``keep`` only: every other trained parameter's
        gradient is set aside before it and put back after it (so a sharded gradient, too, is only
        ever accumulated by its own backward). In one process only ``keep``'s gradient is formed
        (``autograd.grad``: the other trained parameters' weight gradients, which the route throws
        away, are never computed) and added to its ``.grad`` as the backward would; its hook (the
        entity's rows) applies to it all the same."""
        if keep is not None and self.comm.world_size == 1:
            routed = torch.autograd.grad(term, keep)[0]
            keep.grad = routed if keep.grad is None else keep.grad.add_(routed)
            return
        others = [(p, p.grad) for p in self.params if p is not keep]
        for p, _ in others:
            p.grad = None
        term.backward()
        for p, grad in others:
            p.grad = grad

    def backward_step(self, loss: torch.Tensor) -> None:
        """The budget term's backward, then each queued term's (:meth:`backward_terms`), then the step;
        ``loss`` (the caller's report) becomes the sum of every term's value."""
        self._backward(loss, self.budget_ids)
        rest = self.backward_terms(self.rows[0] if self.rows is not None else None)
        with torch.no_grad():   # after its backward: the graph is gone, only the reported value changes
            loss.detach().add_(rest)
        self.optimizer.step()

    def _distill(self, x, logits, where=None):
        reference = self._teacher_logits(x)
        if where is None and "attention_mask" in x:
            where = x["attention_mask"].bool()
        return distill_loss(logits, reference, where)

    @torch.no_grad()
    def _teacher_logits(self, x) -> torch.Tensor:
        r"""The original's logits on ``x``, each distinct batch computed once per objective. The teacher
        is frozen and in eval mode, so its output on the same inputs is the same tensor every time, and
        the fine-tune, the forget side's chunks and the guard's recovery steps read the same budget
        batches (each call's epochs restart at the same seeded order) and cycle the same neighbour
        batches again and again: on the keep suite 60-90% of the teacher's forwards were repeats
        (lm-gpt2-large-10: 16 + 3 distinct of 204). Kept while the cache holds at most
        :data:`TEACHER_CACHE_ELEMENTS` logits (a batch beyond that is computed each time); off under a
        process group, where the sharded teacher's forward is a collective every rank must join."""
        if self.teacher_cache is None or self.comm.world_size > 1:
            return forward_logits(self.teacher, x)
        key = tuple((k, exact_key(v)) for k, v in sorted(x.items()))
        hit = self.teacher_cache.get(key)
        if hit is None:
            hit = forward_logits(self.teacher, x)
            if self.teacher_cached + hit.numel() <= TEACHER_CACHE_ELEMENTS:
                self.teacher_cache[key] = hit
                self.teacher_cached += hit.numel()
        return hit


#: The most teacher logits (elements) one :class:`LMObjective` keeps for repeated batches: 64 MB in float32.
TEACHER_CACHE_ELEMENTS = 1 << 24


@torch.no_grad()
def reset_rows(weight: torch.Tensor, tokens: torch.Tensor, seed: int) -> None:
    r"""Rows ``tokens`` of an embedding ``weight`` drawn afresh, coordinate :math:`j` from
    :math:`\mathcal{N}(\mu_j, \sigma_j^2)` of the other rows (seeded: the same on every rank): the
    rows a model that never saw these tokens has, untrained. Moved only a little, a forgotten
    entity's trained row stays where the MLPs read its facts from, and a few relearning steps on
    some of them bring the rest back (benchmarks/RESULTS.md, "The row's most distinctive tokens")."""
    others = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    others[tokens.to(weight.device)] = False
    ref = weight[others].float()
    g = torch.Generator().manual_seed(int(seed) + 104729)
    noise = torch.randn(int(tokens.numel()), weight.shape[1], generator=g).to(weight.device)
    weight[tokens.to(weight.device)] = (ref.mean(0) + ref.std(0) * noise).to(weight.dtype)


def trained_parameters(model: nn.Module, train: str, layers) -> list[torch.Tensor]:
    """The parameters the fine-tune trains: every one, or (``"mlp"``, ``"mlp+entity"``) those of the
    MLP layers that hold the neurons and of their sibling projections."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train in ("mlp", "mlp+entity"):
        owners = {l.layer for l in layers} | {m for l in layers for m in mlp_projections(model, l.layer)}
        keep = {id(p) for m in owners for p in m.parameters()}
        params = [p for p in params if id(p) in keep]
    return params


def projected_edit(model: nn.Module, edited, forget, projectors, plan, config: EditConfig, device: torch.device,
                   seed: int, guard=None) -> int:
    """Up to ``config.steps`` steps on the ``edited`` layers' weights towards the forget targets, every
    update projected off the retain subspace of its input (:mod:`dfmu_ext.lm.edit`), pruned neurons kept
    at zero. With a retention ``guard`` the validation part is measured every ``check_every`` steps;
    once the edit has cost more than the guard's allowance beyond where it started, its weights go
    back to the last state within it and the edit stops. Returns the steps kept."""
    xf, q, scored = forget
    params = [l.weight for l in edited]
    # SGD keeps each update in the span of the forget sequences' own activations (the gradient of
    # y = W h is g h^T); Adam's per-coordinate steps spread it over every direction.
    opt = MomentumSGD(params, lr=config.lr, momentum=0.9) if config.optimizer == "sgd" else \
        AdamW(params, lr=config.lr, weight_decay=0.0)
    projected = ProjectedUpdates([(l.weight, projectors[l.name], l.unit_dim) for l in edited])
    start = guard.check(model) if guard is not None else None
    kept = kept_ok = 0              # steps run; steps at the last state the guard measured within its allowance
    saved = [p.detach().clone() for p in params] if guard is not None else None
    cursor = 0
    try:
        with seeded(seed, device), eval_mode(model), _training_only(model, params):
            for step in range(config.steps):
                rows = [(cursor + i) % xf.shape[0] for i in range(min(config.batch_size, xf.shape[0]))]
                cursor = (cursor + len(rows)) % xf.shape[0]
                loss = soft_target_loss(forward_logits(model, xf[rows].to(device)), q[rows], scored[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                projected.before()
                opt.step()
                projected.after()
                plan.apply(opt)
                kept = step + 1
                if guard is not None and (kept % guard.config.check_every == 0 or kept == config.steps):
                    if guard.exceeds(guard.check(model), since=start):
                        with torch.no_grad():
                            for p, s in zip(params, saved):
                                p.copy_(s)
                        kept = kept_ok
                        break
                    saved, kept_ok = [p.detach().clone() for p in params], kept
    finally:
        opt.zero_grad(set_to_none=True)
    return kept
