r"""The DFMU orchestration, once for every task (:mod:`dfmu_ext.tasks`): one scoring pass ->
knowledge-preserving selection -> fused masking -> (the task's preparation) -> a short masked
fine-tune on a slice of the retain data, watched by the retention guard (:mod:`dfmu_ext.guard`).
"""
from __future__ import annotations

import time
import warnings

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import record as deletion_record
from ._common import model_device, synchronize
from .distributed import Comm, current_comm
from .finetune import run_finetune
from .guard import (ForgettingWarning, GuardConfig, RetentionGuard, auc_standard_error, caller_stacklevel,
                    membership_auc)
from .model_io import copy_model, model_entry
from .result import FinetuneHistory, UnlearnResult
from .tasks import task_for
from .tasks.base import scoring_positions

#: What a user leaves at its default: these keywords are checked against the task only when given.
_TASK_KEYWORDS = ("comm", "steps", "forget_term", "selection", "finetune", "edit")


def _guard(task, model, split, config: GuardConfig | None, device) -> RetentionGuard | None:
    if config is None or len(split.validation) == 0:
        return None
    tolerance = task.default_tolerance if config.tolerance is None else config.tolerance
    watch = split.extra.get("watch")  # e.g. a sub-class's siblings: the labels its forget samples carry
    guard = RetentionGuard(task.retention_measure(split.validation, device, watch=watch), tolerance, config)
    guard.start(model)
    return guard


