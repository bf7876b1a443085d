"""dfmu_ext: Data-Frugal Machine Unlearning for PyTorch.

Make a trained classifier forget classes with one scoring pass (fused gradient x activation block
importance), knowledge-preserving pruning (one fused multi-tensor masking op) and a short masked
fine-tune on a small stratified slice of the retain data; then measure it with the field's metrics.

    res = dfmu_ext.score_and_prune(model, (x, y), forget_classes=[3])
    out = dfmu_ext.unlearn(model, train_set, forget_classes=[3], retain_fraction=0.13)
    metrics = dfmu_ext.evaluate(model, train_set, test_set, forget_classes=[3])
"""
from . import ops
from ._loader import __version__, build_info
from .finetune import FinetuneConfig
from .eval import evaluate
from .result import FinetuneHistory, PruneResult, UnlearnResult
from .selection import SelectionConfig
from .targets import ForgetTargetConfig
from .guard import ForgettingWarning, GuardConfig, RetentionWarning
from .tasks.classification import score_and_prune
from .unlearn import unlearn

__all__ = ["ops", "build_info", "score_and_prune", "unlearn", "evaluate", "SelectionConfig", "FinetuneConfig",
           "ForgetTargetConfig", "ForgettingWarning", "GuardConfig", "RetentionWarning", "UnlearnResult", "PruneResult",
           "FinetuneHistory"]
