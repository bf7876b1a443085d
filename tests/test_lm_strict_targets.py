"""The forget side's second stage for causal LMs given non-members (issue 27): the task putting its
stricter targets (one made-up person's answer) in its targets and objective alike
(:meth:`CausalLMTask.stricter_targets`), when the stage runs and what it reports
(``dfmu_ext.unlearn._forget_side``), and end-to-end runs with non-members."""
from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch

import dfmu_ext
from dfmu_ext.lm.targets import LMForgetTermConfig
from dfmu_ext.tasks.base import Targets
from dfmu_ext.tasks.causal_lm import CausalLMTask
from test_lm_own_token_floor import _case, _people

U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)


def _lm_objective(teacher, forget, term):
    """An :class:`LMObjective` holding only what the second stage reads and writes."""
    from dfmu_ext.tasks.lm_finetune import LMObjective

    objective = LMObjective.__new__(LMObjective)
    objective.teacher, objective.forget, objective.term = teacher, forget, term
    return objective


def test_the_causal_lm_task_puts_one_neighbours_targets_in_its_targets_and_objective(monkeypatch):
    """The second stage's targets: the original's (the teacher's) answer for each forget row's first
    swapped neighbour, each keeping the own token only as its best guess, the informative positions
    only, floored; put in the targets and the objective alike. Nothing changes without its source, a
    teacher, a forget term, single-process training or ``strict_stage``."""
    import dfmu_ext.tasks.causal_lm as C
    from dfmu_ext.tasks.lm_finetune import LMObjective

    q, labels, scored = _case(n=3, t=5, vocab=11, seed=4)
    xq = {"input_ids": labels.clamp_min(0)}
    near = types.SimpleNamespace(head=lambda count: ("head", count))
    teacher, calls = object(), []

    def template_targets(model, forget, neighbours, own_token_if_top):
        calls.append((model, forget[1] is labels, neighbours, own_token_if_top))
        return q

    monkeypatch.setattr(C, "template_targets", template_targets)
    monkeypatch.setattr(C, "informative", lambda got, model, x, kl: calls.append(("informative", model, kl)) or got)
    term = LMForgetTermConfig(own_token_floor=0.02)
    targets = Targets(("x", "q", "where"), [0], {"_one_neighbour": (xq, labels, near)})
    objective = _lm_objective(teacher, ("x", "q", "where"), term)
    assert CausalLMTask().stricter_targets(targets, objective)
    assert calls == [(teacher, True, ("head", 3), True), ("informative", teacher, CausalLMTask.target_min_kl)]
    one = targets.payload[1]
    assert targets.payload[0] is xq and torch.equal(targets.payload[2], one.scored)
    assert objective.forget[0] == "x" and objective.forget[1] is one and torch.equal(objective.forget[2], one.scored)
    assert torch.equal(one.floored, q.with_floor(labels, 0.02).floored) and torch.equal(one.weights, q.weights)

    class Parallel(LMObjective):   # (torchrun's objective: its teacher is sharded)
        pass

    fresh = lambda: Targets(("x", "q", "where"), [0], {"_one_neighbour": (xq, labels, near)})  # noqa: E731
    for targets, objective in ((Targets(("x", "q", "where"), [0]), _lm_objective(teacher, ("x",), term)),
                               (fresh(), _lm_objective(None, ("x",), term)),
                               (fresh(), _lm_objective(teacher, None, term)),
                               (fresh(), _lm_objective(teacher, ("x",), LMForgetTermConfig(strict_stage=False))),
                               (fresh(), types.SimpleNamespace(teacher=teacher, forget=("x",), term=term))):
        assert not CausalLMTask().stricter_targets(targets, objective) and targets.payload[1] == "q"
    parallel = Parallel.__new__(Parallel)
    parallel.teacher, parallel.forget, parallel.term = teacher, ("x",), term
    assert not CausalLMTask().stricter_targets(fresh(), parallel)
    monkeypatch.setattr(C, "template_targets", lambda *a, **k: None)   # no neighbour differs anywhere
    assert not CausalLMTask().stricter_targets(fresh(), _lm_objective(teacher, ("x",), term))
    with pytest.raises(ValueError, match="strict_stage must be True or False"):
        LMForgetTermConfig(strict_stage=1).validate()


class _Task:
    """A task stand-in: the estimate's gap falls along ``gaps``; stricter targets when ``stricter``."""

    forget_gap_stop = 0.05

    def __init__(self, gaps, stricter=True):
        self.gaps, self.stricter, self.calls = list(gaps), stricter, 0

    def forget_gap(self, *_):
        return self.gaps.pop(0) if len(self.gaps) > 1 else self.gaps[0]

    def losses(self, *_):
        return torch.zeros(1)

    def stricter_targets(self, targets, objective):
        self.calls += 1
        return self.stricter


