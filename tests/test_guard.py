"""The retention guard, distillation and the task seam's one-line errors (dfmu_ext.guard,
dfmu_ext.finetune.distill_loss, dfmu_ext.unlearn)."""
import copy
import importlib
import json
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

import dfmu_ext
from dfmu_ext.finetune import distill_loss
from dfmu_ext.guard import GuardConfig, RetentionGuard, RetentionWarning
from dfmu_ext.tasks.base import hold_out

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp_data(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 8, generator=g) + 2.0 * F.one_hot(y, 8).float()
    return TensorDataset(x, y)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def trained():
    data = _mlp_data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model.eval(), data


def test_hold_out_is_a_seeded_disjoint_share():
    base = Subset(list(range(100)), list(range(10, 60)))
    train, val = hold_out(base, 0.1, seed=3, minimum=8)
    assert len(val) == 8 and len(train) == 42                       # max(minimum, round(0.1 * 50))
    assert not set(train.indices) & set(val.indices) and set(train.indices) | set(val.indices) == set(base.indices)
    assert hold_out(base, 0.1, seed=3, minimum=8)[1].indices == val.indices
    assert hold_out(base, 0.1, seed=4, minimum=8)[1].indices != val.indices
    assert len(hold_out(base, 0.5, 0)[1]) == 25
    assert len(hold_out(base, 0.0, 0)[1]) == 0 and len(hold_out(base, 0.0, 0)[0]) == 50
    tiny = Subset(list(range(5)), [1, 2])
    assert len(hold_out(tiny, 0.1, 0, minimum=8)[0]) == 1           # never all of the budget


def test_guard_drop_and_standard_error_by_hand():
    seq = iter([torch.tensor([0.9, 0.8, 0.7, 1.0]), torch.tensor([0.8, 0.8, 0.5, 0.9])])
    guard = RetentionGuard(lambda m: {"p": next(seq), "accuracy": 1.0}, 0.05, GuardConfig())
    guard.start(None)
    now = guard.check(None, "x")
    d = torch.tensor([0.1, 0.0, 0.2, 0.1], dtype=torch.float64)
    assert now["drop"] == pytest.approx(float(d.mean()))
    assert now["se"] == pytest.approx(float(d.std() / 2))
    assert now["within"] == (float(d.mean()) <= 0.05 + float(d.std() / 2))
    assert guard.stages["x"] is now and guard.reference["score"] == pytest.approx(0.85)


def _guard_after(final_p, tolerance=0.01):
    """A guard whose original measured p = 0.9 on each unit and whose final measurement is ``final_p``."""
    seq = iter([torch.full((len(final_p),), 0.9), torch.tensor(final_p)])
    guard = RetentionGuard(lambda m: {"p": next(seq), "accuracy": 1.0}, tolerance, GuardConfig())
    guard.start(None)
    return guard


@pytest.mark.parametrize("final_p, unresolved", [
    ([0.9, 0.9, 0.9, 0.66], True),     # drop 6 points, SE 6: above the tolerance, let through by the SE alone
    ([0.9, 0.9, 0.9, 0.9], False),     # no drop
    ([0.895, 0.895, 0.895, 0.895], False),   # drop 0.5 points: inside the tolerance itself
    ([0.87, 0.875, 0.87, 0.875], False),     # drop 2.75 points, SE 0.14: beyond the allowance (not within)
    ([0.9, 0.9, 0.9, 0.85], True),     # drop 1.25 points, SE 1.25: just above both
])
def test_unresolved_is_a_drop_above_the_tolerance_let_through_by_a_larger_standard_error(final_p, unresolved):
    guard = _guard_after(final_p)
    guard.stages["final"] = now = guard.check(None)
    d = 0.9 - torch.tensor(final_p, dtype=torch.float64)
    se = float(d.std() / 2)
    want = bool(now["within"] and float(d.mean()) > 0.01 and se > 0.01)
    assert guard.unresolved() == want == unresolved
    assert guard.report(warned=False)["resolved"] == (not want)


