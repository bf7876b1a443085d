"""The LM forget term's targets stored sparsely (per scored position, the distinct next tokens of its
k neighbours and their shares) against the dense computation they replace: a float64
(N, T-1, vocab) histogram built one position at a time (:func:`dfmu_ext.reference.neighbour_targets`),
and the dense soft cross-entropy :math:`-\\sum_v q(v) \\log p(v)` over the whole vocabulary.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dfmu_ext import reference
from dfmu_ext.lm.neurons import mlp_neuron_layers
from dfmu_ext.lm.targets import SparseTargets, forget_targets, nearest_positions, soft_target_loss
from dfmu_ext.lm.task import IGNORE_INDEX
from dfmu_ext.model_io import Inputs
from dfmu_ext.targets import neighbour_targets

from _lm_tiny import VOCAB, TinyLM, qa_set


def _dense_hist(idx: torch.Tensor, labels: torch.Tensor, vocab: int) -> torch.Tensor:
    out = torch.zeros(idx.shape[0], vocab, dtype=torch.float64)
    for i in range(idx.shape[0]):
        for j in idx[i].tolist():
            out[i, int(labels[j])] += 1.0 / idx.shape[1]
    return out


@pytest.mark.parametrize("max_elements", [1, 7, 40, 10_000])
def test_nearest_positions_in_blocks_match_float64_reference(max_elements):
    """Any block size (one similarity at a time up to the whole matrix) finds the same neighbours
    as the float64 loop; random features have no ties within float32 rounding."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(13, 6, generator=g), dim=1)
    r = F.normalize(torch.randn(29, 6, generator=g), dim=1)
    y = torch.randint(0, 5, (29,), generator=g)
    idx = nearest_positions(f, r, 4, max_elements=max_elements)
    assert idx.shape == (13, 4)
    torch.testing.assert_close(_dense_hist(idx, y, 5), reference.neighbour_targets(f, r, y, 5, 4), rtol=0, atol=1e-12)
    # the dense search the LM targets used before (the whole forget-chunk x reference matrix at once)
    torch.testing.assert_close(_dense_hist(idx, y, 5).float(), neighbour_targets(f, r, y, 5, 4), rtol=0, atol=0)


def test_nearest_positions_ties_take_the_lower_index_across_blocks():
    """Equal similarities are broken towards the lower reference index, also when the tied
    references fall in different column blocks (the reference's rule)."""
    f = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    for max_elements in (1, 2, 3, 100):
        assert nearest_positions(f, r, 2, max_elements=max_elements).tolist() == [[1, 3]]
        assert nearest_positions(f, r, 4, max_elements=max_elements).tolist() == [[1, 3, 4, 5]]


def test_nearest_positions_bad_input():
    with pytest.raises(ValueError, match="at least one reference"):
        nearest_positions(torch.ones(2, 3), torch.zeros(0, 3), 2)
    with pytest.raises(ValueError, match="k must be"):
        nearest_positions(torch.ones(2, 3), torch.ones(4, 3), 0)
    with pytest.raises(ValueError, match="feature widths"):
        nearest_positions(torch.ones(2, 3), torch.ones(4, 2), 1)


