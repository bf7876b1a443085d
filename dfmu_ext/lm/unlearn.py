r"""DFMU for causal language models: one scoring pass over the MLP neurons, knowledge-preserving
selection, fused masking of the down projections, a retain-projected edit towards the forget
sequences' targets, and a short masked fine-tune on a slice of the retain sequences.
:func:`dfmu_ext.unlearn` calls :func:`unlearn_causal_lm` when the samples are causal-LM samples (or
``task="causal-lm"``).

1. Selection: :func:`dfmu_ext.selection.select_units` over the neurons' scores, each group's
   importance taken as its share of the block's (:data:`LM_SELECTION`, ``normalize="total"``).
2. Targets :math:`q` (:mod:`dfmu_ext.lm.targets`): what a model that never saw the forget sequences
   would predict at their scored positions, from the retain budget's nearest positions.
3. The edit (:mod:`dfmu_ext.lm.edit`): Adam steps on the MLP projections towards :math:`q`, every
   update projected off the subspace the retain activations use, so the retain sequences' MLP
   outputs do not move.
4. The fine-tune: the budget's mean next-token loss plus the soft cross-entropy to :math:`q` on the
   forget sequences, AdamW on the MLP layers (:class:`dfmu_ext.finetune.AdamW`); after every step
   the masks are re-applied to the weights and both Adam moments, so a removed neuron stays zero.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .. import record as deletion_record
from .._common import eval_mode, model_device, seeded, synchronize, train_mode
from ..finetune import AdamW, MomentumSGD
from ..result import FinetuneHistory, UnlearnResult
from ..selection import SelectionConfig, select_units
from .neurons import mlp_input_layers, mlp_neuron_layers, mlp_projections, neuron_mask_plan, score_neurons
from .edit import EditConfig, ProjectedUpdates, retain_projectors
from .targets import LMForgetTermConfig, forget_targets, soft_target_loss
from .task import batches, cat_batches, check_scored, forward_logits, lm_loss, split_forget, take

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
    train: str = "mlp"      # "all" parameters, or only the "mlp" layers that hold the neurons

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1 and min_steps >= 0")
        if self.train not in ("all", "mlp"):
            raise ValueError(f"finetune.train must be 'all' or 'mlp', got {self.train!r}")
        if not 0.0 <= self.nearest <= 1.0:
            raise ValueError(f"finetune.nearest must be in [0, 1], got {self.nearest}")

    def to_dict(self) -> dict:
        return asdict(self)


def masked_lm_finetune(model: nn.Module, budget, plan, config: LMFinetuneConfig, device: torch.device, seed: int,
                       progress: bool = False, forget=None, forget_term: LMForgetTermConfig | None = None,
                       mlp_layers=()) -> FinetuneHistory:
    """Minimise the mean next-token loss on ``budget`` for ``config.epochs`` (raised to reach
    ``min_steps``), re-applying ``plan`` after every step. With ``forget = (inputs, q, scored)``
    (:func:`dfmu_ext.lm.targets.forget_targets`) each step adds ``forget_term.weight`` times the soft
    cross-entropy to ``q`` on ``forget_term.batch_size`` forget sequences (cycled)."""
    start = time.perf_counter()
    hist = FinetuneHistory()
    steps_per_epoch = max(1, -(-len(budget) // config.batch_size))
    epochs = config.epochs if config.epochs == 0 else max(config.epochs, -(-config.min_steps // steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    if config.train == "mlp":
        owners = {l.layer for l in mlp_layers} | {m for l in mlp_layers for m in mlp_projections(model, l.layer)}
        keep = {id(p) for m in owners for p in m.parameters()}
        params = [p for p in params if id(p) in keep]
    opt = AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    bar = tqdm(total=epochs * steps_per_epoch, desc="fine-tune", leave=False, unit="step", disable=not progress)
    cursor = 0
    with seeded(seed, device), train_mode(model), _training_only(model, params):
        for epoch in range(epochs):
            for x, y in batches(budget, config.batch_size, shuffle=True, seed=seed + epoch, device=device):
                loss = lm_loss(forward_logits(model, x), y)
                if forget is not None and forget_term.weight > 0 and (forget_term.steps is None
                                                                      or hist.steps < forget_term.steps):
                    xf, q, scored = forget
                    rows = [(cursor + i) % xf.shape[0] for i in range(min(forget_term.batch_size, xf.shape[0]))]
                    cursor = (cursor + len(rows)) % xf.shape[0]
                    loss = loss + forget_term.weight * soft_target_loss(
                        forward_logits(model, xf[rows].to(device)), q[rows], scored[rows])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the fine-tune loss became {loss.item()}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                plan.apply(opt)
                hist.steps += 1
                hist.samples += int(x.shape[0])
                if hist.steps % 10 == 1:
                    hist.loss.append(float(loss.detach()))
                bar.update(1)
    bar.close()
    opt.zero_grad(set_to_none=True)
    hist.epochs_run = float(epochs)
    synchronize(device)
    hist.seconds = time.perf_counter() - start
    return hist


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


def _scoring_positions(n_forget: int, n_budget: int, samples: int, seed: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed + 7919)
    half = max(1, samples // 2)
    f = torch.randperm(n_forget, generator=gen)[:half].tolist()
    r = torch.randperm(n_budget, generator=gen)[:max(1, samples - len(f))].tolist()
    return f, r


def projected_edit(model: nn.Module, edited, forget, projectors, plan, config: EditConfig, device: torch.device,
                   seed: int) -> int:
    """``config.steps`` steps on the ``edited`` layers' weights towards the forget targets, every update
    projected off the retain subspace of its input (:mod:`dfmu_ext.lm.edit`), pruned neurons kept at
    zero. Returns the steps run."""
    xf, q, scored = forget
    params = [l.weight for l in edited]
    # SGD keeps each update in the span of the forget sequences' own activations (the gradient of
    # y = W h is g h^T); Adam's per-coordinate steps spread it over every direction.
    opt = MomentumSGD(params, lr=config.lr, momentum=0.9) if config.optimizer == "sgd" else \
        AdamW(params, lr=config.lr, weight_decay=0.0)
    guard = ProjectedUpdates([(l.weight, projectors[l.name], l.unit_dim) for l in edited])
    cursor = 0
    try:
        with seeded(seed, device), eval_mode(model), _training_only(model, params):
            for _ in range(config.steps):
                rows = [(cursor + i) % xf.shape[0] for i in range(min(config.batch_size, xf.shape[0]))]
                cursor = (cursor + len(rows)) % xf.shape[0]
                loss = soft_target_loss(forward_logits(model, xf[rows].to(device)), q[rows], scored[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                guard.before()
                opt.step()
                guard.after()
                plan.apply(opt)
    finally:
        opt.zero_grad(set_to_none=True)
    return config.steps


def _forget_pools(n_forget: int, n_budget: int, scored: list[int], config: LMForgetTermConfig,
                  seed: int) -> tuple[list[int], list[int]]:
    """The forget sequences the forget term reads (the scored ones first, then seeded others) and the
    retain sequences of the budget its neighbours are searched among."""
    gen = torch.Generator().manual_seed(seed + 15485863)
    want = n_forget if config.samples is None else min(n_forget, config.samples)
    taken = set(scored[:want])
    pool = scored[:want] + [i for i in torch.randperm(n_forget, generator=gen).tolist() if i not in taken]
    refs = torch.randperm(n_budget, generator=gen)[:config.references].tolist()
    return pool[:want], refs


def _to(batch, device):
    x, y = batch
    return x.to(device), y


def unlearn_causal_lm(model: nn.Module, train_set, forget_indices, retain_fraction: float = 0.13, *,
                      mode: str = "prune", selection: SelectionConfig | None = None,
                      finetune: LMFinetuneConfig | None = None, score_samples: int = 256, device=None,
                      seed: int = 0, progress: bool = False, record=None,
                      forget_term: LMForgetTermConfig | None = None, edit: EditConfig | None = None
                      ) -> UnlearnResult:
    r"""Make a causal LM forget the sequences at ``forget_indices`` of ``train_set``.

    Steps (timed): one scoring pass (:func:`dfmu_ext.lm.neurons.score_neurons`) on up to
    ``score_samples // 2`` forget sequences and as many retain sequences of the budget (a seeded
    ``retain_fraction`` of the other sequences); selection of neurons (``selection``, default
    :data:`LM_SELECTION`, ``mode`` "prune" or "rescale"); one fused masking of the down
    projections; the masked fine-tune (``finetune``, :class:`LMFinetuneConfig`). The model is
    modified in place; nothing changes if an argument is rejected (one-line ValueError).
    """
    input_sha256 = deletion_record.state_dict_sha256(model) if record is not None else None
    total_start = time.perf_counter()
    if score_samples < 2:
        raise ValueError("score_samples must be >= 2")
    finetune = finetune or LMFinetuneConfig()
    finetune.validate()
    base = selection or LM_SELECTION
    selection = SelectionConfig(**{**base.to_dict(), "mode": mode})
    selection.validate()
    forget_term = forget_term or LMForgetTermConfig()
    forget_term.validate()
    edit = edit or EditConfig()
    edit.validate()
    forget_set, retain_set, budget = split_forget(train_set, forget_indices, retain_fraction, seed, finetune.nearest)
    if device is not None:
        model.to(device)
    device = model_device(model)

    f_pos, r_pos = _scoring_positions(len(forget_set), len(budget), score_samples, seed)
    xf, yf = take(forget_set, f_pos)
    xr, yr = take(budget, r_pos)
    check_scored(yf, "the forget sequences")
    check_scored(yr, "the retain sequences")
    x, y = cat_batches([(xf, yf), (xr, yr)])
    is_forget = torch.cat([torch.ones(len(f_pos), dtype=torch.bool), torch.zeros(len(r_pos), dtype=torch.bool)])
    x, y = x.to(device), y.to(device)

    layers = mlp_neuron_layers(model, x[:1])
    t_targets = time.perf_counter()
    forget, forget_read, projectors = None, sorted(f_pos), None
    if forget_term.weight > 0 or edit.steps > 0:
        pool, refs = _forget_pools(len(forget_set), len(budget), f_pos, forget_term, seed)
        xq, yq = take(forget_set, pool)
        vocab = forward_logits(model, x[:1]).shape[-1]
        q, where = forget_targets(model, layers[0].layer, (xq.to(device), yq), _to(take(budget, refs), device),
                                  vocab, forget_term.k)
        forget, forget_read = (xq, q, where), sorted(set(f_pos) | set(pool))
        if edit.steps > 0:
            xr_, yr_ = take(budget, refs[:edit.references])
            at = None
            if edit.positions == "scored":  # the positions whose next token is scored (the facts' reads)
                at = torch.zeros_like(yr_, dtype=torch.bool)
                at[:, :-1] = yr_[:, 1:] != -100
            edited = layers + (mlp_input_layers(model, layers) if edit.scope == "mlp" else [])
            projectors = retain_projectors(model, layers, xr_.to(device), edit.energy, positions=at,
                                           extra=edited[len(layers):])
    seconds_targets = time.perf_counter() - t_targets
    t0 = time.perf_counter()
    scored = score_neurons(model, x, y, is_forget, layers)
    synchronize(device)
    t1 = time.perf_counter()
    masks = select_units(layers, scored.scores, scored.counts, selection)
    plan = neuron_mask_plan(layers, masks)
    plan.apply()
    synchronize(device)
    t2 = time.perf_counter()
    t_edit = time.perf_counter()
    edit_steps = projected_edit(model, edited, forget, projectors, plan, edit, device, seed) if projectors else 0
    seconds_edit = time.perf_counter() - t_edit
    ft = masked_lm_finetune(model, budget, plan, finetune, device, seed, progress=progress,
                            forget=forget if forget_term.weight > 0 else None,
                            forget_term=forget_term, mlp_layers=layers)
    total = time.perf_counter() - total_start
    timings = {"targets": seconds_targets, "scoring": t1 - t0, "pruning": t2 - t1, "edit": seconds_edit,
               "finetune": ft.seconds, "total": total}
    info = {"task": "causal-lm", "scores": scored.scores, "counts": scored.counts.tolist(), "mode": mode,
            "retain_fraction": retain_fraction, "scoring_forget_samples": len(f_pos),
            "forget_read": forget_read, "forget_term": forget_term.to_dict(), "edit": edit.to_dict(),
            "edit_steps": edit_steps, "forget_samples": len(forget_set), "neuron_layers": [l.name for l in layers]}
    result = UnlearnResult(model=model, masks=masks, timings=timings, retain_samples_used=len(budget),
                           forget_samples_used=len(forget_read), method="DFMU",
                           pruned_units={k: int((m < 1).sum()) for k, m in masks.items()},
                           total_units={l.name: l.units for l in layers}, finetune=ft, info=info)
    if record is not None:
        config = {"task": "causal-lm", "forget_classes": None, "retain_fraction": retain_fraction, "mode": mode,
                  "score_samples": score_samples, "selection": selection.to_dict(), "finetune": finetune.to_dict(),
                  "forget_term": forget_term.to_dict(), "edit": edit.to_dict()}
        deletion_record.write_record(record, deletion_record.unlearn_record(
            result, input_sha256=input_sha256, train_set=train_set, forget_set=forget_set, retain_set=retain_set,
            retain_used=budget, config=config, seed=seed, forget_read=Subset(forget_set, forget_read)))
    return result
