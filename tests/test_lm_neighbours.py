"""The forget sequences' swapped neighbours (dfmu_ext.lm.neighbours): which tokens are distinctive,
what a neighbour is, and the targets averaged over them — each against a plain re-computation."""
import pytest
import torch

import dfmu_ext
import dfmu_ext.lm.targets
from dfmu_ext.unlearn import FORGET_SIDE_STEPS
from dfmu_ext.lm.neighbours import distinctive_tokens, swappable_positions, swapped_neighbours, template_targets
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, take
from dfmu_ext.model_io import Inputs


def _batch(rows, answer_at=3, pad=None):
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, answer_at] = ids[:, answer_at]
    mask = torch.ones_like(ids) if pad is None else (ids != pad).long()
    return Inputs({"input_ids": ids, "attention_mask": mask}), labels


def _reference_distinctive(f_rows, f_answer, b_rows, ratio, recurring=False):
    """Per token: share of forget prompts (positions before the answer) holding it vs share of budget
    rows; with ``recurring`` only those two forget rows or more hold."""
    vocab = 1 + max(max(r) for r in f_rows + b_rows)
    out = []
    for v in range(vocab):
        held = sum(v in row[:f_answer] for row in f_rows)
        r_f, r_b = held / len(f_rows), sum(v in row for row in b_rows) / len(b_rows)
        if r_f > 0 and r_f > ratio * r_b and (held >= 2 or not recurring):
            out.append(v)
    return out


def test_swappable_positions_are_the_prompt_or_the_whole_statement():
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 5, 6, 0, 0], [1, 5, 6, 7, 2]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3] = 7
    labels[1, 2] = 6
    labels[2, 1:] = ids[2, 1:]                       # a statement scored throughout: its prompt is <bos> alone
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(swappable_positions(labels, mask), want)
    # nothing scored: the whole real sequence
    assert torch.equal(swappable_positions(torch.full_like(ids, IGNORE_INDEX), mask), mask.bool())


@pytest.mark.parametrize("ratio", [1.0, 2.0, 4.0])
def test_distinctive_tokens_match_the_presence_rates(ratio):
    # people 10..13, attributes 20..22, answers 30..39; forget person 10 (all facts) and one fact of 11
    f_rows = [[1, 10, 20, 30, 2], [1, 10, 21, 31, 2], [1, 10, 22, 32, 2], [1, 11, 20, 33, 2]]
    b_rows = [[1, 11, 21, 34, 2], [1, 12, 20, 35, 2], [1, 12, 22, 36, 2], [1, 13, 21, 37, 2], [1, 13, 20, 38, 2]]
    got = distinctive_tokens(_batch(f_rows), _batch(b_rows), 40, ratio).tolist()
    assert got == _reference_distinctive(f_rows, 3, b_rows, ratio)
    recurring = distinctive_tokens(_batch(f_rows), _batch(b_rows), 40, ratio, recurring=True).tolist()
    assert recurring == _reference_distinctive(f_rows, 3, b_rows, ratio, recurring=True) and 11 not in recurring
    assert 10 in got and 1 not in got and not set(got) & set(range(30, 40))   # a recurring name; no answer
    if ratio >= 2:           # the attribute 20 (2 of 4 forget rows, 2 of 5 budget rows) is not distinctive
        assert recurring == [10]


