"""Attribute unlearning: the stamped data, the probes, unlearn(forget_attribute=) end to end, its errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import dfmu_ext
from dfmu_ext.eval.attribute import attribute_probes
from dfmu_ext.zoo.attributes import balanced_values, load_attribute_dataset, stamp
from dfmu_ext.zoo.models import build_model
from dfmu_ext.training.classifier import TrainConfig, train_model


def test_values_are_independent_of_the_label():
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 4)
    v = balanced_values(labels, seed=3)
    for c, n in ((0, 10), (1, 7), (2, 4)):
        k = int(v[labels == c].sum())
        assert k in (n // 2, (n + 1) // 2)            # half of every class carries the attribute
    assert torch.equal(v, balanced_values(labels, seed=3))
    assert not torch.equal(v, balanced_values(labels, seed=4))


def test_stamp_sets_only_the_corner_of_stamped_images():
    x = torch.zeros(3, 1, 14, 14)   # side 14: a 2 x 2 stamp
    out = stamp(x, torch.tensor([1, 0, 1]), 5.0)
    assert out[0, 0, :2, :2].eq(5).all() and out[0].sum() == 20 and out[1].sum() == 0
    assert x.sum() == 0                                 # a copy


def test_dataset_plain_twin_differs_exactly_where_stamped():
    d = load_attribute_dataset("digits", seed=0)
    changed = (d.train.tensors[0] != d.plain_train.tensors[0]).flatten(1).any(1)
    assert changed.long().le(d.train_values).all()       # only stamped images change
    assert abs(float(d.train_values.float().mean()) - 0.5) < 0.01


def test_probes_against_a_hand_case():
    rng = np.random.default_rng(0)
    a_tr, a_te = rng.integers(0, 2, 400), rng.integers(0, 2, 200)
    # the attribute is the sign of the first feature: both probes read it
    f_tr = np.c_[(2 * a_tr - 1) + 0.1 * rng.standard_normal(400), rng.standard_normal((400, 3))]
    f_te = np.c_[(2 * a_te - 1) + 0.1 * rng.standard_normal(200), rng.standard_normal((200, 3))]
    got = attribute_probes(f_tr, a_tr, f_te, a_te)
    assert got["attr_probe_linear"] == 1.0 and got["attr_probe_mlp"] >= 0.99
    assert got["attr_majority"] == pytest.approx(np.mean(a_te == np.bincount(a_tr).argmax()))
    # features that carry nothing: both probes near the majority rate
    noise = attribute_probes(rng.standard_normal((400, 4)), a_tr, rng.standard_normal((200, 4)), a_te)
    assert abs(noise["attr_probe_linear"] - noise["attr_majority"]) < 0.1
    with pytest.raises(ValueError, match="values for"):
        attribute_probes(f_tr, a_tr[:10], f_te, a_te)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    d = load_attribute_dataset("digits", seed=0)
    model = build_model("cnn", 1, 10)
    train_model(model, d.train, TrainConfig(epochs=8, lr=0.05, batch_size=64), seed=0)
    return d, model


@pytest.fixture(scope="module")
def unlearned(trained):
    d, original = trained
    attr = (d.train_values, d.test_values)
    before = dfmu_ext.evaluate(original, d.train, d.test, attribute=attr)
    model = dfmu_ext.model_io.copy_model(original)
    result = dfmu_ext.unlearn(model, d.train, forget_attribute=d.train_values, retain_fraction=0.5, seed=0)
    return result, before, dfmu_ext.evaluate(result.model, d.train, d.test, attribute=attr)


def test_unlearn_forget_attribute_end_to_end_keeps_the_task(unlearned):
    result, before, after = unlearned
    assert result.info["task"] == "attribute" and result.info["forget_attribute"]["values"] == 2
    assert before["attr_probe_linear"] > before["attr_majority"] + 0.1       # the original encodes it
    assert after["test_acc"] > before["test_acc"] - 0.03
    assert sum(result.pruned_units.values()) > 0


def test_unlearn_forget_attribute_moves_the_probes_toward_the_majority_rate(unlearned):
    _, before, after = unlearned
    gap = lambda m, k: m[k] - m["attr_majority"]                               # noqa: E731
    assert gap(after, "attr_probe_linear") < gap(before, "attr_probe_linear") - 0.05
    assert gap(after, "attr_probe_mlp") < gap(before, "attr_probe_mlp") - 0.05


def test_one_line_errors(trained):
    d, original = trained
    model = dfmu_ext.model_io.copy_model(original)
    n = len(d.train)
    cases = [({"forget_attribute": d.train_values[:-1]}, "values for"),
             ({"forget_attribute": torch.zeros(n, dtype=torch.long)}, "single value"),
             ({"forget_attribute": d.train_values, "forget_classes": [1]}, "does not take forget_classes")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            dfmu_ext.unlearn(model, d.train, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="on its own"):
        dfmu_ext.evaluate(model, d.train, d.test, [1], attribute=(d.train_values, d.test_values))


def test_cli_demo_attribute_writes_its_table_json_and_plot(tmp_path, capsys):
    import importlib.util
    import json

    from dfmu_ext import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--task", "attribute", "--out-dir", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "report.json").read_text())
    methods = ["original", "DFMU"] + (["LEACE"] if importlib.util.find_spec("concept_erasure") else [])
    assert [r["method"] for r in report["rows"]] == methods
    assert report["dataset"] == "digits" and report["task"] == "attribute"
    # the majority rate, independently: the share of test samples whose value is the train set's commonest
    d = load_attribute_dataset("digits", seed=0)
    majority = float((d.test_values == torch.bincount(d.train_values).argmax()).double().mean())
    rows = {r["method"]: r for r in report["rows"]}
    for r in rows.values():
        assert r["attr_majority"] == pytest.approx(majority) and r["seconds"] >= 0
        assert 0.0 <= r["attr_probe_linear"] <= 1.0 and 0.0 <= r["attr_probe_mlp"] <= 1.0
    assert rows["original"]["test_acc"] > 0.9                     # the stamp does not stop the digits being learnt
    assert rows["original"]["attr_probe_mlp"] > majority + 0.1     # and the original's features carry the stamp
    assert rows["DFMU"]["test_acc"] > rows["original"]["test_acc"] - 0.05
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| DFMU |" in printed and "probe MLP" in printed and "wrote report.json and report.png" in printed


@pytest.mark.parametrize("argv, message", [
    (["--classes", "3"], "--classes does not apply to --task attribute"),
    (["--forget-random", "0.1"], "--forget-random does not apply"),
    (["--battery"], "--battery does not apply"),
    (["--dataset", "topics"], "--task attribute: attribute data needs an image data set"),
])
def test_cli_demo_attribute_errors_are_one_line_and_write_nothing(tmp_path, argv, message, capsys):
    from dfmu_ext import cli
    from dfmu_ext.cli.checks import UsageError

    out = tmp_path / "demo"
    with pytest.raises(UsageError) as info:
        cli.main(["demo", "--task", "attribute", *argv, "--out-dir", str(out), "--device", "cpu", "--quiet"])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_only_demo_takes_task_attribute(capsys):
    from dfmu_ext import cli

    with pytest.raises(SystemExit):
        cli.main(["forget", "--task", "attribute", "--out", "x.pt"])
    assert "invalid choice: 'attribute'" in capsys.readouterr().err
