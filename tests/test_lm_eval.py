"""Language-model metrics (dfmu_ext.eval.lm) on a tiny plain-torch causal LM and hand-made Q/A sets."""
import math

import pytest
import torch

from _lm_tiny import EOS, T, make_model, qa_set, same_state, state, train
from dfmu_ext.eval import lm as E
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, batches, forward_logits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def facts():
    return qa_set(16, seed=0)


@pytest.fixture(scope="module")
def trained(facts):
    """A tiny LM that has memorised ``facts`` (shared: copy before changing it)."""
    return train(make_model(0), facts, steps=150)


def greedy_answers(model, data):
    """A real greedy decoding loop: feed the prompt, append the argmax token, as many times as the
    answer is long; returns per sequence whether the decoded tokens equal the gold answer."""
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(len(data)):
            s = data[i]
            scored = (s["labels"] != IGNORE_INDEX).nonzero().flatten()
            start, stop = int(scored[0]), int(scored[-1]) + 1
            seq = s["input_ids"][:start].clone()
            for _ in range(stop - start):
                x = {"input_ids": seq[None], "attention_mask": torch.ones(1, seq.numel(), dtype=torch.long)}
                nxt = model(**x)[0, -1].argmax()
                seq = torch.cat([seq, nxt[None]])
            out.append(bool(torch.equal(seq[start:stop], s["labels"][start:stop])))
    return torch.tensor(out)


def test_answer_correct_is_greedy_decoding(trained, facts):
    # the memorised facts (mostly right), unseen facts (mostly wrong), and the model's own greedy
    # continuations (all right, answers of varying lengths) with one token changed (all wrong)
    model = trained
    own = qa_set(9, seed=3, answer_len=3)
    ids, labels = own.input_ids.clone(), own.labels.clone()
    with torch.no_grad():
        for i in range(len(own)):
            scored = (labels[i] != IGNORE_INDEX).nonzero().flatten()
            for t in scored.tolist():  # the greedy continuation, token by token
                nxt = model(input_ids=ids[i:i + 1, :t])[0, -1].argmax()
                ids[i, t] = nxt
                labels[i, t] = nxt
    own = TokenSequences(ids, labels, own.attention_mask)
    wrong_labels = labels.clone()
    first = (labels != IGNORE_INDEX).float().argmax(1)
    wrong_labels[torch.arange(len(own)), first] = (labels[torch.arange(len(own)), first] + 1 - 3) % 21 + 3
    wrong = TokenSequences(ids, wrong_labels, own.attention_mask)
    for data, expect in ((facts, None), (qa_set(16, seed=7), None), (own, True), (wrong, False)):
        (x, y), = list(batches(data, len(data)))
        with torch.no_grad():
            got = E.answer_correct(forward_logits(model, x), y)
        ref = greedy_answers(model, data)
        assert torch.equal(got, ref)
        if expect is not None:
            assert bool((got == expect).all())
    assert E.answer_accuracy(model, facts) > 0.8 and E.answer_accuracy(model, qa_set(16, seed=7)) < 0.3


def test_answer_correct_without_scored_token_is_false():
    logits = torch.zeros(2, 4, 5)
    labels = torch.full((2, 4), IGNORE_INDEX)
    labels[1, 2] = 0
    assert E.answer_correct(logits, labels).tolist() == [False, True]