def test_swapped_neighbours_change_one_distinctive_token_everywhere_in_the_prompt():
    f_rows = [[1, 10, 20, 10, 30, 2], [1, 10, 21, 10, 31, 2], [1, 40, 22, 40, 32, 2], [1, 40, 23, 40, 33, 2]]
    b_rows = [[1, 11, 21, 11, 34, 2], [1, 12, 20, 12, 35, 2], [1, 13, 22, 13, 36, 2]]
    forget, budget = _batch(f_rows, answer_at=4), _batch(b_rows, answer_at=4)
    assert set(distinctive_tokens(forget, budget, 50).tolist()) == {10, 23, 40}
    special = set(distinctive_tokens(forget, budget, 50, recurring=True).tolist())
    assert special == {10, 40}        # each row holds a recurring name: the one-off attribute 23 stays
    near = swapped_neighbours(forget, budget, 50, per_sequence=5, seed=3)
    xs = near.inputs
    assert xs["input_ids"].shape == (20, 6) and torch.equal(near.labels, forget[1][near.source])
    assert near.source.tolist() == [0, 1, 2, 3] * 5          # neighbour j of row i sits at j * rows + i
    template = {1, 2}            # held by every budget row: never swapped in
    for n, (row, i) in enumerate(zip(xs["input_ids"].tolist(), near.source.tolist())):
        orig = f_rows[i]
        changed = [t for t in range(6) if row[t] != orig[t]]
        assert changed and all(t < 4 for t in changed)                 # only the prompt moves
        swapped = orig[changed[0]]
        assert swapped in special
        assert changed == [t for t in range(4) if orig[t] == swapped]  # every prompt occurrence of it
        assert len({row[t] for t in changed}) == 1
        new = row[changed[0]]
        assert new not in {10, 23, 40} and new not in template and 0 <= new < 50
        assert int(near.first[n]) == changed[0]
        assert near.where[n].tolist() == [t >= changed[0] for t in range(6)]
    assert len(near.head(7)) == 7 and torch.equal(near.head(7).first, near.first[:7])
    # seeded: the same call gives the same neighbours, another seed others
    again = swapped_neighbours(forget, budget, 50, per_sequence=5, seed=3)
    assert torch.equal(again.inputs["input_ids"], xs["input_ids"])
    other = swapped_neighbours(forget, budget, 50, per_sequence=5, seed=4)
    assert not torch.equal(other.inputs["input_ids"], xs["input_ids"])


def _reference_most_distinctive(f_rows, b_rows, answer_at, ratio=2.0):
    """Per forget row, its distinctive prompt tokens of the largest r_F / ((c_B + 1) / (n_B + 2)) (all on a
    tie), and those held by exactly the same forget rows as one of them."""
    special = set(_reference_distinctive(f_rows, answer_at, b_rows, ratio))
    rows_of = {v: frozenset(i for i, row in enumerate(f_rows) if v in row[:answer_at]) for v in special}
    n_b = len(b_rows)

    def times(v):
        return (len(rows_of[v]) / len(f_rows)) / ((sum(v in row for row in b_rows) + 1) / (n_b + 2))

    out = []
    for row in f_rows:
        held = [v for v in set(row[:answer_at]) if v in special]
        best = max(times(v) for v in held)
        top = {v for v in held if times(v) >= best * (1 - 1e-9)}
        out.append(top | {v for v in held if any(rows_of[v] == rows_of[c] for c in top)})
    return out