def _dense_targets(model, layer, forget, refs, vocab, k):
    """The dense oracle: every position's input of ``layer`` (float64), the scored positions' float64
    histograms of their k nearest scored reference positions, scattered into (N, T-1, vocab)."""
    grabbed = []
    h = layer.register_forward_pre_hook(lambda _m, a: grabbed.append(a[0].detach().double()))
    try:
        with torch.no_grad():
            model(**forget[0])
            model(**refs[0])
    finally:
        h.remove()
    (ff, rf), (yf, yr) = grabbed, (forget[1], refs[1])
    fs, rs = yf[:, 1:] != IGNORE_INDEX, yr[:, 1:] != IGNORE_INDEX
    hist = reference.neighbour_targets(ff[:, :-1][fs], rf[:, :-1][rs], yr[:, 1:][rs], vocab, k)
    q = torch.zeros(yf.shape[0], yf.shape[1] - 1, vocab, dtype=torch.float64)
    q[fs] = hist
    return q, fs


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyLM().eval()
    forget, refs = qa_set(6, seed=1), qa_set(20, seed=2)

    def batch(ds):
        return Inputs({"input_ids": ds.input_ids, "attention_mask": ds.attention_mask}), ds.labels

    return model, batch(forget), batch(refs)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_forget_targets_sparse_equal_the_dense_histograms(k):
    """The sparse targets, made dense, are the float64 oracle's histograms rounded once to float32
    (each share is count / k computed once), zero off the scored positions."""
    model, forget, refs = _tiny()
    layer = mlp_neuron_layers(model, forget[0][:1])[0].layer
    q, scored = forget_targets(model, layer, forget, refs, VOCAB, k, max_elements=50)
    want, want_scored = _dense_targets(model, layer, forget, refs, VOCAB, k)
    assert isinstance(q, SparseTargets) and q.shape == (6, forget[1].shape[1] - 1, VOCAB)
    assert torch.equal(scored, want_scored) and torch.equal(q.scored, want_scored)
    assert q.ids.shape == q.weights.shape == (int(scored.sum()), k)  # storage: positions x k, not x vocab
    torch.testing.assert_close(q.to_dense(), want.float(), rtol=0, atol=0)


def test_rows_select_like_the_dense_tensor():
    """``q[rows]`` (a list with repeats and wrap-around, a tensor, a slice) is the dense
    tensor's ``q[rows]`` — the fine-tune's and the edit's cycling over forget rows."""
    model, forget, refs = _tiny()
    layer = mlp_neuron_layers(model, forget[0][:1])[0].layer
    q, scored = forget_targets(model, layer, forget, refs, VOCAB, 3)
    dense = q.to_dense()
    for rows in ([4, 5, 0, 1], [2, 2], torch.tensor([3, 0]), slice(1, 4), [5]):
        got = q[rows]
        assert torch.equal(got.to_dense(), dense[rows])
        assert torch.equal(got.scored, scored[rows])
    assert len(q) == 6 and len(q[[0, 1]]) == 2
    with pytest.raises(IndexError):
        q[[6]]
    with pytest.raises(TypeError, match="list"):
        q[5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_target_loss_sparse_equals_dense(dtype):
    """The loss and its gradient through the sparse gather equal the dense sum over the vocabulary
    in float64. float32: both take log_softmax in float32 (rounding ~1e-7 relative per term) and the
    dense sum adds the same k nonzero terms in another order, so 1e-5 relative bounds the rounding;
    bfloat16 logits are read in float32 by both, so the same bound holds."""
    model, forget, refs = _tiny()
    layer = mlp_neuron_layers(model, forget[0][:1])[0].layer
    q, scored = forget_targets(model, layer, forget, refs, VOCAB, 4)
    rows = [5, 0, 2]
    logits = (3 * torch.randn(3, forget[1].shape[1], VOCAB)).to(dtype).requires_grad_(True)
    got = soft_target_loss(logits, q[rows], scored[rows])
    got.backward()
    l64 = logits.detach().double().requires_grad_(True)
    dense, s = q.to_dense().double()[rows], scored[rows]
    want = -(dense * F.log_softmax(l64[:, :-1], -1)).sum(-1)[s].sum() / s.sum()
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16 (8 bits)
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=tol, atol=tol * 1e-2)
    # the dense-tensor path, kept for callers that hold one, gives the same value
    torch.testing.assert_close(soft_target_loss(logits.detach(), q.to_dense()[rows], s).double(), want.detach(),
                               rtol=1e-5, atol=0)