def test_the_watched_units_are_held_within_the_tolerance_on_their_own():
    # 8 units, the last 3 watched (a sub-class's siblings): 5 drop 0.3 points, the watched 3.5 each
    orig = torch.full((8,), 0.9)
    now = torch.tensor([0.897] * 5 + [0.865, 0.865, 0.865])
    mask = torch.tensor([False] * 5 + [True] * 3)
    seq = iter([orig, now])
    guard = RetentionGuard(lambda m: {"p": next(seq), "accuracy": 1.0, "watched": mask}, 0.01, GuardConfig())
    guard.start(None)
    out = guard.check(None, "final")
    d = (orig - now).double()
    assert out["drop"] == pytest.approx(float(d.mean())) and out["drop"] <= 0.01 + out["se"]   # all: within
    assert out["watched_units"] == 3 and out["watched_drop"] == pytest.approx(0.035)
    assert out["watched_se"] == pytest.approx(0.0, abs=1e-9) and not out["within"]          # the watched: not
    assert {"watched_units", "watched_drop", "watched_se"} <= set(guard.report(warned=True))
    # every unit watched (random samples: the forget samples carry every label) is the whole: nothing more
    seq = iter([orig, now])
    every = RetentionGuard(lambda m: {"p": next(seq), "accuracy": 1.0, "watched": torch.ones(8, dtype=torch.bool)},
                           0.01, GuardConfig())
    every.start(None)
    assert "watched_drop" not in every.check(None)


def test_keep_warns_when_the_validation_part_cannot_resolve_the_tolerance():
    U = importlib.import_module("dfmu_ext.unlearn")
    from dfmu_ext.finetune import FinetuneHistory

    guard = _guard_after([0.9, 0.9, 0.9, 0.66])
    with pytest.warns(RetentionWarning, match=r"drop of 6.0 points .* standard error of 6.0 on 4 units: above the "
                                              r"tolerance 1.0 .* too few to tell") as caught:
        warned = U._keep(guard, None, None, None, None, FinetuneHistory(), False)
    assert warned and caught[0].filename == __file__
    resolved = _guard_after([0.9, 0.9, 0.9, 0.9])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not U._keep(resolved, None, None, None, None, FinetuneHistory(), False)


def test_distill_loss_is_the_kl_from_the_original():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    pt = t.softmax(1)
    want = (pt * (pt.log() - s.log_softmax(1))).sum(1).mean()
    assert torch.allclose(distill_loss(s, t).double(), want, atol=1e-6)
    where = torch.tensor([True, False, True, False, False])
    want = (pt * (pt.log() - s.log_softmax(1))).sum(1)[where].mean()
    assert torch.allclose(distill_loss(s, t, where).double(), want, atol=1e-6)
    assert float(distill_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_unlearn_reports_the_guard_and_reads_no_extra_data(trained):
    model, data = trained
    res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=list(range(0, 600, 25)), retain_fraction=0.3,
                           seed=0)
    g = res.info["guard"]
    assert g["tolerance"] == 0.01 and g["validation_samples"] >= 8 and g["validation_units"] == g["validation_samples"]
    assert set(g["stages"]) >= {"original", "pruned", "fine-tuned", "final"}
    assert "guard" in res.timings and res.timings["guard"] >= 0
    off = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=list(range(0, 600, 25)), retain_fraction=0.3,
                           seed=0, guard=False)
    assert off.info["guard"] is None and off.finetune.recovery_steps == 0
    assert res.retain_samples_used == off.retain_samples_used        # the validation part is inside the budget


def test_the_guard_warns_with_the_trade_when_it_cannot_keep(trained):
    model, data = trained
    # a tolerance of 0 with no recovery allowed: the warning must say so, never silently
    with pytest.warns(RetentionWarning, match="could not forget inside the tolerance") as caught:
        res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=list(range(0, 600, 7)),
                               retain_fraction=0.2, seed=0, finetune=dfmu_ext.FinetuneConfig(epochs=0),
                               selection=dfmu_ext.SelectionConfig(fraction_first=0.9, fraction_last=0.9, min_ratio=0,
                                                                  protect_top=0.0),
                               guard=GuardConfig(tolerance=0.0, recovery_steps=0))
    assert res.info["guard"]["warned"] and not res.info["guard"]["within"]
    # the warning names the user's line (this file), not a line inside dfmu_ext
    assert {w.filename for w in caught if w.category is RetentionWarning} == {__file__}


