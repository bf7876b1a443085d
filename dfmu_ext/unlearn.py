"""The DFMU pipeline: one scoring pass -> knowledge-preserving selection -> fused masking ->
short masked fine-tune on a stratified slice of the retain data.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import distributed as dist_utils
from .datautil import dataset_labels, split_forget_retain, stratified_fraction, take_batch
from .finetune import FinetuneConfig, masked_finetune
from .importance import FORGET, RETAIN, score_blocks
from .pruning import MaskPlan, build_mask_plan, head_mask_for, suppress_head
from .blocks import classifier_of
from .result import UnlearnResult
from .selection import SelectionConfig, select_units


@dataclass
class PruneResult:
    """What ``score_and_prune`` did."""

    masks: dict[str, torch.Tensor]    # block name -> (units,) mask; the classifier's name -> class-row mask
    scores: dict[str, torch.Tensor]   # block name -> (2, units): row 0 retain, row 1 forget importance
    counts: torch.Tensor              # (2,) retain / forget samples in the scoring batch
    plan: MaskPlan                    # the tensors and masks, for re-application during fine-tuning
    pre_prune_retain_accuracy: float  # accuracy on the batch's retain samples before pruning
    seconds_scoring: float
    seconds_pruning: float

    @property
    def pruned_units(self) -> dict[str, int]:
        return {name: int((m < 1).sum()) for name, m in self.masks.items()}


def _normalise_classes(forget_classes) -> list[int]:
    if isinstance(forget_classes, int):
        forget_classes = [forget_classes]
    classes = sorted(set(int(c) for c in forget_classes))
    if not classes:
        raise ValueError("forget_classes is empty: name at least one class to forget")
    return classes


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def score_and_prune(model: nn.Module, batch, forget_classes, *, selection: SelectionConfig | None = None,
                    mode: str | None = None, head: bool = True, reduce: str = "abs") -> PruneResult:
    """Score every block with ONE forward and ONE backward of ``batch = (x, y)``, select units and
    apply the masks in place with the fused op.

    ``mode`` ("prune" or "rescale") overrides ``selection.mode``. With ``head=True`` the
    classifier's forget-class rows are masked and their logits pinned low. Nothing in the model
    changes if an error is raised.

    Under ``torch.distributed`` (world size > 1) every rank calls this with *its shard* of the
    scoring batch (see ``distributed.shard_batch``): the scores and counts are summed over ranks,
    rank 0's masks are broadcast so all ranks apply identical masks, and the pre-pruning retain
    accuracy is that of the whole batch. Every rank must call it (it runs collectives).
    """
    x, y = batch
    classes = _normalise_classes(forget_classes)
    selection = SelectionConfig(**{**(selection or SelectionConfig()).to_dict(), **({"mode": mode} if mode else {})})
    selection.validate()
    device = _model_device(model)
    x, y = x.to(device), torch.as_tensor(y).to(device).long()
    head_name, head_layer = classifier_of(model)
    if max(classes) >= head_layer.out_features or min(classes) < 0:
        raise ValueError(f"forget classes {classes} are not among the model's {head_layer.out_features} classes")
    if len(classes) >= head_layer.out_features:
        raise ValueError("every class would be forgotten: nothing would remain to classify")

    t0 = time.perf_counter()
    scored = score_blocks(model, x, y, classes, reduce=reduce)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    masks = select_units(scored.blocks, scored.scores, scored.counts, selection)
    distributed = dist_utils.is_distributed()
    if distributed:  # guarantee bit-identical masks on every rank (tiny: one float per unit)
        dist_utils.broadcast_(list(masks.values()), src=0)
    head_mask = head_mask_for(head_layer, classes) if head else None
    plan = build_mask_plan(scored.blocks, masks, head_layer, head_mask)
    plan.apply()
    if head:
        suppress_head(head_layer, classes)
        masks[head_name] = head_mask
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()

    retain = ~torch.isin(y, torch.as_tensor(classes, device=y.device))
    pred = scored.logits.argmax(1)
    if distributed:  # the whole batch's accuracy, identical on every rank (the early-stop target)
        pre_acc = dist_utils.global_fraction(int((pred[retain] == y[retain]).sum()), int(retain.sum()), device)
    else:
        pre_acc = float((pred[retain] == y[retain]).float().mean()) if bool(retain.any()) else float("nan")
    return PruneResult(masks, scored.scores, scored.counts, plan, pre_acc, t1 - t0, t2 - t1)


def _check_train_set(train_set: Dataset, classes: list[int]) -> torch.Tensor:
    if train_set is None or len(train_set) == 0:
        raise ValueError("train_set is empty")
    labels = dataset_labels(train_set)
    present = set(torch.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"forget classes {missing} do not occur in the training labels {sorted(present)}")
    if present <= set(classes):
        raise ValueError("every class in the data would be forgotten: no retain data is left")
    return labels


def _scoring_indices(forget: Subset, retain: Subset, n: int, seed: int) -> tuple[list[int], list[int]]:
    """Up to n/2 random forget samples and n/2 random retain samples (from the budgeted slice)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    half = max(1, n // 2)
    f = torch.randperm(len(forget), generator=gen)[:half].tolist()
    r = torch.randperm(len(retain), generator=gen)[:max(1, n - len(f))].tolist()
    return f, r


def unlearn(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
            mode: str = "prune", selection: SelectionConfig | None = None, finetune: FinetuneConfig | None = None,
            score_samples: int = 512, device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
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
    end, so every rank returns the same model. See ``dfmu_ext.distributed``.
    """
    total_start = time.perf_counter()
    classes = _normalise_classes(forget_classes)
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    if score_samples < 2:
        raise ValueError("score_samples must be >= 2")
    _check_train_set(train_set, classes)
    if device is not None:
        model.to(device)
    device = _model_device(model)
    torch.manual_seed(seed)

    forget_set, retain_set = split_forget_retain(train_set, classes)
    budget = stratified_fraction(retain_set, retain_fraction, seed=seed)
    f_idx, r_idx = _scoring_indices(forget_set, budget, score_samples, seed)
    xf, yf = take_batch(forget_set, f_idx)
    xr, yr = take_batch(budget, r_idx)
    batch = (torch.cat([xf, xr]), torch.cat([yf, yr]))

    if dist_utils.is_distributed():
        if len(f_idx) + len(r_idx) < dist_utils.get_world_size():
            raise ValueError(f"the scoring batch ({len(f_idx) + len(r_idx)} samples) is smaller than the "
                             f"{dist_utils.get_world_size()} ranks: raise score_samples")
        with dist_utils.guard("scoring"):
            pruned = score_and_prune(model, dist_utils.shard_batch(batch), classes, selection=selection, mode=mode)
        ft_config, ft_hooks = dist_utils.finetune_hooks(budget, finetune or FinetuneConfig(), device, seed)
        with dist_utils.guard("fine-tune"):
            ft = masked_finetune(model, budget, pruned.plan, ft_config,
                                 target_accuracy=pruned.pre_prune_retain_accuracy, device=device, seed=seed,
                                 progress=progress and dist_utils.is_main_process(), **ft_hooks)
            dist_utils.sync_buffers_(model)
    else:
        pruned = score_and_prune(model, batch, classes, selection=selection, mode=mode)
        ft = masked_finetune(model, budget, pruned.plan, finetune, target_accuracy=pruned.pre_prune_retain_accuracy,
                             device=device, seed=seed, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - total_start
    timings = {"scoring": pruned.seconds_scoring, "pruning": pruned.seconds_pruning,
               "finetune": ft["seconds"], "total": total}
    info = {"pruned_units": pruned.pruned_units, "scores": pruned.scores, "counts": pruned.counts.tolist(),
            "pre_prune_retain_accuracy": pruned.pre_prune_retain_accuracy, "finetune": ft,
            "retain_fraction": retain_fraction, "mode": mode}
    return UnlearnResult(model=model, masks=pruned.masks, timings=timings, retain_samples_used=len(budget),
                         forget_samples_used=len(f_idx), method="DFMU", info=info)
