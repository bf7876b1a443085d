"""Partner neighbours (dfmu_ext.lm.partners): retain entities that share a piece of a forgotten entity,
put in the forgotten entity's questions; checked by hand on two-token names, and through unlearn."""
import pytest
import torch

import dfmu_ext
from dfmu_ext.lm.neighbours import swapped_neighbours
from dfmu_ext.lm.partners import joined, partner_neighbours
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, take
from dfmu_ext.tasks import LMFinetuneConfig

import _lm_tiny as tl

BOS, EOS, Q1, Q2, MARK = 1, 2, 3, 4, 5
A, B, C, D, E, F = 10, 11, 12, 13, 14, 15     # name pieces: the forgotten person is "A B"
VOCAB, T = 40, 8


def _rows(rows) -> TokenSequences:
    """``(prompt, answer)`` rows: the answer tokens and <eos> scored, right-padded to T."""
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        seq = [BOS] + prompt + [MARK] + answer + [EOS]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(prompt) + 2:len(seq)] = torch.tensor(answer + [EOS])
    return TokenSequences(ids, labels, mask)


FORGET = _rows([([Q1, A, B], [30]), ([Q2, A, B], [31])])
# "A C" shares A (offset 0), "D B" shares B (offset 1); "E F" shares nothing
BUDGET = _rows([([Q1, A, C], [32]), ([Q2, D, B], [33]), ([Q1, E, F], [34]), ([Q2, E, F], [35]),
                ([Q1, F, E], [36]), ([Q2, C, D], [37])])


def _all(ds):
    return take(ds, range(len(ds)))


def test_partners_put_the_budget_entities_sharing_a_piece_in_the_forget_questions():
    got = partner_neighbours(_all(FORGET), _all(BUDGET), VOCAB, most=10)
    rows = {tuple(r) for r in got.inputs["input_ids"].tolist()}
    want = {tuple(FORGET.input_ids[i].tolist()[:2]) + run + tuple(FORGET.input_ids[i].tolist()[4:])
            for i in range(2) for run in [(A, C), (D, B)]}
    assert rows == want and len(got) == 4
    for k in range(len(got)):
        i = int(got.source[k])
        assert torch.equal(got.labels[k], FORGET.labels[i])
        differs = torch.nonzero(got.inputs["input_ids"][k] != FORGET.input_ids[i]).flatten()
        assert int(got.first[k]) == int(differs[0])   # (A, C): from C's position on; (D, B): from D's
        assert torch.equal(got.inputs["attention_mask"][k], FORGET.attention_mask[i])
    # round-robin over the forget rows: the first two cover both
    assert sorted(got.source[:2].tolist()) == [0, 1]
    assert len(partner_neighbours(_all(FORGET), _all(BUDGET), VOCAB, most=3)) == 3


def test_no_partners_where_no_budget_sequence_holds_a_piece_or_none_asked():
    alone = _rows([([Q1, E, F], [34]), ([Q2, C, D], [37]), ([Q1, F, E], [36])])
    assert partner_neighbours(_all(FORGET), _all(alone), VOCAB, most=10) is None
    assert partner_neighbours(_all(FORGET), _all(BUDGET), VOCAB, most=0) is None


def test_joined_keeps_the_swapped_neighbours_tokens():
    part = partner_neighbours(_all(FORGET), _all(BUDGET), VOCAB, most=10)
    near = swapped_neighbours(_all(FORGET), _all(BUDGET), VOCAB, per_sequence=2, seed=0)
    both = joined(part, near)
    assert len(both) == len(part) + len(near)
    assert torch.equal(both.inputs["input_ids"][:len(part)], part.inputs["input_ids"])
    assert torch.equal(both.first[len(part):], near.first) and torch.equal(both.tokens, near.tokens)
    assert joined(None, near) is near and joined(part, None) is part


def test_unlearn_distils_on_partners_only_when_asked():
    data = _rows([([Q1, A, B], [30]), ([Q2, A, B], [31]), ([Q1, A, C], [32]), ([Q2, A, C], [33]),
                  ([Q1, D, B], [34]), ([Q2, D, B], [35]), ([Q1, E, F], [36]), ([Q2, E, F], [37]),
                  ([Q1, C, D], [38]), ([Q2, C, D], [39])])
    model = tl.train(tl.TinyLM(vocab=VOCAB, max_len=T), data, steps=150)
    states = {}
    for partners in (0, 16):
        m = tl.TinyLM(vocab=VOCAB, max_len=T)
        m.load_state_dict(model.state_dict())
        res = dfmu_ext.unlearn(m, data, forget_indices=[0, 1], retain_fraction=1.0, seed=0, guard=False,
                               finetune=LMFinetuneConfig(partners=partners, min_steps=4, batch_size=4))
        states[partners] = tl.state(m)
        assert res.info.get("partners") == (None if partners == 0 else 4)
    assert any(not torch.equal(states[0][k], states[16][k]) for k in states[0])


def test_partners_must_not_be_negative():
    with pytest.raises(ValueError, match="partners"):
        LMFinetuneConfig(partners=-1).validate()