def test_recovery_steps_are_bounded_and_counted(trained):
    model, data = trained
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RetentionWarning)
        res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=list(range(0, 600, 7)),
                               retain_fraction=0.2, seed=0, finetune=dfmu_ext.FinetuneConfig(min_steps=1, lr=1e-4),
                               selection=dfmu_ext.SelectionConfig(fraction_first=0.9, fraction_last=0.9, min_ratio=0,
                                                                  protect_top=0.0),
                               guard=GuardConfig(tolerance=0.0, recovery_steps=7, check_every=3))
    assert 0 < res.finetune.recovery_steps <= 7
    assert res.finetune.steps >= res.finetune.recovery_steps


def test_the_guard_is_in_the_record(trained, tmp_path):
    model, data = trained
    path = tmp_path / "r.json"
    dfmu_ext.unlearn(copy.deepcopy(model), data, [2], 0.2, seed=0, record=str(path),
                     guard=GuardConfig(tolerance=0.03))
    rec = json.loads(path.read_text())
    assert rec["config"]["guard"]["tolerance"] == 0.03
    # the guard's measurements, not only its settings, and where the forget side stopped
    assert rec["guard"]["tolerance"] == 0.03 and rec["guard"]["validation_units"] >= 8
    assert {"original", "final", "drop", "se", "within", "warned", "stages"} <= set(rec["guard"])
    assert rec["forget_side"] == {"stop": "estimate"}


class _Side:
    """A task, model and guard stand-in for the forget side's loop: the gap falls by 1 per chunk; the
    guard holds until its ``fail_at``-th check."""

    forget_gap_stop = 0.05

    def __init__(self, gaps, fail_at=None):
        self.gaps, self.fail_at, self.checks = list(gaps), fail_at, 0
        self.model = nn.Linear(2, 2)
        self.tolerance, self.config = 0.02, GuardConfig()

    def forget_gap(self, *_):
        return self.gaps.pop(0)

    def check(self, _model, stage=None):
        self.checks += 1
        bad = self.fail_at is not None and self.checks >= self.fail_at
        return {"within": not bad, "drop": 0.031 if bad else 0.0}


def _objective(lr=1.0):
    """An objective stand-in: only its optimizer's learning rate is read (and eased) by the forget side."""
    return types.SimpleNamespace(optimizer=types.SimpleNamespace(lr=lr))


@pytest.mark.parametrize("gaps, fail_at, ended, steps", [
    ([2.0, 1.0, 0.04], None, "reached", 20),   # reached its stop after two chunks
    ([2.0, 1.0, 0.5], 2, "guard", 10),         # the second chunk cost too much, even after a retain chunk
])
def test_forget_side_says_why_it_stopped_and_warns_the_refused_trade(monkeypatch, gaps, fail_at, ended, steps):
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    monkeypatch.setattr(U, "run_finetune", lambda *a, **k: None)
    fake = _Side(gaps, fail_at)
    targets = type("T", (), {"payload": object()})()
    objective = _objective()
    side = U._forget_side(fake, fake.model, None, targets, objective, None, None, None, None, fake, "cpu", False)
    assert side["ended"] == ended and side["extra_forget_steps"] == steps and side["threshold"] == 0.05
    assert objective.optimizer.lr == 1.0                                 # the side's easing is its own
    if ended == "guard":
        assert side["gap"] == 1.0 and side["refused_drop"] == 0.031      # the state before the refused chunk
        # the refused chunk was tried at the full step size and then at 1/2 and 1/4 of it, each undone with
        # its FORGET_SIDE_RECOVERY chunks of retain-only steps
        assert side["easings"] == U.FORGET_SIDE_EASINGS == 2
        assert side["undone_steps"] == 3 * 10 * (1 + U.FORGET_SIDE_RECOVERY)
        refused = (r"estimate of Retrain is 1, above its stop 0.05 \(2 before the forget side's 10 extra "
                   r"steps\).*one more chunk, in steps 4x smaller, cost 3.1 points .* \(tolerance 2.0\)")
        with pytest.warns(dfmu_ext.ForgettingWarning, match=refused) as caught:
            U._warn_forgetting(side, fake)
        assert caught[0].filename == __file__                           # the caller's line
    else:
        assert "refused_drop" not in side


