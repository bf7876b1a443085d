"""Attribute methods in the registry (LEACE, INLP, DFMU on the "attribute" task), the registry's task
lookup through dfmu_ext.tasks.task_for, and `dfmu compare --task attribute` for an image model."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import dfmu_ext
from dfmu_ext import baselines
from dfmu_ext.baselines import registry
from dfmu_ext.blocks import classifier_of
from dfmu_ext.lm.task import TokenSequences
from dfmu_ext.model_io import copy_model
from dfmu_ext.splits import stratified_fraction
from dfmu_ext.training.classifier import TrainConfig, train_model
from dfmu_ext.zoo.attributes import load_attribute_dataset
from dfmu_ext.zoo.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    d = load_attribute_dataset("digits", train_size=600, test_size=300, seed=0)
    model = build_model("cnn", 1, 10)
    train_model(model, d.train, TrainConfig(epochs=3, lr=0.05, batch_size=64), seed=0)
    return d, model.eval()


def _head_inputs(model, dataset) -> torch.Tensor:
    """What the classifier's last Linear reads, for every sample of ``dataset`` (a pre-hook: independent
    of the package's feature readers)."""
    _, head = classifier_of(model)          # the last Linear: after an eraser, the classifier behind it
    got = []
    hook = head.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].detach().flatten(1)))
    with torch.no_grad():
        model(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    hook.remove()
    return torch.cat(got).double()


def test_the_registry_holds_the_attribute_methods():
    assert baselines.methods_for("attribute") == ["DFMU", "LEACE", "INLP"]
    assert registry.task_names() == ("classification", "causal-lm", "attribute")
    assert baselines.SPECS["LEACE"].fns == {"attribute": baselines.leace}
    assert baselines.SPECS["INLP"].fns == {"attribute": baselines.inlp}
    assert baselines.resolve_methods("all", task="attribute") == ["DFMU", "LEACE", "INLP"]
    assert baselines.resolve_methods("leace,inlp", task="attribute") == ["LEACE", "INLP"]
    from dfmu_ext.baselines.attribute import ATTRIBUTE_METHODS  # the plain functions stay public
    assert ATTRIBUTE_METHODS == {"LEACE": baselines.leace, "INLP": baselines.inlp}


def test_task_of_follows_task_for(trained):
    d, _ = trained
    tokens = TokenSequences(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
    assert registry.task_of(d.train) == "classification"
    assert registry.task_of(d.train, {"forget_classes": [3]}) == "classification"
    assert registry.task_of(d.train, {"forget_attribute": d.train_values}) == "attribute"
    assert registry.task_of(d.train, {"forget_attribute": None}) == "classification"
    assert registry.task_of(tokens, {"forget_indices": [0]}) == "causal-lm"
    for what in ({}, {"forget_attribute": d.train_values}, {"forget_classes": [1]}):
        assert registry.task_of(d.train, what) == dfmu_ext.tasks.task_for(d.train, None, what).name


def test_leace_through_the_registry_erases_the_linear_cross_covariance(trained):
    d, original = trained
    model = copy_model(original)
    res = baselines.METHODS["LEACE"](model, d.train, forget_attribute=d.train_values, retain_fraction=0.5, seed=0)
    assert res.method == "LEACE" and res.model is model
    # LEACE's defining property, on the samples it was fitted on: Cov(h', z) = 0 for the one-hot z
    budget = stratified_fraction(d.train, 0.5, seed=0)
    z = torch.nn.functional.one_hot(d.train_values[torch.as_tensor(budget.indices)], 2).double()
    before, after = _head_inputs(original, budget), _head_inputs(model, budget)
    cov = lambda h: ((h - h.mean(0)).T @ (z - z.mean(0))) / len(h)     # noqa: E731
    assert cov(before).abs().max() > 1e-3
    assert cov(after).abs().max() < 1e-4 * cov(before).abs().max() + 1e-6
    # the labels survive: the eraser changes one direction of the features
    logits = model(torch.stack([d.test[i][0] for i in range(len(d.test))])).argmax(1)
    assert float((logits == d.test.tensors[1]).double().mean()) > 0.8


def test_inlp_positional_values_insert_an_orthogonal_projection(trained):
    d, original = trained
    model = copy_model(original)
    # positional like the plain function: the registry names the third argument by LEACE/INLP's signature
    res = baselines.METHODS["INLP"](model, d.train, d.train_values, 0.5, iterations=3, seed=0)
    _, head = classifier_of(model)
    eraser = next(m[0] for m in model.modules() if isinstance(m, torch.nn.Sequential) and len(m) == 2 and m[1] is head)
    p = eraser.weight.detach().double()
    assert torch.allclose(p, p.T, atol=1e-5) and torch.allclose(p @ p, p, atol=1e-4)     # an orthogonal projection
    k = res.info["directions"]
    assert 1 <= k <= 3 and round(float(torch.trace(p))) == p.shape[0] - k               # rank d - k


def test_attribute_methods_refuse_other_tasks_in_one_line(trained):
    d, original = trained
    with pytest.raises(ValueError, match="LEACE does not run on classification data; it runs on attribute") as info:
        baselines.METHODS["LEACE"](copy_model(original), d.train, forget_classes=[3])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="does not run on attribute"):
        baselines.resolve_methods("FT", task="attribute")
    with pytest.raises(ValueError, match="FT does not run on attribute data"):
        baselines.METHODS["FT"](copy_model(original), d.train, forget_attribute=d.train_values)


def test_dfmu_through_the_registry_runs_the_attribute_task(trained):
    d, original = trained
    res = baselines.METHODS["DFMU"](copy_model(original), d.train, forget_attribute=d.train_values,
                                    retain_fraction=0.5, seed=0)
    assert res.info["task"] == "attribute"


def test_run_attribute_comparison_rows_and_derived_columns(trained):
    from dfmu_ext.experiments.attribute import run_attribute_comparison

    res = run_attribute_comparison({"LEACE": baselines.SPECS["LEACE"].fn}, base="digits", train_size=400,
                                   config=TrainConfig(epochs=1, lr=0.05, batch_size=64), seeds=[0, 1],
                                   probe_samples=300)
    assert list(res["summary"]) == ["Original", "Retrain", "LEACE"] and not res["failed"]
    for rec in res["records"]:
        m = rec["metrics"]
        assert m["probe_excess"] == pytest.approx(100 * (m["attr_probe_mlp"] - m["attr_majority"]))
    by = {(r["method"], r["seed"]): r["metrics"] for r in res["records"]}
    for seed in (0, 1):
        assert by["Original", seed]["ta_drop"] == 0.0 and by["Original", seed]["time_s"] == 0.0
        assert by["LEACE", seed]["ta_drop"] == pytest.approx(100 * (by["Original", seed]["test_acc"]
                                                                    - by["LEACE", seed]["test_acc"]))
    mean, std, n = res["summary"]["LEACE"]["test_acc"]
    vals = [by["LEACE", s]["test_acc"] for s in (0, 1)]
    assert n == 2 and mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals, ddof=1))
    assert "| Retrain |" in res["table"] and "MLP - majority" in res["table"]