@pytest.mark.parametrize("case", ["people", "attribute", "two-piece names"])
def test_swapped_neighbours_swap_each_rows_most_shared_distinctive_tokens(case):
    # people 10..13 x attributes 20..23; the budget holds no question about attribute 23
    if case == "people":      # forget people 10 and 11 (every fact): their names, not attribute 23, move
        f_rows = [[1, p, a, 30 + a - 20, 2] for p in (10, 11) for a in (20, 21, 22, 23)]
        b_rows = [[1, 12, 20, 31, 2], [1, 13, 21, 32, 2], [1, 12, 22, 33, 2], [1, 13, 20, 34, 2]]
    elif case == "two-piece names":   # 10+14 and 11+15 are two people; 21 a word the budget holds once
        f_rows = [[1, p, p + 4, a, 2] for p in (10, 11) for a in (20, 21, 22, 23, 21, 21)]
        b_rows = [[1, 12, 16, 20, 2], [1, 13, 17, 21, 2], [1, 12, 16, 22, 2]] + [[1, 13, 17, 24, 2]] * 9
        forget, budget = _batch(f_rows, answer_at=4), _batch(b_rows, answer_at=4)
        want = _reference_most_distinctive(f_rows, b_rows, 4)
        near = swapped_neighbours(forget, budget, 50, per_sequence=6, seed=0)
        for row, i in zip(near.inputs["input_ids"].tolist(), near.source.tolist()):
            assert {f_rows[i][t] for t in range(5) if row[t] != f_rows[i][t]} == want[i]
        assert set(near.tokens.tolist()) == {10, 11, 14, 15}
        return
    else:                     # forget attribute 23 of everyone: its word moves, not the one-off names
        f_rows = [[1, p, 23, 35 + p - 10, 2] for p in (10, 11, 12, 13)]
        b_rows = [[1, 14, 20, 31, 2], [1, 15, 21, 32, 2], [1, 16, 22, 33, 2], [1, 17, 20, 34, 2]]
    forget, budget = _batch(f_rows), _batch(b_rows)
    want = _reference_most_distinctive(f_rows, b_rows, 3)
    assert set(distinctive_tokens(forget, budget, 50).tolist()) >= {10, 11, 23}   # names and 23 pass the ratio
    near = swapped_neighbours(forget, budget, 50, per_sequence=6, seed=0)
    for row, i in zip(near.inputs["input_ids"].tolist(), near.source.tolist()):
        moved = {f_rows[i][t] for t in range(5) if row[t] != f_rows[i][t]}
        assert moved == want[i]
    assert set(near.tokens.tolist()) == set().union(*want)
    assert set(near.tokens.tolist()) == ({10, 11} if case == "people" else {23})


def test_swapped_neighbours_none_when_nothing_is_distinctive():
    rows = [[1, 10, 20, 30, 2], [1, 11, 21, 31, 2]]
    assert swapped_neighbours(_batch(rows), _batch(rows), 40, per_sequence=4) is None
    assert swapped_neighbours(_batch(rows), _batch([[1, 12, 22, 32, 2]]), 40, per_sequence=0) is None


class _Table(torch.nn.Module):
    """A 'causal LM' whose logits at position t are a table row of the token at t (so the
    neighbours' next-token distributions are known in closed form)."""

    def __init__(self, vocab, seed=0):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def _own_token_if_top_reference(p: torch.Tensor, own: int) -> torch.Tensor:
    """float64, one neighbour's row at a time: the own token zeroed unless it is the row's top."""
    out = p.double().clone()
    for n in range(out.shape[0]):
        if int(out[n].argmax()) != own:
            out[n, own] = 0.0
        out[n] /= out[n].sum()
    return out


@pytest.mark.parametrize("own_token_if_top", [True, False])
@pytest.mark.parametrize("top", [3, 50])
def test_template_targets_average_the_neighbours_distributions(top, own_token_if_top):
    vocab = 50
    model = _Table(vocab)
    # the answer's logits read the token just before it: make that the person (the attribute comes first)
    f_rows = [[1, 20, 10, 30, 2], [1, 21, 10, 31, 2], [1, 22, 40, 32, 2]]
    b_rows = [[1, 20, 11, 34, 2], [1, 21, 12, 35, 2], [1, 22, 13, 36, 2]]
    forget, budget = _batch(f_rows), _batch(b_rows)
    near = swapped_neighbours(forget, budget, vocab, per_sequence=6, seed=0)
    with torch.no_grad():   # row 0's own answer (30) the top guess of its first neighbour's person only
        model.table[near.inputs["input_ids"][near.source == 0][0, 2], 30] = 50.0
    q = template_targets(model, forget, near, top=top, own_token_if_top=own_token_if_top)
    dense = q.to_dense()
    assert torch.equal(q.scored, forget[1][:, 1:] != IGNORE_INDEX)
    for i in range(3):
        mine = near.inputs["input_ids"][near.source == i]
        raw = torch.softmax(model.table.detach()[mine[:, 2]], -1)   # position 2 predicts the answer
        own = f_rows[i][3]
        p = (_own_token_if_top_reference(raw, own) if own_token_if_top else raw.double()).mean(0).float()
        want = torch.zeros(vocab)
        w, ids = p.topk(min(top, vocab))
        want[ids] = w / w.sum()
        torch.testing.assert_close(dense[i, 2], want, atol=1e-6, rtol=1e-5)
        assert float(dense[i].sum()) == pytest.approx(1.0, abs=1e-5)  # one scored position per row
        if i == 0:     # the neighbour whose best guess is the own answer keeps it either way
            assert float(dense[0, 2, own]) > 0.1
        elif own_token_if_top and not bool((raw.argmax(1) == own).any()):
            assert float(dense[i, 2, own]) == 0.0    # no neighbour's best guess: gone from the target


