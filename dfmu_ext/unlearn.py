"""The DFMU pipeline: one scoring pass -> knowledge-preserving selection -> fused masking ->
short masked fine-tune on a stratified slice of the retain data.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ._common import check_classes_in_head, model_device, normalise_classes, resolve_forget_set, synchronize
from . import record as deletion_record
from .blocks import classifier_of, discover_blocks
from .distributed import Comm, current_comm
from .finetune import FinetuneConfig, masked_finetune
from .importance import score_blocks
from .lm.task import detect_task
from .lm.unlearn import LMFinetuneConfig, unlearn_causal_lm
from .model_io import cat, model_entry
from .pruning import build_mask_plan, head_mask_for, suppress_head
from .result import PruneResult, UnlearnResult
from .selection import SelectionConfig, select_units
from .splits import stratified_fraction, take_batch
from .steps import StepOptions
from .targets import ForgetTargetConfig, disagreement, early_features, neighbour_targets


#: The default selection when samples (not classes) are forgotten. Random samples share every feature
#: with the retain data, so their importance ratio rho is ~1 up to sampling noise: with the classes'
#: rho > 1 rule DFMU pruned 51 units on noise and lost 1 point of RA and TA (Fashion-MNIST CNN, random
#: 10%); requiring rho > 2 leaves 12 units, the same result as the fine-tune alone (benchmarks/RESULTS.md).
SAMPLE_SELECTION = SelectionConfig(min_ratio=2.0)


#: The forget term's default when whole classes are forgotten: off. On Fashion-MNIST class 5 (2 seeds)
#: it brought the TV distance to Retrain from 28.9 to 18.3 (head-mask 43.9) and the probe from +3.0 to
#: +1.5 points of Retrain's, but cost RA and TA a point (RA 90.4 vs 91.4, Retrain 92.3); on class 8 it
#: cost RA/TA half a point and made the TV distance worse (44.2 vs 37.6). Today's RA and TA must not
#: regress (benchmarks/RESULTS.md). ``forget_term=ForgetTargetConfig()`` turns it on.
CLASS_FORGET_TERM = ForgetTargetConfig(weight=0.0)


def default_forget_term(by_classes: bool) -> ForgetTargetConfig:
    """The forget term used when none is given: off for whole classes (:data:`CLASS_FORGET_TERM`),
    ``ForgetTargetConfig()`` for samples and sub-classes (where its own rule decides whether it runs)."""
    return ForgetTargetConfig(**CLASS_FORGET_TERM.to_dict()) if by_classes else ForgetTargetConfig()


def default_selection(by_classes: bool) -> SelectionConfig:
    """The selection used when none is given: the classes' rule, or :data:`SAMPLE_SELECTION`."""
    return SelectionConfig() if by_classes else SAMPLE_SELECTION