@model_entry
def unlearn(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
            forget_indices=None, mode: str = "prune", selection=None, finetune=None,
            score_samples: int | None = None, device=None, seed: int = 0, progress: bool = False,
            comm: Comm | None = None, steps=None, record=None, forget_term=None, task: str | None = None,
            edit=None, guard: GuardConfig | bool | None = None, forget_attribute=None, nonmembers=None
            ) -> UnlearnResult:
    r"""Make ``model`` forget ``forget_classes`` (whole classes) or ``forget_indices`` (samples of
    ``train_set``; exactly one of the two) using a ``retain_fraction`` of the retain data.

    The stages, the same for every task (:mod:`dfmu_ext.tasks`; ``task`` names one, else it is
    read from the samples: per-token ``labels`` make a causal LM, anything else a classifier):

    1. the split: forget set, retain set, and the budget (a ``retain_fraction`` of the retain set:
       stratified by label for classifiers; half nearest the forget set for causal LMs), a share of
       which the retention guard sets aside (``guard``);
    2. one scoring pass on ``score_samples`` samples (half forget, half budget; default 512 for
       classifiers, 256 for causal LMs) through the fused op, then the selection (``selection``,
       ``mode`` "prune" or "rescale") and one fused masking;
    3. the forget samples' targets (``forget_term``): what a model that never saw them would output,
       from their nearest budget samples in early features (:mod:`dfmu_ext.targets`,
       :mod:`dfmu_ext.lm.targets`);
    4. the task's preparation (causal LMs: the retain-projected edit, ``edit``);
    5. the masked fine-tune (``finetune``: :class:`dfmu_ext.FinetuneConfig` or
       :class:`dfmu_ext.tasks.LMFinetuneConfig`) on the budget, with the forget term and the
       distillation to the original's outputs, :math:`w_d\,\mathrm{KL}(p_{orig} \| p_\theta)`
       (``finetune.distill``), and the masks re-applied after every step;
    6. the retention guard (:class:`dfmu_ext.guard.GuardConfig`, on by default; ``guard=False``
       turns it off): the task's retention score on the set-aside part is kept within the tolerance
       of the original's (1 point for classifiers, 6 for causal LMs' stricter measure) — the edit stops,
       retain-only recovery steps run, and a :class:`dfmu_ext.guard.RetentionWarning` says when it cannot; a
       :class:`dfmu_ext.guard.ForgettingWarning` says when it stopped the forget side short of its stop.

    Classifiers: ``forget_classes`` masks the classifier's rows too; the forget term is off for whole
    classes and decides itself for samples (:func:`dfmu_ext.tasks.classifier_defaults.default_forget_term`);
    under ``torch.distributed`` every rank calls ``unlearn`` with the same arguments (``comm``:
    scores summed, identical masks, DDP fine-tune); ``steps`` sets precision and layout
    (:class:`dfmu_ext.steps.StepOptions`). Causal LMs: ``forget_indices`` name the sequences to
    forget; units are the MLP neurons. ``nonmembers`` (optional; data of the same kind the model
    never saw: a validation split, text it was not trained on) sets where forgetting stops: forget-term
    steps continue while the forget samples' losses are still told from the non-members' (membership
    AUC above 0.55), as long as the guard holds (``info["forget_side"]``; for causal LMs beside their
    estimate of Retrain, which still drives the side); without it the forget term's estimate of Retrain
    decides. ``nonmembers="shifted"`` (an image classifier forgetting samples) makes them from the budget:
    its images moved a pixel (:class:`dfmu_ext.splits.ShiftedCopies`). ``forget_attribute`` (one value per
    training sample) names an attribute to forget, for a task that forgets attributes
    (:meth:`dfmu_ext.tasks.base.Task.claims`).
    A keyword a task has no use for is a one-line ValueError.

    Any model and data (:mod:`dfmu_ext.model_io`): tensors, tuples, dicts or ``ModelOutput``
    outputs (or ``logits_fn=``), ``(x, y)`` or dict samples (``label_key=``), ``classifier=``.
    The model is modified in place and returned in the result; nothing changes when an argument is
    rejected; a seed makes the run reproducible. ``record`` (a path) writes a deletion record
    (rank 0 only) holding the guard's numbers: see :mod:`dfmu_ext.record`.
    """
    what = {"forget_classes": forget_classes, "forget_indices": forget_indices, "forget_attribute": forget_attribute}
    the_task = task_for(train_set, task, what)
    unwanted = [k for k, v in what.items() if v is not None and k not in the_task.forgets]
    if unwanted:
        raise ValueError(f"the {the_task.name} task does not take {', '.join(unwanted)}")
    given = {"comm": comm, "steps": steps, "forget_term": forget_term, "selection": selection,
             "finetune": finetune, "edit": edit}
    unused = [k for k in _TASK_KEYWORDS if given[k] is not None and k not in the_task.keywords]
    if unused:
        raise ValueError(f"for the {the_task.name} task, {', '.join(unused)} is not supported")
    guard_config = GuardConfig() if guard is None or guard is True else (guard or None)
    if guard_config is not None:
        guard_config.validate()
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    if isinstance(nonmembers, str):
        if nonmembers != "shifted":
            raise ValueError(f"nonmembers must be a dataset or 'shifted', got {nonmembers!r}")
    elif nonmembers is not None and len(nonmembers) == 0:
        raise ValueError("nonmembers is empty: give data the model never saw, or leave it out")
    score_samples = score_samples if score_samples is not None else the_task.default_score_samples
    if score_samples < 2:
        raise ValueError("score_samples must be >= 2")
    input_sha256 = deletion_record.state_dict_sha256(model) if record is not None else None
    total_start = time.perf_counter()
    comm = comm or current_comm()
    configs = the_task.configs(None, given)
    holdout = {"validation_share": guard_config.validation if guard_config else 0.0,
               "min_validation": guard_config.min_validation if guard_config else 1}
    split = the_task.split(train_set, what, retain_fraction, seed, configs, holdout)
    if nonmembers == "shifted":   # stand-ins made from the budget: no data beyond it
        nonmembers = the_task.shifted_nonmembers(split, seed)
    split.extra["nonmembers"] = nonmembers   # a task may set its defaults and forget targets by them
    configs = the_task.configs(split, given)
    if device is not None:
        model.to(device)
    device = model_device(model)
    torch.manual_seed(seed)

    f_idx, r_idx = scoring_positions(len(split.forget_set), len(split.budget), score_samples, seed)
    batch, is_forget = the_task.scoring_batch(split, f_idx, r_idx)
    split.extra["scoring_batch"] = batch
    teacher = copy_model(model).eval() if (getattr(configs["finetune"], "distill", 0) or 0) > 0 else None
    t_guard = time.perf_counter()
    watch = _guard(the_task, model, split, guard_config, device)
    seconds_guard = time.perf_counter() - t_guard
    t_targets = time.perf_counter()
    targets = the_task.forget_targets(model, split, f_idx, configs, seed, device)
    seconds_targets = time.perf_counter() - t_targets
    x, y, is_forget = comm.shard((batch[0], batch[1], is_forget))
    batch = (x, y)

    pruned, halvings = _prune_within(the_task, model, batch, is_forget, split, configs, mode, comm, watch)
    t_prepare = time.perf_counter()
    prepared = the_task.prepare(model, split, targets, pruned, configs, device, seed, watch)
    if watch is not None and prepared:
        watch.check(model, "prepared")
    seconds_prepare = time.perf_counter() - t_prepare
    with comm.guard("fine-tune"):
        objective = the_task.objective(model, split, targets, pruned, configs, device, seed, comm, steps, teacher)
        ft = FinetuneHistory() if objective is None else run_finetune(
            objective, pruned.plan, configs["finetune"], target_accuracy=the_task.early_stop_target(pruned),
            progress=progress and comm.is_main)
        comm.sync_buffers_(model)
    t_guard = time.perf_counter()
    forget_side = _forget_side(the_task, model, split, targets, objective, pruned.plan, configs["finetune"], ft,
                               nonmembers, watch, device, progress and comm.is_main)
    warned = False
    if watch is not None:
        warned = _keep(watch, model, objective, pruned.plan, configs["finetune"], ft, progress and comm.is_main,
                       forget="always" if the_task.recovery_forget_term else False)
        comm.sync_buffers_(model)
    seconds_guard += time.perf_counter() - t_guard
    last = forget_side.get("strict") or forget_side   # (the second stage's, when it ran)
    if last.get("ended") == "guard":
        _warn_forgetting(last, watch)
    elif last.get("auc") is not None and comm.is_main:
        _warn_membership(last)
    if targets.info.get("_note") and comm.is_main:   # the task's estimate of Retrain saw nothing to move
        warnings.warn(f"DFMU: {targets.info['_note']}", ForgettingWarning, stacklevel=caller_stacklevel())
    synchronize(device)
    total = time.perf_counter() - total_start
    timings = {"scoring": pruned.seconds_scoring, "targets": seconds_targets, "pruning": pruned.seconds_pruning,
               **({the_task.prepare_stage: seconds_prepare} if the_task.prepare_stage else {}),
               "finetune": ft.seconds, "guard": seconds_guard, "total": total}
    info = {"task": the_task.name, "scores": pruned.scores, "counts": pruned.counts.tolist(),
            "pre_prune_retain_accuracy": pruned.pre_prune_retain_accuracy, "retain_fraction": retain_fraction,
            "mode": mode, "forget_read": targets.read, "scoring_forget_samples": len(f_idx),
            "forget_term_ran": targets.payload is not None, **targets.public(), **prepared, **split.describe,
            "guard": {**watch.report(warned), "prune_halvings": halvings} if watch is not None else None,
            "forget_side": forget_side}
    result = UnlearnResult(model=model, masks=pruned.masks, timings=timings,
                           retain_samples_used=len(split.budget) + len(split.validation),
                           forget_samples_used=len(targets.read), method="DFMU", pruned_units=pruned.pruned_units,
                           total_units=pruned.total_units, finetune=ft, info=info)
    if record is not None and comm.is_main:
        config = {**the_task.describe_record(split), **split.describe, "retain_fraction": retain_fraction,
                  "mode": mode, "score_samples": score_samples, "world_size": comm.world_size,
                  **{k: v.to_dict() for k, v in configs.items() if hasattr(v, "to_dict")},
                  "guard": guard_config.to_dict() if guard_config else None}
        if steps is not None or the_task.name == "classification":
            from .steps import StepOptions
            config["steps"] = (steps or StepOptions()).to_dict()
        deletion_record.write_record(record, deletion_record.unlearn_record(
            result, input_sha256=input_sha256, train_set=train_set, forget_set=split.forget_set,
            retain_set=split.retain_set, retain_used=split.extra["full_budget"], config=config, seed=seed,
            forget_read=Subset(split.forget_set, targets.read)))
    return result