def test_a_refused_chunk_is_retried_in_smaller_steps(monkeypatch):
    """The guard refuses the second chunk at the full learning rate (even after its retain-only chunk)
    and takes it at half: the weights go back to before the refused try, the chunk runs again at lr / 2,
    the side goes on at lr / 2 to its stop, and the optimizer's lr is restored when the side ends."""
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    monkeypatch.setattr(U, "FORGET_SIDE_RECOVERY", 1)
    objective = _objective(0.8)
    runs = []   # (learning rate, forget) of each chunk run

    def chunk(*_a, forget=None, **_k):
        runs.append((objective.optimizer.lr, forget))
        with torch.no_grad():
            fake.model.weight.add_(1.0)

    class Guard:
        tolerance, config = 0.02, GuardConfig()

        def check(self, model, stage=None):   # beyond the tolerance after a full-size forget chunk only
            bad = len(runs) >= 2 and runs[-1] == (0.8, "always") or len(runs) >= 3 and runs[-2] == (0.8, "always")
            return {"within": not bad, "drop": 0.03 if bad else 0.0}

    monkeypatch.setattr(U, "run_finetune", chunk)
    fake = _Side([2.0, 1.0, 0.5, 0.04])
    fake.model.weight.data.zero_()
    targets = type("T", (), {"payload": object()})()
    side = U._forget_side(fake, fake.model, None, targets, objective, None, None, None, None, Guard(), "cpu", False)
    assert runs == [(0.8, "always"), (0.8, "always"), (0.8, False), (0.4, "always"), (0.4, "always")]
    assert side["ended"] == "reached" and side["extra_forget_steps"] == 30 and side["gap"] == 0.04
    assert side["easings"] == 1 and side["undone_steps"] == 20 and "refused_drop" not in side
    assert objective.optimizer.lr == 0.8
    assert torch.equal(fake.model.weight, torch.full_like(fake.model.weight, 3.0))   # 5 chunks, 2 undone


@pytest.mark.parametrize("back_after, kept", [(2, True), (None, False)])
def test_a_chunk_beyond_the_tolerance_gets_retain_only_chunks_before_it_is_refused(monkeypatch, back_after, kept):
    """A forget-side chunk beyond the tolerance is followed by retain-only chunks, at most
    FORGET_SIDE_RECOVERY of them and none after the first check back within it: back within after the
    second, the chunk is kept at its step size; never back, it is undone and retried at half."""
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    monkeypatch.setattr(U, "FORGET_SIDE_RECOVERY", 3)
    monkeypatch.setattr(U, "FORGET_SIDE_EASINGS", 0)
    runs = []

    def chunk(*_a, forget=None, **_k):
        runs.append(forget)

    class Guard:
        tolerance, config = 0.02, GuardConfig()

        def check(self, model, stage=None):   # beyond after the first forget chunk until back_after retain chunks
            retain = len(runs) - 1
            bad = runs[0] == "always" and (back_after is None or retain < back_after)
            return {"within": not bad, "drop": 0.05 if bad else 0.0}

    monkeypatch.setattr(U, "run_finetune", chunk)
    fake = _Side([2.0, 0.04])
    targets = type("T", (), {"payload": object()})()
    side = U._forget_side(fake, fake.model, None, targets, _objective(), None, None, None, None, Guard(), "cpu", False)
    if kept:
        assert runs == ["always", False, False] and side["ended"] == "reached" and side["gap"] == 0.04
        assert side["extra_forget_steps"] == 10 and side["undone_steps"] == 0 and side["easings"] == 0
    else:
        assert runs == ["always", False, False, False] and side["ended"] == "guard" and side["gap"] == 2.0
        assert side["extra_forget_steps"] == 0 and side["undone_steps"] == 40 and side["refused_drop"] == 0.05


