r"""The causal-LM task: samples ``{"input_ids", "attention_mask"?, "labels"}`` (per-token labels, -100
where nothing is scored), units are the MLP neurons, the loss is the next-token loss of the scored
tokens, and ``forget_indices`` name the sequences to forget (an entity's facts, an attribute's).

1. Selection: :func:`dfmu_ext.selection.select_units` over the neurons' scores, each group's
   importance taken as its share of the block's (:data:`LM_SELECTION`, ``normalize="total"``).
2. Targets :math:`q` (:mod:`dfmu_ext.lm.targets`): what a model that never saw the forget sequences
   would predict at their scored positions, from the retain budget's nearest positions.
3. The edit (:mod:`dfmu_ext.lm.edit`): steps on the MLP projections towards :math:`q`, every update
   projected off the subspace the retain activations use; the retention guard stops it (and rolls
   it back to its last checked state) once it costs more than the tolerance.
4. The fine-tune: the budget's mean next-token loss, plus the soft cross-entropy to :math:`q` on the
   forget sequences, plus the distillation to the original's next-token distributions at the
   budget's real positions; AdamW on the MLP layers (:class:`dfmu_ext.finetune.AdamW`), the masks
   re-applied to the weights and both Adam moments after every step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .._common import eval_mode, model_device, seeded, synchronize, train_mode
from ..finetune import AdamW, MomentumSGD, Objective, distill_loss, epochs_for
from ..lm.edit import EditConfig, ProjectedUpdates, retain_projectors
from ..lm.neighbours import informative, swapped_neighbours, template_targets
from ..lm.neurons import mlp_input_layers, mlp_neuron_layers, mlp_projections, neuron_mask_plan, score_neurons
from ..lm.targets import LMForgetTermConfig, SparseTargets, forget_targets, soft_target_loss
from ..lm.task import (IGNORE_INDEX, batches, cat_batches, check_scored, forward_logits, lm_loss, split_forget, take,
                       token_nll)
from ..result import PruneResult
from ..selection import SelectionConfig, select_units
from .base import Split, Targets, Task, forget_pool, hold_out

#: The default neuron selection for language models (see benchmarks/RESULTS.md, "Entity unlearning").
LM_SELECTION = SelectionConfig(fraction_first=0.05, fraction_last=0.05, min_ratio=1.0, protect_top=0.10,
                               normalize="total")


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
    distill: float = 5.0    # weight of the KL to the original's next-token distributions (RESULTS: "Keeping")
    neighbours: int = 512   # swapped neighbours of the forget sequences distilled beside the budget; 0: none

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0 or self.distill < 0 \
                or self.neighbours < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1, min_steps, distill and neighbours >= 0")
        if self.train not in ("all", "mlp", "mlp+entity"):
            raise ValueError(f"finetune.train must be 'all', 'mlp' or 'mlp+entity', got {self.train!r}")
        if not 0.0 <= self.nearest <= 1.0:
            raise ValueError(f"finetune.nearest must be in [0, 1], got {self.nearest}")

    def to_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _training_only(model: nn.Module, params: list[torch.Tensor]):
    """Within the block only ``params`` require a gradient (the others get none computed or left
    behind); every flag is restored on exit, also on error."""
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
        x, y = batch
        logits = forward_logits(self.model, x)
        loss = lm_loss(logits, y)
        if forget_phase and self.forget is not None:
            xf, q, scored = self.forget
            rows = [(self.cursor + i) % xf.shape[0] for i in range(min(self.term.batch_size, xf.shape[0]))]
            self.cursor = (self.cursor + len(rows)) % xf.shape[0]
            loss = loss + self.term.weight * soft_target_loss(
                forward_logits(self.model, xf[rows].to(self.device)), q[rows], scored[rows])
        if self.teacher is not None and self.config.distill > 0:
            loss = loss + self.config.distill * self._distill(x, logits)
            if self.neighbours is not None:   # where they differ from the forget sequences (lm.neighbours)
                n = len(self.neighbours)
                rows = [(self.neighbour_cursor + i) % n for i in range(min(self.config.batch_size, n))]
                self.neighbour_cursor = (self.neighbour_cursor + len(rows)) % n
                xn = self.neighbours.inputs[rows].to(self.device)
                loss = loss + self.config.distill * self._distill(xn, forward_logits(self.model, xn),
                                                                  self.neighbours.where[rows])
        return loss, None, int(x.shape[0])

    def _distill(self, x, logits, where=None):
        with torch.no_grad():
            reference = forward_logits(self.teacher, x)
        if where is None and "attention_mask" in x:
            where = x["attention_mask"].bool()
        return distill_loss(logits, reference, where)


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding: ``get_input_embeddings()`` where the model has it (Hugging Face),
    else its first ``nn.Embedding`` with the most rows."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    if isinstance(found, nn.Embedding):
        return found
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embeddings, key=lambda m: m.num_embeddings) if embeddings else None


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


class CausalLMTask(Task):
    """Forget the sequences at ``forget_indices`` of a causal LM's training set."""

    name = "causal-lm"
    keywords = ("selection", "finetune", "forget_term", "edit")
    prepare_stage = "edit"
    default_tolerance = 0.02
    default_score_samples = 256
    forget_gap_stop = 0.05

    def configs(self, split, given: dict) -> dict:
        finetune = given.get("finetune") or LMFinetuneConfig()
        if not isinstance(finetune, LMFinetuneConfig):
            raise ValueError(f"for a causal LM, finetune takes an LMFinetuneConfig, got {type(finetune).__name__}")
        term = given.get("forget_term") or LMForgetTermConfig()
        if not isinstance(term, LMForgetTermConfig):
            raise ValueError(f"for a causal LM, forget_term takes an LMForgetTermConfig, got {type(term).__name__}")
        edit = given.get("edit") or EditConfig()
        for c in (finetune, term, edit):
            c.validate()
        return {"finetune": finetune, "forget_term": term, "edit": edit,
                "selection": given.get("selection") or LM_SELECTION}

    def claims(self, train_set, what) -> bool:
        from ..lm.task import detect_task

        return detect_task(train_set) == "causal-lm"

    def split(self, train_set, what, retain_fraction, seed, configs, extra) -> Split:
        if what["forget_classes"] is not None:
            raise ValueError("a causal LM forgets sequences, not classes: give forget_indices")
        forget_set, retain_set, budget = split_forget(train_set, what["forget_indices"], retain_fraction, seed,
                                                      configs["finetune"].nearest)
        train, validation = hold_out(budget, extra["validation_share"], seed, extra["min_validation"])
        return Split(forget_set, retain_set, train, validation, False, None,
                     {"forget_samples": len(forget_set)}, {"full_budget": budget})

    def scoring_batch(self, split, forget_pos, budget_pos):
        xf, yf = take(split.forget_set, forget_pos)
        xr, yr = take(split.budget, budget_pos)
        check_scored(yf, "the forget sequences")
        check_scored(yr, "the retain sequences")
        is_forget = torch.cat([torch.ones(len(forget_pos), dtype=torch.bool),
                               torch.zeros(len(budget_pos), dtype=torch.bool)])
        return cat_batches([(xf, yf), (xr, yr)]), is_forget

    def layers(self, model, split, batch):
        if "layers" not in split.extra:
            split.extra["layers"] = mlp_neuron_layers(model, batch[0][:1])
        return split.extra["layers"]

    def forget_targets(self, model, split, scored, configs, seed, device) -> Targets:
        term, edit = configs["forget_term"], configs["edit"]
        batch = split.extra["scoring_batch"]
        layers = self.layers(model, split, batch)
        if not (term.weight > 0 or edit.steps > 0):
            return Targets(None, sorted(scored))
        want = len(split.forget_set) if term.samples is None else term.samples
        pool, gen = forget_pool(len(split.forget_set), scored, want, seed)
        refs = torch.randperm(len(split.budget), generator=gen)[:term.references].tolist()
        xq, yq = take(split.forget_set, pool)
        vocab = forward_logits(model, batch[0][:1]).shape[-1]
        count = configs["finetune"].neighbours
        near = None
        if count > 0 or term.source == "neighbours":
            per = max(term.per_sequence, -(-count // max(len(pool), 1)))
            near = swapped_neighbours((xq, yq), take(split.budget, range(len(split.budget))), vocab, per, seed)
        q = template_targets(model, (xq, yq), near) if near is not None and term.source == "neighbours" else None
        if q is not None:   # only the positions that must change (the stop's threshold: the rest already meet it)
            q = informative(q, model, xq, self.forget_gap_stop)
        info = {"forget_targets": "neighbours" if q is not None else "positions",
                "neighbours": 0 if near is None or count == 0 else min(count, len(near))}
        if q is not None:
            where = q.scored
        else:
            xr, yr = take(split.budget, refs)
            q, where = forget_targets(model, layers[0].layer, (xq.to(device), yq), (xr.to(device), yr), vocab,
                                      term.k, term.k_share)
        near = near.head(info["neighbours"]) if info["neighbours"] else None
        if near is not None:
            info["_neighbours"] = near
        if edit.steps > 0:
            xe, ye = take(split.budget, refs[:edit.references])
            if near is not None and edit.neighbours:   # the neighbours' reads join the subspace kept fixed
                xe, ye = cat_batches([(xe, ye), (near.inputs, near.labels)])
            at = None
            if edit.positions == "scored":  # the positions whose next token is scored (the facts' reads)
                at = torch.zeros_like(ye, dtype=torch.bool)
                at[:, :-1] = ye[:, 1:] != IGNORE_INDEX
            edited = layers + (mlp_input_layers(model, layers) if edit.scope == "mlp" else [])
            info["_projectors"] = retain_projectors(model, layers, xe.to(device), edit.energy, positions=at,
                                                   extra=edited[len(layers):])
            info["_edited"] = edited
        return Targets((xq, q, where), sorted(set(scored) | set(pool)), info)

    def prune(self, model, batch, is_forget, split, configs, mode, comm) -> PruneResult:
        device = model_device(model)
        layers = self.layers(model, split, batch)
        x, y = batch[0].to(device), batch[1].to(device)
        selection = SelectionConfig(**{**configs["selection"].to_dict(), "mode": mode})
        selection.validate()
        t0 = time.perf_counter()
        scored = score_neurons(model, x, y, is_forget, layers, comm=comm)  # each rank its shard, summed
        synchronize(device)
        t1 = time.perf_counter()
        masks = select_units(layers, scored.scores, scored.counts, selection)
        if comm is not None:
            comm.broadcast_(list(masks.values()), src=0)  # rank 0's masks: bit-identical on every rank
        plan = neuron_mask_plan(layers, masks)
        plan.apply()
        synchronize(device)
        return PruneResult(masks, scored.scores, scored.counts, plan, None, t1 - t0, time.perf_counter() - t1)

    def prepare(self, model, split, targets, pruned, configs, device, seed, guard) -> dict:
        edit = configs["edit"]
        info = {"forget_term": configs["forget_term"].to_dict(), "edit": edit.to_dict(), "edit_steps": 0,
                "neuron_layers": [l.name for l in split.extra["layers"]]}
        if edit.steps > 0 and targets.payload is not None and "_projectors" in targets.info:
            info["edit_steps"] = projected_edit(model, targets.info["_edited"], targets.payload,
                                                targets.info["_projectors"], pruned.plan, edit, device, seed,
                                                guard=guard)
        return info

    def objective(self, model, split, targets, pruned, configs, device, seed, comm, steps, teacher):
        if comm is not None and comm.world_size > 1:  # torchrun: FSDP2 (or DDP) fine-tune, see tasks/lm_parallel.py
            from .lm_parallel import ParallelLMObjective
            return ParallelLMObjective.build(model, split, targets, pruned, configs, device, seed, comm, teacher)
        return LMObjective(model, split.budget, configs["finetune"], device=device, seed=seed,
                           forget=targets.payload, forget_term=configs["forget_term"],
                           layers=split.extra["layers"], teacher=teacher, neighbours=targets.info.get("_neighbours"))

    def early_stop_target(self, pruned) -> float | None:
        return None

    @torch.no_grad()
    def retention(self, model: nn.Module, dataset, device, watch=None) -> dict:
        """Per sequence of ``dataset``, the probability of its least probable right next token (``p``:
        a fact is known when each of its tokens is, and a statement's template words, right for every
        entity, would otherwise drown its answer); the share of sequences with every scored token
        right (``accuracy``), and the mean loss per scored token."""
        probs, hits, tokens = [], 0, 0
        nll = 0.0
        with eval_mode(model):
            for x, y in batches(dataset, 16, device=device):
                logits = forward_logits(model, x)
                nxt = y[:, 1:].to(logits.device)
                scored = nxt != IGNORE_INDEX
                logp = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)   # scored positions only
                right = logp.gather(1, nxt[scored][:, None])[:, 0]
                row = scored.nonzero()[:, 0]
                worst = torch.zeros(nxt.shape[0], device=right.device).scatter_reduce(0, row, right, "amin")
                wrong = torch.zeros(nxt.shape[0], dtype=torch.long, device=right.device).index_add_(
                    0, row, (logp.argmax(-1) != nxt[scored]).long())
                has = scored.any(1)
                probs.append(worst[has].exp().cpu())
                hits += int(((wrong == 0) & has).sum())
                nll -= float(right.sum())
                tokens += int(scored.sum())
        p = torch.cat(probs) if probs else torch.zeros(0)
        return {"p": p, "accuracy": hits / max(int(p.numel()), 1), "samples": len(dataset),
                "loss": nll / max(tokens, 1)}

    @torch.no_grad()
    def losses(self, model: nn.Module, dataset, device) -> torch.Tensor:
        """Each sequence's mean next-token loss over its scored tokens (the membership signal)."""
        out = []
        with eval_mode(model):
            for x, y in batches(dataset, 64, device=device):
                nll = token_nll(forward_logits(model, x), y)
                out.append((nll.sum(1) / (y[:, 1:] != IGNORE_INDEX).sum(1).clamp_min(1).to(nll.device)).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def forget_gap(self, model: nn.Module, split: Split, targets: Targets, device) -> float | None:
        r"""The mean :math:`\mathrm{KL}(q_{i,t} \,\|\, p_\theta(\cdot \mid x_{i,\le t}))` over the forget
        sequences' scored positions that have targets (nats; :func:`soft_target_loss` minus the
        targets' entropy): 0 once they are answered as the targets say an unseen entity is."""
        if targets.payload is None:
            return None
        xf, q, scored = targets.payload
        total, count = 0.0, 0
        with eval_mode(model):
            for start in range(0, xf.shape[0], 64):
                rows = list(range(start, min(start + 64, xf.shape[0])))
                part = scored[rows]
                n = int(part.sum())
                if n == 0:
                    continue
                ce = soft_target_loss(forward_logits(model, xf[rows].to(device)), q[rows], part)
                total += float(ce) * n
                count += n
        if count == 0:
            return None
        w = q.weights if isinstance(q, SparseTargets) else q[scored]
        entropy = float(-(w * w.clamp_min(1e-30).log()).sum())
        return total / count - entropy / count

    def describe_record(self, split: Split) -> dict:
        return {"task": "causal-lm", "forget_classes": None}
