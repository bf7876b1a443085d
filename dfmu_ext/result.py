"""What the stages hand back, typed: every unlearning method returns an :class:`UnlearnResult`, so
DFMU and the baselines are interchangeable; DFMU's stages return a :class:`PruneResult` and a
:class:`FinetuneHistory`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

__all__ = ["UnlearnResult", "PruneResult", "FinetuneHistory"]


@dataclass
class FinetuneHistory:
    """What the masked fine-tune did: optimizer steps, samples seen (over all ranks), epochs run
    (fractional when it stopped early), whether the early stop fired, the loss every 10 steps, seconds,
    and the retain-only steps the retention guard added (included in ``steps``)."""

    steps: int = 0
    samples: int = 0
    epochs_run: float = 0.0
    stopped_early: bool = False
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0
    recovery_steps: int = 0     # steps the retention guard added after the fine-tune (dfmu_ext.guard)

    def to_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key: str):  # read like the dict it used to be (reports, tests)
        return getattr(self, key)


@dataclass
class PruneResult:
    """What ``score_and_prune`` did."""

    masks: dict[str, torch.Tensor]    # block name -> (units,) mask; the classifier's name -> class-row mask
    scores: dict[str, torch.Tensor]   # block name -> (2, units): row 0 retain, row 1 forget importance
    counts: torch.Tensor              # (2,) retain / forget samples in the scoring batch
    plan: object                      # the pruning.MaskPlan, re-applied during fine-tuning
    pre_prune_retain_accuracy: float  # accuracy on the batch's retain samples before pruning
    seconds_scoring: float
    seconds_pruning: float

    @property
    def pruned_units(self) -> dict[str, int]:
        return {name: int((m < 1).sum()) for name, m in self.masks.items()}

    @property
    def total_units(self) -> dict[str, int]:
        """Units per scored block (the classifier is not a block)."""
        return {name: int(s.shape[-1]) for name, s in self.scores.items()}


@dataclass
class UnlearnResult:
    """What an unlearning call hands back.

    Attributes:
        model: the unlearned model (the same object that was passed in, modified in place).
        masks: block name -> 1-D float mask per unit (empty for methods that do not mask units).
        timings: seconds per stage; always holds ``"total"`` (wall time of the whole call).
        retain_samples_used: how many distinct retain samples the method read.
        forget_samples_used: how many distinct forget samples the method read.
        method: the method's name as shown in tables ("DFMU", "SalUn", ...).
        pruned_units / total_units: per scored block, units masked below 1 and units in all (DFMU).
        finetune: the masked fine-tune's history (DFMU).
        info: method-specific extras (scores, chosen hyper-parameters, epochs run, ...), for people
            and tests; reports read only the typed fields above.
    """

    model: torch.nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    retain_samples_used: int = 0
    forget_samples_used: int = 0
    method: str = "DFMU"
    pruned_units: dict[str, int] = field(default_factory=dict)
    total_units: dict[str, int] = field(default_factory=dict)
    finetune: FinetuneHistory | None = None
    info: dict = field(default_factory=dict)
