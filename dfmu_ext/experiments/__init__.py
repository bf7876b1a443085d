"""Experiments on top of the method and the baselines: the forget report (:mod:`.forget`), the
side-by-side comparison (:mod:`.compare`), the scenarios (:mod:`.scenarios`), the LM comparison
(:mod:`.lm`), the one runner under the three (:mod:`.runner`) and their plots (:mod:`.plots`)."""
from .compare import format_comparison_table, run_comparison
from .forget import format_table, run_forget

__all__ = ["run_comparison", "format_comparison_table", "run_forget", "format_table"]
