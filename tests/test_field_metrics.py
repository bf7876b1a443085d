"""The field's LM-unlearning metrics (dfmu_ext.eval.field) against values computed by hand.

A bigram model whose next-token distribution after token ``c`` is the row ``P[c]`` (its logits are
``log P``, float64) makes every probability known exactly; the expected values below are written
out from ``P`` with Python's ``math`` and numpy, not with the module's code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from _lm_tiny import ANSWERS, EOS, make_model, qa_set, train
from dfmu_ext.eval import field as fm
from dfmu_ext.eval.field import QAItem

P = np.array([[0.10, 0.60, 0.10, 0.10, 0.10],
              [0.10, 0.10, 0.50, 0.20, 0.10],
              [0.20, 0.10, 0.10, 0.40, 0.20],
              [0.25, 0.25, 0.10, 0.10, 0.30],
              [0.40, 0.15, 0.15, 0.15, 0.15]])
# greedy from 0: 1, 2, 3, 4, 0, 1, ... (every row has one largest entry)


class Bigram(nn.Module):
    def __init__(self, probs: np.ndarray = P):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(np.log(probs), dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None):
        return self.logits[input_ids]


def gm(*p):  # length-normalised probability of an answer: the geometric mean of its token probabilities
    return math.prod(p) ** (1 / len(p))


@pytest.fixture(scope="module")
def model():
    return Bigram().eval()


def test_probability_is_the_length_normalised_answer_probability(model):
    items = [QAItem((0,), (1, 2)), QAItem((0,), (1, 3, 0)), QAItem((3, 4), (0,))]
    want = [gm(0.6, 0.5), gm(0.6, 0.2, 0.25), 0.4]
    np.testing.assert_allclose(fm.probability(model, items), want, rtol=1e-12)
    # the same from samples (right-padded in one batch), and batch by batch
    samples = [it.sample() for it in items]
    np.testing.assert_allclose(fm.probability(model, samples, batch_size=1), want, rtol=1e-12)
    np.testing.assert_allclose(fm.probability_w_options([0.5, 0.2], [[0.25, 0.25], [0.1, 0.5]]),
                               [0.5, 0.2 / 0.8], rtol=1e-12)


def test_truth_ratio_geometric_means_and_aggregators(model):
    item = QAItem((0,), (1, 2), paraphrased=[(1, 3)], perturbed=[(2, 3), (4, 0)])
    # perturbed: P(2|0) P(3|2) = .1 * .4 and P(4|0) P(0|4) = .1 * .4; paraphrased: P(1|0) P(3|1) = .6 * .2
    want = math.sqrt(gm(0.1, 0.4) * gm(0.1, 0.4)) / gm(0.6, 0.2)
    no_para = QAItem((2,), (3,), perturbed=[(0,), (4,)])  # the gold answer stands in: sqrt(.2 * .2) / .4
    two_para = QAItem((0,), (1, 2), paraphrased=[(1, 3), (1, 2)], perturbed=[(1, 4)])
    want_two = gm(0.6, 0.1) / math.sqrt(gm(0.6, 0.2) * gm(0.6, 0.5))
    np.testing.assert_allclose(fm.truth_ratios(model, [item, no_para, two_para]), [want, 0.5, want_two], rtol=1e-12)
    r = [0.5, 2.0, 1.5]
    assert fm.truth_ratio(r, "closer_to_1_better") == pytest.approx((0.5 + 0.5 + 1 / 1.5) / 3, rel=1e-14)
    assert fm.truth_ratio(r, "true_better") == pytest.approx(0.5 / 3, rel=1e-14)
    with pytest.raises(ValueError, match="aggregator must be one of"):
        fm.truth_ratio(r, "mean")
    with pytest.raises(ValueError, match="perturbed answers"):
        fm.truth_ratios(model, [QAItem((0,), (1,))])


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    a = rng.lognormal(size=40)
    assert fm.forget_quality(a, a.copy()) == 1.0
    b = rng.lognormal(mean=2.0, size=40)
    # disjoint samples: D = 1, whose exact two-sided p-value for n = m is 2 / C(2n, n)
    lo, hi = np.sort(a)[:10], np.sort(a)[:10] + 100
    assert fm.forget_quality(lo, hi) == pytest.approx(2 / math.comb(20, 10), rel=1e-9)
    # OpenUnlearning tests 1/R: the same p-value (KS is invariant under a monotone map of both samples)
    assert fm.forget_quality(a, b) == pytest.approx(fm.forget_quality(1 / a, 1 / b), rel=1e-12)
    assert fm.forget_quality(a, b) < 1e-6


def test_greedy_generation_and_rouge_l_recall(model):
    pytest.importorskip("rouge_score")
    assert fm.greedy_generate(model, [(0,), (3,), (2, 2)], 5) == [[1, 2, 3, 4, 0], [4, 0, 1, 2, 3], [3, 4, 0, 1, 2]]
    assert fm.greedy_generate(model, [(0,), (1,)], [2, 7], eos_token_id=0) == [[1, 2], [2, 3, 4]]
    items = [QAItem((0,), (1, 3, 4)),   # greedy 1 2 3: LCS "1 3" = 2 of 3 gold words
             QAItem((0,), (1, 2)),      # greedy 1 2: 1
             QAItem((4,), (2, 3, 1, 1))]  # greedy 0 1 2 3: LCS "2 3" = 2 of 4
    np.testing.assert_allclose(fm.rouge_l_recall(model, items), [2 / 3, 1.0, 0.5], rtol=1e-12)

    class Words:  # a tokenizer's decode, with a word the stemmer folds ("mats" -> "mat")
        eos_token_id = 4
        words = ["the", "cat", "sat", "on", "mats"]

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.words[i] for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    # gold "the cat sat mat" vs greedy after 3: 4 (eos: stop) -> "" ; after 2: 3 4 -> "on"
    got = fm.rouge_l_recall(model, [QAItem((3,), (0, 1)), QAItem((1,), (2, 3, 0))], Words())
    np.testing.assert_allclose(got, [0.0, 2 / 3], rtol=1e-12)


def test_model_utility_is_the_harmonic_mean_of_the_sets_numbers(model):
    pytest.importorskip("rouge_score")
    retain = [QAItem((0,), (1, 2), paraphrased=[(1, 3)], perturbed=[(2, 3), (4, 0)])]
    authors = [QAItem((2,), (3,), perturbed=[(0,), (4,)])]
    got = fm.model_utility(model, {"retain": retain, "real_authors": authors})
    tr = math.sqrt(gm(0.1, 0.4) * gm(0.1, 0.4)) / gm(0.6, 0.2)
    want = {"retain_Q_A_Prob": gm(0.6, 0.5), "retain_Q_A_ROUGE": 1.0, "retain_Truth_Ratio": max(0.0, 1 - tr),
            "real_authors_Q_A_Prob_normalised": 0.4 / (0.4 + 0.2 + 0.2), "real_authors_Q_A_ROUGE": 1.0,
            "real_authors_Truth_Ratio": 1 - 0.5}
    assert set(got) == set(want) | {"model_utility"}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12), k
    assert got["model_utility"] == pytest.approx(len(want) / sum(1 / v for v in want.values()), rel=1e-12)
    assert fm.hm_aggregate([1.0, 0.5, 0.25]) == pytest.approx(3 / 7) and fm.hm_aggregate([1.0, 0.0]) == 0.0


def _z(row: np.ndarray, y: int) -> float:
    logp = np.log(row)
    mu = float((row * logp).sum())
    return (logp[y] - mu) / math.sqrt(float((row * logp ** 2).sum()) - mu ** 2)


def test_min_k_plus_plus_auc_and_privleak(model):
    sample = QAItem((0,), (1, 3, 0))  # tokens scored after 0, 1 and 3
    z = sorted([_z(P[0], 1), _z(P[1], 3), _z(P[3], 0)])
    np.testing.assert_allclose(fm.min_k_plus_plus(model, [sample], k=0.4), [z[0]], rtol=1e-10)  # int(3 * .4) = 1
    np.testing.assert_allclose(fm.min_k_plus_plus(model, [sample], k=0.7), [(z[0] + z[1]) / 2], rtol=1e-10)
    np.testing.assert_allclose(fm.min_k_plus_plus(model, [sample], k=1.0), [sum(z) / 3], rtol=1e-10)
    # forget [3, 1, 2] vs holdout [0, 2]: 4 wins and a tie of 6 pairs
    assert fm.mia_auc([3, 1, 2], [0, 2]) == pytest.approx(4.5 / 6)
    assert fm.privleak(0.75, 0.5) == pytest.approx(50.0) and fm.privleak(0.4, 0.5) == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="k must be in"):
        fm.min_k_plus_plus(model, [sample], k=0)


def test_exact_memorization_and_extraction_strength(model):
    # teacher-forced argmax after 0, 1, 2, 3, 4 is 1, 2, 3, 4, 0
    items = [QAItem((0,), (1, 2, 3)),   # all right: EM 1, ES 1
             QAItem((0,), (1, 3, 0)),   # right, wrong, wrong: EM 1/3, ES 0
             QAItem((0,), (2, 3, 4)),   # wrong, right, right: EM 2/3, ES 1 - 1/3
             QAItem((0,), (1, 3, 4))]   # right, wrong, right: EM 2/3, ES 1 - 2/3
    np.testing.assert_allclose(fm.exact_memorization(model, items), [1, 1 / 3, 2 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_allclose(fm.extraction_strength(model, items), [1, 0, 2 / 3, 1 / 3], rtol=1e-12)


def test_qa_items_from_samples_and_bad_input():
    item = QAItem((5, 6), (7, 8), paraphrased=[(9,)], perturbed=[(3, 3), (4,)])
    s = item.sample()
    assert s["labels"].tolist() == [-100, -100, 7, 8] and s["input_ids"].tolist() == [5, 6, 7, 8]
    padded = {"input_ids": torch.tensor([5, 6, 7, 8, 0]), "labels": torch.tensor([-100, -100, 7, 8, -100])}
    back = QAItem.from_samples(padded, [item.sample((9,))], [item.sample((3, 3)), item.sample((4,))])
    assert back == item
    with pytest.raises(ValueError, match="share the gold sample's prompt"):
        QAItem.from_samples(padded, perturbed=[QAItem((5,), (3,)).sample()])
    with pytest.raises(ValueError, match="needs a prompt"):
        QAItem.split({"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2])})
    with pytest.raises(ValueError, match="non-empty"):
        QAItem((), (1,))


def _items(data, perturbed_seed: int) -> list[QAItem]:
    """The tiny QA set as items, with 3 perturbed answers each: random answers of the gold's length."""
    g = torch.Generator().manual_seed(perturbed_seed)
    out = []
    for i in range(len(data)):
        q, a = QAItem.split(data[i])
        wrong = [tuple(ANSWERS[int(j)] for j in torch.randint(len(ANSWERS), (len(a) - 1,), generator=g)) + (EOS,)
                 for _ in range(3)]
        out.append(QAItem(q, a, perturbed=wrong))
    return out


