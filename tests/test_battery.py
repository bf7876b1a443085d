"""Tests of dfmu_ext.battery: known answers (blind features, head-mask, self-distance), input hygiene,
determinism and bad inputs. Small synthetic data and scikit-learn's digits: seconds in all."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dfmu_ext import baselines
from dfmu_ext.eval.attacks import prototype_attack, relearn_attack
from dfmu_ext.eval.battery import collateral, default_stages, probe_by_depth, tv_distance
from dfmu_ext.eval import evaluate
from dfmu_ext.zoo.models import ResNet18, SmallCNN


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# fixtures: a synthetic 4-class problem whose class 3 a "blind" model cannot tell from class 2,
# and a small CNN trained on digits
# --------------------------------------------------------------------------------------------

def _synthetic(counts, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = 3.0 * F.one_hot(y, 4).float() + 0.3 * torch.randn(y.numel(), 4, generator=g)
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def synth():
    """(train, test, decoy): class 2 is twice as frequent as class 3 in training (a probe that cannot
    tell them apart says "2"); the test set's class-3 inputs are its class-2 inputs with coordinates 2
    and 3 swapped; ``decoy`` is the test set with those class-3 inputs replaced by the class-2 inputs
    themselves (labelled 3), i.e. inputs that carry no class-3 information at all."""
    train, test = _synthetic([100, 100, 200, 100], 0), _synthetic([50, 50, 50, 50], 1)
    x, y = test.tensors[0].clone(), test.tensors[1]
    x[y == 3] = x[y == 2][:, [0, 1, 3, 2]]
    decoy = x.clone()
    decoy[y == 3] = x[y == 2]
    return train, TensorDataset(x, y), TensorDataset(decoy, y)


def _feature_model(blind: bool) -> nn.Sequential:
    """ReLU([x; -x]) features (8-d) -> Linear(8, 4) classifier reading the positive half.
    ``blind``: input coordinate 3 is wired like coordinate 2, so classes 2 and 3 share features."""
    a = torch.cat([torch.eye(4), -torch.eye(4)])
    if blind:
        a[:, 3] = a[:, 2]
    enc = nn.Linear(4, 8, bias=False)
    head = nn.Linear(8, 4)
    with torch.no_grad():
        enc.weight.copy_(a)
        head.weight.copy_(torch.cat([torch.eye(4), torch.zeros(4, 4)], 1) * 2.0)
        head.bias.zero_()
    return nn.Sequential(enc, nn.ReLU(), head)


@pytest.fixture(scope="module")
def digits_cnn(digits):
    train, test, info = digits
    torch.manual_seed(0)
    model = SmallCNN(info.in_channels, info.num_classes, width=8, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    x, y = train.tensors
    model.train()
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, train, test


def _masked(model, train, cls):
    m = copy.deepcopy(model)
    baselines.head_mask(m, train, [cls], 0.13, progress=False)
    return m


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# known answers
# --------------------------------------------------------------------------------------------

def test_blind_features_are_not_better_than_chance(synth):
    train, test, decoy = synth
    seeing, blind = _feature_model(False), _feature_model(True)
    p_see = probe_by_depth(seeing, train, test, [3], stages=["1"])
    p_blind = probe_by_depth(blind, train, test, [3], stages=["1"])
    assert p_see["penultimate"] >= 0.95 and p_see["1"] >= 0.95
    assert p_blind["penultimate"] <= 0.2 and p_blind["1"] <= 0.2
    assert prototype_attack(seeing, train, test, [3], k=5) >= 0.9
    assert prototype_attack(seeing, train, decoy, [3], k=5) <= 0.1
    # to the blind model class-3 inputs look exactly like class-2 inputs: the prototype's "accuracy" is
    # the rate at which it captures inputs with no class-3 information, not recognition
    assert prototype_attack(blind, train, test, [3], k=5) == prototype_attack(blind, train, decoy, [3], k=5)
    # ... and it captures class-2 inputs as often as class-3 ones
    d = prototype_attack(blind, train, test, [3], k=5, details=True)
    assert d["forget_acc"] == prototype_attack(blind, train, test, [3], k=5)
    assert d["captured"] == pytest.approx(d["forget_acc"] / 3)  # one of the three remaining classes
    assert prototype_attack(seeing, train, test, [3], k=5, details=True)["captured"] <= 0.05


def test_head_mask_leaves_probe_prototype_and_relearn_unchanged(digits_cnn):
    model, train, test = digits_cnn
    masked = _masked(model, train, 3)
    assert evaluate(masked, train, test, [3], mia=False, probe=False)["forget_test_acc"] == 0.0
    assert probe_by_depth(masked, train, test, [3]) == probe_by_depth(model, train, test, [3])
    assert prototype_attack(masked, train, test, [3]) == prototype_attack(model, train, test, [3])
    # the attack re-initialises the forget row and bias, which is all head-mask changed
    kw = dict(k=5, steps=3, attack_seeds=(0,))
    assert relearn_attack(masked, train, test, [3], **kw) == relearn_attack(model, train, test, [3], **kw)


def test_probe_by_depth_matches_metrics_probe_and_default_stages(digits_cnn):
    model, train, test = digits_cnn
    out = probe_by_depth(model, train, test, [5], probe_samples=800, seed=3)
    assert list(out) == ["features.2", "features.6", "features.10", "features.14", "penultimate"]
    ref = evaluate(model, train, test, [5], mia=False, probe_samples=800, seed=3)["probe_forget_acc"]
    assert out["penultimate"] == ref
    assert all(0.0 <= v <= 1.0 for v in out.values())
    assert default_stages(ResNet18(1, 10, width=4), torch.zeros(1, 1, 8, 8)) == [f"layer{i}" for i in range(1, 5)]


def test_tv_distance_and_collateral_known_answers(digits_cnn):
    model, train, test = digits_cnn
    assert tv_distance(model, copy.deepcopy(model), test, [3]) == 0.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.classifier.weight.mul_(0.5)
    tv = tv_distance(model, other, test, [3])
    assert 0.0 < tv <= 1.0 and tv == pytest.approx(tv_distance(other, model, test, [3]))
    self_c = collateral(model, model, test, [3])
    assert self_c["max_drop"] == 0.0 and set(self_c["per_class_drop"]) == set(range(10)) - {3}
    # head-mask only moves predictions away from the forget class: no retained class gets worse
    assert collateral(_masked(model, train, 3), model, test, [3])["max_drop"] <= 0.0
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.classifier.bias[7] = -1e4
    c = collateral(broken, model, test, [3])
    assert c["worst_class"] == 7 and c["max_drop"] > 0.5


def test_relearn_readouts_and_keep_init(digits_cnn):
    model, train, test = digits_cnn
    base = evaluate(model, train, test, [3], mia=False, probe=False)["forget_test_acc"]
    # no learning (tiny lr), row kept: the curve is flat at the model's own forget-class accuracy
    r = relearn_attack(model, train, test, [3], row_init="keep", lr=1e-12, steps=2, attack_seeds=(0, 1))
    assert r["acc_mean"] == pytest.approx(base) and r["auc_mean"] == pytest.approx(base)
    assert len(r["curve_mean"]) == 3 and len(r["acc_per_seed"]) == 2
    masked = _masked(model, train, 3)
    assert relearn_attack(masked, train, test, [3], row_init="keep", lr=1e-12, steps=2)["acc_mean"] == 0.0
    # a real attack on a model that knows the class brings it back
    r = relearn_attack(masked, train, test, [3], k=5, steps=10, head_only=True, row_init="random")
    assert r["acc_mean"] > 0.5 and 0.0 <= r["auc_mean"] <= 1.0
    # constant lr, draws made before training: a short attack is the prefix of a longer one
    short = relearn_attack(model, train, test, [3], steps=2, attack_seeds=(0,))
    long = relearn_attack(model, train, test, [3], steps=4, attack_seeds=(0,))
    assert long["curve_mean"][:3] == short["curve_mean"]


# --------------------------------------------------------------------------------------------
# hygiene: inputs untouched, modes restored, deterministic
# --------------------------------------------------------------------------------------------

def test_functions_never_modify_their_inputs_and_are_deterministic(digits_cnn):
    model, train, test = digits_cnn
    model = copy.deepcopy(model).train()
    before = copy.deepcopy(model.state_dict())
    ref = _masked(model, train, 3)
    kw = dict(k=3, steps=2, attack_seeds=(1,), lr=0.01)  # a step size at which head-only differs in 2 steps
    r1 = relearn_attack(model, train, test, [3], **kw)
    r2 = relearn_attack(model, train, test, [3], **kw)
    assert r1 == r2
    assert relearn_attack(model, train, test, [3], head_only=True, **kw) != r1
    assert prototype_attack(model, train, test, [3], seed=4) == prototype_attack(model, train, test, [3], seed=4)
    assert probe_by_depth(model, train, test, [3], probe_samples=300) == \
        probe_by_depth(model, train, test, [3], probe_samples=300)
    tv_distance(model, ref, test, [3])
    collateral(model, ref, test, [3])
    assert _same_state(before, model.state_dict())
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks))


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc", [
    (lambda m, tr, te: probe_by_depth(m, tr, te, []), ValueError),
    (lambda m, tr, te: probe_by_depth(m, tr, te, [10]), ValueError),
    (lambda m, tr, te: probe_by_depth(m, tr, te, [3], stages=["nope"]), ValueError),
    (lambda m, tr, te: probe_by_depth(m, tr, te, [3], stages="features.2"), TypeError),
    (lambda m, tr, te: probe_by_depth(m, tr, te, [3], probe_samples=0), ValueError),
    (lambda m, tr, te: probe_by_depth("model", tr, te, [3]), TypeError),
    (lambda m, tr, te: relearn_attack(m, tr, te, [3], k=0), ValueError),
    (lambda m, tr, te: relearn_attack(m, tr, te, [3], k=10 ** 6), ValueError),
    (lambda m, tr, te: relearn_attack(m, tr, te, [3], row_init="zeros"), ValueError),
    (lambda m, tr, te: relearn_attack(m, tr, te, [3], lr=-1.0), ValueError),
    (lambda m, tr, te: relearn_attack(m, tr, te, [3], attack_seeds=()), ValueError),
    (lambda m, tr, te: relearn_attack(m, tr, te, list(range(10))), ValueError),
    (lambda m, tr, te: prototype_attack(m, tr, te, [3], k=-1), ValueError),
    (lambda m, tr, te: prototype_attack(m, tr, TensorDataset(te.tensors[0][:0], te.tensors[1][:0]), [3]),
     ValueError),
    (lambda m, tr, te: tv_distance(m, None, te, [3]), TypeError),
    (lambda m, tr, te: tv_distance(m, nn.Linear(2, 5), te, [3]), ValueError),
    (lambda m, tr, te: collateral(m, m, TensorDataset(te.tensors[0][te.tensors[1] != 3],
                                                      te.tensors[1][te.tensors[1] != 3]), [3]), ValueError),
    (lambda m, tr, te: collateral(m, m, te, "3"), TypeError),
])
def test_bad_inputs_raise(digits_cnn, call, exc):
    model, train, test = digits_cnn
    with pytest.raises(exc):
        call(model, train, test)


def test_evaluate_with_the_battery(digits_cnn):
    from dfmu_ext.eval import BATTERY_KEYS

    model, train, test = digits_cnn
    masked = _masked(model, train, 3)
    m = evaluate(masked, train, test, [3], battery=True, original=model, reference=model, probe_samples=400)
    assert set(BATTERY_KEYS) <= set(m) and any(k.startswith("probe@") for k in m)
    assert m["collateral"] <= 1e-12  # head-mask changes no remaining class's prediction
    o = evaluate(model, train, test, [3], battery=True, probe_samples=400)
    for key in [k for k in m if k.startswith("probe@")] + ["relearn_k5", "relearn_k20", "relearn_k5_auc"]:
        assert m[key] == o[key], key   # the reset erases head-mask's only change; features are the original's
    assert o["tv_to_reference"] != o["tv_to_reference"]  # nan without a reference
    with pytest.raises(ValueError, match="needs forget_classes"):
        evaluate(model, train, test, forget_indices=[0, 1, 2], battery=True)


def test_compare_and_forget_report_the_battery(tmp_path, monkeypatch, capsys):
    from dfmu_ext import cli
    from dfmu_ext.experiments import run_comparison

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    rep = run_comparison("digits", "mlp", [3], fractions=[0.3], seeds=[0, 1], methods="head-mask,DFMU,Retrain",
                         out_dir=str(tmp_path / "cmp"), battery=True, quiet=True, train_epochs=2)
    assert rep["config"]["methods"][0] == "Retrain"  # run first: the reference of the TV distance
    assert "relearn" in rep["table"] and "| relearn_k5 |" in rep["hiding_vs_forgetting"]
    assert (tmp_path / "cmp" / "frontier.png").stat().st_size > 10_000
    retrain = [r for r in rep["runs"] if r["method"] == "Retrain"]
    assert all(r["metrics"]["tv_to_reference"] == 0.0 for r in retrain)
    ckpt = tmp_path / "o.pt"
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--out", str(ckpt),
                     "--device", "cpu", "--quiet"]) == 0
    assert cli.main(["forget", "--ckpt", str(ckpt), "--classes", "3", "--out", str(tmp_path / "f.pt"), "--device",
                     "cpu", "--quiet", "--battery", "--retrain", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| relearn |" in out and "TV to Retrain" in out and "linear probe by depth" in out
