"""The forget term one simulated relearning step away (``LMForgetTermConfig(relearn_step=)``, issue 27's
relearning target): the weights inside the step against a float64 gradient computed by hand, put back bit for
bit, and the objective's forget-side gradient against the forget term's own gradient at the moved weights."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from dfmu_ext.lm.relearning import own_token_labels, relearning_step
from dfmu_ext.lm.targets import LMForgetTermConfig
from dfmu_ext.lm.task import IGNORE_INDEX, take


def _tiny(rows: int):
    from _lm_tiny import make_model, qa_set, train

    data = qa_set()
    return train(make_model(0), data, steps=60), take(data, list(range(rows)))


def test_own_token_labels_ask_for_the_next_token_at_the_scored_positions_only():
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 6, 8, 0, 0]])
    scored = torch.tensor([[False, True, True, False], [True, False, False, False]])
    want = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 9, IGNORE_INDEX],
                         [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    assert torch.equal(own_token_labels(ids, scored), want)
    with pytest.raises(ValueError, match="does not fit"):
        own_token_labels(ids, scored[:, :3])


@pytest.mark.parametrize("size", [1e-3, 0.05])
def test_the_step_moves_each_weight_against_its_gradient_sign_and_puts_it_back(size):
    model, (x, y) = _tiny(6)
    model = model.double()
    scored = y[:, 1:] != IGNORE_INDEX
    params = [p for n, p in model.named_parameters() if not n.startswith("pos")]   # a parameter left out stays
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # the reference: the mean next-token NLL of the own tokens, its gradient in float64 by autograd on a copy
    ref = copy.deepcopy(model)
    logits = ref(x["input_ids"], x.get("attention_mask"))
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, x["input_ids"][:, 1:, None])[..., 0]
    loss = -(logp * scored).sum() / scored.sum()
    names = [n for n, _ in model.named_parameters() if not n.startswith("pos")]
    grads = dict(zip(names, torch.autograd.grad(loss, [dict(ref.named_parameters())[n] for n in names])))

    with relearning_step(model, params, x, scored, size):
        for n, p in model.named_parameters():
            if n.startswith("pos"):
                assert torch.equal(p, before[n])
                continue
            g = grads[n]
            clear = g.abs() > 1e-12          # (a sign read off a float64 zero is either way)
            want = before[n] - size * g.sign()
            assert torch.allclose(p[clear], want[clear], rtol=0, atol=1e-15)
            assert bool(clear.any())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_frozen_weights_move_in_the_step_and_are_frozen_again():
    """A frozen parameter given to the step moves by its float64 gradient's sign like a trained one, no
    gradient is left on it, and it is frozen again (and bit-identical) when the block ends."""
    model, (x, y) = _tiny(5)
    model = model.double()
    model.zero_grad(set_to_none=True)   # (the training's)
    scored = y[:, 1:] != IGNORE_INDEX
    named = dict(model.named_parameters())
    frozen = [n for n in named if not n.startswith("pos")][:3]
    for n in frozen:
        named[n].requires_grad_(False)
    before = {n: p.detach().clone() for n, p in named.items()}
    ref = copy.deepcopy(model).requires_grad_(True)
    logits = ref(x["input_ids"], x.get("attention_mask"))
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, x["input_ids"][:, 1:, None])[..., 0]
    grads = torch.autograd.grad(-(logp * scored).sum() / scored.sum(), [dict(ref.named_parameters())[n] for n in frozen])
    with relearning_step(model, [named[n] for n in frozen], x, scored, 0.01):
        for n, g in zip(frozen, grads):
            clear = g.abs() > 1e-12
            assert bool(clear.any())
            want = before[n] - 0.01 * g.sign()
            assert torch.allclose(named[n][clear], want[clear], rtol=0, atol=1e-15)
        assert all(torch.equal(p, before[n]) for n, p in named.items() if n not in frozen)
    for n, p in named.items():
        assert torch.equal(p, before[n]) and p.grad is None
        assert p.requires_grad == (n not in frozen)


def test_the_weights_come_back_when_the_block_raises_and_size_zero_moves_nothing():
    model, (x, y) = _tiny(4)
    scored = y[:, 1:] != IGNORE_INDEX
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="inside"):
        with relearning_step(model, params, x, scored, 0.01):
            assert any(not torch.equal(p, b) for p, b in zip(params, before))
            raise RuntimeError("inside")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with relearning_step(model, params, x, scored, 0.0):
        assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("bad", [-1e-3, 1.0, "0.001", float("nan")])
def test_a_bad_relearn_step_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="relearn_step"):
        LMForgetTermConfig(relearn_step=bad).validate()


@pytest.mark.parametrize("bad", ["all", "Frozen", None, 1])
def test_a_bad_relearn_moves_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="relearn_moves must be one of"):
        LMForgetTermConfig(relearn_moves=bad).validate()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.25", True, float("nan")])
def test_a_bad_relearn_rest_share_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match="relearn_rest_share must be in"):
        LMForgetTermConfig(relearn_rest_share=bad).validate()


def _objective(relearn_step, into="trained", moves="frozen", rest=0.0):
    from test_lm_per_term import _setup

    model, teacher, obj, (xb, yb), forget, q, near, vocab = _setup(into)
    obj.term = LMForgetTermConfig(batch_size=2, relearn_step=relearn_step, relearn_moves=moves, relearn_rest_share=rest)
    return model, obj, (xb, yb)


def _forget_grads(obj, batch, forget_side, around=contextlib.nullcontext):
    """``.grad`` after the step's queued forget term alone (the budget's term and the neighbours' left out),
    run inside ``around()`` (within the objective's context: its gradient hooks apply there)."""
    obj.forget_side = forget_side
    with obj.context(), around():
        obj.loss(batch, True)
        obj.terms = [t for t in obj.terms if t[0] in ("forget", "forget_rest")]
        obj.optimizer.zero_grad(set_to_none=True)
        obj.backward_terms(obj.rows[0] if obj.rows is not None else None)   # (as backward_step routes it)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in obj.params]   # (routed: rows only)


@pytest.mark.parametrize("moves,rest", [("frozen", 0.0), ("trained", 0.0), ("frozen", 0.5), ("trained", 1.0)])
@pytest.mark.parametrize("into", ["trained", "entity"])   # the forget term into every trained weight / the rows
def test_the_objective_takes_the_forget_term_gradient_at_the_moved_weights_on_the_forget_side_only(into, moves, rest):
    """On the forget side the term's gradient is r times its gradient at theta plus 1 - r times its gradient
    at theta' (the weights ``moves`` names moved by hand here), on the same rows."""
    model, plain, batch = _objective(0.0, into)
    _, shifted, _ = _objective(0.02, into, moves, rest)
    assert shifted.into_rows == (into == "entity")
    assert all(torch.equal(a, b) for a, b in zip(plain.params, shifted.params))

    # off the forget side (the fine-tune's forget phase) the setting changes nothing
    off = [_forget_grads(o, batch, False) for o in (plain, shifted)]
    assert all(torch.equal(a, b) for a, b in zip(*off))
    for o in (plain, shifted):
        o.cursor = 0

    # on it: the term's gradient at theta' (moved by hand here), the weights back at theta afterwards
    at = [p.detach().clone() for p in shifted.params]
    xf, _, scored = shifted.forget
    rows = [0, 1]
    trained = {id(p) for p in plain.params}
    moved = plain.params if moves == "trained" else [p for p in plain.model.parameters() if id(p) not in trained]
    assert moved and len(moved) < len(list(plain.model.parameters()))
    frozen_before = [p.detach().clone() for p in shifted.model.parameters() if all(p is not q for q in shifted.params)]
    at_moved = _forget_grads(plain, batch, True, lambda: relearning_step(plain.model, moved, xf[rows], scored[rows],
                                                                         0.02))
    plain.cursor = 0
    at_rest = _forget_grads(plain, batch, True)
    got = _forget_grads(shifted, batch, True)
    assert shifted.cursor == plain.cursor == 2   # (both parts on rows 0 and 1: the cursor moved once)
    want = [rest * r + (1 - rest) * m for r, m in zip(at_rest, at_moved)]
    # (shares that are powers of two: the float32 soft cross-entropy scaled by them rounds as the hand mix does)
    assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in zip(got, want))
    assert any(not torch.allclose(g, u, rtol=1e-6, atol=1e-9) for g, u in zip(got, at_rest)) == (rest < 1)
    assert any(not torch.allclose(g, m, rtol=1e-6, atol=1e-9) for g, m in zip(got, at_moved)) == (rest > 0)
    assert all(torch.equal(p, a) for p, a in zip(shifted.params, at))
    frozen_after = [p for p in shifted.model.parameters() if all(p is not q for q in shifted.params)]
    assert len(frozen_after) == len(frozen_before) > 0
    assert all(torch.equal(p, b) for p, b in zip(frozen_after, frozen_before))   # (and frozen again: the next test)