@pytest.mark.parametrize("max_elements", [1, 60, 130, 10_000])
def test_template_targets_in_groups_equal_the_whole(max_elements):
    """Groups of forget rows (as few as one position's sums at a time, one neighbour per forward) give
    the targets of one pass over everything: nothing positions x vocabulary is needed at once."""
    vocab = 50
    model = _Table(vocab, seed=3)
    ids = torch.tensor([[1, 20, 21, 10, 22, 30, 2], [1, 20, 21, 10, 23, 31, 2], [1, 24, 25, 10, 26, 32, 2]])
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    labels[1, 4:] = IGNORE_INDEX                         # rows with different numbers of scored positions
    forget = (Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), labels)
    b = torch.tensor([[1, 20, 21, 11, 22, 34, 2], [1, 20, 21, 12, 23, 35, 2], [1, 24, 25, 13, 26, 36, 2]])
    budget = (Inputs({"input_ids": b, "attention_mask": torch.ones_like(b)}), b.clone())
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=1)
    whole = template_targets(model, forget, near, top=7, max_elements=1 << 30)
    parts = template_targets(model, forget, near, top=7, max_elements=max_elements)
    assert torch.equal(parts.index, whole.index) and torch.equal(parts.ids, whole.ids)
    torch.testing.assert_close(parts.weights, whole.weights, rtol=1e-6, atol=1e-7)


def test_template_targets_skip_positions_that_read_no_swap():
    """A statement scored throughout, its name at position 3: positions before it get no target, the
    ones after average only over the neighbours (all of which swapped the name there)."""
    vocab = 50
    model = _Table(vocab)
    ids = torch.tensor([[1, 20, 21, 10, 22, 30, 2], [1, 20, 21, 10, 23, 31, 2]])
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    forget = (Inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}), labels)
    b = torch.tensor([[1, 20, 21, 11, 22, 34, 2], [1, 20, 21, 12, 23, 35, 2], [1, 24, 25, 13, 26, 36, 2]])
    budget = (Inputs({"input_ids": b, "attention_mask": torch.ones_like(b)}), b.clone())
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=1)
    assert set(near.first.tolist()) == {3}
    q = template_targets(model, forget, near, top=vocab)
    want_scored = torch.zeros(2, 6, dtype=torch.bool)
    want_scored[:, 3:] = True                          # logits at t >= 3 read the swapped name
    assert torch.equal(q.scored, want_scored)
    dense = q.to_dense()
    for i in range(2):
        mine = near.inputs["input_ids"][near.source == i]
        for t in range(3, 6):   # the default: each neighbour keeps the own next token only as its top
            raw = torch.softmax(model.table.detach()[mine[:, t]], -1)
            p = _own_token_if_top_reference(raw, int(ids[i, t + 1])).mean(0).float()
            torch.testing.assert_close(dense[i, t], p / p.sum(), atol=1e-6, rtol=1e-5)


