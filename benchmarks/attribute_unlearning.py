"""Attribute unlearning on the stamped Fashion-MNIST (dfmu_ext.zoo.attributes): the original, Retrain
(trained on the same images never stamped), DFMU (unlearn(forget_attribute=)), LEACE and INLP; the
linear and MLP probes on the penultimate features beside the majority rate, the task's test accuracy,
and the seconds of each method. Writes a JSON of the rows.

    python benchmarks/attribute_unlearning.py --seeds 0 [--train-size N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import dfmu_ext
from dfmu_ext.baselines.attribute import ATTRIBUTE_METHODS
from dfmu_ext.eval.attribute import attribute_metrics
from dfmu_ext.model_io import copy_model
from dfmu_ext.training.classifier import train_model
from dfmu_ext.zoo.attributes import load_attribute_dataset
from dfmu_ext.zoo.models import build_model, default_train_config


def run(seed: int, train_size: int | None, base: str) -> list[dict]:
    data = load_attribute_dataset(base, train_size=train_size, seed=seed)
    info = data.info
    attr = (data.train_values, data.test_values)
    rows = []

    def measure(name, model, seconds):
        m = attribute_metrics(model, data.train, data.test, attr, seed=seed)
        rows.append({"seed": seed, "method": name, "seconds": seconds, **m})
        print(json.dumps(rows[-1]), flush=True)

    config = default_train_config("cnn")
    torch.manual_seed(seed)
    original = build_model("cnn", info.in_channels, info.num_classes)
    t = time.perf_counter()
    train_model(original, data.train, config, seed=seed)
    measure("original", original, time.perf_counter() - t)
    torch.manual_seed(seed)
    retrain = build_model("cnn", info.in_channels, info.num_classes)
    t = time.perf_counter()
    train_model(retrain, data.plain_train, config, seed=seed)
    measure("Retrain", retrain, time.perf_counter() - t)
    model = copy_model(original)
    result = dfmu_ext.unlearn(model, data.train, forget_attribute=data.train_values, seed=seed)
    measure("DFMU", result.model, result.timings["total"])
    for name, fn in ATTRIBUTE_METHODS.items():
        result = fn(copy_model(original), data.train, data.train_values, seed=seed)
        measure(name, result.model, result.timings["total"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--base", default="auto")
    ap.add_argument("--out", default="attribute_unlearning.json")
    args = ap.parse_args()
    torch.set_num_threads(1)   # the CPU is shared
    rows = [r for s in args.seeds.split(",") for r in run(int(s), args.train_size, args.base)]
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