@pytest.mark.parametrize("argv, message", [
    (["compare", "--task", "attribute", "--methods", "NPO"], "NPO does not run on attribute models"),
    (["compare", "--task", "attribute", "--fractions", "0.1,0.2"], "--fractions takes one retain fraction"),
    (["compare", "--task", "attribute", "--attribute", "birth_year"], "--attribute must be stamp"),
    (["compare", "--task", "attribute", "--classes", "3"], "--classes does not apply to --task attribute"),
    (["compare", "--model", "lm"], "--model lm is for --task attribute"),
    (["demo", "--model", "lm"], "--model lm is for --task attribute"),
])
def test_cli_attribute_compare_errors_are_one_line_and_write_nothing(tmp_path, argv, message):
    from dfmu_ext import cli
    from dfmu_ext.cli.checks import UsageError

    out = tmp_path / "cmp"
    with pytest.raises(UsageError) as info:
        cli.main([*argv, "--out-dir", str(out), "--device", "cpu", "--quiet"])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


@pytest.mark.slow
def test_cli_compare_task_attribute_writes_the_comparison(tmp_path):
    out = tmp_path / "cmp"
    run = subprocess.run([sys.executable, "-m", "dfmu_ext", "compare", "--task", "attribute", "--seeds", "1",
                          "--epochs", "1", "--methods", "LEACE,INLP", "--out-dir", str(out), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                          "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "comparison.json").read_text())
    assert list(report["summary"]) == ["Original", "Retrain", "LEACE", "INLP"]
    assert report["config"]["dataset"] == "digits" and report["config"]["retain_fraction"] == 0.13
    assert "| INLP |" in run.stdout and "probe MLP" in run.stdout