def _people(people=12, facts=3, values=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, owner = [], []
    answers = torch.randint(0, values, (people, facts), generator=g)
    for p in range(people):
        for a in range(facts):
            rows.append([1, 3 + p, 3 + people + a, 3 + people + facts + a * values + int(answers[p, a]), 2])
            owner.append(p)
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    return TokenSequences(ids, labels), torch.tensor(owner), 3 + people + facts + facts * values


def test_unlearn_reports_the_neighbour_targets_and_the_estimate_stop():
    from _lm_tiny import make_model, train

    data, owner, vocab = _people()
    model = train(make_model(0, vocab=vocab), data, steps=200)
    forget = torch.nonzero(owner == 0).flatten().tolist()
    res = dfmu_ext.unlearn(model, data, forget_indices=forget, retain_fraction=0.5, seed=0)
    assert res.info["forget_targets"] == "neighbours" and res.info["neighbours"] > 0
    assert res.info["forget_into"] == "entity rows"         # each person's token is their own
    side = res.info["forget_side"]
    assert side["stop"] == "estimate" and side["gap"] <= side["gap_before"] + 1e-9
    assert 0 <= side["extra_forget_steps"] <= FORGET_SIDE_STEPS["estimate"]
    # the old targets stay reachable, and then no neighbour is distilled when asked for none
    again = train(make_model(0, vocab=vocab), data, steps=200)
    old = dfmu_ext.unlearn(again, data, forget_indices=forget, retain_fraction=0.5, seed=0,
                           forget_term=dfmu_ext.lm.targets.LMForgetTermConfig(source="positions"),
                           finetune=dfmu_ext.tasks.LMFinetuneConfig(neighbours=0))
    assert old.info["forget_targets"] == "positions" and old.info["neighbours"] == 0


@pytest.mark.parametrize("bad", [dict(source="nearest"), dict(per_sequence=0)])
def test_bad_forget_term_source_is_one_line(bad):
    with pytest.raises(ValueError, match="forget term"):
        dfmu_ext.lm.targets.LMForgetTermConfig(**bad).validate()


def test_negative_neighbours_is_one_line():
    with pytest.raises(ValueError, match="neighbours"):
        dfmu_ext.tasks.LMFinetuneConfig(neighbours=-1).validate()


def _two_people_targets():
    """A table model, two forget sequences and their neighbours' dense-able targets from another table."""
    vocab = 30
    f_rows = [[1, 20, 10, 25, 2], [1, 21, 10, 26, 2]]
    b_rows = [[1, 20, 11, 27, 2], [1, 21, 12, 28, 2]]
    forget, budget = _batch(f_rows), _batch(b_rows)
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=0)
    return _Table(vocab, seed=1), forget, template_targets(_Table(vocab, seed=2), forget, near, top=vocab)


@pytest.mark.parametrize("min_kl", [0.0, 0.58, 0.7])   # the two positions' KLs: 0.565, 0.610
def test_informative_keeps_the_positions_whose_kl_to_the_original_exceeds_the_threshold(min_kl):
    """informative keeps a target position where KL(q || p_orig) > min_kl, the KL recomputed densely in
    float64 (the forget side's old stop measure; now only the targets' position filter)."""
    from dfmu_ext.lm.neighbours import informative

    model, forget, q = _two_people_targets()
    dense = q.to_dense().double()
    logp = torch.log_softmax(model.table.detach().double()[forget[0]["input_ids"]][:, :-1], -1)
    kl = (dense * (dense.clamp_min(1e-300).log() - logp)).sum(-1)
    want = q.scored & (kl > min_kl)
    kept = informative(q, model, forget[0], min_kl)
    if not bool(want.any()):
        assert kept is None                              # no position asks for a change
        return
    assert torch.equal(kept.scored, want)
    torch.testing.assert_close(kept.to_dense()[want], q.to_dense()[want])