def test_forget_side_at_its_step_limit_says_so(monkeypatch):
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    monkeypatch.setattr(U, "run_finetune", lambda *a, **k: None)
    monkeypatch.setitem(U.FORGET_SIDE_STEPS, "estimate", 20)
    fake = _Side([3.0, 2.0, 1.0])
    targets = type("T", (), {"payload": object()})()
    side = U._forget_side(fake, fake.model, None, targets, _objective(), None, None, None, None, None, "cpu", False)
    assert side["ended"] == "limit" and side["gap"] == 1.0 and side["extra_forget_steps"] == 20


def test_forget_side_ends_on_a_plateau_and_keeps_its_lowest_state(monkeypatch):
    # each chunk adds 1 to the weights; the gap falls to 0.5 after chunk 2, then to 0.4 and back above it,
    # never 10% of its starting distance (2.0 - 0.05) lower: FORGET_SIDE_PATIENCE chunks after chunk 2 it
    # ends, with the weights of chunk 3 (its lowest), not of the last chunk
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    after = []   # the weights after each chunk

    def chunk(*_a, **_k):
        with torch.no_grad():
            fake.model.weight.add_(1.0)
        after.append(fake.model.weight.detach().clone())

    monkeypatch.setattr(U, "run_finetune", chunk)
    patience = U.FORGET_SIDE_PATIENCE
    gaps = [2.0, 1.0, 0.5, 0.4] + [0.6, 0.7] * patience   # 0.4 > 0.5 - 0.195: lower, but no progress
    fake = _Side(gaps)
    targets = type("T", (), {"payload": object()})()
    side = U._forget_side(fake, fake.model, None, targets, _objective(), None, None, None, None, None, "cpu", False)
    assert side["ended"] == "plateau" and side["extra_forget_steps"] == 10 * (2 + patience)
    assert side["gap"] == 0.4 and side["kept_steps"] == 30 and side["gap_before"] == 2.0
    assert len(after) == 2 + patience and torch.equal(fake.model.weight, after[2])   # the state after chunk 3

    # steady progress never ends on a plateau: the step limit does
    monkeypatch.setitem(U.FORGET_SIDE_STEPS, "estimate", 10 * (patience + 1))
    fake = _Side([4.0 - 0.4 * i for i in range(patience + 2)])   # 0.4 a chunk > 10% of 4.0 - 0.05
    side = U._forget_side(fake, fake.model, None, targets, _objective(), None, None, None, None, None, "cpu", False)
    assert side["ended"] == "limit" and side["kept_steps"] == side["extra_forget_steps"]


class _SideWithNonmembers(_Side):
    """:class:`_Side` given non-members: their losses are 1 and 2; the forget samples' losses, read
    once before the side and after each chunk, are popped from ``forget_losses``."""

    def __init__(self, gaps, forget_losses):
        super().__init__(gaps)
        self.forget_losses, self.nonmembers = list(forget_losses), torch.tensor([1.0, 2.0])

    def losses(self, _model, data, _device):
        return data if data is self.nonmembers else torch.tensor(self.forget_losses.pop(0))

    def stricter_targets(self, _targets, _objective):   # (Task's default: no second stage)
        return False


