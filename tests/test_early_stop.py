"""The fine-tune's early stop (:func:`dfmu_ext.finetune.run_finetune`): it fires once the running retain
accuracy over ``window`` samples reaches the target, and never while a fixed-length forget phase runs."""
import contextlib

import pytest
import torch

from dfmu_ext.finetune import FinetuneConfig, MomentumSGD, Objective, run_finetune
from dfmu_ext.pruning import MaskPlan


class _Always(Objective):
    """Every batch is answered right (``seen`` samples a step), so only the window and the forget
    phase decide when the early stop fires; records which steps carried the forget term."""

    def __init__(self, forget_steps, seen=64, epochs=1, steps_per_epoch=100):
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = MomentumSGD([self.w], lr=0.1)
        self.forget_steps, self.seen, self.epochs = forget_steps, seen, epochs
        self.steps_per_epoch, self.phases = steps_per_epoch, []

    def context(self):
        return contextlib.nullcontext()

    def batches(self, epoch, progress):
        return [None] * self.steps_per_epoch

    def loss(self, batch, forget_phase):
        self.phases.append(forget_phase)
        return (self.w - 1).pow(2).sum(), self.seen, self.seen


def _run(objective, window=256, target=0.99, **kw):
    config = FinetuneConfig(window=window, min_fraction=0.0)
    return run_finetune(objective, MaskPlan(), config, target_accuracy=target, **kw)


@pytest.mark.parametrize("forget_steps", [7, 12, 30])
@pytest.mark.parametrize("seen", [64, 100])
def test_the_early_stop_waits_for_the_end_of_the_forget_phase(forget_steps, seen):
    objective = _Always(forget_steps, seen=seen)
    history = _run(objective)
    need = -(-256 // seen)                    # steps whose samples fill the window
    assert history.stopped_early and history.steps == forget_steps + need
    assert objective.phases == [True] * forget_steps + [False] * need


@pytest.mark.parametrize("forget_steps", [0, None])
def test_without_a_fixed_phase_the_window_counts_from_the_first_step(forget_steps):
    # no forget term (0), or a term on every step (None: the attribute task's): unchanged
    objective = _Always(forget_steps)
    history = _run(objective)
    assert history.stopped_early and history.steps == 4


def test_a_phase_longer_than_the_run_never_stops_early():
    objective = _Always(150, epochs=1, steps_per_epoch=100)
    history = _run(objective)
    assert not history.stopped_early and history.steps == 100 and all(objective.phases)


def test_recovery_steps_leave_the_term_out_and_stop_at_max_steps():
    # the guard's recovery: no target accuracy, the forget term off, a fixed number of steps
    objective = _Always(12)
    history = _run(objective, target=None, max_steps=5, forget=False)
    assert history.steps == 5 and history.recovery_steps == 5 and objective.phases == [False] * 5