def test_forget_gap_is_the_own_token_excess_over_the_targets():
    """forget_gap = mean over the positions with targets of p(own next token) - q(own next token),
    recomputed densely in float64; the original (whose own tokens the targets lower) is above 0."""
    from dfmu_ext.tasks.base import Targets
    from dfmu_ext.tasks.causal_lm import CausalLMTask

    model, forget, q = _two_people_targets()
    targets = Targets((forget[0], q, q.scored), [0, 1])
    gap = CausalLMTask().forget_gap(model, None, targets, torch.device("cpu"))
    dense = q.to_dense().double()
    p = torch.softmax(model.table.detach().double()[forget[0]["input_ids"]][:, :-1], -1)
    own = forget[0]["input_ids"][:, 1:]
    excess = (p.gather(2, own[..., None]) - dense.gather(2, own[..., None]))[..., 0][q.scored]
    assert gap == pytest.approx(float(excess.mean()), rel=1e-5, abs=1e-7)
    # the dense form of the same targets gives the same number
    dense_gap = CausalLMTask().forget_gap(model, None, Targets((forget[0], q.to_dense(), q.scored), [0, 1]),
                                          torch.device("cpu"))
    assert dense_gap == pytest.approx(gap, rel=1e-5, abs=1e-7)


def test_mlp_entity_trains_the_mlp_and_only_the_forget_sets_token_rows():
    from _lm_tiny import make_model, train

    data, owner, vocab = _people()
    model = train(make_model(0, vocab=vocab), data, steps=200)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    forget = torch.nonzero(owner == 0).flatten().tolist()
    res = dfmu_ext.unlearn(model, data, forget_indices=forget, retain_fraction=0.5, seed=0, guard=False)
    assert res.finetune.steps > 0
    after = model.state_dict()
    person = 3                                       # person 0's token: the only distinctive one
    changed_rows = (after["tok.weight"] != before["tok.weight"]).any(1).nonzero().flatten().tolist()
    assert changed_rows == [person]
    for name in before:
        moved = not torch.equal(after[name], before[name])
        if name.startswith("mlp.") or name == "tok.weight":
            continue
        assert not moved, name                       # attention, norms, positions and head stay as they were
    assert not torch.equal(after["mlp.0.weight"], before["mlp.0.weight"])


@pytest.mark.parametrize("into", ["trained", "entity"])
def test_forget_into_entity_routes_the_forget_terms_gradient_to_the_token_rows_only(into):
    """forget_into="entity": the forget term's gradient is the full model's gradient of the term with
    respect to the input embedding, on the distinctive tokens' rows, and nothing on the MLPs; the
    budget's loss trains the MLPs as before. "trained": the term reaches the MLPs too."""
    from _lm_tiny import make_model, train
    from dfmu_ext.lm.neurons import mlp_neuron_layers
    from dfmu_ext.lm.targets import LMForgetTermConfig, soft_target_loss
    from dfmu_ext.tasks.lm_finetune import LMFinetuneConfig, LMObjective

    data, owner, vocab = _people()
    model = train(make_model(0, vocab=vocab), data, steps=100)
    f_idx = torch.nonzero(owner == 0).flatten().tolist()
    b_idx = torch.nonzero(owner != 0).flatten().tolist()[:12]
    forget, budget = take(data, f_idx), take(data, b_idx)
    near = swapped_neighbours(forget, budget, vocab, per_sequence=4, seed=0)
    q = template_targets(model, forget, near, top=vocab)
    payload = (forget[0], q, q.scored)
    layers = mlp_neuron_layers(model, forget[0][:1])
    obj = LMObjective(model, data.subset(b_idx), LMFinetuneConfig(distill=0.0, forget_into=into),
                      device=torch.device("cpu"), seed=0, forget=payload,
                      forget_term=LMForgetTermConfig(batch_size=len(f_idx)), layers=layers, neighbours=near)
    batch = take(data, b_idx)

    def grads(forget_phase):
        model.zero_grad(set_to_none=True)
        with obj.context():
            loss = obj.loss(batch, forget_phase)[0]
            obj.backward_terms(model.tok.weight)         # the step's queued terms, as backward_step runs them
            loss.backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    both, retain = grads(True), grads(False)
    term = {n: both[n] - retain[n] for n in both}
    emb = model.tok.weight
    want = torch.autograd.grad(soft_target_loss(model(forget[0]["input_ids"]), q, q.scored), emb)[0]
    rows = torch.zeros(vocab, 1)
    rows[near.tokens] = 1
    assert near.tokens.tolist() == [3]                                  # person 0's token
    torch.testing.assert_close(term["tok.weight"], want * rows, rtol=1e-4, atol=1e-6)
    mlp = [n for n in term if n.startswith("mlp.")]
    assert mlp and any(retain[n].abs().sum() > 0 for n in mlp)          # the budget's loss trains the MLPs
    moved = max(float(term[n].abs().max()) for n in mlp)
    assert (moved < 1e-7) if into == "entity" else (moved > 1e-4)


