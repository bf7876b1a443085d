"""Speed changes of the causal-LM path that must not change a single weight (issue 27's time target):
the distillation teacher's logits computed once per distinct batch, and the swapped neighbours drawn
with their per-row work done once. Each is checked against the plain computation."""
import copy

import pytest
import torch

import dfmu_ext.tasks.lm_finetune as lm_finetune
from dfmu_ext.finetune import run_finetune
from dfmu_ext.lm.neighbours import _distinctive, _ids_mask, _rates, most_distinctive, swappable_positions
from dfmu_ext.lm.neighbours import swapped_neighbours, template_targets
from dfmu_ext.lm.neurons import mlp_neuron_layers, neuron_mask_plan
from dfmu_ext.lm.targets import LMForgetTermConfig
from dfmu_ext.lm.task import forward_logits, take
from dfmu_ext.tasks.lm_finetune import LMFinetuneConfig, LMObjective
from test_lm_per_term import _people


def _objective(model, teacher, data, owner, vocab, shared: bool = False):
    """The tiny fine-tune forgetting person 0 (``shared``: the budget holds one of their facts too, so
    the budget's term has a gradient on their embedding row as well)."""
    f_idx = torch.nonzero(owner == 0).flatten().tolist()
    b_idx = torch.nonzero(owner != 0).flatten().tolist() + (f_idx[:1] if shared else [])
    forget, budget = take(data, f_idx), take(data, b_idx)
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=0)
    q = template_targets(teacher, forget, near, top=vocab)
    layers = mlp_neuron_layers(model, forget[0][:1])
    config = LMFinetuneConfig(distill=5.0, batch_size=4, lr=1e-2, min_steps=12)
    obj = LMObjective(model, data.subset(b_idx), config, device=torch.device("cpu"), seed=0,
                      forget=(forget[0], q, q.scored), forget_term=LMForgetTermConfig(batch_size=2), layers=layers,
                      teacher=teacher, neighbours=near)
    masks = {l.name: torch.ones(l.units) for l in layers}
    return obj, neuron_mask_plan(layers, masks)


def _run(monkeypatch, cache_elements: int):
    """The fine-tune, then two forget-side chunks and a retain-only chunk (each restarts the budget's
    epochs, so batches repeat), with the teacher's forwards counted."""
    from _lm_tiny import make_model, train

    monkeypatch.setattr(lm_finetune, "TEACHER_CACHE_ELEMENTS", cache_elements)
    data, owner, vocab = _people(people=8)
    original = train(make_model(0, vocab=vocab), data, steps=80)
    model, teacher = copy.deepcopy(original), copy.deepcopy(original).eval()
    obj, plan = _objective(model, teacher, data, owner, vocab)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    history = run_finetune(obj, plan, obj.config)
    for forget in ("always", "always", False):
        run_finetune(obj, plan, obj.config, max_steps=5, forget=forget, history=history)
    return model, len(calls), history.steps


def test_teacher_cache_leaves_every_weight_bit_identical_and_skips_repeated_forwards(monkeypatch):
    cached, cached_calls, steps = _run(monkeypatch, 1 << 24)
    plain, plain_calls, plain_steps = _run(monkeypatch, 0)     # nothing fits: every batch computed anew
    assert steps == plain_steps and plain_calls == 2 * steps   # the budget's and the neighbours' each step
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert cached_calls < plain_calls / 2                      # the chunks re-read the fine-tune's batches


def test_teacher_cache_is_bounded_and_returns_the_teachers_logits(monkeypatch):
    from _lm_tiny import make_model, train

    data, owner, vocab = _people(people=8)
    original = train(make_model(0, vocab=vocab), data, steps=40)
    obj, _ = _objective(copy.deepcopy(original), copy.deepcopy(original).eval(), data, owner, vocab)
    x, _ = take(data, [0, 1, 2])
    one = forward_logits(original.eval(), x).numel()
    monkeypatch.setattr(lm_finetune, "TEACHER_CACHE_ELEMENTS", one)
    with torch.no_grad():
        want = forward_logits(original, x)
    assert torch.equal(obj._teacher_logits(x), want) and obj.teacher_cached == one
    y, _ = take(data, [3, 4, 5])
    obj._teacher_logits(y)                                     # beyond the bound: computed, not kept
    assert len(obj.teacher_cache) == 1 and obj.teacher_cached == one
    assert obj._teacher_logits(x) is obj.teacher_cache[next(iter(obj.teacher_cache))]


