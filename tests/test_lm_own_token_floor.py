"""The LM forget term's own-token floor (:func:`dfmu_ext.lm.targets.own_token_floor_loss`): against the
float64 loop of :func:`dfmu_ext.reference.own_token_floor`, its gradient, the positions it floors
(:meth:`SparseTargets.with_floor`), its bad inputs, and that it runs on the forget side's steps only."""
from __future__ import annotations


import pytest
import torch

import dfmu_ext
from dfmu_ext import reference
from dfmu_ext.lm.targets import LMForgetTermConfig, SparseTargets, own_token_floor_loss, soft_target_loss
from dfmu_ext.lm.task import IGNORE_INDEX

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _case(n=3, t=5, vocab=11, k=4, seed=0):
    """Random targets on a random scored mask (some scored positions without a target), labels whose
    own next token is in the target with a small, a large or no weight."""
    g = torch.Generator().manual_seed(seed)
    scored = torch.rand(n, t, generator=g) < 0.7
    scored[0, 0] = True
    has = scored & (torch.rand(n, t, generator=g) < 0.85)
    p = int(has.sum())
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k].sort().values for _ in range(p)])
    weights = torch.rand(p, k, generator=g) ** 3
    weights = weights / weights.sum(1, keepdim=True)
    index = torch.full((n, t), -1, dtype=torch.long)
    index[has] = torch.arange(p)
    q = SparseTargets(ids, weights, index, vocab)
    labels = torch.randint(0, vocab, (n, t + 1), generator=g)
    own_at = torch.nonzero(has)
    for j, (i, s) in enumerate(own_at.tolist()):   # a third each: the target's heaviest, lightest, an outsider
        if j % 3 == 0:
            labels[i, s + 1] = ids[j, weights[j].argmax()]
        elif j % 3 == 1:
            labels[i, s + 1] = ids[j, weights[j].argmin()]
    labels[:, 0] = IGNORE_INDEX
    return q, labels, scored


@pytest.mark.parametrize("floor", [1e-3, 0.05, 0.4])
def test_with_floor_marks_the_own_token_where_its_target_weight_is_below_the_floor(floor):
    q, labels, scored = _case()
    got = q.with_floor(labels, floor).floored
    dense = q.to_dense().double()
    want = []
    for i, t in torch.nonzero(q.scored).tolist():
        y = int(labels[i, t + 1])
        want.append(y if float(dense[i, t, y]) < floor else -1)
    assert got.tolist() == want
    assert (got >= 0).any() and (got < 0).any() or floor == 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 11), (1, 1, 2), (4, 7, 33)])
@pytest.mark.parametrize("floor", [3e-3, 0.2])
def test_floor_loss_matches_the_float64_reference_and_its_gradient(device, dtype, shape, floor):
    n, t, vocab = shape
    q, labels, scored = _case(n, t, vocab, k=min(4, vocab), seed=n * 100 + t)
    q = q.with_floor(labels, floor)
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(n, t + 1, vocab, generator=g)).to(device, dtype).requires_grad_(True)
    got = own_token_floor_loss(logits, q, scored, floor)
    ref_logits = logits.detach().double().cpu().requires_grad_(True)
    want = reference.own_token_floor(ref_logits, q.to_dense().double(), labels, scored, floor)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double().cpu(), want, **tol)
    got.backward()
    want.backward()
    torch.testing.assert_close(logits.grad.double().cpu(), ref_logits.grad, **tol)


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_the_forget_terms_floor_is_the_soft_cross_entropy_plus_the_weighted_floor(weight):
    """``soft_target_loss(floor=)`` (one log-softmax for both) equals the two losses added, and so does
    its gradient."""
    q, labels, scored = _case(n=4, t=6, vocab=13, seed=5)
    q = q.with_floor(labels, 0.05)
    g = torch.Generator().manual_seed(2)
    a = (3 * torch.randn(4, 7, 13, generator=g)).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    joint = soft_target_loss(a, q, scored, floor=0.05, floor_weight=weight)
    apart = soft_target_loss(b, q, scored) + weight * own_token_floor_loss(b, q, scored, 0.05)
    torch.testing.assert_close(joint, apart, rtol=1e-6, atol=1e-7)
    joint.backward()
    apart.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="needs targets with floored tokens"):
        soft_target_loss(a, SparseTargets(q.ids, q.weights, q.index, q.vocab), scored, floor=0.05)


