"""The memory-lean distillation term (dfmu_ext.finetune.distill_loss): its value and gradient against
an independent float64 reference, over dtypes, odd sizes, masks and 3-D logits; gradcheck; and what
it keeps for the backward."""
import pytest
import torch

import dfmu_ext.finetune as finetune
from dfmu_ext.finetune import distill_loss


def reference(s: torch.Tensor, t: torch.Tensor, where=None) -> torch.Tensor:
    """mean over the kept rows of sum_c p_c (log p_c - log q_c), in float64, rows taken explicitly."""
    c = s.shape[-1]
    s, t = s.double().reshape(-1, c), t.double().reshape(-1, c)
    keep = range(s.shape[0]) if where is None else where.reshape(-1).nonzero().flatten().tolist()
    per_row = []
    for i in keep:
        log_p, log_q = torch.log_softmax(t[i], 0), torch.log_softmax(s[i], 0)
        per_row.append(sum(log_p[j].exp() * (log_p[j] - log_q[j]) for j in range(c)) if c < 8 else
                       (log_p.exp() * (log_p - log_q)).sum())
    return torch.stack(per_row).mean()


def grads(fn, s, t, where):
    """The value and the gradients in both logits of ``fn`` (a fresh leaf of each)."""
    s, t = s.detach().clone().requires_grad_(True), t.detach().clone().requires_grad_(True)
    value = fn(s, t, where)
    value.backward()
    return value.detach(), s.grad, t.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 37])
@pytest.mark.parametrize("classes", [1, 7, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_gradient_match_float64(dtype, rows, classes, masked):
    g = torch.Generator().manual_seed(rows * 1000 + classes)
    s = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    t = (3 * torch.randn(rows, classes, generator=g)).to(dtype)
    where = (torch.rand(rows, generator=g) < 0.6) if masked else None
    if where is not None and not where.any():
        where[rows // 2] = True
    got, gs, gt = grads(distill_loss, s, t, where)
    # the reference sees exactly the low-precision values, upcast: the difference is only the arithmetic
    want, ws, wt = grads(reference, s.double(), t.double(), where)
    assert got.dtype == torch.float32 and gs.dtype == dtype and gt.dtype == dtype
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # low-precision gradients are kept in their dtype and scaled by the incoming factor: rounded twice,
    # within one ulp of each element (bf16 2^-7, fp16 2^-10 relative; fp16's subnormal spacing 2^-24);
    # the teacher's, p (log p - log q - KL), has float32 cancel log-ratios of up to ~20: 1e-5 of the largest
    rel = {torch.float32: 0.0, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    tiny = 2 ** -24 if dtype == torch.float16 else 1e-12
    assert ((gs.double() - ws).abs() <= rel * ws.abs() + 1e-6 * ws.abs().max() + tiny).all()
    assert ((gt.double() - wt).abs() <= rel * wt.abs() + 1e-5 * wt.abs().max() + tiny).all()
    if where is not None:  # the rows that do not count get no gradient at all
        assert (gs[~where] == 0).all() and (gt[~where] == 0).all()


def test_three_d_logits_with_a_position_mask_and_a_prefix_mask():
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    where = torch.rand(3, 5) < 0.5
    where[0, 0] = True
    got, gs, _ = grads(distill_loss, s, t, where)
    want, ws, _ = grads(reference, s.double(), t.double(), where)
    assert torch.allclose(got.double(), want, atol=1e-6) and torch.allclose(gs.double(), ws, atol=1e-7)
    # a (N,) mask over (N, T, C) logits keeps whole sequences: every position of the kept ones
    seq = torch.tensor([True, False, True])
    got, gs, _ = grads(distill_loss, s, t, seq)
    want, ws, _ = grads(reference, s.double(), t.double(), seq[:, None].expand(3, 5))
    assert torch.allclose(got.double(), want, atol=1e-6) and torch.allclose(gs.double(), ws, atol=1e-7)


def test_chunking_does_not_change_value_or_gradient(monkeypatch):
    torch.manual_seed(2)
    s, t = torch.randn(2, 9, 50).bfloat16(), torch.randn(2, 9, 50).bfloat16()
    where = torch.rand(2, 9) < 0.7
    whole = grads(distill_loss, s, t, where)
    monkeypatch.setattr(finetune, "DISTILL_CHUNK", 3 * 50)  # 3 rows a chunk: 18 rows in 6 chunks
    chunked = grads(distill_loss, s, t, where)
    assert torch.allclose(whole[0], chunked[0], rtol=1e-6)
    assert torch.equal(whole[1], chunked[1]) and torch.equal(whole[2], chunked[2])


def test_no_row_counts_gives_a_zero_loss_with_a_graph():
    s = torch.randn(2, 4, 6, requires_grad=True)
    loss = distill_loss(s, torch.randn(2, 4, 6), torch.zeros(2, 4, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_a_class_the_teacher_rules_out_adds_nothing():
    """A -inf teacher logit has p = 0: 0 log 0 = 0, the KL over the other classes (not NaN)."""
    s = torch.tensor([[0.3, -1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, float("-inf"), 0.5]])
    loss = distill_loss(s, t)
    want = reference(s.detach()[:, [0, 2]], t[:, [0, 2]]) + torch.logsumexp(s.detach().double(), 1) \
        - torch.logsumexp(s.detach().double()[:, [0, 2]], 1)
    assert torch.allclose(loss.double(), want.squeeze(), atol=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_gradcheck_in_float64():
    torch.manual_seed(3)
    s = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    where = torch.tensor([[True, False, True], [False, True, True]])
    assert distill_loss(s, t, where).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: distill_loss(a, b, where), (s, t))
    assert torch.autograd.gradcheck(lambda a, b: distill_loss(a, b), (s, t))


def test_the_backward_keeps_one_gradient_in_the_logits_dtype():
    """What the graph saves: the kept rows' gradient in the logits' dtype and their index, where the
    eager log_softmax / kl_div formulation kept two float32 (rows, vocab) tensors (3x the bf16 logits)."""
    torch.manual_seed(4)
    s = torch.randn(4, 16, 300, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 16, 300, dtype=torch.bfloat16)
    where = torch.rand(4, 16) < 0.8
    saved = {}

    def pack(x):
        saved[(x.untyped_storage().data_ptr(), x.dtype)] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        distill_loss(s, t, where)
    logits = s.numel() * s.element_size()
    kept = int(where.sum())
    assert sum(saved.values()) == kept * 300 * 2 + kept * 8
    assert all(dtype != torch.float32 for (_, dtype) in saved)
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        distill_loss(s, t, where)
    assert not saved


def test_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match="differ"):
        distill_loss(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="does not fit"):
        distill_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.ones(3, dtype=torch.bool))