class _Guard:
    tolerance, config = 0.02, dfmu_ext.GuardConfig()

    def check(self, model, stage=None):
        return {"within": False, "drop": 0.05}


@pytest.mark.parametrize("aucs, stricter, guard, strict", [
    ([0.9, 0.8, 0.8, 0.7, 0.5], True, False, True),   # the estimate met, the AUC still high: the second stage
    ([0.9, 0.58], True, False, False),                 # above its stop, within the noise of 200 + 200 losses
    ([0.9, 0.5], True, False, False),                  # the AUC reached its stop beside the estimate
    ([0.9, 0.8], False, False, False),                 # no stricter targets for this task
    ([0.9], True, True, False),                        # the guard ended the side: no second stage
])
def test_the_second_stage_runs_on_stricter_targets_only_where_non_members_still_tell(monkeypatch, aucs, stricter,
                                                                                      guard, strict):
    read = list(aucs)
    monkeypatch.setattr(U, "run_finetune", lambda *a, **k: None)
    monkeypatch.setattr(U, "membership_auc", lambda *a: read.pop(0) if len(read) > 1 else read[0])
    task = _Task([2.0, 0.04], stricter)
    split = types.SimpleNamespace(forget_set=list(range(400)))
    targets = types.SimpleNamespace(payload=object(), read=list(range(200)))
    objective = types.SimpleNamespace(optimizer=types.SimpleNamespace(lr=1.0))
    side = U._forget_side(task, torch.nn.Linear(2, 2), split, targets, objective, None, None, None, list(range(200)),
                          _Guard() if guard else None, "cpu", False)
    assert side["stop"] == "estimate" and ("strict" in side) == strict
    assert task.calls == (0 if guard or aucs[1] <= 0.58 else 1)
    if not strict:   # (Hanley-McNeil on the 200 forget losses read and the 200 non-members)
        assert side["auc_se"] == pytest.approx(dfmu_ext.guard.auc_standard_error(side["auc"], 200, 200))
    if strict:
        stage = side["strict"]
        assert stage["stop"] == "strict" and stage["ended"] == "reached" and stage["threshold"] == 0.55
        assert stage["auc_before"] == 0.8 and stage["auc"] == 0.5 == side["auc"]
        assert stage["extra_forget_steps"] == 20 <= U.FORGET_SIDE_STEPS["strict"]
    elif guard:
        assert side["ended"] == "guard" and side["auc"] == 0.9


@pytest.mark.parametrize("scrambled", [False, True])
def test_unlearn_with_nonmembers_reports_the_second_stage_and_its_final_auc(scrambled):
    """A tiny LM with never-trained people as non-members: the AUC reaches its stop beside the estimate
    and no second stage runs. With their scored tokens scrambled (losses no forgotten fact reaches), the
    AUC stays above it: the second stage runs, on its own limit, and its AUC is the side's final one."""
    from _lm_tiny import make_model, train

    data, owner, vocab = _people(people=14, seed=6)
    train_part = torch.nonzero(owner < 12).flatten().tolist()
    members = data.subset(train_part)
    model = train(make_model(0, vocab=vocab), members, steps=200)
    forget = [train_part.index(i) for i in torch.nonzero(owner == 0).flatten().tolist()]
    nonmembers = data.subset(torch.nonzero(owner >= 12).flatten().tolist())
    if scrambled:
        ids, labels = nonmembers.input_ids.clone(), nonmembers.labels.clone()
        at = labels != -100
        ids[at] = labels[at] = torch.randint(3, vocab, (int(at.sum()),), generator=torch.Generator().manual_seed(0))
        nonmembers = type(nonmembers)(ids, labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dfmu_ext.unlearn(model, members, forget_indices=forget, retain_fraction=0.5, seed=0,
                               nonmembers=nonmembers, guard=False)
    said = [str(w.message) for w in caught if issubclass(w.category, dfmu_ext.ForgettingWarning)]
    side = res.info["forget_side"]
    assert side["stop"] == "estimate" and ("strict" in side) == scrambled
    if scrambled:
        stage = side["strict"]
        assert stage["stop"] == "strict" and side["auc"] == stage["auc"] > stage["threshold"] == 0.55
        assert 0 < stage["extra_forget_steps"] <= U.FORGET_SIDE_STEPS["strict"] and stage["ended"] != "guard"
        # the warning gives the second stage's numbers
        assert len(said) == 1 and f"AUC {stage['auc']:.3f} after the forget side's {stage['extra_forget_steps']} " \
            f"extra steps ({stage['auc_before']:.3g} before" in said[0]
    else:
        assert side["auc"] <= side["auc_threshold"]
