"""Deep Unlearning (SVD projection of the forget-specific activation subspace), on hand-made
subspaces and on digits with a tiny CNN (CPU, fast)."""
import copy

import pytest
import torch
from torch import nn

from dfmu_ext.baselines.subspace import (InputRecorder, deep_unlearning, discriminatory_projections,
                                         project_weights_, scaled_projection)
from dfmu_ext.eval import accuracy
from dfmu_ext.splits import split_forget_retain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scaled_projection_limits():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 2)).Q
    cols = basis @ torch.randn(2, 50)
    p = scaled_projection(cols, alpha=1e9)  # every direction with energy counts fully: the projector
    assert torch.allclose(p, (basis @ basis.t()).double(), atol=1e-6)
    p1 = scaled_projection(cols, alpha=1.0)  # raw energy shares: trace 1
    assert float(torch.trace(p1)) == pytest.approx(1.0, abs=1e-9)


def test_disjoint_subspaces_remove_only_the_forget_directions():
    lin = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    rec = InputRecorder(lin)
    x = torch.zeros(40, 4)
    x[:20, 0] = torch.randn(20)          # forget samples live on e0
    x[20:, 1:3] = torch.randn(20, 2)     # retain samples on e1, e2
    with rec, torch.no_grad():
        rec.groups = torch.arange(40) < 20
        lin(x)
    proj = discriminatory_projections(rec, alpha_r=1e9, alpha_f=1e9, layers="last:2")
    w = lin[0].weight.detach().clone()
    project_weights_(rec.modules, proj)
    assert torch.allclose(lin[0].weight[:, 0], torch.zeros(3), atol=1e-6)   # forget direction gone
    assert torch.allclose(lin[0].weight[:, 1:], w[:, 1:], atol=1e-6)        # retain directions kept
    with pytest.raises(ValueError, match="layers must be"):
        discriminatory_projections(rec, 1.0, 1.0, layers="first:2")


def test_deep_unlearning_contract(original, digits):
    train, _, _ = digits
    model = copy.deepcopy(original)
    res = deep_unlearning(model, train, [3], 0.3, retain_samples=200, forget_samples=50, head=True)
    assert res.method == "DeepUnlearning" and res.retain_samples_used == 200 and res.forget_samples_used == 50
    forget, retain = split_forget_retain(train, [3])
    assert accuracy(model, forget) == 0.0
    assert accuracy(model, retain) > 0.8
    again = deep_unlearning(copy.deepcopy(original), train, [3], 0.3, retain_samples=200, forget_samples=50,
                            head=True).model
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not applicable to sample forgetting"):
        deep_unlearning(copy.deepcopy(original), train, forget_indices=[0, 1, 2], head=True)
