"""The causal-LM fine-tune step runs one backward per loss term (issue 28, memory): the budget's
term, then the forget term, then the swapped neighbours' distillation, each forward and backward
before the next. Its gradient and step must be those of the single summed loss, recomputed here
eagerly in float64 on the tiny LM."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dfmu_ext.finetune import AdamW
from dfmu_ext.lm.neighbours import swapped_neighbours, template_targets
from dfmu_ext.lm.neurons import mlp_neuron_layers
from dfmu_ext.lm.targets import LMForgetTermConfig, soft_target_loss
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, lm_loss, take
from dfmu_ext.tasks.lm_finetune import LMFinetuneConfig, LMObjective


def _people(people=6, facts=3, values=3, seed=0):
    """One sequence per (person, fact): ``<bos> person fact answer <eos>``, the answer scored."""
    g = torch.Generator().manual_seed(seed)
    answers = torch.randint(0, values, (people, facts), generator=g)
    rows = [[1, 3 + p, 3 + people + a, 3 + people + facts + a * values + int(answers[p, a]), 2]
            for p in range(people) for a in range(facts)]
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    owner = torch.arange(people).repeat_interleave(facts)
    return TokenSequences(ids, labels), owner, 3 + people + facts + facts * values


def _kl(student, teacher, where):
    """Eager mean over the kept rows of sum_c p_t (log p_t - log p_s)."""
    s, t = student[where], teacher[where]
    return (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()


def _setup(into):
    from _lm_tiny import make_model, train

    data, owner, vocab = _people()
    model = train(make_model(0, vocab=vocab), data, steps=100).double()
    teacher = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # the student off the teacher: the distillation's gradient is zero where they agree
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    f_idx = torch.nonzero(owner == 0).flatten().tolist()
    b_idx = torch.nonzero(owner != 0).flatten().tolist()
    forget, budget = take(data, f_idx), take(data, b_idx)
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=0)
    q = template_targets(model, forget, near, top=vocab)
    layers = mlp_neuron_layers(model, forget[0][:1])
    config = LMFinetuneConfig(distill=5.0, batch_size=4, forget_into=into, lr=1e-2)
    obj = LMObjective(model, data.subset(b_idx), config, device=torch.device("cpu"), seed=0,
                      forget=(forget[0], q, q.scored), forget_term=LMForgetTermConfig(batch_size=2), layers=layers,
                      teacher=teacher, neighbours=near)
    return model, teacher, obj, take(data, b_idx[:4]), forget, q, near, vocab


@pytest.mark.parametrize("into", ["trained", "entity"])
def test_per_term_step_equals_the_single_loss_step_in_float64(into):
    model, teacher, obj, (xb, yb), forget, q, near, vocab = _setup(into)
    assert obj.into_rows == (into == "entity") and len(near) > 4   # the neighbours' cursor takes 4 of them
    start = copy.deepcopy(model)                       # after the objective's reset of the entity's rows
    names = {id(p): n for n, p in model.named_parameters()}
    trained = [names[id(p)] for p in obj.params]
    assert "tok.weight" in trained

    events = []                                        # the student's forwards and backwards, in order
    model.register_forward_pre_hook(lambda m, a: events.append("F"))
    model.head.register_full_backward_hook(lambda m, gi, go: events.append("B"))
    with obj.context():
        loss, _, _ = obj.loss((xb, yb), True)
        obj.optimizer.zero_grad(set_to_none=True)
        obj.backward_step(loss)
    assert events == ["F", "B"] * 3                    # no two terms' graphs alive at once
    got = {names[id(p)]: p.grad.clone() for p in obj.params}
    after = {n: p.detach().clone() for n, p in model.named_parameters()}

    # the single loss, eagerly, from the same state: the forget term on forget rows 0-1 (its cursor),
    # the neighbours' distillation on neighbours 0-3
    ref = dict(start.named_parameters())
    wanted = [ref[n] for n in trained]
    xf, scored = forget[0][:2], q.scored[:2]
    xn, where = near.inputs[:4], near.where[:4]
    with torch.no_grad():
        tb, tn = teacher(xb["input_ids"]), teacher(xn["input_ids"])
    logits = start(xb["input_ids"])
    rest = lm_loss(logits, yb) + 5.0 * _kl(logits, tb, xb["attention_mask"].bool()) \
        + 5.0 * _kl(start(xn["input_ids"]), tn, where)
    term = obj.term.weight * soft_target_loss(start(xf["input_ids"]), q[:2], scored)
    if into == "entity":   # the forget term's gradient on the embedding only
        want = list(torch.autograd.grad(rest, wanted, retain_graph=True))
        want[trained.index("tok.weight")] += torch.autograd.grad(term, ref["tok.weight"], retain_graph=True)[0]
    else:
        want = list(torch.autograd.grad(rest + term, wanted, retain_graph=True))
    rows = torch.zeros(vocab, 1, dtype=torch.float64)
    rows[near.tokens] = 1
    want[trained.index("tok.weight")] *= rows              # "mlp+entity": the entity's rows only
    for n, w in zip(trained, want):
        torch.testing.assert_close(got[n], w, rtol=1e-10, atol=1e-12, msg=n)
    assert loss.item() == pytest.approx((rest + term).item(), rel=1e-12)   # the reported loss: every term's sum

    # not vacuous: each deferred term moves the trained parameters
    for part in (term, 5.0 * _kl(start(xn["input_ids"]), tn, where)):
        g = torch.autograd.grad(part, wanted)
        assert max(float(x.abs().max()) for x in g) > 1e-6

    # the same AdamW step from the same state with the reference gradient
    fresh = [ref[n].detach().clone() for n in trained]
    for p, w in zip(fresh, want):
        p.grad = w
    AdamW(fresh, lr=obj.config.lr, weight_decay=obj.config.weight_decay).step()
    for n, p in zip(trained, fresh):
        torch.testing.assert_close(after[n], p, rtol=1e-10, atol=1e-12, msg=n)


def test_a_non_finite_deferred_term_raises_before_the_step():
    model, _, obj, (xb, yb), *_ = _setup("trained")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    obj.term.weight = float("nan")
    with obj.context():
        loss, _, _ = obj.loss((xb, yb), True)
        obj.optimizer.zero_grad(set_to_none=True)
        with pytest.raises(FloatingPointError, match="forget term"):
            obj.backward_step(loss)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
