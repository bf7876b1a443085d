"""The classification task: samples ``(x, y)`` (or dicts with a label), units are the blocks'
channels (:mod:`dfmu_ext.blocks`), the loss is cross-entropy, and forgetting is of whole classes or
of named samples (a sub-class, random samples).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .._common import (TrainBatches, check_classes_in_head, eval_mode, model_device, normalise_classes,
                       resolve_forget_set, synchronize, train_mode)
from ..blocks import classifier_of, discover_blocks
from ..distributed import Comm, current_comm
from ..finetune import FinetuneConfig, ForgetBatches, MomentumSGD, Objective, distill_loss, epochs_for, run_finetune
from ..importance import score_blocks
from ..model_io import cat, model_entry
from ..pruning import MaskPlan, build_mask_plan, head_mask_for, suppress_head
from ..result import FinetuneHistory, PruneResult
from ..selection import SelectionConfig, select_units
from ..splits import ShiftedCopies, dataset_labels, shift_pixels, stratified_fraction, take_batch
from ..steps import StepEngine, StepOptions
from ..targets import (ForgetTargetConfig, disagreement, early_features, feature_loss, feature_neighbours,
                       feature_scales, head_inputs, neighbour_targets, nonmember_targets, penultimate_features)
from .base import Split, Targets, Task, forget_pool, hold_out
from .classifier_defaults import (NONMEMBER_FORGET_TERM, NOTHING_TO_MOVE, default_distill, default_forget_term,
                                  default_selection)


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



class ClassifierObjective(Objective):
    """Cross-entropy on the budget with SGD (momentum, weight decay) on every parameter, under the
    step engine's precision and layout, DDP under a process group; the forget term (soft
    cross-entropy of forget samples to their neighbour targets, and with ``feature_weight`` the
    standardised cosine distance of their classifier inputs to those of their nearest retain samples,
    in the same forward so BatchNorm sees one batch) on the first ``forget_term.steps`` steps;
    distillation to ``teacher`` on the budget."""

    def __init__(self, model: nn.Module, dataset: Dataset, config: FinetuneConfig, *, device, seed: int,
                 comm: Comm, steps: StepOptions | None, forget=None, forget_term: ForgetTargetConfig | None = None,
                 teacher: nn.Module | None = None):
        self.model, self.dataset, self.config, self.seed, self.comm = model, dataset, config, seed, comm
        self.device, self.teacher = device, teacher
        self.engine = StepEngine(model, device, steps)
        self.engine.prepare(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = MomentumSGD(params, lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
        self.sampler = comm.sampler(dataset, seed)
        self.net = comm.wrap(model)
        self.term = forget_term or ForgetTargetConfig()
        self.forget_batches = (ForgetBatches(forget[0], forget[1], self.term.batch_size, seed, device, self.engine)
                               if forget is not None and self.term.active else None)
        self.head = classifier_of(model)[1]  # its input: the features the feature term pulls
        # the feature term's retain images (forget[2]; their positions ride in the targets' last k columns)
        self.neighbour_x = forget[2] if forget is not None and len(forget) > 2 else None
        self.pick = torch.Generator().manual_seed(seed + 7919)
        self.forget_steps = self.term.steps if self.forget_batches is not None else 0
        self.epochs = epochs_for(config, len(dataset), config.batch_size, self.forget_steps)

    def context(self):
        return train_mode(self.model)

    def batches(self, epoch: int, progress: bool):
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return TrainBatches(self.dataset, self.comm.local_batch_size(self.config.batch_size), self.seed + epoch,
                            self.device, sampler=self.sampler, desc=f"fine-tune {epoch + 1}", progress=progress,
                            engine=self.engine)

    def loss(self, batch, forget_phase: bool):
        x, y = batch
        with self.engine.autocast():
            if not forget_phase or self.forget_batches is None:
                logits = self.net(x)
                loss = F.cross_entropy(logits, y)
            else:  # one forward: BatchNorm normalises retain and forget samples together
                xf, tf = self.forget_batches.next()   # tf = [label histogram (C) | neighbour positions (k)]
                n, m, classes, term = x.shape[0], tf.shape[0], self.head.out_features, self.term
                pull = term.feature_weight > 0 and self.neighbour_x is not None
                parts = [x, xf]
                if pull:  # one of each forget sample's k neighbours, drawn uniformly: the mean's pull in expectation
                    col = torch.randint(tf.shape[1] - classes, (m,), generator=self.pick)
                    rows = tf[:, classes:].cpu()[torch.arange(m), col].long()
                    parts.append(self.engine.batch(self.neighbour_x[rows].to(self.device)))
                with head_inputs(self.head, on=pull) as feats:
                    both = self.net(cat(parts))
                logits = both[:n]
                loss = F.cross_entropy(logits, y)
                if term.weight > 0:
                    soft = -(tf[:, :classes] * F.log_softmax(both[n:n + m].float(), dim=1)).sum(1).mean()
                    loss = loss + term.weight * soft
                if pull:
                    h = feats[-1]
                    loss = loss + term.feature_weight * feature_loss(h[n:n + m], h[n + m:], *feature_scales(h[:n]))
            if self.teacher is not None and (self.config.distill or 0) > 0:
                with torch.no_grad():
                    reference = self.teacher(x)
                loss = loss + self.config.distill * distill_loss(logits, reference)
        return loss, int((logits.detach().argmax(1) == y).sum()), int(x.shape[0])

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward_step(loss, self.optimizer)


def masked_finetune(model: nn.Module, dataset: Dataset, plan: MaskPlan, config: FinetuneConfig | None = None, *,
                    target_accuracy: float | None = None, device=None, seed: int = 0,
                    progress: bool = False, comm: Comm | None = None,
                    steps: StepOptions | None = None, forget: tuple[torch.Tensor, torch.Tensor] | None = None,
                    forget_term: ForgetTargetConfig | None = None, teacher: nn.Module | None = None
                    ) -> FinetuneHistory:
    """The classifier's masked fine-tune: :class:`ClassifierObjective` under
    :func:`dfmu_ext.finetune.run_finetune` (the early stop on ``target_accuracy``, the masks
    re-applied after every step). ``forget = (x_f, t)`` adds the forget term (``forget_term``) to the
    first ``forget_term.steps`` steps (the forget phase); the steps after it are retain-only (the
    recovery phase), and the run may take ``forget_term.steps`` more steps than ``min_steps`` asks, so
    that the early stop can wait for the retain accuracy to come back (measured: the forget term on
    every step cost the siblings of a forgotten sub-class 1-2.5 points more)."""
    config = config or FinetuneConfig()
    config.validate()
    device = torch.device(device) if device is not None else model_device(model)
    if config.epochs == 0 or len(dataset) == 0:
        return FinetuneHistory()
    objective = ClassifierObjective(model, dataset, config, device=device, seed=seed, comm=comm or Comm(),
                                    steps=steps, forget=forget, forget_term=forget_term, teacher=teacher)
    return run_finetune(objective, plan, config, target_accuracy=target_accuracy, progress=progress)


class ClassificationTask(Task):
    """Forget whole classes (``forget_classes``) or samples (``forget_indices``) of a classifier."""

    name = "classification"
    keywords = ("comm", "steps", "forget_term", "selection", "finetune")
    prune_halvings = 3    # 0.2 of the last block's units -> 0.1 -> 0.05 -> 0.025 (unlearn._prune_within)

    def configs(self, split: Split | None, given: dict) -> dict:
        by_classes = split.by_classes if split is not None else True
        # samples forgotten with non-members given: targets that are Retrain-like by construction, fitted
        # over the whole fine-tune (the early stop ended it after ~10 steps, before they were)
        unseen = not by_classes and split is not None and split.extra.get("nonmembers") is not None
        finetune = given.get("finetune") or FinetuneConfig(early_stop=not unseen)
        if not isinstance(finetune, FinetuneConfig):
            raise ValueError(f"for a classifier, finetune takes a FinetuneConfig, got {type(finetune).__name__}")
        finetune.validate()
        if finetune.distill is None:
            finetune = FinetuneConfig(**{**finetune.to_dict(), "distill": default_distill(by_classes)})
        term = given.get("forget_term")
        if term is not None and not isinstance(term, ForgetTargetConfig):
            raise ValueError(f"for a classifier, forget_term takes a ForgetTargetConfig, got {type(term).__name__}")
        if term is None:
            term = ForgetTargetConfig(**NONMEMBER_FORGET_TERM.to_dict()) if unseen else default_forget_term(by_classes)
        term.validate()
        return {"finetune": finetune, "forget_term": term,
                "selection": given.get("selection") or default_selection(by_classes)}

    def split(self, train_set, what, retain_fraction, seed, configs, extra) -> Split:
        forget = resolve_forget_set(train_set, what["forget_classes"], what["forget_indices"])
        forget_set, retain_set = forget.split(train_set)
        budget = stratified_fraction(retain_set, retain_fraction, seed=seed)
        train, validation = hold_out(budget, extra["validation_share"], seed, extra["min_validation"])
        # the guard watches the labels the forgotten samples carry (a sub-class's siblings)
        watch = None if forget.by_classes else sorted(set(dataset_labels(forget_set).tolist()))
        return Split(forget_set, retain_set, train, validation, forget.by_classes, forget.classes,
                     forget.describe(), {"full_budget": budget, "watch": watch})

    def scoring_batch(self, split: Split, forget_pos, budget_pos):
        xf, yf = take_batch(split.forget_set, forget_pos)
        xr, yr = take_batch(split.budget, budget_pos)
        is_forget = torch.cat([torch.ones(len(forget_pos), dtype=torch.bool),
                               torch.zeros(len(budget_pos), dtype=torch.bool)])
        return (cat([xf, xr]), torch.cat([yf, yr])), is_forget

    def forget_targets(self, model, split, scored, configs, seed, device) -> Targets:
        r"""Before pruning: each forget sample read gets the label histogram of its ``k`` nearest
        retain samples of the budget in the first block's features (:mod:`dfmu_ext.targets`); the
        term runs only when the forget samples' neighbours disagree with their labels more than the
        retain samples' do (``min_excess``)."""
        config: ForgetTargetConfig = configs["forget_term"]
        if not (config.active and len(split.budget) > 1):
            return Targets(None, list(scored), {"forget_excess_disagreement": None, "forget_targets": "off"})
        nonmembers = split.extra.get("nonmembers")
        if nonmembers is not None and not split.by_classes:
            return self._nonmember_targets(model, split, scored, config, seed, nonmembers)
        n = len(split.forget_set)
        pool, _ = forget_pool(n, scored, config.pool_size(n), seed)
        if len(pool) == n:
            pool = list(range(n))  # the whole forget set is read, in index order
        x_f, y_f = take_batch(split.forget_set, pool)
        gen = torch.Generator().manual_seed(seed + 32452843)
        refs = torch.randperm(len(split.budget), generator=gen)[:config.references].tolist()
        x_r, y_r = take_batch(split.budget, refs)
        first = discover_blocks(model, x_r[:2].to(model_device(model)))[0]
        _, head = classifier_of(model)
        f_r = early_features(model, first, x_r, config.grid)
        t = neighbour_targets(early_features(model, first, x_f, config.grid), f_r, y_r, head.out_features, config.k)
        t_r = neighbour_targets(f_r, f_r, y_r, head.out_features, config.k, leave_one_out=True)
        excess = disagreement(t, y_f) - disagreement(t_r, y_r)
        payload = (x_f, t) if excess >= config.min_excess else None
        if payload is not None and config.feature_weight > 0:  # the nearest retain samples in the original's features
            near = feature_neighbours(penultimate_features(model, x_f), penultimate_features(model, x_r),
                                      config.feature_k)
            payload = (x_f, torch.cat([t, near.float()], 1), x_r)
        # "off" on random samples: the budget's look-alikes carry the forget samples' labels as often as
        # their own, so this estimate sees nothing to move there, memorised or not (nonmembers= can)
        info = {"forget_excess_disagreement": excess, "forget_targets": "budget" if payload else "off"}
        if payload is None and not split.by_classes:
            info["_note"] = NOTHING_TO_MOVE.format(excess=excess, min_excess=config.min_excess)
        return Targets(payload, sorted(set(scored) | set(pool)), info)

    def shifted_nonmembers(self, split, seed: int):
        """The budget's images moved a few pixels (:class:`dfmu_ext.splits.ShiftedCopies`)."""
        if split.by_classes:
            raise ValueError("nonmembers='shifted' is for forgetting samples, not whole classes")
        sample = split.budget[0] if len(split.budget) else None
        x = sample[0] if isinstance(sample, (tuple, list)) and len(sample) == 2 else sample
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or min(x.shape[-2:]) < 4:
            got = "dict samples" if isinstance(x, dict) else type(x).__name__ + (
                str(tuple(x.shape)) if isinstance(x, torch.Tensor) else "")
            raise ValueError("nonmembers='shifted' needs (image, label) samples with image tensors (..., H, W) of at "
                             f"least 4 x 4 pixels, got {got}")
        return ShiftedCopies(split.budget, shift_pixels(*x.shape[-2:]), seed)

    def _nonmember_targets(self, model, split, scored, config, seed, nonmembers) -> Targets:
        r"""Samples forgotten with ``nonmembers`` given: :func:`dfmu_ext.targets.nonmember_targets`
        (the forget samples' true-label probabilities matched, per label, to the model's on up to
        ``references`` non-members, in the order their nearest non-members back their labels, found
        in the last block's features). No ``min_excess`` gate: the term runs over the fine-tune's first
        ``steps`` steps, the early stop off by default (:data:`NONMEMBER_FORGET_TERM`); then the
        membership AUC against the same non-members decides whether more run (``unlearn``'s forget side)."""
        n = len(split.forget_set)
        pool, _ = forget_pool(n, scored, config.pool_size(n), seed)
        if len(pool) == n:
            pool = list(range(n))
        x_f, y_f = take_batch(split.forget_set, pool)
        gen = torch.Generator().manual_seed(seed + 86028121)
        refs = torch.randperm(len(nonmembers), generator=gen)[:config.references].tolist()
        x_n, y_n = take_batch(nonmembers, refs)
        device = model_device(model)
        # the last block (the classifier's input): how the model itself groups unseen look-alikes ranks the
        # forget samples best (fashion-mnist memorised, seed 0: Spearman 0.73 with Retrain's true-label
        # probability, against 0.52 in the first block's features; benchmarks/RESULTS.md)
        last = discover_blocks(model, x_n[:2].to(device))[-1]
        _, head = classifier_of(model)
        with torch.no_grad(), eval_mode(model):
            p_n = torch.cat([torch.softmax(model(x_n[s:s + 256].to(device)).float(), 1).cpu()
                             for s in range(0, len(refs), 256)])
        if p_n.shape[1] != head.out_features or int(y_n.max()) >= p_n.shape[1] or int(y_n.min()) < 0:
            raise ValueError("nonmembers' labels must be classes of the model's head")
        t = nonmember_targets(early_features(model, last, x_f, config.grid), y_f,
                              early_features(model, last, x_n, config.grid), p_n, y_n, config.k)
        return Targets((x_f, t), sorted(set(scored) | set(pool)),
                       {"forget_excess_disagreement": None, "forget_targets": "nonmembers",
                        "nonmembers_read": len(refs)})

    def prune(self, model, batch, is_forget, split, configs, mode, comm):
        if split.by_classes:
            return score_and_prune(model, batch, split.classes, selection=configs["selection"], mode=mode, comm=comm)
        return score_and_prune(model, batch, forget_mask=is_forget, selection=configs["selection"], mode=mode,
                               comm=comm)

    def objective(self, model, split, targets, pruned, configs, device, seed, comm, steps, teacher):
        config = configs["finetune"]
        if config.epochs == 0 or len(split.budget) == 0:
            return None
        return ClassifierObjective(model, split.budget, config, device=device, seed=seed, comm=comm, steps=steps,
                                   forget=targets.payload, forget_term=configs["forget_term"], teacher=teacher)

    def early_stop_target(self, pruned) -> float | None:
        return pruned.pre_prune_retain_accuracy

    @torch.no_grad()
    def retention(self, model: nn.Module, dataset: Dataset, device, watch=None) -> dict:
        """Per sample of ``dataset``: the probability of its label (``p``); the accuracy, mean loss
        and per-class accuracy; with ``watch`` (labels: a forgotten sub-class's coarse class) the
        accuracy on those labels too (the siblings)."""
        probs, labels, hits = [], [], []
        with eval_mode(model):
            for x, y in TrainBatches(dataset, 256, 0, device, shuffle=False, skip_singletons=False):
                logp = torch.log_softmax(model(x).float(), dim=1)
                probs.append(logp.gather(1, y[:, None])[:, 0].exp().cpu())
                hits.append((logp.argmax(1) == y).cpu())
                labels.append(y.cpu())
        p, y, hit = torch.cat(probs), torch.cat(labels), torch.cat(hits).float()
        n = max(int(y.numel()), 1)
        per_class = {int(c): float(hit[y == c].mean()) for c in torch.unique(y)}
        out = {"p": p, "accuracy": float(hit.sum()) / n, "samples": int(y.numel()),
               "loss": float(-p.clamp_min(1e-30).log().sum()) / n, "per_class": per_class}
        if watch:
            near = torch.isin(y, torch.as_tensor(watch))
            out["siblings"] = float(hit[near].mean()) if bool(near.any()) else None
            out["watched"] = near   # the guard holds these units within the tolerance on their own too
        return out

    @torch.no_grad()
    def losses(self, model: nn.Module, dataset: Dataset, device) -> torch.Tensor:
        """Each sample's cross-entropy (the membership signal)."""
        out = []
        with eval_mode(model):
            for x, y in TrainBatches(dataset, 256, 0, device, shuffle=False, skip_singletons=False):
                out.append(F.cross_entropy(model(x).float(), y, reduction="none").cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def describe_record(self, split: Split) -> dict:
        return {"forget_classes": split.classes, **split.describe}