#: the most forget-side steps after the fine-tune, per stop ("strict" 240, was 120: with the LM distillation at 20
#: it ended at its limit on 5 of 8 held-out splits; benchmarks/RESULTS.md, "The strict stage's limit")
FORGET_SIDE_STEPS = {"nonmembers": 60, "estimate": 300, "strict": 240}
#: the forget side's plateau (:func:`_forget_side`): it ends after this many chunks in a row without
#: moving its measure a ``FORGET_SIDE_PROGRESS`` share of its starting distance to the stop closer
FORGET_SIDE_PATIENCE = 8
FORGET_SIDE_PROGRESS = 0.1
#: how many times a chunk the guard refuses is retried at half the step size before the side ends
FORGET_SIDE_EASINGS = 2
#: the most chunks of retain-only steps a forget-side chunk beyond the tolerance gets before it is refused
FORGET_SIDE_RECOVERY = 3
#: the second stage starts where the AUC exceeds its stop by this many standard errors (one-sided 95%)
STRICT_STAGE_Z = 1.645


def _prune_within(task, model, batch, is_forget, split, configs, mode, comm, watch):
    r"""Score, select and mask; with the guard's ``prune_allowance`` set, a pruning that costs more than
    it (the drop after pruning above ``prune_allowance`` x :math:`\tau`) is undone and redone with the
    selection's shares halved, at most ``task.prune_halvings`` times. Why: the fine-tune gives back only
    a part of what a pruning took (measured 1.4-4x less drop after it), so a pruning past about twice
    the tolerance ended beyond it: 5 of 6 whole-class runs that did warned (benchmarks/RESULTS.md).
    Returns the result and how many halvings ran."""
    tries = task.prune_halvings if watch is not None and watch.config.prune_allowance is not None else 0
    state = {k: v.detach().clone() for k, v in model.state_dict().items()} if tries else None
    seconds = [0.0, 0.0]
    for halving in range(tries + 1):
        with comm.guard("scoring"):
            pruned = task.prune(model, batch, is_forget, split, configs, mode, comm)
        seconds = [seconds[0] + pruned.seconds_scoring, seconds[1] + pruned.seconds_pruning]
        if watch is None:
            return pruned, 0
        now = watch.check(model, "pruned")
        if halving == tries or now["drop"] <= watch.config.prune_allowance * watch.tolerance:
            break
        model.load_state_dict(state)
        configs["selection"] = configs["selection"].halved()
    pruned.seconds_scoring, pruned.seconds_pruning = seconds
    return pruned, halving


