"""Every unlearning method (DFMU and the baselines) on digits, timed once each, metrics in extra_info.

A reduced version of ``dfmu compare``: digits, a SmallCNN (width 8) trained with the cnn recipe,
forget class 3, one seed, 13% of the retain data. Each method runs once from a copy of the same
original (``benchmark.pedantic(rounds=1)``: the methods modify the model, so they cannot be
repeated on the same copy); the evaluation (UA/RA/TA/MIA/probe) is recorded in ``extra_info``.

    pytest benchmarks/bench_unlearning.py --benchmark-only -q

(The file name does not start with ``test_`` so that ``make bench`` / plain pytest do not collect
it by accident; name it on the command line.)
"""
from __future__ import annotations

import copy

import pytest
import torch

from dfmu_ext import baselines, evaluate
from dfmu_ext import training
from dfmu_ext.zoo import data, models

FRACTION = 0.13
CLASSES = [3]
SEED = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core CI machines two threads oversubscribed and the
    small digits batches ran 10-100x slower and very noisily."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(one_thread):
    train, test, info = data.load_dataset("digits")
    torch.manual_seed(SEED)
    config = models.default_train_config("cnn", "cpu")
    model = models.build_model("cnn", info.in_channels, info.num_classes, info.image_size, width=8)
    training.train_model(model, train, config, seed=SEED, progress=False)
    return model.eval(), train, test, config


@pytest.mark.parametrize("name", list(baselines.METHODS))
def test_unlearning_method(benchmark, setup, name):
    original, train, test, config = setup
    model = copy.deepcopy(original)
    kwargs = {"config": config} if name == "Retrain" else {}
    frac = 1.0 if name == "Retrain" else FRACTION
    out = {}

    def run():
        out["res"] = baselines.METHODS[name](model, train, CLASSES, frac, seed=SEED, progress=False, **kwargs)

    benchmark.group = f"unlearning digits/cnn class {CLASSES} ({100 * FRACTION:g}% retain)"
    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    res = out["res"]
    metrics = evaluate(res.model, train, test, CLASSES, seed=SEED)
    info = benchmark.extra_info
    info.update({k: round(v, 4) for k, v in metrics.items()})
    info["UA"] = round(1.0 - metrics["forget_acc"], 4)
    info["retain_fraction"] = frac if baselines.SPECS[name].budgeted else baselines.SPECS[name].fixed_fraction
    info["retain_samples_used"] = res.retain_samples_used
    info["forget_samples_used"] = res.forget_samples_used
    info["timings"] = {k: round(v, 4) for k, v in res.timings.items()}
    assert res.timings["total"] > 0
