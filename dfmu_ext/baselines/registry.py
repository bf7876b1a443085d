"""The registry of unlearning methods: one :class:`MethodSpec` per method, read by the comparison
runner instead of parallel name sets or signature inspection.

Every method module registers its own spec(s) with :func:`register` when it is imported; this module
imports none of them (:mod:`dfmu_ext.baselines` imports them all and fixes the table order). A method
that runs on several tasks holds one function per task (:attr:`MethodSpec.fns`); calling the spec's
:attr:`~MethodSpec.fn` picks the function of the call's task (:func:`task_of`): the task that
:func:`dfmu_ext.tasks.task_for` finds from the data and the ``forget_*`` keywords, the same lookup
:func:`dfmu_ext.unlearn` makes (``forget_attribute=`` -> the attribute task, token samples -> the
causal-LM task, anything else -> classification). The task names are those of the task registry
(:data:`dfmu_ext.tasks.TASKS`).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Callable

from ..model_io import model_entry
from ..result import UnlearnResult
from ..tasks import TASKS as _TASK_OBJECTS
from ..tasks import task_for

__all__ = ["MethodSpec", "SPECS", "METHODS", "register", "set_table_order", "task_of", "task_names", "methods_for",
           "resolve_methods"]


def task_names() -> tuple[str, ...]:
    """The names of the registered tasks (:data:`dfmu_ext.tasks.TASKS`), in registration order."""
    return tuple(_TASK_OBJECTS)


def task_of(train_set, what: dict | None = None) -> str:
    """The name of the task of a call on ``train_set`` forgetting ``what`` (the call's ``forget_*``
    keywords, e.g. ``{"forget_attribute": values}``), as :func:`dfmu_ext.tasks.task_for` finds it:
    the one place the registry decides which of a method's functions runs."""
    return task_for(train_set, None, what or {}).name


