r"""The retention guard: DFMU watches what it must keep while it runs, without a Retrain model.

A share of the retain budget is set aside (never trained on; no extra data is read) and the task's
retention score :math:`s` (an accuracy: a classifier's, or a causal LM's next-token accuracy on the
scored tokens) is measured on it for the original model, before anything changes, and after each
stage. The drop :math:`\Delta = s_{\mathrm{orig}} - s` is kept within the tolerance :math:`\tau`
(1 point for classifiers, 2 for causal LMs) by the method's own means:

* stages that push forgetting stop early when they cost more than :math:`\tau` beyond where they
  started (the causal-LM edit is rolled back to its last checked state within it);
* after the fine-tune, while :math:`\Delta > \tau`, retain-only steps (the forget term off,
  distillation on) run in chunks of ``check_every`` up to ``recovery_steps``;
* when it still is, a ``RetentionWarning`` says so with the measured trade; never silently.

A validation part of :math:`n` samples resolves accuracy only to :math:`1/n`, so a drop counts as
beyond the tolerance when :math:`\Delta > \tau + 1/n` (the allowance; :math:`n` is the number of
scored units: samples, or an LM's scored tokens). The guard's numbers go into the result's
``info["guard"]`` and into the deletion record.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

__all__ = ["GuardConfig", "RetentionGuard", "RetentionWarning"]


class RetentionWarning(UserWarning):
    """DFMU could not keep what it must keep within the tolerance."""


@dataclass
class GuardConfig:
    """The retention guard of :func:`dfmu_ext.unlearn` (``guard=``; ``guard=False`` turns it off).

    Attributes:
        tolerance: the largest drop of the retention score allowed (a fraction: 0.01 is one point);
            None: the task's default (0.01 for classifiers, 0.02 for causal LMs).
        validation: the share of the retain budget set aside to measure it (not trained on).
        min_validation: at least this many samples are set aside (when the budget allows).
        recovery_steps: the most retain-only steps added after the fine-tune while the drop is beyond
            the tolerance; None: as many as the fine-tune ran, at least 20.
        check_every: steps between two measurements during recovery and during an edit.
    """

    tolerance: float | None = None
    validation: float = 0.1
    min_validation: int = 8
    recovery_steps: int | None = None
    check_every: int = 10

    def validate(self) -> None:
        if self.tolerance is not None and not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"guard.tolerance must be in [0, 1] (a fraction), got {self.tolerance}")
        if not 0.0 < self.validation < 1.0:
            raise ValueError(f"guard.validation must be in (0, 1), got {self.validation}")
        if self.min_validation < 1 or self.check_every < 1 or (self.recovery_steps or 0) < 0:
            raise ValueError("guard: min_validation and check_every must be >= 1, recovery_steps >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetentionGuard:
    """Measures ``measure(model) -> {"score": s, "units": n, ...}`` on the validation part and keeps
    each stage's numbers (``stages``), relative to the original's (``reference``)."""

    measure: Callable[[nn.Module], dict]
    tolerance: float
    config: GuardConfig
    reference: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)

    def start(self, model: nn.Module) -> dict:
        self.reference = self.measure(model)
        self.stages["original"] = self.reference
        return self.reference

    @property
    def allowance(self) -> float:
        """:math:`\\tau + 1/n`: the drop beyond which the guard acts."""
        return self.tolerance + 1.0 / max(1, int(self.reference.get("units", 1)))

    def drop(self, measured: dict) -> float:
        return float(self.reference["score"] - measured["score"])

    def check(self, model: nn.Module, stage: str | None = None) -> dict:
        """Measure now; record it under ``stage`` (when given); return it with its ``drop``."""
        now = self.measure(model)
        now["drop"] = self.drop(now)
        now["within"] = now["drop"] <= self.allowance
        if stage is not None:
            self.stages[stage] = now
        return now

    def within(self, measured: dict) -> bool:
        return self.drop(measured) <= self.allowance

    def report(self, warned: bool) -> dict:
        final = self.stages.get("final") or next(reversed(self.stages.values()))
        return {"tolerance": self.tolerance, "allowance": self.allowance,
                "validation_units": int(self.reference.get("units", 0)),
                "validation_samples": int(self.reference.get("samples", 0)),
                "original": self.reference["score"], "final": final["score"], "drop": self.drop(final),
                "within": self.within(final), "warned": warned,
                "stages": {k: {kk: v for kk, v in s.items() if not isinstance(v, (list, dict))}
                           for k, s in self.stages.items()}}

    def warn(self, what: str, extra: str = "") -> None:
        final = self.stages.get("final") or next(reversed(self.stages.values()))
        warnings.warn(
            f"DFMU kept {what} at {100 * final['score']:.1f}% on its validation part vs the original's "
            f"{100 * self.reference['score']:.1f}% (-{100 * self.drop(final):.1f} points; tolerance "
            f"{100 * self.tolerance:.1f} + resolution {100 * (self.allowance - self.tolerance):.1f}): it could not "
            f"forget inside the tolerance{extra}", RetentionWarning, stacklevel=3)
