"""The tasks DFMU unlearns, behind one seam (:class:`dfmu_ext.tasks.base.Task`): the registry maps a
name to its task, and :func:`task_for` picks one from the data when none is named."""
from __future__ import annotations

from .base import Split, Targets, Task
from .attribute import AttributeTask
from .causal_lm import CausalLMTask, LMFinetuneConfig
from .classification import ClassificationTask, masked_finetune, score_and_prune

#: name -> task object; a new task registers here (:func:`register`).
TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


register(ClassificationTask())
register(CausalLMTask())
register(AttributeTask())


def task_for(train_set, task: str | None = None, what: dict | None = None) -> Task:
    """The task named ``task``, or the first registered task (the latest first) that claims the data
    and what is forgotten (``what``: the ``forget_*`` keywords; :meth:`Task.claims`): causal-LM
    samples (per-token ``labels``) are the causal-LM task; classification takes the rest."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return TASKS[task]
    what = what or {}
    for candidate in reversed(list(TASKS.values())):
        if candidate.claims(train_set, what):
            return candidate
    return TASKS["classification"]


__all__ = ["TASKS", "Task", "Split", "Targets", "register", "task_for", "ClassificationTask", "CausalLMTask",
           "LMFinetuneConfig", "masked_finetune", "score_and_prune"]