def test_nonmembers_beside_the_estimate_end_the_side_once_unseen(monkeypatch):
    # a task with its own estimate (causal LMs): the estimate drives the side, the membership AUC is read
    # beside it; seen (AUC 1: every forget loss below every non-member's) twice, then 0.25 <= 0.55
    U = importlib.import_module("dfmu_ext.unlearn")   # (the package attribute is the function)

    after = []

    def chunk(*_a, **_k):
        with torch.no_grad():
            fake.model.weight.add_(1.0)
        after.append(fake.model.weight.detach().clone())

    monkeypatch.setattr(U, "run_finetune", chunk)
    seen, unseen = [0.1, 0.2], [1.5, 2.5]
    fake = _SideWithNonmembers([2.0, 1.0, 1.5, 0.5], [seen, seen, unseen, seen])
    split, targets = types.SimpleNamespace(forget_set=[0, 1]), types.SimpleNamespace(payload=object(), read=[0, 1])
    side = U._forget_side(fake, fake.model, split, targets, _objective(), None, None, None, fake.nonmembers, None,
                          "cpu", False)
    # ended by the AUC after two chunks, with the last chunk's state although the first measured a lower gap
    assert side["stop"] == "estimate" and side["ended"] == "reached" and side["extra_forget_steps"] == 20
    assert side["gap"] == 1.5 and side["kept_steps"] == 20 and torch.equal(fake.model.weight, after[-1])
    assert (side["auc_before"], side["auc"], side["auc_threshold"]) == (1.0, 0.25, 0.55)

    # never unseen: the side runs as without non-members (the same steps, gap and kept state) and says so
    gaps = [2.0, 1.0, 0.5, 0.4] + [0.6, 0.7] * U.FORGET_SIDE_PATIENCE
    alone = U._forget_side(_Side(gaps), fake.model, None, targets, _objective(), None, None, None, None, None, "cpu",
                           False)
    fake = _SideWithNonmembers(gaps, [seen] * len(gaps))
    side = U._forget_side(fake, fake.model, split, targets, _objective(), None, None, None, fake.nonmembers, None,
                          "cpu", False)
    assert {k: side[k] for k in alone} == alone and side["auc"] == 1.0
    told = r"loss attack still tells .* membership AUC 1.000 after the forget side's 100 extra steps \(1 before; "
    with pytest.warns(dfmu_ext.ForgettingWarning, match=told + r"stop 0.55.*because its measure stopped moving"):
        U._warn_membership(side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        U._warn_membership({**side, "auc": 0.5})                        # unseen: nothing to say


def test_edit_rollback_restores_the_weights_exactly():
    from dfmu_ext.lm.edit import EditConfig
    from dfmu_ext.tasks.causal_lm import projected_edit

    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    before = lin.weight.detach().clone()

    class Layer:
        name, weight, unit_dim = "l", lin.weight, 1

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, input_ids, attention_mask=None):
            return self.lin(input_ids)

    class AlwaysWorse:
        config = GuardConfig(check_every=2)

        def check(self, model):
            return {"drop": 0.0, "se": 0.0}

        def exceeds(self, now, since):
            return True

    class Plan:
        def apply(self, opt=None):
            pass

    from dfmu_ext.model_io import Inputs
    xf = Inputs({"input_ids": torch.randn(2, 5, 4)})
    q = torch.full((2, 4, 3), 1 / 3)
    scored = torch.ones(2, 4, dtype=torch.bool)
    kept = projected_edit(Model(), [Layer], (xf, q, scored), {"l": torch.eye(4)}, Plan(), EditConfig(steps=6),
                          torch.device("cpu"), 0, guard=AlwaysWorse())
    assert kept == 0 and torch.equal(lin.weight.detach(), before)


@pytest.mark.parametrize("bad, match", [
    (dict(guard=GuardConfig(tolerance=2.0)), "tolerance"),
    (dict(guard=GuardConfig(validation=0.0)), "validation"),
    (dict(edit=object()), "edit is not supported"),
    (dict(forget_attribute=[0] * 600), "does not take forget_(attribute|classes)"),
    (dict(finetune=dfmu_ext.tasks.LMFinetuneConfig()), "FinetuneConfig"),
])
def test_bad_keywords_are_one_line_errors_and_change_nothing(trained, bad, match):
    model, data = trained
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match) as err:
        dfmu_ext.unlearn(m, data, [1], 0.2, **bad)
    assert "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))


