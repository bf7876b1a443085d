r"""The retention guard: DFMU watches what it must keep while it runs, without a Retrain model.

A share of the retain budget is set aside (never trained on; no extra data is read) and, on each of
its :math:`n` units (a classifier's samples, a causal LM's sequences), the probability the model
gives the right answer, :math:`p_i` (the soft accuracy; its accuracy is reported beside it; for a
sequence, its least probable token among those the original predicted right), is
measured for the original model, before anything changes, and after each stage. The drop is the mean
paired difference :math:`\Delta = \frac1n \sum_i (p^{\mathrm{orig}}_i - p_i)`, and it is kept within
the tolerance :math:`\tau` (1 point for classifiers; 6 for causal LMs, whose per-sequence measure is the
stricter: :attr:`dfmu_ext.tasks.causal_lm.CausalLMTask.default_tolerance`) by the method's own means:

* stages that push forgetting stop early when they cost more than :math:`\tau` beyond where they
  started (the causal-LM edit is rolled back to its last checked state within it);
* after the fine-tune, while :math:`\Delta > \tau`, retain-only steps (the forget term off,
  distillation on) run in chunks of ``check_every`` up to ``recovery_steps``;
* when it still is, a ``RetentionWarning`` says so with the measured trade; never silently;
* when the final drop is above :math:`\tau` and let through only because its standard error is larger
  than :math:`\tau` itself (too few units to resolve the tolerance: 27 validation images, SE 1.2-2.8
  points, while the ViT lost 2.4 points of RA unwarned), a ``RetentionWarning`` says that too.

Why the soft accuracy: a validation part of :math:`n` units resolves accuracy only to :math:`1/n`
(8 facts of a small LM's budget: 12.5 points), so erosion spread over many facts stays invisible
until it is large; the paired probability drop sees it while it is small. A drop counts as beyond
the tolerance when :math:`\Delta > \tau + \mathrm{SE}(\Delta)` (the allowance; SE the standard
error of the paired differences), so that which units were set aside does not decide alone. The
guard's numbers go into the result's ``info["guard"]`` and into the deletion record.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

__all__ = ["ForgettingWarning", "GuardConfig", "RetentionGuard", "RetentionWarning", "membership_auc"]


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called from the function that warns, that names the
    first frame outside this package: the user's call, however deep inside ``dfmu_ext`` it was raised."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class RetentionWarning(UserWarning):
    """DFMU could not keep what it must keep within the tolerance."""


class ForgettingWarning(UserWarning):
    """DFMU stopped forgetting short of its own stop because going on would have cost more of what it
    must keep than the guard's tolerance allows (``info["forget_side"]["ended"] == "guard"``), or its
    estimate of Retrain saw nothing to move and it changed the model by pruning and fine-tuning alone
    (the message says which, and what to give it)."""


@dataclass
class GuardConfig:
    """The retention guard of :func:`dfmu_ext.unlearn` (``guard=``; ``guard=False`` turns it off).

    Attributes:
        tolerance: the largest drop of the retention score allowed (a fraction: 0.01 is one point);
            None: the task's default (0.01 for classifiers, 0.06 for causal LMs).
        validation: the share of the retain budget set aside to measure it (not trained on).
        min_validation: at least this many samples are set aside (when the budget allows).
        recovery_steps: the most retain-only steps added after the fine-tune while the drop is beyond
            the tolerance; None: as many as the fine-tune ran, at least 20.
        check_every: steps between two measurements during recovery and during an edit.
        prune_allowance: a pruning that drops the score by more than this many tolerances is undone and
            redone with half the units (classifiers, at most three times); None (the default): never.
            Off by default: on the keep suite's whole classes it keeps TA/RA closer to the original's
            but leaves the features' probe where head-mask leaves it (benchmarks/RESULTS.md).
    """

    tolerance: float | None = None
    validation: float = 0.1
    min_validation: int = 8
    recovery_steps: int | None = None
    check_every: int = 10
    prune_allowance: float | None = None

    def validate(self) -> None:
        if self.tolerance is not None and not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"guard.tolerance must be in [0, 1] (a fraction), got {self.tolerance}")
        if not 0.0 < self.validation < 1.0:
            raise ValueError(f"guard.validation must be in (0, 1), got {self.validation}")
        if self.min_validation < 1 or self.check_every < 1 or (self.recovery_steps or 0) < 0:
            raise ValueError("guard: min_validation and check_every must be >= 1, recovery_steps >= 0")
        if self.prune_allowance is not None and not self.prune_allowance >= 0:
            raise ValueError(f"guard.prune_allowance must be >= 0 or None, got {self.prune_allowance}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RetentionGuard:
    """Measures ``measure(model) -> {"p": (n,) right-answer probabilities, "accuracy": a, ...}`` on the
    validation part and keeps each stage's numbers (``stages``), relative to the original's
    (``reference``)."""

    measure: Callable[[nn.Module], dict]
    tolerance: float
    config: GuardConfig
    reference: dict | None = None
    stages: dict[str, dict] = field(default_factory=dict)

    def _measure(self, model: nn.Module) -> dict:
        out = self.measure(model)
        p = out.pop("p").double()
        watched = out.pop("watched", None)
        out["units"] = int(p.numel())
        out["score"] = float(p.mean()) if p.numel() else float("nan")
        if self.reference is not None and not p.numel():   # nothing the original knew to keep
            out.update(drop=0.0, se=0.0, within=True)
        elif self.reference is not None:
            d = self._p - p
            out["drop"], out["se"] = _mean_se(d)
            out["within"] = out["drop"] <= self.tolerance + out["se"]
            # the units nearest the forget set (a sub-class's siblings), when they are a part of the whole:
            # diluted among the rest, their drop passed unseen (digits: 4.2 +- 2.1 points where all 2.0)
            if watched is not None and 1 < int(watched.sum()) < d.numel():
                out["watched_units"] = int(watched.sum())
                out["watched_drop"], out["watched_se"] = _mean_se(d[watched])
                out["within"] = out["within"] and out["watched_drop"] <= self.tolerance + out["watched_se"]
        return out, p

    def start(self, model: nn.Module) -> dict:
        self.reference, self._p = self._measure(model)
        self.stages["original"] = self.reference
        return self.reference

    def check(self, model: nn.Module, stage: str | None = None) -> dict:
        """Measure now; record it under ``stage`` (when given); return it with its ``drop``, the
        drop's standard error ``se`` and whether it is ``within`` :math:`\\tau + \\mathrm{SE}`."""
        now, _ = self._measure(model)
        if stage is not None:
            self.stages[stage] = now
        return now

    def exceeds(self, measured: dict, since: dict) -> bool:
        """Whether ``measured`` lost more than the allowance against an earlier measurement ``since``
        (the LM edit's own cost: the drop since it started)."""
        return measured["drop"] - since["drop"] > self.tolerance + measured["se"]

    def unresolved(self) -> bool:
        """Whether the final drop (of all units, or of the watched ones) is above the tolerance and
        counted as within only because its standard error exceeds the tolerance itself: the
        validation part is too small to tell."""
        final = self.stages.get("final") or next(reversed(self.stages.values()))
        return bool(final.get("within", True) and any(
            final.get(drop, 0.0) > self.tolerance and final.get(se, 0.0) > self.tolerance
            for drop, se in (("drop", "se"), ("watched_drop", "watched_se"))))

    def report(self, warned: bool) -> dict:
        final = self.stages.get("final") or next(reversed(self.stages.values()))
        return {"tolerance": self.tolerance, "resolved": not self.unresolved(),
                "validation_units": int(self.reference.get("units", 0)),
                "validation_samples": int(self.reference.get("samples", 0)),
                "original": self.reference["score"], "final": final["score"], "drop": final.get("drop", 0.0),
                "se": final.get("se", 0.0), **{k: final[k] for k in WATCHED if k in final},
                "original_accuracy": self.reference.get("accuracy"),
                "final_accuracy": final.get("accuracy"), "within": final.get("within", True), "warned": warned,
                "stages": {k: {kk: v for kk, v in s.items() if not isinstance(v, (list, dict))}
                           for k, s in self.stages.items()}}

    def _watched_words(self, final: dict) -> str:
        if "watched_drop" not in final:
            return ""
        return (f"; on the {final['watched_units']} units nearest the forget set -{100 * final['watched_drop']:.1f} "
                f"points, SE {100 * final['watched_se']:.1f}")

    def warn(self, what: str, extra: str = "") -> None:
        final = self.stages.get("final") or next(reversed(self.stages.values()))
        warnings.warn(
            f"DFMU kept {what} at a right-answer probability of {100 * final['score']:.1f}% on its validation "
            f"part vs the original's {100 * self.reference['score']:.1f}% (-{100 * final['drop']:.1f} points, "
            f"tolerance {100 * self.tolerance:.1f} + SE {100 * final['se']:.1f}; accuracy "
            f"{100 * final['accuracy']:.1f}% vs {100 * self.reference['accuracy']:.1f}%{self._watched_words(final)}): "
            f"it could not forget inside the tolerance{extra}", RetentionWarning, stacklevel=caller_stacklevel())

    def warn_unresolved(self) -> None:
        final = self.stages["final"]
        warnings.warn(
            f"DFMU's validation part measured a drop of {100 * final['drop']:.1f} points of right-answer "
            f"probability, with a standard error of {100 * final['se']:.1f} on {final['units']} units"
            f"{self._watched_words(final)}: above the tolerance {100 * self.tolerance:.1f} and within a standard "
            f"error larger than it, too few to tell whether what must be kept stayed within the tolerance; set "
            f"more aside (guard=GuardConfig(validation=..., min_validation=...)) or give a larger retain_fraction",
            RetentionWarning, stacklevel=caller_stacklevel())