def _forget_side(task, model, split, targets, objective, plan, config, history, nonmembers, watch, device,
                 progress, margin: float = 0.05, chunk: int = 10, strict: bool = False) -> dict:
    r"""The forget side's stop: forget-term steps run ``chunk`` at a time (at most ``limit``), each chunk
    kept only while the retention guard holds, until the forget samples look unseen. With
    ``nonmembers`` (data the model never saw, of the task's kind): until their losses are no longer
    told from the non-members' (:func:`membership_auc` at most 0.5 + ``margin``; ``"nonmembers"``).
    Without: until the task's :meth:`~dfmu_ext.tasks.base.Task.forget_gap` to its targets (its estimate
    of Retrain's outputs) is at most ``task.forget_gap_stop`` (``"estimate"``; nothing runs for a
    task without one).

    It also ends on a plateau (``"plateau"``): when :data:`FORGET_SIDE_PATIENCE` chunks in a row bring
    the measure :math:`m` no lower than :math:`m^\ast - \rho\,(m_0 - s)` (:math:`m^\ast` where it last
    moved so, :math:`m_0` its value before the side, :math:`s` the stop, :math:`\rho` =
    :data:`FORGET_SIDE_PROGRESS`). And it keeps the state of the lowest measure it saw, not the last:
    after ~130 of 300 steps the people corpus's gap oscillates between 0.01 and 0.03 from chunk to chunk
    (benchmarks/RESULTS.md). The measure before and at the kept state is reported.

    A chunk beyond the tolerance gets up to :data:`FORGET_SIDE_RECOVERY` chunks of retain-only steps
    (ending at the first back within it). One still beyond is refused: undone and run again at half the
    step size (for the rest of the side), at most :data:`FORGET_SIDE_EASINGS` times, before the side
    ends (``"guard"``). Why: one refusal ended all forgetting; with one retain-only chunk, 3 of 4 dev
    people-corpus originals (another CPU) answered 54-71% of the forgotten facts, with three 10-12%.

    With ``nonmembers`` and a task that has its own estimate (causal LMs), the estimate still drives
    the side (its stop, plateau and lowest state) and the membership AUC is read beside it after every
    chunk: the side also ends (keeping that state) once the AUC is at most 0.5 + ``margin``, and
    reports it (``"auc_before"``, ``"auc"``, ``"auc_threshold"``). Why not the AUC alone: on the people
    corpus it moved 0.94 -> 0.83 and stopped on its plateau after 80-180 steps, where the estimate's ran
    220 and forgot more (10% / 101: facts still answered 0.36 against 0.18; benchmarks/RESULTS.md).
    Where the estimate's side ends (not by the guard) with the AUC still above its stop, a second stage
    (``strict``, reported under ``"strict"``; ``"auc"`` is then its final AUC) runs on the task's
    :meth:`~dfmu_ext.tasks.base.Task.stricter_targets` with the AUC as its measure, at most
    ``FORGET_SIDE_STEPS["strict"]`` steps, where the AUC is above the stop by :data:`STRICT_STAGE_Z`
    standard errors (``"auc_se"``; without it, it overshot on the keep suite's few dozen sequences a
    side). Held out it took the AUC from 0.62-0.70 to 0.49-0.55 (Retrain 0.48-0.56; RESULTS)."""
    lever = objective is not None and targets.payload is not None
    auc = beside = None
    auc_stop = 0.5 + margin
    if nonmembers is not None:
        forget_read = Subset(split.forget_set, targets.read)
        # (both under the model as it is now: the side moves the non-members' losses too)
        auc = lambda: membership_auc(task.losses(model, forget_read, device),  # noqa: E731
                                     task.losses(model, nonmembers, device))
    if auc is not None and (task.forget_gap_stop is None or strict):
        measure, stop, name, key = auc, auc_stop, "strict" if strict else "nonmembers", "auc"
    else:  # (a forward pass of the forget samples per chunk: cheaper than the AUC's, so more chunks may run)
        measure = lambda: task.forget_gap(model, split, targets, device)  # noqa: E731
        stop, name, key, beside = task.forget_gap_stop, "estimate", "gap", auc
    value = before = measure() if lever else None
    if value is None or stop is None:
        return {"stop": name}
    seen = seen_before = beside() if beside is not None else None     # the AUC read beside the estimate
    seen_best, unseen = seen, lambda: seen is not None and seen <= auc_stop  # noqa: E731
    steps, limit, ended, cost = 0, FORGET_SIDE_STEPS[name], "reached", None
    best, best_steps, best_state = value, 0, None      # best_state None: the model holds the best now
    mark, idle, progress_step = value, 0, FORGET_SIDE_PROGRESS * (before - stop)
    optimizer, eased, undone, retry = objective.optimizer, 0, 0, False
    lr = optimizer.lr
    while value > stop and not unseen() and steps < limit and idle < FORGET_SIDE_PATIENCE:
        if not retry:   # (a retry starts from the undone chunk's ``state``, which the model holds again)
            # a copy of the weights only where one is read: the guard's undo, or the best state held now
            keep = watch is not None or best_state is None
            state = {k: v.detach().clone() for k, v in model.state_dict().items()} if keep else None
            best_state = state if best_state is None else best_state
        retry = False
        run_finetune(objective, plan, config, max_steps=chunk, forget="always", history=history, progress=progress)
        now, recovered = watch.check(model) if watch is not None else None, 0
        while now is not None and not now["within"] and recovered < FORGET_SIDE_RECOVERY:
            # a dip the retain side may take back: chunks of retain-only steps before giving up
            run_finetune(objective, plan, config, max_steps=chunk, forget=False, history=history, progress=progress)
            now, recovered = watch.check(model), recovered + 1
        if now is not None and not now["within"]:
            model.load_state_dict(state)   # still beyond the tolerance: keep the state before the chunk
            cost, undone = now["drop"], undone + (1 + recovered) * chunk
            if eased == FORGET_SIDE_EASINGS:
                ended = "guard"
                break
            eased, retry = eased + 1, True
            optimizer.lr *= 0.5            # the same chunk again, in smaller steps
            continue
        steps += chunk
        value = measure()
        seen = beside() if beside is not None else None
        if value < best:
            best, best_steps, best_state, seen_best = value, steps, None, seen
        mark, idle = (value, 0) if value < mark - progress_step else (mark, idle + 1)
    optimizer.lr = lr
    earlier = best < value and not unseen()    # (the chunk the AUC reached its stop at is kept)
    if best_state is not None and earlier:
        model.load_state_dict(best_state)      # an earlier chunk's state measured lower than the last
    if ended == "reached" and value > stop and not unseen():
        ended = "plateau" if idle >= FORGET_SIDE_PATIENCE else "limit"
    out = {"stop": name, f"{key}_before": before, key: best if earlier else value, "extra_forget_steps": steps,
           "kept_steps": best_steps if earlier else steps, "lever": lever, "ended": ended, "threshold": stop,
           "easings": eased, "undone_steps": undone}
    if beside is not None:
        out.update(auc_before=seen_before, auc=seen_best if earlier else seen, auc_threshold=auc_stop)
        out["auc_se"] = auc_standard_error(out["auc"], len(forget_read), len(nonmembers))
        told = out["auc"] - STRICT_STAGE_Z * out["auc_se"] > auc_stop   # (a few dozen sequences: noise)
        if ended != "guard" and told and task.stricter_targets(targets, objective):
            out["strict"] = _forget_side(task, model, split, targets, objective, plan, config, history, nonmembers,
                                         watch, device, progress, margin, chunk, strict=True)
            out["auc"] = out["strict"]["auc"]
    return {**out, "refused_drop": cost} if cost is not None and ended == "guard" else out


