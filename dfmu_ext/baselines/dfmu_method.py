"""DFMU (:func:`dfmu_ext.unlearn`) as a registered method, beside the baselines."""
from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from ..result import UnlearnResult
from ..unlearn import unlearn
from .registry import register, task_names

__all__ = ["dfmu"]


@register("DFMU", task_names(), budgeted=True)   # every task: unlearn reads the task itself
def dfmu(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
         forget_indices=None, device=None, seed: int = 0, progress: bool = False, **kwargs) -> UnlearnResult:
    """DFMU (:func:`dfmu_ext.unlearn`, which reads the task itself), under the baselines' calling convention."""
    return unlearn(model, train_set, forget_classes, retain_fraction, forget_indices=forget_indices, device=device,
                   seed=seed, progress=progress, **kwargs)
