"""dfmu_ext: Data-Frugal Machine Unlearning for PyTorch.

Make a trained classifier forget classes with one scoring pass (fused gradient x activation block
importance), knowledge-preserving pruning (one fused multi-tensor masking op) and a short masked
fine-tune on a small stratified slice of the retain data; then measure it with the field's metrics.
"""
from . import ops
from ._loader import build_info

__all__ = ["ops", "build_info"]
__version__ = "0.1.0"
