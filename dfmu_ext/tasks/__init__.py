"""The tasks DFMU unlearns, behind one seam (:class:`dfmu_ext.tasks.base.Task`): the registry maps a
name to its task, and :func:`task_for` picks one from the data when none is named."""
from __future__ import annotations

from .base import Split, Targets, Task
from .causal_lm import CausalLMTask, LMFinetuneConfig
from .classification import ClassificationTask, masked_finetune, score_and_prune

#: name -> task object; a new task registers here (:func:`register`).
TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


register(ClassificationTask())
register(CausalLMTask())


def task_for(train_set, task: str | None = None) -> Task:
    """The task named ``task``, or the one the data's samples belong to: causal-LM samples (per-token
    ``labels``) are the causal-LM task, anything else classification."""
    from ..lm.task import detect_task

    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return TASKS[task]
    return TASKS[detect_task(train_set)]


__all__ = ["TASKS", "Task", "Split", "Targets", "register", "task_for", "ClassificationTask", "CausalLMTask",
           "LMFinetuneConfig", "masked_finetune", "score_and_prune"]