def _warn_forgetting(side: dict, watch: RetentionGuard) -> None:
    """The trade the guard refused, in a :class:`ForgettingWarning`: where the forget side stopped
    against its stop, and what one more chunk would have cost of what must be kept."""
    key, what = ("auc", "membership AUC against the non-members") if side["stop"] in ("nonmembers", "strict") else \
        ("gap", "excess probability of their own answers over the estimate of Retrain")
    smaller = f", in steps {2 ** side['easings']}x smaller," if side.get("easings") else ""
    why = f"one more chunk{smaller} cost {100 * side['refused_drop']:.1f} points of what must be kept"
    warnings.warn(
        f"DFMU stopped forgetting short of its stop: the forget samples' {what} is {side[key]:.3g}, above its "
        f"stop {side['threshold']:.3g} ({side[key + '_before']:.3g} before the forget side's "
        f"{side['extra_forget_steps']} extra steps), because {why} (tolerance {100 * watch.tolerance:.1f}); "
        f"a larger guard tolerance (guard=GuardConfig(tolerance=...)) or retain_fraction trades more",
        ForgettingWarning, stacklevel=caller_stacklevel())


def _warn_membership(side: dict) -> None:
    """A :class:`ForgettingWarning` when the forget side ended (not by the guard: that warning says more)
    with the forget samples' losses still told from the non-members' (membership AUC above its stop)."""
    threshold = side.get("auc_threshold", side["threshold"])
    if side["auc"] <= threshold:
        return
    why = {"reached": "its estimate's stop was met", "plateau": "its measure stopped moving",
           "limit": "its step limit was reached"}.get(side["ended"], side["ended"])
    warnings.warn(
        f"DFMU: a loss attack still tells the forget samples from the non-members: membership AUC "
        f"{side['auc']:.3f} after the forget side's {side['extra_forget_steps']} extra steps ({side['auc_before']:.3g} "
        f"before; stop {threshold:.2f}, a model that never saw them ~0.5); the side ended because {why}",
        ForgettingWarning, stacklevel=caller_stacklevel())


def _keep(watch: RetentionGuard, model, objective, plan, config, history: FinetuneHistory, progress: bool,
          forget: bool | str = False) -> bool:
    """After the fine-tune and the forget side: recovery steps (retain-only unless the task keeps its
    forget term there), ``check_every`` at a time, while the guard's drop is beyond its allowance (at
    most ``recovery_steps``; none without a fine-tune); warn when it still is, or when the validation
    part is too small to tell (:meth:`RetentionGuard.unresolved`). Returns whether it warned."""
    now = watch.check(model, "fine-tuned")
    limit = watch.config.recovery_steps if watch.config.recovery_steps is not None else max(20, history.steps)
    while not now["within"] and objective is not None and history.recovery_steps < limit:
        run_finetune(objective, plan, config, max_steps=min(watch.config.check_every, limit - history.recovery_steps),
                     forget=forget, history=history, progress=progress)
        now = watch.check(model, "recovered")
    watch.stages["final"] = now
    if not now["within"]:
        watch.warn("what it must keep", f" ({history.recovery_steps} recovery steps run)")
        return True
    if watch.unresolved():
        watch.warn_unresolved()
        return True
    return False