@model_entry
def score_and_prune(model: nn.Module, batch, forget_classes=None, *, forget_mask: torch.Tensor | None = None,
                    selection: SelectionConfig | None = None, mode: str | None = None, head: bool | None = None,
                    reduce: str = "abs", comm: Comm | None = None) -> PruneResult:
    """Score every block with ONE forward and ONE backward of ``batch = (x, y)``, select units and
    apply the masks in place with the fused op.

    The batch's forget samples are those of ``forget_classes``, or those where the boolean
    ``forget_mask`` (one entry per sample) is true — exactly one of the two. ``mode`` ("prune" or
    "rescale") overrides ``selection.mode``; the default selection is ``SelectionConfig()`` for
    classes and :data:`SAMPLE_SELECTION` for a mask. With ``head`` (default: when whole classes are
    forgotten) the classifier's forget-class rows are masked and their logits pinned low; the head
    is never touched when samples are forgotten. Nothing in the model changes if an error is raised.

    Under ``torch.distributed`` (``comm`` defaults to :func:`distributed.current_comm`) every rank
    calls this with *its shard* of the scoring batch (``comm.shard(batch)``): the scores and counts
    are summed over ranks, rank 0's masks are broadcast so all ranks apply identical masks, and the
    pre-pruning retain accuracy is that of the whole batch. Every rank must call it (collectives).
    """
    x, y = batch
    comm = comm or current_comm()
    if (forget_classes is None) == (forget_mask is None):
        raise ValueError("give exactly one of forget_classes and forget_mask")
    classes = normalise_classes(forget_classes) if forget_classes is not None else None
    if head is None:
        head = classes is not None
    if head and classes is None:
        raise ValueError("the classifier's rows can only be masked when whole classes are forgotten (head=False)")
    base = selection or default_selection(classes is not None)
    selection = SelectionConfig(**{**base.to_dict(), **({"mode": mode} if mode else {})})
    selection.validate()
    device = model_device(model)
    x, y = x.to(device), torch.as_tensor(y).to(device).long()
    head_name, head_layer = classifier_of(model)
    if classes is not None:
        check_classes_in_head(classes, head_layer.out_features)
        forget_mask = torch.isin(y, torch.as_tensor(classes, device=y.device))
    else:
        forget_mask = torch.as_tensor(forget_mask, dtype=torch.bool).to(y.device).reshape(-1)
        if forget_mask.numel() != y.numel():
            raise ValueError(f"forget_mask has {forget_mask.numel()} entries for a batch of {y.numel()} samples")

    t0 = time.perf_counter()
    scored = score_blocks(model, x, y, forget_mask=forget_mask, reduce=reduce, comm=comm)
    synchronize(device)
    t1 = time.perf_counter()
    masks = select_units(scored.blocks, scored.scores, scored.counts, selection)
    comm.broadcast_(list(masks.values()), src=0)  # bit-identical masks on every rank (one float per unit)
    head_mask = head_mask_for(head_layer, classes) if head else None
    plan = build_mask_plan(scored.blocks, masks, head_layer, head_mask)
    plan.apply()
    if head:
        suppress_head(head_layer, classes)
        masks[head_name] = head_mask
    synchronize(device)
    t2 = time.perf_counter()

    retain = ~forget_mask
    pred = scored.logits.argmax(1)
    # The whole batch's accuracy (over all ranks): the fine-tune's early-stop target.
    pre_acc = comm.global_fraction(int((pred[retain] == y[retain]).sum()), int(retain.sum()), device)
    return PruneResult(masks, scored.scores, scored.counts, plan, pre_acc, t1 - t0, t2 - t1)


def _scoring_indices(forget: Subset, retain: Subset, n: int, seed: int) -> tuple[list[int], list[int]]:
    """Up to n/2 random forget samples and n/2 random retain samples (from the budgeted slice)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    half = max(1, n // 2)
    f = torch.randperm(len(forget), generator=gen)[:half].tolist()
    r = torch.randperm(len(retain), generator=gen)[:max(1, n - len(f))].tolist()
    return f, r


def _forget_pool(forget_set: Subset, scored: list[int], samples: int, seed: int) -> list[int]:
    """Positions in ``forget_set`` the forget term reads: the scored ones first, then seeded random
    others, ``samples`` in all."""
    n = len(forget_set)
    if samples >= n:
        return list(range(n))
    chosen = scored[:samples]
    taken = set(chosen)
    gen = torch.Generator().manual_seed(seed + 15485863)
    others = [i for i in torch.randperm(n, generator=gen).tolist() if i not in taken]
    return chosen + others[:samples - len(chosen)]


def _forget_targets(model: nn.Module, forget_set: Subset, budget: Subset, config: ForgetTargetConfig,
                    scored: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], float]:
    """``(x_f, t, positions, D_f - D_r)``: the forget samples the forget term reads, their neighbour
    targets (:mod:`dfmu_ext.targets`), measured in the model's first block before anything is pruned,
    and how much more their neighbours disagree with their labels than the retain samples' do."""
    pool = _forget_pool(forget_set, scored, config.pool_size(len(forget_set)), seed)
    x_f, y_f = take_batch(forget_set, pool)
    gen = torch.Generator().manual_seed(seed + 32452843)
    refs = torch.randperm(len(budget), generator=gen)[:config.references].tolist()
    x_r, y_r = take_batch(budget, refs)
    first = discover_blocks(model, x_r[:2].to(model_device(model)))[0]
    _, head = classifier_of(model)
    f_r = early_features(model, first, x_r, config.grid)
    t = neighbour_targets(early_features(model, first, x_f, config.grid), f_r, y_r, head.out_features, config.k)
    t_r = neighbour_targets(f_r, f_r, y_r, head.out_features, config.k, leave_one_out=True)
    return x_f, t, pool, disagreement(t, y_f) - disagreement(t_r, y_r)