#: the watched units' numbers a measurement may carry (:meth:`RetentionGuard._measure`)
WATCHED = ("watched_units", "watched_drop", "watched_se")


def _mean_se(d) -> tuple[float, float]:
    """The mean of the paired drops ``d`` and its standard error (0 for one unit)."""
    return float(d.mean()), (float(d.std() / d.numel() ** 0.5) if d.numel() > 1 else 0.0)


def membership_auc(member_losses, nonmember_losses) -> float:
    r"""The AUC of telling members from non-members by a lower loss,
    :math:`P(\ell_{\mathrm{non}} > \ell_{\mathrm{mem}}) + \tfrac12 P(=)`: 0.5 when the forget samples'
    losses are indistinguishable from those of data the model never saw (what Retrain looks like on
    memorised samples), 1 when every forget sample is fitted better than any non-member."""
    import torch

    m = torch.as_tensor(member_losses, dtype=torch.float64).reshape(-1, 1)
    n = torch.as_tensor(nonmember_losses, dtype=torch.float64).reshape(1, -1)
    if m.numel() == 0 or n.numel() == 0:
        raise ValueError("membership_auc needs at least one member and one non-member loss")
    return float(((n > m).double() + 0.5 * (n == m).double()).mean())


def auc_standard_error(auc: float, members: int, nonmembers: int) -> float:
    r"""The standard error of an AUC :math:`A` read off ``members`` and ``nonmembers`` scores (Hanley and
    McNeil, 1982): :math:`\sqrt{\big(A(1-A) + (m-1)(Q_1 - A^2) + (n-1)(Q_2 - A^2)\big) / (mn)}`, with
    :math:`Q_1 = A / (2 - A)` and :math:`Q_2 = 2A^2 / (1 + A)`."""
    if members < 1 or nonmembers < 1 or not 0.0 <= auc <= 1.0:
        raise ValueError(f"auc_standard_error needs an AUC in [0, 1] and counts >= 1, got {auc}, {members}, "
                         f"{nonmembers}")
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = auc * (1 - auc) + (members - 1) * (q1 - auc * auc) + (nonmembers - 1) * (q2 - auc * auc)
    var /= members * nonmembers
    return max(var, 0.0) ** 0.5