def test_the_floor_pulls_until_the_floor_and_no_further():
    """One position, one token: the gradient on its logit is (1 - p) / |S| above the floor, 0 below."""
    vocab = 5
    q = SparseTargets(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0]]), vocab)
    labels = torch.tensor([[IGNORE_INDEX, 3]])
    q = q.with_floor(labels, 0.01)
    scored = torch.tensor([[True]])
    for logit_3, pulled in ((2.0, True), (-9.0, False)):
        logits = torch.zeros(1, 2, vocab)
        logits[0, 0, 3] = logit_3
        logits.requires_grad_(True)
        own_token_floor_loss(logits, q, scored, 0.01).backward()
        p = float(torch.softmax(logits[0, 0].detach(), 0)[3])
        assert (p > 0.01) == pulled
        assert float(logits.grad[0, 0, 3]) == pytest.approx(1 - p if pulled else 0.0, abs=1e-6)


def test_floored_tokens_follow_row_selection_and_the_own_token_share():
    q, labels, scored = _case(n=4, t=6, seed=3)
    q = q.with_floor(labels, 0.1)
    rows = [2, 0]
    sub = q[rows]
    want = [int(q.floored[int(q.index[r, s])]) for r in rows for s in range(6) if int(q.index[r, s]) >= 0]
    assert sub.floored.tolist() == want
    assert torch.equal(q.own_token_scaled(labels, 0.5).floored, q.floored)
    assert SparseTargets(q.ids, q.weights, q.index, q.vocab).floored is None


def test_floor_bad_inputs_are_one_line_errors():
    q, labels, scored = _case()
    with pytest.raises(ValueError, match="floored must be"):
        SparseTargets(q.ids, q.weights, q.index, q.vocab, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs targets with floored tokens"):
        own_token_floor_loss(torch.zeros(3, 6, 11), q, scored, 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        q.with_floor(labels[:, :-1], 0.1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="own_token_floor must be in"):
            LMForgetTermConfig(own_token_floor=bad).validate()
    with pytest.raises(ValueError, match="own_token_floor_weight must be"):
        LMForgetTermConfig(own_token_floor_weight=-1.0).validate()
    LMForgetTermConfig(own_token_floor=None).validate()


def _people(people=12, facts=3, values=3, seed=0):
    from test_lm_neighbours import _people as people_corpus
    return people_corpus(people, facts, values, seed)


@pytest.mark.parametrize("floor", [3e-3, None])
@pytest.mark.parametrize("seed, phase_steps", [(1, None), (2, 0)])
def test_the_floor_runs_on_the_forget_sides_steps_only(monkeypatch, floor, seed, phase_steps):
    """Seed 1: the fine-tune's forget phase runs and the forget side does not (its stop is met), and the
    floor is never called. Seed 2 without a forget phase (``steps=0``): the forget side runs, and the
    floor once a side step. With ``own_token_floor=None`` never."""
    from _lm_tiny import make_model, train

    import dfmu_ext.tasks.lm_finetune as lm_finetune

    calls = []
    real = lm_finetune.soft_target_loss

    def spy(logits, q, scored, floor=None, floor_weight=1.0):   # the forget term adds the floor through it
        if floor is not None:
            calls.append(floor)
        return real(logits, q, scored, floor=floor, floor_weight=floor_weight)

    monkeypatch.setattr(lm_finetune, "soft_target_loss", spy)
    data, owner, vocab = _people(seed=seed)
    model = train(make_model(0, vocab=vocab), data, steps=200)
    forget = torch.nonzero(owner == 0).flatten().tolist()
    term = LMForgetTermConfig(own_token_floor=floor, **({} if phase_steps is None else {"steps": phase_steps}))
    res = dfmu_ext.unlearn(model, data, forget_indices=forget, retain_fraction=0.5, seed=0, forget_term=term)
    side = res.info["forget_side"]
    side_steps = (side.get("extra_forget_steps") or 0) + (side.get("undone_steps") or 0)
    assert (side_steps > 0) == (phase_steps == 0)
    assert res.info["forget_term"]["own_token_floor"] == floor
    if floor is None:
        assert calls == []
    else:
        assert len(calls) == side_steps and all(eps == floor for eps in calls)