def _reference_neighbours(forget, budget, vocab, per_sequence, seed, ratio=2.0):
    """swapped_neighbours' draws written plainly: every neighbour recomputes its row's tokens and positions."""
    (xf, yf), (xb, _) = forget, budget
    ids, mask = _ids_mask(xf)
    r_f, r_b = _rates(forget, budget, vocab)
    special = _distinctive(r_f, r_b, ids.shape[0], ratio, recurring=False)
    b_ids, b_mask = _ids_mask(xb)
    allowed = r_b <= 0.5
    allowed[special] = False
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[b_ids[b_mask].clamp(0, vocab - 1)] = True
    from_budget, from_vocab = torch.nonzero(allowed & seen).flatten(), torch.nonzero(allowed).flatten()
    swappable = swappable_positions(yf, mask)
    holds = most_distinctive(ids, torch.isin(ids, special) & swappable, r_f, r_b, int(b_mask.shape[0]))
    g = torch.Generator().manual_seed(int(seed) + 7919)
    out, first = [], []
    for i in torch.nonzero(holds.any(1)).flatten().repeat(per_sequence).tolist():
        row = ids[i].clone()
        for token in torch.unique(ids[i][holds[i]]).tolist():
            pool = from_budget if from_budget.numel() and bool(torch.rand((), generator=g) < 0.5) else from_vocab
            row[(ids[i] == token) & swappable[i]] = pool[torch.randint(pool.numel(), (1,), generator=g)]
        out.append(row)
        first.append(int(holds[i].float().argmax()))
    return torch.stack(out), torch.tensor(first)


@pytest.mark.parametrize("seed", [0, 3])
def test_swapped_neighbours_draw_what_the_plain_loop_draws(seed):
    data, owner, vocab = _people(people=10, facts=4, values=3, seed=seed)
    gone = (owner == 1) | (owner == 4)
    forget = take(data, torch.nonzero(gone).flatten().tolist())
    budget = take(data, torch.nonzero(~gone).flatten()[:12].tolist())
    near = swapped_neighbours(forget, budget, vocab, per_sequence=5, seed=seed)
    ids, first = _reference_neighbours(forget, budget, vocab, 5, seed)
    assert torch.equal(near.inputs["input_ids"], ids) and torch.equal(near.first, first)


def test_the_cache_key_tells_inputs_apart_exactly():
    from dfmu_ext.lm.reuse import exact_key as _exact

    ids = torch.arange(6).reshape(2, 3)
    assert _exact(ids) == _exact(ids.clone()) and _exact(ids.t()) == _exact(ids.t().contiguous())
    assert _exact(ids) != _exact(ids.reshape(3, 2)) and _exact(ids) != _exact(ids.int())
    half = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)      # no numpy dtype: read as bytes
    assert _exact(half) != _exact(torch.tensor([1.0, 2.5], dtype=torch.bfloat16))


def test_routed_forget_term_by_autograd_grad_equals_the_set_aside_backward():
    """The forget term routed into the entity's rows: in one process only the embedding's gradient is
    formed (``autograd.grad``); the backward that sets every other gradient aside (the path a process
    group takes) must give the same weights, bit for bit."""
    from types import SimpleNamespace

    from _lm_tiny import make_model, train

    data, owner, vocab = _people(people=8)
    original = train(make_model(0, vocab=vocab), data, steps=60)
    out = []
    for world in (1, 2):
        model = copy.deepcopy(original)
        obj, plan = _objective(model, copy.deepcopy(original).eval(), data, owner, vocab, shared=True)
        obj.config.forget_into, obj.into_rows = "entity", True    # routed although the budget holds the name
        obj.comm = SimpleNamespace(world_size=world)   # 2: the set-aside backward (no collective is reached here)
        run_finetune(obj, plan, obj.config)
        out.append(model.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(out[0].values(), original.state_dict().values()))
    for name, a in out[0].items():
        assert torch.equal(a, out[1][name]), name


def test_lookups_only_tells_an_untied_embedding_from_a_tied_head():
    from dfmu_ext.lm.reuse import lookups_only

    emb = torch.nn.Embedding(7, 4)
    ids = torch.tensor([[1, 2, 3]])
    h = emb(ids)
    untied = (h @ torch.randn(4, 7)).sum()
    tied = (h @ emb.weight.t()).sum()           # the head reads the same weight: every row gets a gradient
    assert lookups_only(untied, emb.weight) and not lookups_only(tied, emb.weight)
    assert not lookups_only((torch.randn(3, requires_grad=True) * 2).sum(), emb.weight)   # not in the graph


@pytest.mark.parametrize("shared", [False, True])
def test_backward_above_the_embedding_leaves_every_weight_bit_identical(monkeypatch, shared):
    """The budget's and the neighbours' backward stops above the embedding when their tokens hold no
    entity row (``shared``: the budget holds one of the forgotten person's facts, so its batches
    sometimes do); the weights must equal those of the full backward, bit for bit."""
    from _lm_tiny import make_model, train

    data, owner, vocab = _people(people=8)
    original = train(make_model(0, vocab=vocab), data, steps=60)
    out, skipped = [], []
    real = torch.autograd.backward

    def counting(tensors, *args, inputs=None, **kw):
        skipped.append(inputs is not None)
        return real(tensors, *args, inputs=inputs, **kw)

    monkeypatch.setattr(torch.autograd, "backward", counting)
    for allowed in (True, False):
        model = copy.deepcopy(original)
        obj, plan = _objective(model, copy.deepcopy(original).eval(), data, owner, vocab, shared=shared)
        obj.lookups_only = None if allowed else False   # False: always the full backward
        history = run_finetune(obj, plan, obj.config)
        run_finetune(obj, plan, obj.config, max_steps=4, forget=False, history=history)   # no forget term
        out.append(model.state_dict())
    assert any(skipped) and not all(skipped)
    for name, a in out[0].items():
        assert torch.equal(a, out[1][name]), name
