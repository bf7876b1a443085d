"""Attribute unlearning in a causal LM: one attribute of every person of the people corpus
(dfmu_ext.zoo.people_attribute, dfmu_ext.experiments.lm_attribute), its benchmark and its CLI."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

from dfmu_ext.experiments.lm_attribute import make_attribute_scenario, run_lm_attribute
from dfmu_ext.result import UnlearnResult
from dfmu_ext.training.causal_lm import LMTrainConfig
from dfmu_ext.zoo.people import ATTRIBUTES, PeopleConfig, make_people_corpus
from dfmu_ext.zoo.people_attribute import (attribute_forget_indices, attribute_majority, attribute_qa,
                                           attribute_rows)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = PeopleConfig(num_people=8, holdout_people=2, filler_train=16, filler_test=8)
SIZE = {"hidden": 32, "layers": 1, "heads": 2, "mlp": 64}


@pytest.fixture(scope="module")
def corpus():
    return make_people_corpus(SMALL)


def _row_ids(corpus, i: int) -> list[int]:
    ids = corpus.train.input_ids[i]
    return ids[corpus.train.attention_mask[i].bool()].tolist()


def test_forget_indices_are_exactly_the_statements_and_questions_about_the_attribute(corpus):
    tok = corpus.tokenizer
    for attribute in SMALL.attributes:
        a = ATTRIBUTES[attribute]
        # independently: every text the corpus states or asks about the attribute, as token ids
        wanted = collections.Counter()
        for pid in range(SMALL.num_people):
            value = corpus.facts[pid][attribute]
            wanted[tuple([tok.bos_id] + tok.encode(a.statement.format(name=corpus.names[pid], value=value))
                         + [tok.eos_id])] += 1
            held = corpus.paraphrase_template(pid, attribute)
            for k, q in enumerate(a.questions):
                if k != held:
                    wanted[tuple([tok.bos_id] + tok.encode(q.format(name=corpus.names[pid])) + tok.encode(value)
                                 + [tok.eos_id])] += 1
        idx = attribute_forget_indices(corpus, attribute)
        assert idx.tolist() == sorted(idx.tolist()) and idx.numel() == 3 * SMALL.num_people
        assert collections.Counter(tuple(_row_ids(corpus, i)) for i in idx.tolist()) == wanted
        rest = set(range(len(corpus.train))) - set(idx.tolist())
        assert not any(tuple(_row_ids(corpus, i)) in wanted for i in rest)
    rows = attribute_rows(corpus)
    assert rows[corpus.train_kind == 2].eq(-1).all() and rows[corpus.train_kind < 2].ge(0).all()


def test_attribute_questions_split_the_people_s_questions(corpus):
    people = [1, 4, 6]
    for paraphrased in (False, True):
        everything = corpus.qa(people, paraphrased)
        mine = attribute_qa(corpus, people, "pet", paraphrased=paraphrased)
        others = attribute_qa(corpus, people, "pet", paraphrased=paraphrased, other=True)
        assert len(mine) + len(others) == len(everything)
        assert len(mine) == len(people) * (1 if paraphrased else 2)
        pet_words = {w for v in ATTRIBUTES["pet"].values for w in v.split()}
        answers = [corpus.tokenizer.decode(row[row != -100].tolist()) for row in mine.labels]
        assert all(set(a.replace("<eos>", "").split()) <= pet_words for a in answers)
    facts = [corpus.facts[p]["colour"] for p in range(SMALL.num_people)]
    assert attribute_majority(corpus, range(SMALL.num_people), "colour") == \
        collections.Counter(facts).most_common(1)[0][1] / len(facts)


def test_one_line_errors(corpus):
    for call in (lambda: attribute_forget_indices(corpus, "shoe"), lambda: make_attribute_scenario(corpus, "shoe")):
        with pytest.raises(ValueError, match="attribute must be one of") as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no seed"):
        run_lm_attribute({}, seeds=[], corpus_config=SMALL)
    with pytest.raises(ValueError, match="retain_fraction"):
        run_lm_attribute({}, seeds=[0], retain_fraction=0.0, corpus_config=SMALL)


def test_run_lm_attribute_original_retrain_and_a_method(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    seen = []

    def nothing(model, train_set, forget_indices=None, retain_fraction=0.13, seed=0, device=None):
        """Doing nothing, as a method: its row must equal the original's."""
        seen.append((torch.as_tensor(forget_indices).tolist(), len(train_set), retain_fraction, seed))
        return UnlearnResult(model=model, timings={"total": 0.5}, retain_samples_used=0, forget_samples_used=0)

    res = run_lm_attribute({"nothing": nothing}, attribute="birth_year", seeds=[0], retain_fraction=0.3,
                           corpus_config=SMALL, size=SIZE, train_config=LMTrainConfig(epochs=2, warmup_steps=2))
    assert not res["failed"] and list(res["summary"]) == ["Original", "Retrain", "nothing"]
    assert seen == [(attribute_forget_indices(corpus, "birth_year").tolist(), len(corpus.train), 0.3, 0)]
    by = {r["method"]: r["metrics"] for r in res["records"]}
    for key in ("attr_acc", "attr_para_acc", "attr_prob", "other_acc", "other_para_acc", "perplexity",
                "attr_relearn_acc"):
        assert by["nothing"][key] == pytest.approx(by["Original"][key]), key
    assert by["nothing"]["seconds"] == 0.5 and by["Original"]["seconds"] == 0.0
    # Retrain never saw a birth year, not even as input: it never answers one
    assert by["Retrain"]["attr_acc"] == 0.0 and by["Retrain"]["attr_para_acc"] == 0.0
    assert by["Retrain"]["attr_prob"] < 1.0 / len(ATTRIBUTES["birth_year"].values)
    assert by["Retrain"]["attr_gap"] == 0.0 and by["Original"]["other_drop"] == 0.0
    assert by["Original"]["attr_gap"] == pytest.approx(100 * abs(by["Original"]["attr_acc"] - by["Retrain"]["attr_acc"]))
    assert by["Retrain"]["other_drop"] == pytest.approx(100 * (by["Original"]["other_acc"] - by["Retrain"]["other_acc"]))
    facts = [corpus.facts[p]["birth_year"] for p in range(SMALL.num_people)]
    assert by["Original"]["attr_majority"] == collections.Counter(facts).most_common(1)[0][1] / len(facts)
    assert by["Original"]["attr_chance"] == 1 / len(ATTRIBUTES["birth_year"].values)
    assert "| nothing |" in res["table"] and "majority" in res["table"]
    assert res["config"]["forget_sequences"] == 3 * SMALL.num_people


