"""Forget targets from non-members (``unlearn(nonmembers=)`` on a classifier forgetting samples):
the targets against a float64 per-sample reference, and, on a small model that memorised noisy
labels, the forget samples' membership AUC (recomputed with scikit-learn) falling toward 0.5."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dfmu_ext
from dfmu_ext.targets import nonmember_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(f, y_f, n, p, y_n, k):
    """Per sample, in float64 numpy: neighbours by a stable sort of the similarities, the mean output,
    per label the rank of the support, the non-members' quantile (numpy's linear rule), the rest."""
    f, n, p = f.double().numpy(), n.double().numpy(), p.double().numpy()
    y_f, y_n = y_f.numpy(), y_n.numpy()
    k = min(k, len(n))
    q = np.stack([p[np.argsort(-(n @ row), kind="stable")[:k]].mean(0) for row in f])
    u = p[np.arange(len(y_n)), y_n]
    own = np.empty(len(f))
    for c in np.unique(y_f):
        idx = [i for i in range(len(f)) if y_f[i] == c]
        pool = u[y_n == c] if (y_n == c).any() else u
        ranked = sorted(idx, key=lambda i: (q[i, c], i))
        for r, i in enumerate(ranked):
            own[i] = np.quantile(pool, (r + 0.5) / len(ranked))
    t = np.zeros_like(q)
    for i in range(len(f)):
        others = [c for c in range(p.shape[1]) if c != y_f[i]]
        mass = q[i, others].sum()
        t[i, others] = (1 - own[i]) * (q[i, others] / mass if mass > 0 else 1.0 / len(others))
        t[i, y_f[i]] = own[i]
    return torch.from_numpy(t)


@pytest.mark.parametrize("n_f,n_n,d,c,k", [(1, 1, 3, 2, 5), (9, 40, 5, 3, 4), (30, 80, 16, 5, 10), (12, 6, 4, 4, 3)])
def test_nonmember_targets_match_reference(n_f, n_n, d, c, k):
    g = torch.Generator().manual_seed(n_f * 100 + n_n)
    f = F.normalize(torch.randn(n_f, d, generator=g), dim=1)
    n = F.normalize(torch.randn(n_n, d, generator=g), dim=1)
    p = torch.softmax(3 * torch.randn(n_n, c, generator=g), dim=1)
    y_f, y_n = torch.randint(0, c, (n_f,), generator=g), torch.randint(0, c, (n_n,), generator=g)
    got = nonmember_targets(f, y_f, n, p, y_n, k)
    torch.testing.assert_close(got.double(), _reference(f, y_f, n, p, y_n, k), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(n_f))


def test_targets_put_the_nonmembers_confidence_on_the_forget_labels():
    # one label, 4 forget samples, non-members whose true-label probabilities are 0.2, 0.4, 0.6, 0.8:
    # the forget sample best backed by its neighbours gets the top quantile, the rest the remaining mass
    n = torch.eye(4)
    p = torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]])
    t = nonmember_targets(torch.eye(4), torch.zeros(4, dtype=torch.long), n, p, torch.zeros(4, dtype=torch.long), k=1)
    want_own = torch.from_numpy(np.quantile([0.2, 0.4, 0.6, 0.8], [0.125, 0.375, 0.625, 0.875])).float()
    torch.testing.assert_close(t[:, 0], want_own)
    torch.testing.assert_close(t[:, 1], 1 - want_own)


def test_bad_nonmember_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="at least one non-member"):
        nonmember_targets(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0, 2),
                          torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="one output row and one label"):
        nonmember_targets(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(3, 3), torch.ones(2, 2) / 2,
                          torch.zeros(3, dtype=torch.long))


def _noisy(n, seed):
    """Four Gaussian classes, a fifth of the labels flipped at random: a model that fits them memorises."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 8, generator=g) + 1.5 * F.one_hot(y, 8).float()
    flip = torch.rand(n, generator=g) < 0.2
    y = torch.where(flip, torch.randint(0, 4, (n,), generator=g), y)
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def memorised():
    data = _noisy(400, 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(600):
        opt.zero_grad()
        F.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model.eval(), data


def _auc(model, members, nonmembers):
    """Membership AUC by scikit-learn: a lower loss says member."""
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        lm = F.cross_entropy(model(members[0]), members[1], reduction="none")
        ln = F.cross_entropy(model(nonmembers[0]), nonmembers[1], reduction="none")
    return roc_auc_score(np.r_[np.ones(len(lm)), np.zeros(len(ln))], -np.r_[lm.numpy(), ln.numpy()])


def test_nonmembers_move_memorised_samples_toward_unseen_data(memorised):
    model, data = memorised
    x, y = data.tensors
    assert float((model(x).argmax(1) == y).float().mean()) == 1.0     # memorised, noisy labels included
    fresh = _noisy(300, 7)
    idx = list(range(0, 400, 10))
    forget = (x[idx], y[idx])
    before = _auc(model, forget, fresh.tensors)
    assert before > 0.7                                                  # members are told from non-members
    m = copy.deepcopy(model)
    res = dfmu_ext.unlearn(m, data, forget_indices=idx, retain_fraction=0.3, seed=0, nonmembers=fresh)
    side = res.info["forget_side"]
    assert res.info["forget_targets"] == "nonmembers" and res.info["forget_term_ran"] and side["lever"]
    # the forget side measured the same AUC on the model it left (the guard's recovery steps come after)
    assert side["auc"] <= side["auc_before"] + 1e-12
    after = _auc(m, forget, fresh.tensors)
    assert after < before - 0.1                                          # the forget samples look less seen
    with torch.no_grad():                                                # what must be kept: the retain samples
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[idx] = False
        assert float((m(x[keep]).argmax(1) == y[keep]).float().mean()) >= 0.9
    plain = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=idx, retain_fraction=0.3, seed=0)
    assert plain.info["forget_side"] == {"stop": "estimate"}
    assert plain.info["forget_targets"] in ("budget", "off")