def test_bad_forget_into_is_one_line():
    with pytest.raises(ValueError, match="forget_into"):
        dfmu_ext.tasks.LMFinetuneConfig(forget_into="mlp").validate()


def test_reset_rows_draws_only_those_rows_from_the_others_statistics():
    from dfmu_ext.tasks.lm_finetune import reset_rows

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(400, 6, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0]) + 4.0
    before = weight.clone()
    tokens = torch.tensor([3, 17, 250])
    reset_rows(weight, tokens, seed=5)
    others = torch.ones(400, dtype=torch.bool)
    others[tokens] = False
    assert torch.equal(weight[others], before[others])               # no other row moves
    assert not torch.equal(weight[tokens], before[tokens])
    again = before.clone()
    reset_rows(again, tokens, seed=5)
    assert torch.equal(again, weight)                                 # seeded: the same on every rank
    # the drawn rows follow the other rows' per-coordinate mean and std (many rows drawn to check)
    many = torch.arange(0, 400, 2)
    big = before.clone()
    reset_rows(big, many, seed=1)
    keep = torch.ones(400, dtype=torch.bool)
    keep[many] = False
    ref = before[keep].double()
    torch.testing.assert_close(big[many].double().mean(0), ref.mean(0), atol=0.5, rtol=0)
    torch.testing.assert_close(big[many].double().std(0) / ref.std(0), torch.ones(6, dtype=torch.float64),
                               atol=0.25, rtol=0)


def test_token_shares_measured_on_a_fair_sample_swap_the_names_not_the_template():
    # forget rows "<bos> A1 A2 was ANS" (two people); the budget's nearest part holds the retain people who
    # share a name piece and few rows with "was": measured on it, "was" is the most distinctive token and
    # the names stay in every neighbour (the same person: the targets read the forgotten answers back).
    # Measured on a fair sample of the retain data (the budget's random draw), the names are swapped.
    was = 5
    forget = _batch([[1, 20, 21, was, 50]] * 4 + [[1, 22, 23, was, 51]] * 4, answer_at=4)
    nearest = [[1, 20, 30, 9, 52], [1, 21, 31, 9, 52], [1, 22, 32, 9, 53], [1, 23, 33, 9, 53],
               [1, 34, 35, was, 54], [1, 36, 37, was, 54], [1, 38, 39, 9, 55], [1, 24, 25, 9, 55]]
    fair = [[1, 40 + 2 * i, 41 + 2 * i, was if i % 2 else 9, 56] for i in range(8)]
    budget = _batch(nearest + fair, answer_at=4)
    rows = torch.arange(8).repeat(4)

    biased = swapped_neighbours(forget, _batch(nearest, answer_at=4), 64, per_sequence=4, seed=0)
    assert torch.equal(biased.source, rows)
    changed = biased.inputs["input_ids"] != forget[0]["input_ids"][rows]
    assert changed[:, 3].all() and not changed[:, 1:3].any()          # "was" swapped, the names kept

    fair_near = swapped_neighbours(forget, budget, 64, per_sequence=4, seed=0, rates=_batch(fair, answer_at=4))
    changed = fair_near.inputs["input_ids"] != forget[0]["input_ids"][rows]
    assert changed[:, 1:3].all() and not changed[:, 3].any()          # the names swapped, "was" kept
    # the substitutes still come from the whole budget or the vocabulary, never a distinctive token
    assert not torch.isin(fair_near.inputs["input_ids"][:, 1:3], torch.tensor([20, 21, 22, 23])).any()


