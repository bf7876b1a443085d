r"""DFMU for causal language models: one scoring pass over the MLP neurons, knowledge-preserving
selection, fused masking of the down projections, and a short masked fine-tune on a slice of the
retain sequences. :func:`dfmu_ext.unlearn` calls :func:`unlearn_causal_lm` when the samples are
causal-LM samples (or ``task="causal-lm"``).

Selection is :func:`dfmu_ext.selection.select_units` over the neurons' scores (a unit's forget
specificity :math:`\rho_c = \bar I_{f,c} / \bar I_{r,c}`, the top retain-important neurons protected),
with :data:`LM_SELECTION` as the default. The fine-tune minimises the mean next-token loss of the
budget's scored tokens with :class:`dfmu_ext.finetune.AdamW`; after every step the masks are
re-applied to the weights and both Adam moments, so a removed neuron stays exactly zero.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from .. import record as deletion_record
from .._common import model_device, seeded, synchronize, train_mode
from ..finetune import AdamW
from ..result import FinetuneHistory, UnlearnResult
from ..selection import SelectionConfig, select_units
from .neurons import mlp_neuron_layers, neuron_mask_plan, score_neurons
from .task import batches, cat_batches, check_scored, forward_logits, lm_loss, split_forget, take

#: The default neuron selection for language models (see benchmarks/RESULTS.md, "Entity unlearning").
LM_SELECTION = SelectionConfig(fraction_first=0.10, fraction_last=0.10, min_ratio=1.0, protect_top=0.10)


@dataclass
class LMFinetuneConfig:
    """The masked fine-tune of a causal LM on the retain budget."""

    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 32
    weight_decay: float = 0.0
    min_steps: int = 10     # whole epochs until at least this many steps (a small budget is few batches)

    def validate(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError("epochs must be >= 0, lr > 0, batch_size >= 1 and min_steps >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def masked_lm_finetune(model: nn.Module, budget, plan, config: LMFinetuneConfig, device: torch.device, seed: int,
                       progress: bool = False) -> FinetuneHistory:
    """Minimise the mean next-token loss on ``budget`` for ``config.epochs`` (raised to reach
    ``min_steps``), re-applying ``plan`` after every step."""
    start = time.perf_counter()
    hist = FinetuneHistory()
    steps_per_epoch = max(1, -(-len(budget) // config.batch_size))
    epochs = config.epochs if config.epochs == 0 else max(config.epochs, -(-config.min_steps // steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    bar = tqdm(total=epochs * steps_per_epoch, desc="fine-tune", leave=False, unit="step", disable=not progress)
    with seeded(seed, device), train_mode(model):
        for epoch in range(epochs):
            for x, y in batches(budget, config.batch_size, shuffle=True, seed=seed + epoch, device=device):
                loss = lm_loss(forward_logits(model, x), y)
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


def _scoring_positions(n_forget: int, n_budget: int, samples: int, seed: int) -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(seed + 7919)
    half = max(1, samples // 2)
    f = torch.randperm(n_forget, generator=gen)[:half].tolist()
    r = torch.randperm(n_budget, generator=gen)[:max(1, samples - len(f))].tolist()
    return f, r


def unlearn_causal_lm(model: nn.Module, train_set, forget_indices, retain_fraction: float = 0.13, *,
                      mode: str = "prune", selection: SelectionConfig | None = None,
                      finetune: LMFinetuneConfig | None = None, score_samples: int = 256, device=None,
                      seed: int = 0, progress: bool = False, record=None) -> UnlearnResult:
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
    forget_set, retain_set, budget = split_forget(train_set, forget_indices, retain_fraction, seed)
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

    t0 = time.perf_counter()
    layers = mlp_neuron_layers(model, x[:1])
    scored = score_neurons(model, x, y, is_forget, layers)
    synchronize(device)
    t1 = time.perf_counter()
    masks = select_units(layers, scored.scores, scored.counts, selection)
    plan = neuron_mask_plan(layers, masks)
    plan.apply()
    synchronize(device)
    t2 = time.perf_counter()
    ft = masked_lm_finetune(model, budget, plan, finetune, device, seed, progress=progress)
    total = time.perf_counter() - total_start
    timings = {"scoring": t1 - t0, "pruning": t2 - t1, "finetune": ft.seconds, "total": total}
    info = {"task": "causal-lm", "scores": scored.scores, "counts": scored.counts.tolist(), "mode": mode,
            "retain_fraction": retain_fraction, "scoring_forget_samples": len(f_pos),
            "forget_read": sorted(f_pos), "forget_samples": len(forget_set), "neuron_layers": [l.name for l in layers]}
    result = UnlearnResult(model=model, masks=masks, timings=timings, retain_samples_used=len(budget),
                           forget_samples_used=len(f_pos), method="DFMU",
                           pruned_units={k: int((m < 1).sum()) for k, m in masks.items()},
                           total_units={l.name: l.units for l in layers}, finetune=ft, info=info)
    if record is not None:
        config = {"task": "causal-lm", "forget_classes": None, "retain_fraction": retain_fraction, "mode": mode,
                  "score_samples": score_samples, "selection": selection.to_dict(), "finetune": finetune.to_dict()}
        deletion_record.write_record(record, deletion_record.unlearn_record(
            result, input_sha256=input_sha256, train_set=train_set, forget_set=forget_set, retain_set=retain_set,
            retain_used=budget, config=config, seed=seed, forget_read=Subset(forget_set, sorted(f_pos))))
    return result
