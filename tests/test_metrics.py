"""Tests of dfmu_ext.metrics: hand-checked accuracies, MIA, probe, hook/mode hygiene, bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from dfmu_ext.eval import accuracy
from dfmu_ext.splits import split_forget_retain
from dfmu_ext.eval import (
    METRIC_KEYS,
    evaluate,
    last_linear,
    linear_probe_accuracy,
    mia_efficacy,
    penultimate_features,
    svc_mia_from_probs,
    true_label_probs,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    spin-waiting makes them ~100x slower when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# a model with hand-made logits: input i -> table[i] -> identity Linear
# --------------------------------------------------------------------------------------------

class Lookup(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float())

    def forward(self, x):
        return self.table[x.long().reshape(-1)]


def lookup_model(table: torch.Tensor) -> nn.Sequential:
    """logits(i) = table[i] exactly; the penultimate features are table[i] too."""
    c = table.shape[1]
    head = nn.Linear(c, c)
    with torch.no_grad():
        head.weight.copy_(torch.eye(c))
        head.bias.zero_()
    return nn.Sequential(Lookup(table), head)


def one_hot_logits(pred, c, scale=10.0):
    return scale * torch.nn.functional.one_hot(torch.as_tensor(pred), c).float()


def lookup_sets(train_logits, train_y, test_logits, test_y):
    """(model, train_set, test_set) where sample k of train/test gets the given logits."""
    ntr = len(train_y)
    table = torch.cat([torch.as_tensor(train_logits).float(), torch.as_tensor(test_logits).float()])
    model = lookup_model(table)
    train = TensorDataset(torch.arange(ntr), torch.as_tensor(train_y))
    test = TensorDataset(torch.arange(ntr, ntr + len(test_y)), torch.as_tensor(test_y))
    return model, train, test


def hand_case():
    # 3 classes, forget {2}. Predictions chosen so every accuracy is a known fraction.
    train_y = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    train_p = [0, 1, 0, 1, 1, 0, 1, 2, 0, 1]   # retain: 5/7 right; forget: 1/3 right
    test_y = [0, 1, 1, 2, 2, 0]
    test_p = [0, 1, 0, 2, 2, 2]                 # remaining: 2/4 right; forget: 2/2 right
    return lookup_sets(one_hot_logits(train_p, 3), train_y, one_hot_logits(test_p, 3), test_y)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def small_net(bn: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 32)]
    if bn:
        layers.append(nn.BatchNorm1d(32))
    layers += [nn.ReLU(), nn.Linear(32, 10)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def trained(digits):
    train, _ = digits
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = train.tensors
    model.train()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k


# --------------------------------------------------------------------------------------------
# accuracies, hand-checked
# --------------------------------------------------------------------------------------------

def test_hand_checked_accuracies():
    model, train, test = hand_case()
    out = evaluate(model, train, test, [2], mia=False, probe=False)
    assert tuple(out) == METRIC_KEYS
    assert out["forget_acc"] == pytest.approx(1 / 3)
    assert out["retain_acc"] == pytest.approx(5 / 7)
    assert out["test_acc"] == pytest.approx(2 / 4)
    assert out["forget_test_acc"] == pytest.approx(1.0)
    assert math.isnan(out["mia_efficacy"]) and math.isnan(out["probe_forget_acc"])


def test_hand_checked_two_forget_classes_and_int_spelling():
    model, train, test = hand_case()
    out = evaluate(model, train, test, np.array([2, 0, 2]), mia=False, probe=False, batch_size=3)
    # forget {0, 2}: train forget samples idx 0,1,2,7,8,9 -> right at 0,2,7 -> 3/6
    assert out["forget_acc"] == pytest.approx(3 / 6)
    assert out["retain_acc"] == pytest.approx(3 / 4)      # class 1: idx 3..6, right 3,4,6
    assert out["test_acc"] == pytest.approx(1 / 2)        # class 1 test: idx 1 right, 2 wrong
    assert out["forget_test_acc"] == pytest.approx(3 / 4)  # 0,2,2,0 -> right, right, right, wrong
    single = evaluate(model, train, test, torch.tensor(2), mia=False, probe=False)
    assert single["forget_acc"] == pytest.approx(1 / 3)


def test_accuracies_match_datautil_on_digits(digits, trained):
    train, test = digits
    out = evaluate(trained, train, test, [3], mia=False, probe=False, batch_size=128)
    ftr, rtr = split_forget_retain(train, [3])
    fte, rte = split_forget_retain(test, [3])
    assert out["forget_acc"] == pytest.approx(accuracy(trained, ftr))
    assert out["retain_acc"] == pytest.approx(accuracy(trained, rtr))
    assert out["forget_test_acc"] == pytest.approx(accuracy(trained, fte))
    assert out["test_acc"] == pytest.approx(accuracy(trained, rte))
    assert out["retain_acc"] > 0.9 and out["test_acc"] > 0.85


def test_true_label_probs():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    p = true_label_probs(logits, torch.tensor([1, 0]))
    np.testing.assert_allclose(p, [0.5, 0.75])
    with pytest.raises(ValueError):
        true_label_probs(logits, torch.tensor([0, 2]))


# --------------------------------------------------------------------------------------------
# penultimate features
# --------------------------------------------------------------------------------------------

def test_penultimate_features_is_relu_output():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(23, 5)
    ds = TensorDataset(x, torch.randint(0, 3, (23,)))
    feats, labels = penultimate_features(model, ds, batch_size=4)
    assert feats.shape == (23, 7)
    torch.testing.assert_close(feats, torch.relu(model[0](x)))
    assert torch.equal(labels, ds.tensors[1])
    assert last_linear(model) is model[2]
    assert not model[2]._forward_pre_hooks  # hook removed


def test_penultimate_features_hook_removed_and_mode_restored_on_error():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(nn.Linear(4, 4), Boom(), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    ds = TensorDataset(torch.randn(10, 4), torch.zeros(10, dtype=torch.long))
    with pytest.raises(RuntimeError, match="boom"):
        penultimate_features(model, ds, batch_size=4)
    assert not model[2]._forward_pre_hooks
    assert model.training and model[0].training and not model[1].training and model[2].training


def test_penultimate_features_no_linear():
    model = nn.Sequential(nn.Flatten())
    with pytest.raises(ValueError, match="nn.Linear"):
        penultimate_features(model, TensorDataset(torch.randn(3, 2), torch.zeros(3)))


# --------------------------------------------------------------------------------------------
# SVC membership inference
# --------------------------------------------------------------------------------------------

def test_svc_mia_extremes():
    rng = np.random.default_rng(0)
    shadow_in = rng.uniform(0.9, 1.0, 300)    # members: confident
    shadow_out = rng.uniform(0.0, 0.3, 300)   # non-members: unsure
    like_out = rng.uniform(0.0, 0.3, 50)
    like_in = rng.uniform(0.9, 1.0, 50)
    assert svc_mia_from_probs(shadow_in, shadow_out, like_out) == 1.0
    assert svc_mia_from_probs(shadow_in, shadow_out, like_in) == 0.0
    half = np.concatenate([like_out[:25], like_in[:25]])
    assert svc_mia_from_probs(shadow_in, shadow_out, half) == 0.5


def test_svc_mia_cap_and_seed():
    rng = np.random.default_rng(1)
    shadow_in = rng.uniform(0.5, 1.0, 2000)
    shadow_out = rng.uniform(0.0, 0.6, 800)
    target = rng.uniform(0.0, 1.0, 100)
    a = svc_mia_from_probs(shadow_in, shadow_out, target, max_per_side=100, seed=3)
    b = svc_mia_from_probs(shadow_in, shadow_out, target, max_per_side=100, seed=3)
    assert a == b and 0.0 <= a <= 1.0
    # clearly separable points are classified the same whatever the sample
    assert svc_mia_from_probs(shadow_in, shadow_out, [0.01, 0.02], max_per_side=50) == 1.0
    assert svc_mia_from_probs(shadow_in, shadow_out, [0.99, 0.98], max_per_side=50) == 0.0
    with pytest.raises(ValueError):
        svc_mia_from_probs([], shadow_out, target)
    with pytest.raises(ValueError):
        svc_mia_from_probs(shadow_in, shadow_out, [])
    with pytest.raises(ValueError):
        svc_mia_from_probs(shadow_in, shadow_out, target, max_per_side=0)
    with pytest.raises(ValueError):
        svc_mia_from_probs(shadow_in, shadow_out, [np.nan])


def _mia_case(forget_conf: float):
    """Retain train: p_y≈0.99; remaining test: p_y≈0.3-0.5; forget train: p_y≈forget_conf."""
    rng = np.random.default_rng(0)
    c = 3

    def rows(labels, conf):
        # logits [a, 0, 0] permuted to the label: p_y = e^a / (e^a + 2)
        a = np.log(2 * conf / (1 - conf))
        out = torch.zeros(len(labels), c)
        out[torch.arange(len(labels)), torch.as_tensor(labels)] = torch.as_tensor(a, dtype=torch.float32)
        return out

    retain_y = rng.integers(0, 2, 60)
    forget_y = np.full(20, 2)
    test_rem_y = rng.integers(0, 2, 40)
    test_f_y = np.full(10, 2)
    train_logits = torch.cat([rows(retain_y, rng.uniform(0.97, 0.995, 60)),
                              rows(forget_y, np.full(20, forget_conf))])
    test_logits = torch.cat([rows(test_rem_y, rng.uniform(0.3, 0.5, 40)),
                             rows(test_f_y, np.full(10, 0.5))])
    return lookup_sets(train_logits, np.concatenate([retain_y, forget_y]),
                       test_logits, np.concatenate([test_rem_y, test_f_y]))


@pytest.mark.parametrize("forget_conf,expected", [(0.4, 1.0), (0.985, 0.0)])
def test_mia_efficacy_model_level(forget_conf, expected):
    model, train, test = _mia_case(forget_conf)
    out = evaluate(model, train, test, [2], probe=False)
    assert out["mia_efficacy"] == expected
    ftr, rtr = split_forget_retain(train, [2])
    _, rte = split_forget_retain(test, [2])
    assert mia_efficacy(model, rtr, ftr, rte) == expected
    with pytest.raises(ValueError):
        mia_efficacy(model, rtr, Subset(train, []), rte)


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------

def test_probe_separable_features_give_one():
    rng = np.random.default_rng(0)
    centers = np.eye(4) * 10.0
    ytr = np.repeat(np.arange(4), 30)
    yte = np.repeat(np.arange(4), 10)
    xtr = centers[ytr] + rng.normal(0, 0.5, (len(ytr), 4))
    xte = centers[yte] + rng.normal(0, 0.5, (len(yte), 4))
    assert linear_probe_accuracy(xtr, ytr, xte, yte, [1]) == 1.0
    assert linear_probe_accuracy(torch.tensor(xtr), torch.tensor(ytr), xte, yte, [1, 3]) == 1.0


def test_probe_constant_features_give_zero_for_minority_class():
    # no information in the features: the probe predicts the majority class (0) everywhere,
    # so the minority forget class 2 scores 0.
    ytr = np.array([0] * 50 + [1] * 30 + [2] * 20)
    xtr = np.ones((100, 3))
    xte = np.ones((12, 3))
    yte = np.array([0] * 4 + [1] * 4 + [2] * 4)
    assert linear_probe_accuracy(xtr, ytr, xte, yte, [2]) == 0.0
    assert linear_probe_accuracy(xtr, ytr, xte, yte, [0]) == 1.0
    # a single training class: that class everywhere
    assert linear_probe_accuracy(xtr[:50], ytr[:50], xte, yte, [0, 2]) == 0.5


def test_probe_bad_inputs():
    x = np.zeros((4, 2))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError):
        linear_probe_accuracy(x, y, x, y, [])
    with pytest.raises(ValueError):
        linear_probe_accuracy(x, y, x, y, [5])          # no forget test sample
    with pytest.raises(ValueError):
        linear_probe_accuracy(x, y[:3], x, y, [1])      # length mismatch
    with pytest.raises(ValueError):
        linear_probe_accuracy(x, y, np.zeros((4, 3)), y, [1])
    with pytest.raises(ValueError):
        linear_probe_accuracy(np.zeros((0, 2)), y[:0], x, y, [1])


def test_probe_in_evaluate_uses_penultimate_features():
    # lookup features are class-separable (train and test alike) although the head predicts
    # class 0 for everything: probe 1.0, forget accuracy 0.
    rng = np.random.default_rng(0)
    ytr = np.repeat(np.arange(3), 20)
    yte = np.repeat(np.arange(3), 5)
    feats = lambda y: torch.tensor(np.eye(3)[y] * 5 + rng.normal(0, 0.3, (len(y), 3)),
                                   dtype=torch.float32)
    model, train, test = lookup_sets(feats(ytr), ytr, feats(yte), yte)
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    out = evaluate(model, train, test, [2], mia=False, probe_samples=45)
    assert out["forget_acc"] == 0.0 and out["forget_test_acc"] == 0.0
    assert out["probe_forget_acc"] == 1.0


def test_head_mask_keeps_probe(digits, trained):
    """Zeroing the forget rows of the head forgets at the output but not in the features."""
    import copy

    train, test = digits
    base = evaluate(trained, train, test, [3], mia=False, probe_samples=1000)
    masked = copy.deepcopy(trained)
    with torch.no_grad():
        masked[-1].weight[3].zero_()
        masked[-1].bias[3] = -1e4
    out = evaluate(masked, train, test, [3], mia=False, probe_samples=1000)
    assert out["forget_acc"] == 0.0
    assert out["probe_forget_acc"] == base["probe_forget_acc"] > 0.8


# --------------------------------------------------------------------------------------------
# hygiene: mode, state, determinism, ranges
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [True, False])
def test_evaluate_restores_mode_and_keeps_state(digits, trained, mode):
    train, test = digits
    trained.train(mode)
    before = clone_state(trained)
    out = evaluate(trained, train, test, [3, 7], probe_samples=800)
    assert trained.training is mode
    assert all(m.training is mode for m in trained.modules())
    assert_same_state(trained, before)  # BatchNorm running stats untouched
    assert not last_linear(trained)._forward_pre_hooks
    assert tuple(out) == METRIC_KEYS
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())
    trained.eval()


def test_evaluate_no_grad(digits):
    train, test = digits
    model = small_net(bn=False)
    grad_seen = []
    model[-1].register_forward_hook(lambda m, i, o: grad_seen.append(torch.is_grad_enabled()))
    evaluate(model, train, test, [0], mia=False, probe_samples=200)
    assert grad_seen and not any(grad_seen)
    assert all(p.grad is None for p in model.parameters())


def test_evaluate_deterministic(digits, trained):
    train, test = digits
    a = evaluate(trained, train, test, [5], probe_samples=600, seed=4)
    b = evaluate(trained, train, test, [5], probe_samples=600, seed=4)
    assert a == b


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------

def test_bad_inputs():
    model, train, test = hand_case()
    empty = TensorDataset(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, train, test, [])
    with pytest.raises(ValueError, match="no sample in train_set"):
        evaluate(model, train, test, [7])
    with pytest.raises(ValueError, match="no class would remain"):
        evaluate(model, train, test, [0, 1, 2])
    with pytest.raises(ValueError, match="train_set is empty"):
        evaluate(model, empty, test, [2])
    with pytest.raises(ValueError, match="test_set is empty"):
        evaluate(model, train, empty, [2])
    with pytest.raises(ValueError, match="forget classes"):
        evaluate(model, train, Subset(test, [0, 1]), [2])   # no forget test sample
    with pytest.raises(ValueError, match="remaining classes"):
        evaluate(model, train, Subset(test, [3, 4]), [2])   # no remaining test sample
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, train, test, [2], batch_size=0)
    with pytest.raises(ValueError, match="probe_samples"):
        evaluate(model, train, test, [2], probe_samples=0)
    no_linear = nn.Sequential(Lookup(torch.eye(3).repeat(6, 1)))
    with pytest.raises(ValueError, match="nn.Linear"):
        evaluate(no_linear, train, test, [2])
    # without the probe the same model is fine
    out = evaluate(no_linear, train, test, [2], probe=False, mia=False)
    assert tuple(out) == METRIC_KEYS