def test_most_distinctive_is_the_largest_ratio_not_the_strongest_evidence():
    # "what" (5) in every forget prompt and in 12 of 40 budget rows: 3.2x as often (smoothed), and the evidence
    # that the budget holds it less is overwhelming (a binomial tail of ~1e-300 at 40 rows); the names (10+11,
    # 12+13), each in half the forget rows and once in the budget, are 10.5x as often: they are what is swapped
    what = 5
    f_rows = [[1, what, 10, 11, 50]] * 4 + [[1, what, 12, 13, 51]] * 4
    b_rows = ([[1, what, 20 + i, 21 + i, 52] for i in range(12)] + [[1, 9, 10, 30, 53], [1, 9, 31, 11, 53],
              [1, 9, 12, 32, 53], [1, 9, 33, 13, 53]] + [[1, 9, 40 + i, 41 + i, 54] for i in range(24)])
    want = _reference_most_distinctive(f_rows, b_rows, 4)
    assert want == [{10, 11}] * 4 + [{12, 13}] * 4
    near = swapped_neighbours(_batch(f_rows, answer_at=4), _batch(b_rows, answer_at=4), 80, per_sequence=3, seed=0)
    for row, i in zip(near.inputs["input_ids"].tolist(), near.source.tolist()):
        assert {f_rows[i][t] for t in range(5) if row[t] != f_rows[i][t]} == want[i]


def test_own_token_share_reaches_the_forget_targets(monkeypatch):
    from _lm_tiny import make_model, train

    from dfmu_ext.lm.targets import LMForgetTermConfig, SparseTargets

    made = []
    scaled = SparseTargets.own_token_scaled

    def spy(self, labels, share):
        made.append((scaled(self, labels, share), labels[:, 1:][self.scored], share))
        return made[-1][0]

    monkeypatch.setattr(SparseTargets, "own_token_scaled", spy)
    data, owner, vocab = _people(seed=1)
    model = train(make_model(0, vocab=vocab), data, steps=200)
    forget = torch.nonzero(owner == 0).flatten().tolist()
    res = dfmu_ext.unlearn(model, data, forget_indices=forget, retain_fraction=0.5, seed=0,
                           forget_term=LMForgetTermConfig(own_token_share=0.0))
    assert res.info["forget_term"]["own_token_share"] == 0.0 and len(made) == 1
    q, own, share = made[0]
    hit = q.ids == own[:, None]
    movable = (q.weights * ~hit).sum(1) > 0
    assert share == 0.0 and bool(movable.any()) and float((q.weights * hit)[movable].sum()) == 0.0


@pytest.mark.parametrize("own_token_if_top", [True, False])
def test_own_token_if_top_reaches_the_template_targets(monkeypatch, own_token_if_top):
    from _lm_tiny import make_model, train

    import dfmu_ext.tasks.causal_lm as causal_lm
    from dfmu_ext.lm.targets import LMForgetTermConfig

    seen = []
    real = causal_lm.template_targets

    def spy(*args, **kwargs):
        seen.append(kwargs.get("own_token_if_top"))
        return real(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "template_targets", spy)
    data, owner, vocab = _people(seed=1)
    model = train(make_model(0, vocab=vocab), data, steps=200)
    forget = torch.nonzero(owner == 0).flatten().tolist()
    term = {} if own_token_if_top else dict(forget_term=LMForgetTermConfig(own_token_if_top=False))
    res = dfmu_ext.unlearn(model, data, forget_indices=forget, retain_fraction=0.5, seed=0, **term)
    assert seen == [own_token_if_top] and res.info["forget_term"]["own_token_if_top"] is own_token_if_top


def test_own_token_if_top_must_be_a_bool():
    from dfmu_ext.lm.targets import LMForgetTermConfig

    with pytest.raises(ValueError, match="own_token_if_top must be True or False"):
        LMForgetTermConfig(own_token_if_top="yes").validate()
