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