def _call_task(signature: inspect.Signature, args: tuple, kwargs: dict) -> str:
    """The task of one call: its ``train_set`` and ``forget_*`` arguments, positional ones named by
    ``signature`` (the method's first function's, which its entry point shows)."""
    names = [p.name for p in signature.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    given = {**dict(zip(names, args)), **kwargs}
    return task_of(given.get("train_set"), {k: v for k, v in given.items() if k.startswith("forget_")})


@dataclass(frozen=True)
class MethodSpec:
    """How to run one method and what it reads.

    Attributes:
        name: the name in tables and on the command line.
        fns: task -> ``fn(model, train_set, forget_classes, retain_fraction, *, device, seed, progress, **kw)``
            (task names of :data:`dfmu_ext.tasks.TASKS`), in registration order; an attribute method
            takes ``forget_attribute`` where the others take ``forget_classes``.
        budgeted: its result depends on ``retain_fraction`` (it reads the budgeted retain slice), so
            a comparison runs it at every fraction; otherwise once per seed.
        fixed_fraction: the fraction a non-budgeted method runs at when that is meaningful
            (Retrain: 1.0, all retain data); None when it reads no retain data.
        default_epochs: the default of its ``epochs`` keyword (None: it has no epochs).
        trains: it runs training steps and takes ``steps=`` (:class:`dfmu_ext.steps.StepOptions`:
            precision and memory layout), so a comparison can run every trained method on one engine.
        fn: the entry point (derived): the function of the call's task (:func:`task_of`), wrapped by
            :func:`dfmu_ext.model_io.model_entry` (``logits_fn=``, ``classifier=``, ``label_key=``);
            its signature and docstring are the first task's.
    """

    name: str
    fns: dict[str, Callable[..., UnlearnResult]]
    budgeted: bool
    fixed_fraction: float | None = None
    default_epochs: int | None = None
    trains: bool = True
    fn: Callable[..., UnlearnResult] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        unknown = [t for t in self.fns if t not in task_names()]
        if not self.fns or unknown:
            raise ValueError(f"{self.name}: tasks must be some of {', '.join(task_names())}, got {list(self.fns)}")
        object.__setattr__(self, "fns", dict(self.fns))
        object.__setattr__(self, "fn", _entry(self.name, self.fns))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks it runs on, in registration order."""
        return tuple(self.fns)


def _entry(name: str, fns: dict[str, Callable]) -> Callable[..., UnlearnResult]:
    """One callable for every task of ``fns``: each task's function is wrapped by ``model_entry`` (so
    its own keywords bind), and the task is read from the data and the ``forget_*`` arguments before
    the call (a one-line ValueError for a task the method does not run on)."""
    if set(fns) == set(task_names()) and len(set(fns.values())) == 1:  # one function reads every task (DFMU)
        return model_entry(next(iter(fns.values())))
    entries = {task: model_entry(fn) for task, fn in fns.items()}
    first_task = next(iter(fns))
    first = entries[first_task]

    signature = inspect.signature(first)

    @functools.wraps(first)
    def fn(*args, **kwargs):
        task = _call_task(signature, args, kwargs)
        if task not in entries:
            raise ValueError(f"{name} does not run on {task} data; it runs on {', '.join(entries)}")
        return entries[task](*args, **kwargs)

    fn.__signature__ = signature  # type: ignore[attr-defined]
    others = "; ".join(f"on {t} data: :func:`{f.__module__}.{f.__name__}`" for t, f in fns.items() if t != first_task)
    if others:
        fn.__doc__ = (first.__doc__ or "") + f"\n\n    {others[0].upper()}{others[1:]}."
    return fn


#: Table name -> spec, in table order (filled by the method modules, ordered by :func:`set_table_order`).
SPECS: dict[str, MethodSpec] = {}
#: Table name -> method function (the public registry), the same order.
METHODS: dict[str, Callable[..., UnlearnResult]] = {}


def register(name: str, tasks: str | tuple[str, ...] = "classification", *, budgeted: bool | None = None,
             **attrs) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated function as method ``name`` on ``tasks`` (one task or a tuple:
    the same function for each), e.g. ``@register("GA", budgeted=False, default_epochs=5)``.

    The first registration of a name creates its :class:`MethodSpec` (``budgeted`` is required then,
    ``attrs`` are its other fields); a later one adds the function of another task and may repeat
    only the same fields. One-line ValueError for a task registered twice or fields that disagree.
    """
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)

    def decorate(fn: Callable) -> Callable:
        spec = SPECS.get(name)
        if spec is None:
            if budgeted is None:
                raise ValueError(f"{name}: the first registration must say whether it is budgeted")
            new = MethodSpec(name, {t: fn for t in tasks}, budgeted=budgeted, **attrs)
        else:
            taken = [t for t in tasks if t in spec.fns]
            if taken:
                raise ValueError(f"{name} already has a function for {taken[0]}")
            fields = {"budgeted": budgeted, **attrs} if budgeted is not None else attrs
            differ = [k for k, v in fields.items() if getattr(spec, k) != v]
            if differ:
                raise ValueError(f"{name}: {', '.join(differ)} differ from its first registration")
            new = dataclasses.replace(spec, fns={**spec.fns, **{t: fn for t in tasks}})
        SPECS[name] = new
        METHODS[name] = new.fn
        return fn

    return decorate


def set_table_order(names) -> None:
    """Put ``names`` first in :data:`SPECS` and :data:`METHODS`, in that order (the tables' column
    order); methods registered but not named follow in registration order. ValueError for a name
    that is not registered."""
    names = list(names)
    missing = [n for n in names if n not in SPECS]
    if missing:
        raise ValueError(f"not registered: {', '.join(missing)}")
    order = names + [n for n in SPECS if n not in names]
    specs = {n: SPECS[n] for n in order}
    SPECS.clear()
    SPECS.update(specs)
    METHODS.clear()
    METHODS.update({n: s.fn for n, s in specs.items()})


_ALIASES = {"l1": "l1-sparse", "l1sparse": "l1-sparse", "headmask": "head-mask", "deep-unlearning": "DeepUnlearning",
            "svd": "DeepUnlearning", "selective-pruning": "SelectivePruning", "graddiff": "GradDiff"}


def methods_for(task: str) -> list[str]:
    """The registry's methods that run on ``task`` (a name of :func:`task_names`: "classification",
    "causal-lm", "attribute"), in table order."""
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