@model_entry
def unlearn(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
            forget_indices=None, mode: str = "prune", selection: SelectionConfig | None = None,
            finetune: FinetuneConfig | None = None,
            score_samples: int = 512, device=None, seed: int = 0, progress: bool = False,
            comm: Comm | None = None, steps: StepOptions | None = None, record=None,
            forget_term: ForgetTargetConfig | None = None, task: str | None = None) -> UnlearnResult:
    r"""Make ``model`` forget ``forget_classes`` (whole classes) or ``forget_indices`` (samples of
    ``train_set``; exactly one of the two) using a ``retain_fraction`` of the retain data — every
    other sample; the budget is stratified by label either way.

    Steps (timed separately): one scoring pass on a batch of ``score_samples`` (half forget, half
    retain from the budgeted slice); the forget term's targets (below); knowledge-preserving pruning
    (``mode`` "prune" or "rescale"); a masked fine-tune on the class-stratified ``retain_fraction``
    of the retain data, stopping early once the retain accuracy measured before pruning is recovered.

    The forget term (``forget_term``, :class:`dfmu_ext.targets.ForgetTargetConfig`; default: on for
    ``forget_indices``, off for whole classes, :func:`default_forget_term`) makes forgetting change
    behaviour where a retrained model would: before pruning, each of up to
    ``steps * batch_size`` forget samples gets the label histogram :math:`t_i` of its ``k`` nearest
    retain samples of the budget in the model's first-block features (an estimate of what Retrain
    outputs on it); the first ``steps`` fine-tune steps add
    :math:`w \cdot \mathrm{mean}_i(-\sum_c t_{ic} \log p_{ic})` on ``batch_size`` of them, and
    the rest of the fine-tune is retain-only. It runs only when the forget samples' neighbours
    disagree with their labels clearly more than the retain samples' own neighbours do (by
    ``min_excess``): whole classes and sub-classes whose look-alikes are elsewhere, not random
    samples, whose neighbourhoods are the retain data's. ``weight=0`` turns it off. The forget
    samples read (scoring and forget term) are counted in ``forget_samples_used`` and listed in
    ``info["forget_read"]`` (positions in the forget set); a deletion record holds their count and
    hash.

    The classifier's rows are masked only when whole classes are forgotten; for samples the default selection is
    :data:`SAMPLE_SELECTION` (only units clearly more important to the forget samples are touched).
    The model is modified in place and returned in
    the result; a seed makes the run reproducible.

    Under ``torch.distributed`` (e.g. torchrun; world size W > 1) every rank calls ``unlearn`` with
    the same arguments and model: rank r scores samples r, r+W, ... of the scoring batch (scores
    summed over ranks, identical masks everywhere), then fine-tunes under DistributedDataParallel on
    its DistributedSampler share of the budget with a per-rank batch of ceil(batch_size / W), the
    early stop decided on counts summed over ranks; BatchNorm running statistics are averaged at the
    end, so every rank returns the same model. ``comm`` (default :func:`distributed.current_comm`)
    carries all of that; see ``dfmu_ext.distributed``. ``steps`` sets the fine-tune's precision and
    memory layout (:class:`dfmu_ext.steps.StepOptions`; default: per device). ``record`` (a path)
    writes a deletion record there (rank 0 only): see ``dfmu_ext.record``.

    Any model and data (:mod:`dfmu_ext.model_io`): the model may return a tensor, a tuple, a dict or
    a ``transformers`` ``ModelOutput`` (or anything, read by ``logits_fn=``); samples may be
    ``(x, y)`` pairs or dicts (``{"input_ids", "attention_mask", "labels"}``, ``{"pixel_values",
    "label"}``, the label's key ``label_key=``), passed to the model as keyword arguments. Integer
    token inputs are scored at the output of the model's embeddings. ``classifier=`` names the
    classifier module when it is not found (timm's ``get_classifier()``, a ``classifier`` or
    ``score`` attribute, else the last ``nn.Linear``).

    Causal language models (``task="causal-lm"``, or detected from samples
    ``{"input_ids", "attention_mask"?, "labels"}`` whose ``labels`` are per token, -100 where
    nothing is scored): ``forget_indices`` name the sequences to forget, the units are the MLP
    neurons, the loss is the next-token loss of the scored tokens, and ``finetune`` is a
    :class:`dfmu_ext.lm.unlearn.LMFinetuneConfig` — see :func:`dfmu_ext.lm.unlearn.unlearn_causal_lm`.
    """
    if detect_task(train_set, task) == "causal-lm":
        if forget_classes is not None:
            raise ValueError("a causal LM forgets sequences, not classes: give forget_indices")
        unused = [n for n, v in (("comm", comm), ("steps", steps), ("forget_term", forget_term)) if v is not None]
        if unused or (finetune is not None and not isinstance(finetune, LMFinetuneConfig)):
            raise ValueError(f"for a causal LM, {', '.join(unused) or 'finetune'} is not supported "
                             f"(finetune takes an LMFinetuneConfig)")
        return unlearn_causal_lm(model, train_set, forget_indices, retain_fraction, mode=mode, selection=selection,
                                 finetune=finetune, score_samples=score_samples, device=device, seed=seed,
                                 progress=progress, record=record)
    input_sha256 = deletion_record.state_dict_sha256(model) if record is not None else None
    total_start = time.perf_counter()
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    if score_samples < 2:
        raise ValueError("score_samples must be >= 2")
    forget = resolve_forget_set(train_set, forget_classes, forget_indices)
    comm = comm or current_comm()
    if device is not None:
        model.to(device)
    device = model_device(model)
    torch.manual_seed(seed)

    forget_set, retain_set = forget.split(train_set)
    budget = stratified_fraction(retain_set, retain_fraction, seed=seed)
    f_idx, r_idx = _scoring_indices(forget_set, budget, score_samples, seed)
    xf, yf = take_batch(forget_set, f_idx)
    xr, yr = take_batch(budget, r_idx)
    forget_term = forget_term if forget_term is not None else default_forget_term(forget.by_classes)
    forget_term.validate()
    t_targets = time.perf_counter()
    targets, forget_read, excess = None, list(f_idx), None
    if forget_term.weight > 0 and forget_term.steps > 0 and len(budget) > 1:
        x_t, t, pool, excess = _forget_targets(model, forget_set, budget, forget_term, f_idx, seed)
        forget_read = sorted(set(f_idx) | set(pool))
        if excess >= forget_term.min_excess:
            targets = (x_t, t)
    seconds_targets = time.perf_counter() - t_targets
    is_forget = torch.cat([torch.ones(len(f_idx), dtype=torch.bool), torch.zeros(len(r_idx), dtype=torch.bool)])
    x, y, is_forget = comm.shard((cat([xf, xr]), torch.cat([yf, yr]), is_forget))

    with comm.guard("scoring"):
        if forget.by_classes:
            pruned = score_and_prune(model, (x, y), forget.classes, selection=selection, mode=mode, comm=comm)
        else:
            pruned = score_and_prune(model, (x, y), forget_mask=is_forget, selection=selection, mode=mode, comm=comm)
    with comm.guard("fine-tune"):
        ft = masked_finetune(model, budget, pruned.plan, finetune, target_accuracy=pruned.pre_prune_retain_accuracy,
                             device=device, seed=seed, progress=progress and comm.is_main, comm=comm, steps=steps,
                             forget=targets, forget_term=forget_term)
        comm.sync_buffers_(model)
    synchronize(device)
    total = time.perf_counter() - total_start
    timings = {"scoring": pruned.seconds_scoring, "targets": seconds_targets, "pruning": pruned.seconds_pruning,
               "finetune": ft.seconds, "total": total}
    info = {"scores": pruned.scores, "counts": pruned.counts.tolist(),
            "pre_prune_retain_accuracy": pruned.pre_prune_retain_accuracy, "retain_fraction": retain_fraction,
            "mode": mode, "forget_read": forget_read, "scoring_forget_samples": len(f_idx),
            "forget_excess_disagreement": excess, "forget_term_ran": targets is not None,
            **forget.describe()}
    result = UnlearnResult(model=model, masks=pruned.masks, timings=timings, retain_samples_used=len(budget),
                           forget_samples_used=len(forget_read), method="DFMU", pruned_units=pruned.pruned_units,
                           total_units=pruned.total_units, finetune=ft, info=info)
    if record is not None and comm.is_main:
        config = {"forget_classes": forget.classes, **forget.describe(), "retain_fraction": retain_fraction,
                  "mode": mode, "score_samples": score_samples,
                  "selection": (selection or default_selection(forget.by_classes)).to_dict(),
                  "finetune": (finetune or FinetuneConfig()).to_dict(), "world_size": comm.world_size,
                  "steps": (steps or StepOptions()).to_dict(), "forget_term": forget_term.to_dict()}
        deletion_record.write_record(record, deletion_record.unlearn_record(
            result, input_sha256=input_sha256, train_set=train_set, forget_set=forget_set, retain_set=retain_set,
            retain_used=budget, config=config, seed=seed, forget_read=Subset(forget_set, forget_read)))
    return result