def test_whole_classes_ignore_nonmember_targets(memorised):
    model, data = memorised
    res = dfmu_ext.unlearn(copy.deepcopy(model), data, [1], 0.3, seed=0, nonmembers=_noisy(100, 5))
    assert res.info["forget_targets"] == "off" and not res.info["forget_term_ran"]


def test_shifted_copies_move_each_image_and_keep_its_label():
    from dfmu_ext.splits import ShiftedCopies, shift_pixels

    x = torch.randn(40, 2, 9, 7)
    base = TensorDataset(x, torch.arange(40) % 3)
    copies = ShiftedCopies(base, 2, seed=5)
    assert len(copies) == 40 and torch.equal(copies.shifts, ShiftedCopies(base, 2, seed=5).shifts)
    assert not torch.equal(copies.shifts, ShiftedCopies(base, 2, seed=6).shifts)
    for i in range(40):
        dy, dx = copies.shifts[i].tolist()
        assert (dy, dx) != (0, 0) and max(abs(dy), abs(dx)) <= 2
        moved, label = copies[i]
        want = torch.zeros_like(x[i])
        for r in range(9):            # by hand: pixel (r, c) goes to ((r + dy) mod 9, (c + dx) mod 7)
            for c in range(7):
                want[:, (r + dy) % 9, (c + dx) % 7] = x[i, :, r, c]
        assert torch.equal(moved, want) and label == i % 3
    assert [shift_pixels(s, s) for s in (4, 8, 28, 32, 42, 224)] == [1, 1, 1, 1, 2, 8]
    with pytest.raises(ValueError, match="pixels must be >= 1"):
        ShiftedCopies(base, 0)


def test_shifted_nonmembers_come_from_the_budget_for_image_samples_only():
    torch.manual_seed(0)
    x, y = torch.rand(240, 1, 8, 8), torch.arange(240) % 3
    data = TensorDataset(x, y)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):                                        # memorise the noise labels
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    idx = list(range(0, 240, 12))
    res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=idx, retain_fraction=0.3, seed=0,
                           nonmembers="shifted")
    assert res.info["forget_targets"] == "nonmembers" and res.info["forget_side"]["stop"] == "nonmembers"
    plain = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=idx, retain_fraction=0.3, seed=0)
    assert res.retain_samples_used == plain.retain_samples_used       # nothing read beyond the budget
    m = copy.deepcopy(model)
    for bad, match in (("shifted!", "a dataset or 'shifted'"),):
        with pytest.raises(ValueError, match=match):
            dfmu_ext.unlearn(m, data, forget_indices=idx, nonmembers=bad)
    with pytest.raises(ValueError, match="not whole classes"):
        dfmu_ext.unlearn(m, data, [1], 0.3, nonmembers="shifted")
    flat = TensorDataset(x.flatten(1), y)
    mlp = nn.Sequential(nn.Linear(64, 3))
    with pytest.raises(ValueError, match=r"needs \(image, label\) samples with image tensors \(\.\.\., H, W\)"):
        dfmu_ext.unlearn(mlp, flat, forget_indices=idx, nonmembers="shifted")
    from dfmu_ext.splits import DictDataset
    dicts = DictDataset({"pixel_values": x}, y)
    with pytest.raises(ValueError, match="got dict samples"):
        dfmu_ext.unlearn(m, dicts, forget_indices=idx, nonmembers="shifted")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model.state_dict().values()))
