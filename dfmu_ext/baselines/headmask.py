"""head-mask: zero the forget classes' classifier rows — the trivial method (features untouched)."""
from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from ..pruning import build_mask_plan, head_mask_for, suppress_head
from ..result import UnlearnResult
from ._plumbing import Setup, make_result
from .registry import register


@register("head-mask", budgeted=False, trains=False)
def head_mask(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
              forget_indices=None, device=None, seed: int = 0, progress: bool = False) -> UnlearnResult:
    """Head-mask: zero the classifier's forget-class rows and pin their bias to
    ``pruning.SUPPRESSED_LOGIT`` (the trivial method: features untouched). Reads no samples;
    ``train_set`` is only used to validate the classes."""
    if forget_classes is None:
        raise ValueError("head-mask is not applicable to sample forgetting: it removes whole classes' classifier rows")
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices)
    mask = head_mask_for(setup.head, setup.classes)
    build_mask_plan([], {}, setup.head, mask).apply()
    suppress_head(setup.head, setup.classes)
    return make_result(setup, model, "head-mask", 0, 0, {}, masks={setup.head_name: mask})
