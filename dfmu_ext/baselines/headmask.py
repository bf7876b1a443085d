"""head-mask: zero the forget classes' classifier rows — the trivial method (features untouched)."""
from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from ..pruning import build_mask_plan, head_mask_for, suppress_head
from ..result import UnlearnResult
from ._plumbing import Setup, make_result


def head_mask(model: nn.Module, train_set: Dataset, forget_classes, retain_fraction: float = 0.13, *,
              device=None, seed: int = 0, progress: bool = True) -> UnlearnResult:
    """Head-mask: zero the classifier's forget-class rows and pin their bias to
    ``pruning.SUPPRESSED_LOGIT`` (the trivial method: features untouched). Reads no samples;
    ``train_set`` is only used to validate the classes."""
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed)
    mask = head_mask_for(setup.head, setup.classes)
    build_mask_plan([], {}, setup.head, mask).apply()
    suppress_head(setup.head, setup.classes)
    return make_result(setup, model, "head-mask", 0, 0, {}, masks={setup.head_name: mask})