@pytest.mark.parametrize("argv, message", [
    (["--attribute", "shoe"], "--attribute must be one of"),
    (["--dataset", "digits"], "--dataset does not apply to --task attribute --model lm"),
    (["--classes", "3"], "--classes does not apply to --task attribute"),
    (["--forget-people", "0.1"], "--forget-people does not apply"),
])
def test_cli_lm_attribute_errors_are_one_line_and_write_nothing(tmp_path, argv, message):
    from dfmu_ext import cli
    from dfmu_ext.cli.checks import UsageError

    for command in ("demo", "compare"):
        out = tmp_path / command
        with pytest.raises(UsageError) as info:
            cli.main([command, "--task", "attribute", "--model", "lm", *argv, "--out-dir", str(out), "--device",
                      "cpu", "--quiet"])
        assert message in str(info.value) and "\n" not in str(info.value)
        assert not out.exists()


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DFMU_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_cli_demo_task_attribute_model_lm(tmp_path):
    out = tmp_path / "demo"
    run = _run(["-m", "dfmu_ext", "demo", "--task", "attribute", "--model", "lm", "--people", "8", "--epochs", "2",
                "--attribute", "pet", "--retrain", "--out-dir", str(out), "--device", "cpu"], tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["Original", "Retrain", "DFMU"]
    assert report["attribute"] == "pet" and report["forget_sequences"] == 3 * 8
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["Retrain"]["attr_acc"] == 0.0
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| DFMU |" in run.stderr + run.stdout


@pytest.mark.slow
def test_cli_compare_task_attribute_model_lm_and_the_benchmark(tmp_path):
    out = tmp_path / "cmp"
    run = _run(["-m", "dfmu_ext", "compare", "--task", "attribute", "--model", "lm", "--people", "8", "--epochs",
                "2", "--seeds", "1", "--methods", "GA", "--out-dir", str(out), "--device", "cpu"], tmp_path)
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "comparison.json").read_text())
    assert list(report["summary"]) == ["Original", "Retrain", "GA"] and report["config"]["attribute"] == "birth_year"
    assert "| GA |" in run.stdout
    bench = _run([os.path.join(os.path.dirname(__file__), "..", "benchmarks", "lm_attribute.py"), "--seeds", "0,1",
                  "--people", "8", "--epochs", "2", "--attribute", "colour", "--out", str(tmp_path / "b.json")],
                 tmp_path)
    assert bench.returncode == 0, bench.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert list(result["summary"]) == ["Original", "Retrain", "DFMU"] and result["config"]["seeds"] == [0, 1]
    assert result["summary"]["DFMU"]["attr_acc"][2] == 2 and "commit" in result["machine"]
    assert "| DFMU |" in bench.stdout