def test_soft_target_loss_no_scored_position_is_zero():
    q = SparseTargets(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.full((2, 3), -1), 5)
    assert float(soft_target_loss(torch.randn(2, 4, 5), q, q.scored)) == 0.0


def test_sparse_targets_bad_input():
    with pytest.raises(ValueError, match="ids"):
        SparseTargets(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 2), torch.full((1, 3), -1), 5)
    with pytest.raises(ValueError, match="vocab"):
        SparseTargets(torch.full((1, 1), 7), torch.ones(1, 1), torch.tensor([[0, -1]]), 5)
    with pytest.raises(ValueError, match="index"):
        SparseTargets(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.tensor([[0, 3]]), 5)


def test_scoring_pass_in_chunks_adds_up_to_the_whole_batch():
    """score_neurons holds one chunk of sequences at a time; the scores are sums over sequences,
    so one sequence per chunk gives the whole batch's scores (to float32 summation order: 1e-5)."""
    from dfmu_ext.lm.neurons import score_neurons

    model, (x, y), _ = _tiny()
    layers = mlp_neuron_layers(model, x[:1])
    forget = torch.arange(x.shape[0]) % 2 == 0
    whole = score_neurons(model, x, y, forget, layers)
    chunked = score_neurons(model, x, y, forget, layers, max_tokens=1)
    for name in whole.scores:
        torch.testing.assert_close(chunked.scores[name], whole.scores[name], rtol=1e-5, atol=1e-7)
    assert torch.equal(chunked.counts, whole.counts)
    assert abs(chunked.loss - whole.loss) <= 1e-5 * abs(whole.loss)
    with pytest.raises(ValueError, match="max_tokens"):
        score_neurons(model, x, y, forget, layers, max_tokens=0)


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_own_token_share_scales_each_positions_own_next_token(share):
    # 2 sequences of 4 tokens, 3 next-token positions each; positions (0,0), (0,2), (1,1) scored
    vocab = 6
    scored = torch.tensor([[True, False, True], [False, True, False]])
    next_tokens = torch.tensor([[1, 1, 2, 3], [4, 4, 4, 4], [0, 2, 5, 5]])   # k = 4 neighbours' next tokens
    q = SparseTargets.from_neighbours(next_tokens, scored, vocab)
    labels = torch.tensor([[9, 1, 7, 5], [9, 8, 2, IGNORE_INDEX]])          # own next tokens: 1, 5, 2
    got = q.own_token_scaled(labels, share).to_dense().double()
    want = q.to_dense().double()
    for (i, t), own in zip([(0, 0), (0, 2), (1, 1)], [1, 5, 2]):
        row = want[i, t].clone()
        if row.sum() > row[own]:                  # something besides its own token to move the weight to
            row[own] *= share
            row /= row.sum()
        want[i, t] = row
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.sum(-1)[scored], torch.ones(3, dtype=torch.float64), atol=1e-6)
    if share == 0.0:
        assert got[0, 0, 1] == 0 and got[0, 2, 5] == 0 and got[1, 1, 2] == 0
    assert torch.equal(q.own_token_scaled(labels, 1.0).weights, q.weights)


def test_own_token_share_leaves_a_position_all_on_its_own_token_and_checks_its_input():
    scored = torch.tensor([[True, True]])
    q = SparseTargets.from_neighbours(torch.tensor([[4, 4], [1, 2]]), scored, 6)
    out = q.own_token_scaled(torch.tensor([[0, 4, 1]]), 0.0).to_dense()
    assert out[0, 0, 4] == 1.0                                  # nothing else to move it to
    assert out[0, 1, 1] == 0.0 and out[0, 1, 2] == 1.0
    with pytest.raises(ValueError, match="do not fit"):
        q.own_token_scaled(torch.tensor([[0, 4]]), 0.0)
    from dfmu_ext.lm.targets import LMForgetTermConfig
    with pytest.raises(ValueError, match="own_token_share must be in"):
        LMForgetTermConfig(own_token_share=1.5).validate()
