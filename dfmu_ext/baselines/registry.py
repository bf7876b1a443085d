"""The registry of unlearning methods: one :class:`MethodSpec` per method, read by the comparison
runner instead of parallel name sets or signature inspection."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.utils.data import Dataset

from ..lm.task import TASKS, detect_task
from ..model_io import model_entry
from ..result import UnlearnResult
from ..unlearn import unlearn
from .ascent import gradient_ascent
from .finetuning import finetune, l1_sparse
from .headmask import head_mask
from .relabel import random_label, salun
from .scratch import retrain
from .subspace import deep_unlearning
from .distill import scrub
from .dampening import ssd
from .lm import lm_gradient_ascent, lm_graddiff, lm_retrain, npo, selective_pruning


def dfmu(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
         forget_indices=None, device=None, seed: int = 0, progress: bool = False, **kwargs) -> UnlearnResult:
    """DFMU (:func:`dfmu_ext.unlearn`), under the baselines' calling convention."""
    return unlearn(model, train_set, forget_classes, retain_fraction, forget_indices=forget_indices, device=device,
                   seed=seed, progress=progress, **kwargs)


def _per_task(classifier_fn: Callable, lm_fn: Callable) -> Callable:
    """One registry entry for both tasks: ``lm_fn`` on causal-LM data sets, ``classifier_fn`` otherwise."""

    @functools.wraps(classifier_fn)
    def fn(model, train_set, *args, **kwargs):
        target = lm_fn if detect_task(train_set) == "causal-lm" else classifier_fn
        return target(model, train_set, *args, **kwargs)

    fn.__doc__ = (classifier_fn.__doc__ or "") + f"\n\n    On causal-LM data: :func:`{lm_fn.__module__}.{lm_fn.__name__}`."
    return fn


@dataclass(frozen=True)
class MethodSpec:
    """How to run one method and what it reads.

    Attributes:
        name: the name in tables and on the command line.
        fn: ``fn(model, train_set, forget_classes, retain_fraction, *, device, seed, progress, **kw)``,
            wrapped by :func:`dfmu_ext.model_io.model_entry` (``logits_fn=``, ``classifier=``, ``label_key=``).
        budgeted: its result depends on ``retain_fraction`` (it reads the budgeted retain slice), so
            a comparison runs it at every fraction; otherwise once per seed.
        fixed_fraction: the fraction a non-budgeted method runs at when that is meaningful
            (Retrain: 1.0, all retain data); None when it reads no retain data.
        default_epochs: the default of its ``epochs`` keyword (None: it has no epochs).
        trains: it runs training steps and takes ``steps=`` (:class:`dfmu_ext.steps.StepOptions`:
            precision and memory layout), so a comparison can run every trained method on one engine.
        tasks: the tasks it runs on (:data:`dfmu_ext.lm.task.TASKS`): classifiers, causal LMs or both.
    """

    name: str
    fn: Callable[..., UnlearnResult]
    budgeted: bool
    fixed_fraction: float | None = None
    default_epochs: int | None = None
    trains: bool = True
    tasks: tuple[str, ...] = ("classification",)

    def __post_init__(self):
        # every method takes any model and dict data sets (logits_fn=, classifier=, label_key=)
        object.__setattr__(self, "fn", model_entry(self.fn))


SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("Retrain", _per_task(retrain, lm_retrain), budgeted=False, fixed_fraction=1.0, tasks=TASKS),
    MethodSpec("FT", finetune, budgeted=True, default_epochs=10),
    MethodSpec("GA", _per_task(gradient_ascent, lm_gradient_ascent), budgeted=False, default_epochs=5, tasks=TASKS),
    MethodSpec("RL", random_label, budgeted=True, default_epochs=10),
    MethodSpec("l1-sparse", l1_sparse, budgeted=True, default_epochs=10),
    MethodSpec("SalUn", salun, budgeted=True, default_epochs=10),
    MethodSpec("SSD", ssd, budgeted=True, trains=False),
    MethodSpec("SCRUB", scrub, budgeted=True, default_epochs=3),
    MethodSpec("head-mask", head_mask, budgeted=False, trains=False),
    MethodSpec("DFMU", dfmu, budgeted=True, tasks=TASKS),
    MethodSpec("DeepUnlearning", deep_unlearning, budgeted=True, trains=False),
    # causal language models only (dfmu_ext.baselines.lm)
    MethodSpec("GradDiff", lm_graddiff, budgeted=True, default_epochs=10, tasks=("causal-lm",)),
    MethodSpec("NPO", npo, budgeted=True, default_epochs=10, tasks=("causal-lm",)),
    MethodSpec("SelectivePruning", selective_pruning, budgeted=True, trains=False, tasks=("causal-lm",)),
)}

#: Table name -> method function (the public registry).
METHODS: dict[str, Callable[..., UnlearnResult]] = {name: spec.fn for name, spec in SPECS.items()}

_ALIASES = {"l1": "l1-sparse", "l1sparse": "l1-sparse", "headmask": "head-mask", "deep-unlearning": "DeepUnlearning",
            "svd": "DeepUnlearning", "selective-pruning": "SelectivePruning", "graddiff": "GradDiff"}


def methods_for(task: str) -> list[str]:
    """The registry's methods that run on ``task`` ("classification" or "causal-lm"), in table order."""
    return [name for name, spec in SPECS.items() if task in spec.tasks]


def resolve_methods(spec, task: str = "classification") -> list[str]:
    """``"all"`` (every method of ``task``), a comma-separated string or a list of names
    (case-insensitive) -> registry names; ValueError for a name unknown or not of ``task``."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = list(spec)
    if any(n.lower() == "all" for n in names):
        return methods_for(task)
    lookup = {k.lower(): k for k in SPECS}
    lookup.update(_ALIASES)
    out = []
    for n in names:
        key = n.lower()
        if key not in lookup:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(SPECS)} or 'all'")
        if task not in SPECS[lookup[key]].tasks:
            raise ValueError(f"{lookup[key]} does not run on {task} models; choose from {', '.join(methods_for(task))}")
        if lookup[key] not in out:
            out.append(lookup[key])
    if not out:
        raise ValueError("no method named")
    return out
