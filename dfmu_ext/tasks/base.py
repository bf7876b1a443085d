r"""The seam between the unlearning orchestration (:func:`dfmu_ext.unlearn`) and what a task is.

A task says how its samples are read and split into forget, retain and budget; what its units are
and how one scoring pass over them goes; what the forget samples' targets are; and what the
fine-tune's loss is. :func:`dfmu_ext.unlearn` runs the stages once for every task:

    split -> scoring batch -> targets -> score + select + mask -> prepare (e.g. an edit)
          -> masked fine-tune (the task's objective, the retention guard) -> result, record

A task is an object with the methods of :class:`Task`; the registry (:mod:`dfmu_ext.tasks`) maps
names to them, and ``task_for`` picks one from the data when none is named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset


@dataclass
class Split:
    """What one call forgets and reads, resolved against its training set.

    Attributes:
        forget_set / retain_set: subsets of the training set (every forget sample; every other one).
        budget: the part of the retain set the method trains on (the data budget).
        validation: the part of the budget set aside for the retention guard (never trained on);
            empty when the guard is off.
        by_classes: whole classes are forgotten (the classifier's rows are masked).
        classes: the forget classes, or None.
        describe: what was forgotten, for reports and the deletion record.
    """

    forget_set: Subset
    retain_set: Subset
    budget: Subset
    validation: Subset
    by_classes: bool = False
    classes: list[int] | None = None
    describe: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Targets:
    """The forget samples' targets (what a model that never saw them would output) and which forget
    samples were read to make them (positions in the forget set)."""

    payload: Any | None
    read: list[int]
    info: dict = field(default_factory=dict)   # keys starting with "_" are the task's own (not reported)

    def public(self) -> dict:
        return {k: v for k, v in self.info.items() if not k.startswith("_")}


def scoring_positions(n_forget: int, n_budget: int, samples: int, seed: int) -> tuple[list[int], list[int]]:
    """Up to ``samples // 2`` seeded random forget positions and the rest from the budget."""
    gen = torch.Generator().manual_seed(seed + 7919)
    half = max(1, samples // 2)
    f = torch.randperm(n_forget, generator=gen)[:half].tolist()
    r = torch.randperm(n_budget, generator=gen)[:max(1, samples - len(f))].tolist()
    return f, r


def forget_pool(n_forget: int, scored: list[int], samples: int, seed: int) -> tuple[list[int], torch.Generator]:
    """The forget positions a forget term reads: the scored ones first, then seeded random others,
    ``samples`` in all; and the generator, for what the task draws next from the same stream."""
    gen = torch.Generator().manual_seed(seed + 15485863)
    samples = min(samples, n_forget)
    chosen = scored[:samples]
    taken = set(chosen)
    others = [i for i in torch.randperm(n_forget, generator=gen).tolist() if i not in taken]
    return chosen + others[:samples - len(chosen)], gen


def hold_out(budget: Subset, share: float, seed: int, minimum: int = 1) -> tuple[Subset, Subset]:
    """``(train, validation)``: a seeded ``share`` of ``budget`` (at least ``minimum``, and never all
    of it) set aside for the retention guard; ``share == 0`` sets nothing aside."""
    n = len(budget)
    k = 0 if share <= 0 or n < 2 else min(n - 1, max(minimum, int(round(share * n))))
    if k == 0:
        return budget, Subset(budget.dataset, [])
    gen = torch.Generator().manual_seed(seed + 49979687)
    order = torch.randperm(n, generator=gen)
    held = set(order[:k].tolist())
    keep = [budget.indices[i] for i in range(n) if i not in held]
    return Subset(budget.dataset, keep), Subset(budget.dataset, [budget.indices[i] for i in sorted(held)])


class Task:
    """What :func:`dfmu_ext.unlearn` asks of a task (the classifier, causal-LM and attribute tasks
    implement it). ``name`` is the registry key; ``keywords`` the ``unlearn`` keywords the task
    reads beyond the shared ones — any other non-default keyword is a one-line error."""

    name = "task"
    keywords: tuple[str, ...] = ()
    forgets: tuple[str, ...] = ("forget_classes", "forget_indices")   # the forget_* keywords it takes
    prepare_stage: str | None = None     # the name of :meth:`prepare`'s stage in the timings, if it has one
    default_tolerance = 0.01             # the retention guard's tolerance (dfmu_ext.guard)
    default_score_samples = 512          # the scoring batch when unlearn(score_samples=None)
    #: whether the guard's recovery steps keep the forget term: off where the term pushes single forget
    #: samples (a retain-only step is what recovers), on where it is the whole point of every step
    #: (an attribute removed from everyone's features)
    recovery_forget_term = False
    #: how many times the guard may halve a pruning that cost more than its allowance (0: never)
    prune_halvings = 0

    def configs(self, split: Split | None, given: dict) -> dict:
        """The task's configs with defaults filled in and validated (``selection``, ``finetune``,
        ``forget_term``, ...), from the keywords ``given``."""
        raise NotImplementedError

    def claims(self, train_set: Dataset, what: dict) -> bool:
        """Whether this task is the one for ``train_set`` and ``what`` is forgotten (``what``: the
        ``forget_*`` keywords of ``unlearn``), when no task is named."""
        return False

    def split(self, train_set: Dataset, what: dict, retain_fraction: float, seed: int, configs: dict,
              extra: dict) -> Split:
        """``what``: ``{"forget_classes", "forget_indices", "forget_attribute"}`` as given to
        ``unlearn`` (None where not given); ``extra``: the guard's hold-out share and minimum."""
        raise NotImplementedError

    def scoring_batch(self, split: Split, forget_pos: list[int], budget_pos: list[int]):
        """``(batch, is_forget)``: the scoring pass's batch (forget samples first) and its forget mask."""
        raise NotImplementedError

    def forget_targets(self, model: nn.Module, split: Split, scored: list[int], configs: dict, seed: int,
                       device: torch.device) -> Targets:
        raise NotImplementedError

    def prune(self, model: nn.Module, batch, is_forget: torch.Tensor, split: Split, configs: dict, mode: str,
              comm) -> Any:
        """One scoring pass, selection and fused masking; returns a :class:`dfmu_ext.result.PruneResult`."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, split: Split, targets: Targets, pruned, configs: dict, device, seed: int,
                guard) -> dict:
        """What runs between masking and the fine-tune (e.g. the LM's projected edit); returns info."""
        return {}

    def objective(self, model: nn.Module, split: Split, targets: Targets, pruned, configs: dict, device, seed: int,
                  comm, steps, teacher):
        """The fine-tune's objective (:class:`dfmu_ext.finetune.Objective`)."""
        raise NotImplementedError

    def losses(self, model: nn.Module, dataset: Dataset, device) -> torch.Tensor:
        """Each sample's loss on ``dataset`` (the forget side's membership signal)."""
        raise NotImplementedError

    #: the forget side runs on (without non-members) while :meth:`forget_gap` is above this
    forget_gap_stop: float | None = None

    def forget_gap(self, model: nn.Module, split: Split, targets: Targets, device) -> float | None:
        """How far the forget samples still are from the targets' estimate of Retrain (a divergence
        in nats, 0 once reached), or None when the task has no such estimate."""
        return None

    def stricter_targets(self, targets: Targets, objective) -> bool:
        """Make the forget targets stricter, in ``targets`` and in ``objective`` alike, for the forget
        side's second stage: non-members still tell the forget samples apart once the task's estimate
        was met (:func:`dfmu_ext.unlearn`). Returns whether it did (the default: the task has none)."""
        return False

    def shifted_nonmembers(self, split: Split, seed: int) -> Dataset:
        """``unlearn(nonmembers="shifted")``: stand-ins for non-members made from the budget."""
        raise ValueError(f"nonmembers='shifted' is for image classifiers, not the {self.name} task")

    def retention(self, model: nn.Module, dataset: Dataset, device) -> dict:
        """What the guard watches on ``dataset`` (the budget's validation part): ``{"p": (n,) per-unit
        right-answer probabilities, "accuracy": a, ...}`` (see :class:`dfmu_ext.guard.RetentionGuard`)."""
        raise NotImplementedError

    def retention_measure(self, dataset: Dataset, device, watch=None):
        """The guard's ``measure(model)`` on ``dataset``; its first call measures the original (a task
        may fix there what later calls compare, e.g. which tokens the original knew)."""
        return lambda m: self.retention(m, dataset, device, watch=watch)
