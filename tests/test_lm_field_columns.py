"""The LM comparison's forget quality and model utility columns (dfmu_ext.experiments.lm on
dfmu_ext.eval.field): the TOFU-shaped items of the people corpus, and the numbers in a small run."""
import math

import numpy as np
import pytest

from dfmu_ext.eval import field
from dfmu_ext.experiments import lm as lm_exp
from dfmu_ext.zoo.people import ATTRIBUTES, PeopleConfig, make_people_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def test_qa_items_are_the_trained_questions_with_wrong_values():
    corpus = make_people_corpus(PeopleConfig(num_people=8, holdout_people=8))
    tok = corpus.tokenizer
    items = lm_exp.qa_items(corpus, [2, 5], seed=3)
    rows = corpus.qa_rows([2, 5])
    qa = corpus.qa([2, 5])
    assert len(items) == len(rows) == len(qa)
    for item, (pid, attr, _), sample in zip(items, rows, qa):
        # the same prompt and answer tokens as the trained Q/A sequence
        assert field.QAItem.split(sample) == (item.question, item.answer)
        assert tok.decode(item.answer) == f"{corpus.facts[pid][attr]} <eos>"
        wrong = [tok.decode(a[:-1]) for a in item.perturbed]
        assert len(wrong) == lm_exp.PERTURBED == len(set(wrong)) and item.paraphrased == ()
        assert all(a[-1] == tok.eos_id for a in item.perturbed)
        assert corpus.facts[pid][attr] not in wrong and set(wrong) <= set(ATTRIBUTES[attr].values)
    assert lm_exp.qa_items(corpus, [2, 5], seed=3) == items and lm_exp.qa_items(corpus, [2, 5], seed=4) != items


def test_the_columns_are_declared_once_beside_the_metrics():
    assert field.FORGET_QUALITY in lm_exp.COLUMNS and field.MODEL_UTILITY in lm_exp.COLUMNS
    assert field.FORGET_QUALITY.key == "forget_quality" and field.MODEL_UTILITY.key == "model_utility"


def test_a_small_comparison_reports_forget_quality_and_model_utility(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from scipy.stats import ks_2samp

    from dfmu_ext.baselines import SPECS

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    out = lm_exp.run_lm_comparison({"GA": SPECS["GA"].fn}, shares=(0.25,), seeds=(0,),
                                   corpus_config=PeopleConfig(num_people=8, holdout_people=8),
                                   train_config=lm_exp.LMTrainConfig(epochs=2))
    (run,) = out["runs"]
    assert list(run["methods"]) == list(run["truth_ratios"]) == ["Original", "Retrain", "GA"]
    ref = run["truth_ratios"]["Retrain"]
    for name, metrics in run["methods"].items():
        ratios = run["truth_ratios"][name]
        assert len(ratios) == 2 * 10 and all(r > 0 for r in ratios)  # 2 people x 5 attributes x 2 templates
        # forget quality: the KS p-value of this row's truth ratios against Retrain's
        assert metrics["forget_quality"] == pytest.approx(ks_2samp(ratios, ref).pvalue, rel=1e-12)
        assert 0.0 < metrics["model_utility"] <= 1.0
    assert run["methods"]["Retrain"]["forget_quality"] == 1.0
    text = lm_exp.format_table(out["summary"])
    assert "forget quality" in text and "model utility" in text


def test_model_utility_is_the_harmonic_mean_of_the_retain_numbers(tmp_path, monkeypatch):
    # field_measures on a model: model utility = HM(retain probability, ROUGE-L recall, true_better truth ratio)
    import torch

    from dfmu_ext.zoo.lm_models import build_causal_lm

    corpus = make_people_corpus(PeopleConfig(num_people=8, holdout_people=8))
    scenario = lm_exp.make_scenario(corpus, 0.25, 0)
    torch.manual_seed(0)
    model = build_causal_lm("plain", corpus.tokenizer.vocab_size, corpus.config.max_len, hidden=16, layers=1,
                            heads=2, mlp=32).eval()
    utility, ratios = lm_exp.field_measures(model, scenario)
    items = scenario.items["retain"]
    prob = float(np.mean(field.probability(model, items)))
    rouge = float(np.mean(field.rouge_l_recall(model, items)))
    tr = float(np.mean(np.maximum(0.0, 1.0 - field.truth_ratios(model, items))))
    vals = [prob, rouge, tr]
    expect = 0.0 if min(vals) == 0 else 3 / sum(1 / v for v in vals)
    assert utility["model_utility"] == pytest.approx(expect, rel=1e-9)
    assert ratios == pytest.approx(field.truth_ratios(model, scenario.items["forget"]).tolist())
    assert not math.isnan(utility["model_utility"])