def test_auc_standard_error_by_hand_and_bad_inputs():
    from dfmu_ext.guard import auc_standard_error

    # A = 0.75, 10 and 20 scores: Q1 = 0.6, Q2 = 0.642857; (0.1875 + 9 * 0.0375 + 19 * 0.080357) / 200
    assert auc_standard_error(0.75, 10, 20) == pytest.approx((2.0517857 / 200) ** 0.5, rel=1e-6)
    assert auc_standard_error(1.0, 5, 5) == 0.0 and auc_standard_error(0.5, 1, 1) == pytest.approx(0.5)
    assert auc_standard_error(0.6, 400, 400) < auc_standard_error(0.6, 40, 40)
    for bad in ((1.2, 3, 3), (0.5, 0, 3), (0.5, 3, 0)):
        with pytest.raises(ValueError, match="auc_standard_error needs"):
            auc_standard_error(*bad)


def test_membership_auc_by_hand():
    from dfmu_ext.guard import membership_auc

    assert membership_auc([0.1, 0.2], [0.3, 0.4]) == 1.0          # every member fitted better
    assert membership_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert membership_auc([0.1, 0.3], [0.2, 0.3]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    with pytest.raises(ValueError, match="at least one"):
        membership_auc([], [0.1])


def test_nonmembers_set_where_forgetting_stops(trained):
    model, data = trained
    fresh = _mlp_data(200, seed=9)                                 # never trained on
    idx = list(range(0, 600, 20))
    res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=idx, retain_fraction=0.3, seed=0,
                           nonmembers=fresh)
    side = res.info["forget_side"]
    assert side["stop"] == "nonmembers" and 0.0 <= side["auc"] <= 1.0 and side["extra_forget_steps"] <= 60
    if side["lever"] and side["extra_forget_steps"] == 0:
        assert side["auc_before"] <= 0.55                          # already indistinguishable
    assert dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=idx, retain_fraction=0.3,
                            seed=0).info["forget_side"] == {"stop": "estimate"}
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="nonmembers is empty"):
        dfmu_ext.unlearn(m, data, forget_indices=idx, nonmembers=Subset(fresh, []))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))