def test_perplexity_probability_and_losses_match_float64_hand_computation(trained, facts):
    model = trained
    with torch.no_grad():
        logits = model(input_ids=facts.input_ids, attention_mask=facts.attention_mask).double()
    logp = torch.log_softmax(logits, -1)
    total, tokens, per_seq, per_tok = 0.0, 0, [], []
    for n in range(len(facts)):
        s = 0.0
        k = 0
        for t in range(T - 1):
            y = int(facts.labels[n, t + 1])
            if y != IGNORE_INDEX:
                s -= float(logp[n, t, y])
                k += 1
        per_seq.append(s)
        per_tok.append(s / k)
        total += s
        tokens += k
    assert E.perplexity(model, facts, batch_size=5) == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert E.answer_probability(model, facts, batch_size=3) == pytest.approx(
        sum(math.exp(-s) for s in per_seq) / len(per_seq), rel=1e-5)
    got = E.sequence_losses(model, facts, batch_size=4)
    assert got.dtype == torch.float64 and got.shape == (len(facts),)
    assert torch.allclose(got, torch.tensor(per_tok, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_auc_hand_example_with_ties():
    # positives 3, 2, 2 ; negatives 2, 1: pairs (3>2) (3>1) (2=2 -> 1/2) (2>1) (2=2 -> 1/2) (2>1) = 5/6
    assert E.auc_from_scores(torch.tensor([3.0, 2.0, 2.0]), torch.tensor([2.0, 1.0])) == pytest.approx(5 / 6)
    assert E.auc_from_scores(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == pytest.approx(0.5)
    assert E.auc_from_scores(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 5, (30,), generator=g).double(), torch.randint(0, 5, (20,), generator=g).double()
    pairwise = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean()
    assert E.auc_from_scores(pos, neg) == pytest.approx(float(pairwise))
    with pytest.raises(ValueError, match="positives and negatives"):
        E.auc_from_scores(torch.tensor([]), torch.tensor([1.0]))


def test_membership_auc(trained, facts):
    unseen = qa_set(16, seed=9)
    auc = E.membership_auc(trained, facts, unseen)
    m, n = -E.sequence_losses(trained, facts), -E.sequence_losses(trained, unseen)
    pairwise = ((m[:, None] > n[None]).double() + 0.5 * (m[:, None] == n[None]).double()).mean()
    assert auc == pytest.approx(float(pairwise)) and auc > 0.9
    assert E.membership_auc(trained, facts, facts) == pytest.approx(0.5)


def test_metrics_restore_mode_and_do_not_change_the_model(trained, facts):
    model = make_model(1, dropout=0.5)
    model.train()
    model.mlp.eval()
    before = state(model)
    a = E.answer_probability(model, facts)
    assert E.answer_probability(model, facts) == a  # eval mode: dropout off, deterministic
    assert model.training and not model.mlp.training and model.attn.training
    assert same_state(before, state(model))


def test_relearn_attack_leaves_the_model_untouched(trained, facts):
    before = state(trained)
    grads = [p.grad for p in trained.parameters()]
    train_facts, eval_facts = facts.subset(range(4)), facts.subset(range(4, 16))
    acc = E.relearn_attack(trained, train_facts, eval_facts, steps=3)
    assert same_state(before, state(trained)) and [p.grad for p in trained.parameters()] == grads
    assert not trained.training and 0.0 <= acc <= 1.0
    assert E.relearn_attack(trained, train_facts, eval_facts, steps=3) == acc  # deterministic
    assert E.relearn_attack(trained, train_facts, eval_facts, steps=0) == E.answer_accuracy(trained, eval_facts)


def test_relearn_attack_trains_only_the_named_parameters(trained, facts, monkeypatch):
    train_facts, eval_facts = facts.subset(range(4)), facts.subset(range(4, 16))
    every = [name for name, _ in trained.named_parameters()]
    acc = E.relearn_attack(trained, train_facts, eval_facts, steps=3)
    # naming every parameter is the default attack, step for step
    assert E.relearn_attack(trained, train_facts, eval_facts, steps=3, parameters=every) == acc
    attackers = []
    real_copy = E.copy_model
    monkeypatch.setattr(E, "copy_model", lambda m: attackers.append(real_copy(m)) or attackers[-1])
    before = state(trained)
    for pieces, moved in (("attn", {"attn.qkv", "attn.proj"}), (["mlp.0", "head"], {"mlp.0", "head"})):
        attackers.clear()
        out = E.relearn_attack(trained, train_facts, eval_facts, steps=3, parameters=pieces)
        assert 0.0 <= out <= 1.0 and same_state(before, state(trained))
        changed = {name.rsplit(".", 1)[0] for name, p in attackers[0].named_parameters()
                   if not torch.equal(p, dict(trained.named_parameters())[name])}
        assert changed == moved   # the named ones moved (weights and biases), every other one is bit-identical


def test_relearn_attack_one_line_errors_for_parameters(trained, facts):
    before = state(trained)
    for bad, match in ((["nothing-here"], "no parameter name"), ([], "name pieces"), ([""], "name pieces"),
                       ([3], "name pieces")):
        with pytest.raises(ValueError, match=match) as e:
            E.relearn_attack(trained, facts, facts, steps=1, parameters=bad)
        assert "\n" not in str(e.value)
    assert same_state(before, state(trained))


def test_lm_battery(trained, facts):
    para = qa_set(16, seed=0, vary=False)  # the same answers, other prompts for some of them
    out = E.lm_battery(trained, forget_qa=facts.subset(range(8)), forget_para=para.subset(range(8)),
                       retain_qa=facts.subset(range(8, 16)), filler_test=facts, nonmember_qa=qa_set(8, seed=11),
                       relearn=(facts.subset(range(2)), facts.subset(range(2, 8))))
    assert tuple(out) == E.LM_BATTERY_KEYS
    assert out["forget_acc"] == E.answer_accuracy(trained, facts.subset(range(8)))
    assert out["forget_prob"] == pytest.approx(E.answer_probability(trained, facts.subset(range(8))))
    assert out["perplexity"] == pytest.approx(E.perplexity(trained, facts))
    assert out["mia_auc"] == pytest.approx(E.membership_auc(trained, facts.subset(range(8)), qa_set(8, seed=11)))
    assert math.isnan(out["retain_para_acc"]) and 0 <= out["relearn_acc"] <= 1
    out = E.lm_battery(trained, forget_qa=facts, forget_para=para, retain_qa=facts, retain_para=para,
                       filler_test=facts, nonmember_qa=facts)
    assert math.isnan(out["relearn_acc"]) and out["retain_para_acc"] == out["forget_para_acc"]


def test_one_line_errors(trained, facts):
    empty = facts.subset([])
    unscored = TokenSequences(facts.input_ids[:2], torch.full((2, T), IGNORE_INDEX), facts.attention_mask[:2])
    for fn in (E.answer_accuracy, E.answer_probability, E.perplexity, E.sequence_losses):
        with pytest.raises(ValueError, match="empty") as e:
            fn(trained, empty)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="score") as e:
            fn(trained, unscored)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        E.membership_auc(trained, facts, empty)
    with pytest.raises(ValueError, match="batch_size"):
        E.answer_accuracy(trained, facts, batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        E.relearn_attack(trained, facts, facts, lr=0)
    assert EOS == 2
