"""The result every unlearning method returns, so that DFMU and the baselines are interchangeable."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
        info: method-specific extras (scores, chosen hyper-parameters, epochs run, ...).
    """

    model: torch.nn.Module
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    retain_samples_used: int = 0
    forget_samples_used: int = 0
    method: str = "DFMU"
    info: dict = field(default_factory=dict)