def test_lm_guard_keeps_the_tokens_the_original_knew_float64_reference():
    """The causal-LM guard's unit against a float64 recomputation: per sequence, the least probable of
    the scored tokens the ORIGINAL predicted right, fixed at the first measurement; sequences where it
    knew none are left out."""
    from _lm_tiny import make_model, qa_set, train

    from dfmu_ext.lm.task import IGNORE_INDEX
    from dfmu_ext.tasks.causal_lm import CausalLMTask

    data = qa_set(24, seed=3, answer_len=3)
    original = train(make_model(seed=1), data, steps=4)   # knows some tokens: 20 of 24 sequences hold one
    later = copy.deepcopy(original)
    with torch.no_grad():
        for p in later.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def reference(model, known=None):
        ids, y, mask = data.input_ids, data.labels, data.attention_mask
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, attention_mask=mask).double(), -1)
        ps, marks = [], []
        for i in range(len(data)):
            worst, k_i = None, []
            for t in range(1, ids.shape[1]):
                if y[i, t] == IGNORE_INDEX:
                    continue
                right = logp[i, t - 1, y[i, t]]
                k = bool(logp[i, t - 1].argmax() == y[i, t]) if known is None else known.pop(0)
                k_i.append(k)
                if k:
                    worst = right if worst is None else min(worst, right)
            marks += k_i
            if worst is not None:
                ps.append(math.exp(worst))
        return torch.tensor(ps, dtype=torch.float64), marks

    measure = CausalLMTask().retention_measure(data, torch.device("cpu"))
    first, second = measure(original), measure(later)
    p0, known = reference(original)
    p1, _ = reference(later, list(known))
    assert 0 < len(p0) < len(data)                               # some sequences hold no known token
    assert "known" not in first and first["accuracy"] == 1.0     # every known token is right, by definition
    torch.testing.assert_close(first["p"].double(), p0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second["p"].double(), p1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        CausalLMTask().retention(original, data, "cpu", known=torch.ones(3, dtype=torch.bool))



class _Pruning:
    """A task and guard stand-in for the pruning back-off: each prune zeroes the first
    ``round(20 * share)`` of the weight's 20 rows (share: the selection's ``fraction_last``), and the
    guard's drop is the share of zero rows."""

    prune_halvings = 3

    def __init__(self, allowance):
        self.tolerance, self.config = 0.01, GuardConfig(prune_allowance=allowance)
        self.shares, self.starts = [], []

    def prune(self, model, batch, is_forget, split, configs, mode, comm):
        from dfmu_ext.result import PruneResult

        share = configs["selection"].fraction_last
        self.shares.append(share)
        self.starts.append(model.weight.detach().clone())
        with torch.no_grad():
            model.weight[:round(20 * share)] = 0
        return PruneResult({}, {}, torch.zeros(2), None, 1.0, 0.5, 0.25)

    def check(self, model, stage=None):
        return {"drop": float((model.weight == 0).all(1).double().mean()), "within": True}


@pytest.mark.parametrize("allowance, shares", [
    (2.0, [0.2, 0.1, 0.05, 0.025]),   # drops 0.2, 0.1, 0.05 above 0.02: halved up to the limit (3 times)
    (8.0, [0.2, 0.1, 0.05]),          # 0.2 and 0.1 above 0.08, then 0.05 within
    (25.0, [0.2]),                    # within its allowance at once
    (None, [0.2]),                    # no back-off
])
def test_a_pruning_past_its_allowance_is_undone_and_redone_with_half_the_units(allowance, shares):
    from dfmu_ext.distributed import Comm
    from dfmu_ext.selection import SelectionConfig

    U = importlib.import_module("dfmu_ext.unlearn")
    fake, model = _Pruning(allowance), nn.Linear(3, 20)
    original = model.weight.detach().clone()
    given = SelectionConfig()
    configs = {"selection": given}
    pruned, halvings = U._prune_within(fake, model, None, None, None, configs, "prune", Comm(), fake)
    assert fake.shares == pytest.approx(shares) and halvings == len(shares) - 1
    assert all(torch.equal(start, original) for start in fake.starts)      # every try starts from the original
    assert configs["selection"].fraction_last == pytest.approx(shares[-1]) and given.fraction_last == 0.2
    assert configs["selection"].fraction_first == 0.0 and configs["selection"].min_ratio == given.min_ratio
    assert (pruned.seconds_scoring, pruned.seconds_pruning) == pytest.approx((0.5 * len(shares), 0.25 * len(shares)))


def test_prune_allowance_must_be_non_negative():
    assert GuardConfig().prune_allowance is None                          # off by default
    with pytest.raises(ValueError, match="prune_allowance"):
        GuardConfig(prune_allowance=-1.0).validate()


def test_unlearn_backs_off_a_costly_pruning_when_asked(trained):
    model, data = trained
    heavy = dfmu_ext.SelectionConfig(fraction_first=0.8, fraction_last=0.8, min_ratio=0, protect_top=0.0)
    kw = dict(forget_indices=list(range(0, 600, 7)), retain_fraction=0.3, seed=0, selection=heavy,
              finetune=dfmu_ext.FinetuneConfig(epochs=0))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        off = dfmu_ext.unlearn(copy.deepcopy(model), data, **kw)
        on = dfmu_ext.unlearn(copy.deepcopy(model), data, guard=GuardConfig(prune_allowance=2.0), **kw)
    assert off.info["guard"]["prune_halvings"] == 0
    assert on.info["guard"]["prune_halvings"] >= 1
    assert sum(on.pruned_units.values()) < sum(off.pruned_units.values())
    assert on.info["guard"]["stages"]["pruned"]["drop"] < off.info["guard"]["stages"]["pruned"]["drop"]