def test_unlearn_with_the_step_on_runs_the_forget_side_and_records_the_setting():
    """End to end on a tiny LM: the forget side's steps run one relearning step away, the weights the
    objective saw at the end are the model's (nothing left moved), and the result's info says so."""
    import dfmu_ext
    from _lm_tiny import make_model, train
    from test_lm_per_term import _people

    data, owner, vocab = _people(people=10, seed=3)
    model = train(make_model(0, vocab=vocab), data, steps=200)
    forget = torch.nonzero(owner == 0).flatten().tolist()
    runs = {}
    for step in (0.0, 1e-3):
        res = dfmu_ext.unlearn(copy.deepcopy(model), data, forget_indices=forget, retain_fraction=0.5, seed=0,
                               guard=False, forget_term=LMForgetTermConfig(relearn_step=step))
        side = res.info["forget_side"]
        assert side["stop"] == "estimate" and side["extra_forget_steps"] > 0
        assert res.info["forget_term"]["relearn_step"] == step
        assert all(torch.isfinite(p).all() for p in res.model.parameters())
        runs[step] = {n: p.detach().clone() for n, p in res.model.named_parameters()}
    assert any(not torch.equal(runs[0.0][n], runs[1e-3][n]) for n in runs[0.0])


def test_under_torchrun_the_setting_is_a_one_line_error():
    from dfmu_ext.tasks.causal_lm import CausalLMTask

    class TwoRanks:
        world_size = 2

    configs = {"forget_term": LMForgetTermConfig(relearn_step=1e-3)}
    with pytest.raises(ValueError, match="relearn_step runs in one process only"):
        CausalLMTask().objective(None, None, None, None, configs, None, 0, TwoRanks(), None, None)
