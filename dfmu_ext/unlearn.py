"""The DFMU pipeline: one scoring pass -> knowledge-preserving selection -> fused masking ->
short masked fine-tune on a stratified slice of the retain data.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ._common import (check_classes_in_head, check_train_set, model_device, normalise_classes,
                      synchronize)
from .blocks import classifier_of
from . import record as _record
from .distributed import Comm, current_comm
from .finetune import FinetuneConfig, masked_finetune
from .importance import score_blocks
from .pruning import build_mask_plan, head_mask_for, suppress_head
from .result import PruneResult, UnlearnResult
from .selection import SelectionConfig, select_units
from .splits import split_forget_retain, stratified_fraction, take_batch


def score_and_prune(model: nn.Module, batch, forget_classes, *, selection: SelectionConfig | None = None,
                    mode: str | None = None, head: bool = True, reduce: str = "abs",
                    comm: Comm | None = None) -> PruneResult:
    """Score every block with ONE forward and ONE backward of ``batch = (x, y)``, select units and
    apply the masks in place with the fused op.

    ``mode`` ("prune" or "rescale") overrides ``selection.mode``. With ``head=True`` the
    classifier's forget-class rows are masked and their logits pinned low. Nothing in the model
    changes if an error is raised.

    Under ``torch.distributed`` (``comm`` defaults to :func:`distributed.current_comm`) every rank
    calls this with *its shard* of the scoring batch (``comm.shard(batch)``): the scores and counts
    are summed over ranks, rank 0's masks are broadcast so all ranks apply identical masks, and the
    pre-pruning retain accuracy is that of the whole batch. Every rank must call it (collectives).
    """
    x, y = batch
    comm = comm or current_comm()
    classes = normalise_classes(forget_classes)
    selection = SelectionConfig(**{**(selection or SelectionConfig()).to_dict(), **({"mode": mode} if mode else {})})
    selection.validate()
    device = model_device(model)
    x, y = x.to(device), torch.as_tensor(y).to(device).long()
    head_name, head_layer = classifier_of(model)
    check_classes_in_head(classes, head_layer.out_features)

    t0 = time.perf_counter()
    scored = score_blocks(model, x, y, classes, reduce=reduce, comm=comm)
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

    retain = ~torch.isin(y, torch.as_tensor(classes, device=y.device))
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


def unlearn(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
            mode: str = "prune", selection: SelectionConfig | None = None, finetune: FinetuneConfig | None = None,
            score_samples: int = 512, device=None, seed: int = 0, progress: bool = True,
            comm: Comm | None = None, record=None) -> UnlearnResult:
    """Make ``model`` forget ``forget_classes`` using a ``retain_fraction`` of the retain data.

    Steps (timed separately): one scoring pass on a batch of ``score_samples`` (half forget, half
    retain from the budgeted slice); knowledge-preserving pruning (``mode`` "prune" or "rescale");
    a masked fine-tune on the class-stratified ``retain_fraction`` of the retain data, stopping
    early once the retain accuracy measured before pruning is recovered. The model is modified in
    place and returned in the result; a seed makes the run reproducible.

    Under ``torch.distributed`` (e.g. torchrun; world size W > 1) every rank calls ``unlearn`` with
    the same arguments and model: rank r scores samples r, r+W, ... of the scoring batch (scores
    summed over ranks, identical masks everywhere), then fine-tunes under DistributedDataParallel on
    its DistributedSampler share of the budget with a per-rank batch of ceil(batch_size / W), the
    early stop decided on counts summed over ranks; BatchNorm running statistics are averaged at the
    end, so every rank returns the same model. ``comm`` (default :func:`distributed.current_comm`)
    carries all of that; see ``dfmu_ext.distributed``.

    ``record`` (a path) writes a deletion record there (rank 0 only): see ``dfmu_ext.record``.
    """
    input_sha256 = _record.state_dict_sha256(model) if record is not None else None
    total_start = time.perf_counter()
    classes = normalise_classes(forget_classes)
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    if score_samples < 2:
        raise ValueError("score_samples must be >= 2")
    check_train_set(train_set, classes)
    comm = comm or current_comm()
    if device is not None:
        model.to(device)
    device = model_device(model)
    torch.manual_seed(seed)

    forget_set, retain_set = split_forget_retain(train_set, classes)
    budget = stratified_fraction(retain_set, retain_fraction, seed=seed)
    f_idx, r_idx = _scoring_indices(forget_set, budget, score_samples, seed)
    xf, yf = take_batch(forget_set, f_idx)
    xr, yr = take_batch(budget, r_idx)
    batch = (torch.cat([xf, xr]), torch.cat([yf, yr]))

    with comm.guard("scoring"):
        pruned = score_and_prune(model, comm.shard(batch), classes, selection=selection, mode=mode, comm=comm)
    with comm.guard("fine-tune"):
        ft = masked_finetune(model, budget, pruned.plan, finetune, target_accuracy=pruned.pre_prune_retain_accuracy,
                             device=device, seed=seed, progress=progress and comm.is_main, comm=comm)
        comm.sync_buffers_(model)
    synchronize(device)
    total = time.perf_counter() - total_start
    timings = {"scoring": pruned.seconds_scoring, "pruning": pruned.seconds_pruning,
               "finetune": ft.seconds, "total": total}
    info = {"scores": pruned.scores, "counts": pruned.counts.tolist(),
            "pre_prune_retain_accuracy": pruned.pre_prune_retain_accuracy, "retain_fraction": retain_fraction,
            "mode": mode}
    result = UnlearnResult(model=model, masks=pruned.masks, timings=timings, retain_samples_used=len(budget),
                           forget_samples_used=len(f_idx), method="DFMU", pruned_units=pruned.pruned_units,
                           total_units=pruned.total_units, finetune=ft, info=info)
    if record is not None and comm.is_main:
        config = {"forget_classes": classes, "retain_fraction": retain_fraction, "mode": mode, "score_samples":
                  score_samples, "selection": (selection or SelectionConfig()).to_dict(),
                  "finetune": (finetune or FinetuneConfig()).to_dict(), "world_size": comm.world_size}
        _record.write_record(record, _record.unlearn_record(result, input_sha256=input_sha256, train_set=train_set,
                             forget_set=forget_set, retain_set=retain_set, retain_used=budget, config=config, seed=seed))
    return result