def test_forget_quality_separates_the_original_from_retrain():
    """The original (trained on forget + retain) memorised the forget answers: its truth ratios are
    far below Retrain's (trained on retain only), so KS tells them apart; a model against itself is 1."""
    data = qa_set(16, seed=0)
    forget, retain = data.subset(range(8)), data.subset(range(8, 16))
    original = train(make_model(0), data, steps=200)
    retrain = train(make_model(1), retain, steps=200)
    items = _items(forget, perturbed_seed=1)
    tr_orig, tr_retrain = fm.truth_ratios(original, items), fm.truth_ratios(retrain, items)
    assert fm.forget_quality(tr_retrain, fm.truth_ratios(retrain, items)) == 1.0
    assert fm.forget_quality(tr_orig, tr_retrain) < 0.05
    assert np.median(tr_orig) < 0.1 < np.median(tr_retrain)
    # the original reproduces the forget answers, Retrain does not
    em = fm.exact_memorization(original, items).mean(), fm.exact_memorization(retrain, items).mean()
    es = fm.extraction_strength(original, items).mean(), fm.extraction_strength(retrain, items).mean()
    rouge = [fm.rouge_l_recall(m, items, eos_token_id=EOS).mean() for m in (original, retrain)]
    assert em[0] > 0.9 > 0.5 > em[1]
    assert es[0] > 0.9 > 0.5 > es[1]
    assert rouge[0] > 0.9 > 0.5 > rouge[1]


@pytest.mark.slow  # importing transformers' GPT-2 takes seconds; the test itself milliseconds
def test_greedy_generation_of_a_hugging_face_model_matches_its_generate():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    prompts = [(3, 5, 7), (1, 2, 3), (9, 4)]
    ours = fm.greedy_generate(hf, prompts, 6)
    for p, got in zip(prompts, ours):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                          max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()
    # and the teacher-forced metrics read its ModelOutput's logits
    item = QAItem((3, 5), (7, 1))
    assert fm.probability(hf, [item]).shape == (1,) and 0 < fm.probability(hf, [item])[0] < 1
