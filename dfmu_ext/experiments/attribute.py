r"""Compare attribute-unlearning methods on an image classifier (:mod:`dfmu_ext.zoo.attributes`: a
stamp drawn half and half in every class), side by side over seeds.

Per seed :math:`s`: the stamped data set (its draw seeded with :math:`s`), the original trained on
it, and **Retrain**, the same recipe and initial weights on the same images never stamped (data that
never carried the attribute); then every method of ``methods`` (the registry's attribute methods:
DFMU, LEACE, INLP; :func:`dfmu_ext.baselines.methods_for`) on a copy of the original, called as
``fn(model, train_set, forget_attribute=values, retain_fraction=f, seed=s, device=...)``. Each model
is read by :func:`dfmu_ext.eval.attribute.attribute_metrics` (linear and MLP probes on the
penultimate features beside the majority rate, the task's test accuracy) and its wall time.

Rows are the mean ± sample std over seeds (:func:`dfmu_ext.experiments.runner.mean_std`), Original
and Retrain first: how far apart doing nothing and the gold standard are is what makes the other
rows readable. Two derived columns, per seed: ``probe_excess`` :math:`= 100\,(\text{MLP probe} -
\text{majority})` in points (0: the attribute cannot be read), and ``ta_drop``
:math:`= 100\,(TA^{\rm Original} - TA)`.
"""
from __future__ import annotations

import time

import torch

from .._io import markdown_table
from ..eval.attribute import ATTRIBUTE_METRICS, attribute_metrics
from ..eval.metrics import Metric
from ..model_io import copy_model
from ..training.classifier import TrainConfig, train_model
from ..zoo.attributes import load_attribute_dataset
from ..zoo.models import build_model
from .runner import TIME, Call, column_stats, reference_pairs, run_seeds

__all__ = ["COMPARE_COLUMNS", "run_attribute_comparison", "format_attribute_table"]

PROBE_EXCESS = Metric("probe_excess", "MLP - majority", scale=1.0, fmt="+.1f",
                      label="MLP probe above the majority rate (points)")
TA_DROP = Metric("ta_drop", "TA drop", scale=1.0, fmt="+.1f", label="task accuracy lost (points)")
#: The table's columns, each as declared (the attribute metrics, the two derived ones, the time).
COMPARE_COLUMNS = tuple(ATTRIBUTE_METRICS) + (PROBE_EXCESS, TA_DROP, TIME)


def _train(model_name: str, train_set, info, config: TrainConfig, device, seed: int, progress: bool):
    """A fresh ``model_name`` under ``seed`` trained by ``config``; ``(model, seconds)``."""
    torch.manual_seed(seed)
    model = build_model(model_name, info.in_channels, info.num_classes).to(device)
    start = time.perf_counter()
    train_model(model, train_set, config, device=device, seed=seed, progress=progress)
    return model.eval(), time.perf_counter() - start


def run_attribute_comparison(methods: dict, *, base: str = "digits", model_name: str = "cnn",
                             config: TrainConfig | None = None, seeds=(0,), retain_fraction: float = 0.13,
                             train_size: int | None = None, probe_samples: int = 5000, device="cpu",
                             progress: bool = False, log=None) -> dict:
    """Original, Retrain and every method of ``methods`` (name -> function, e.g.
    ``{n: SPECS[n].fn for n in methods_for("attribute")}``) on each seed (module docs). ``config``:
    the original's and Retrain's recipe (default ``TrainConfig()``). Returns ``{"records", "summary"
    (method -> {key: (mean, std, n)}), "table", "failed", "config"}``."""
    log = log or (lambda *_: None)
    config = config or TrainConfig()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seed to run")
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    sizes: dict = {}

    def calls_of(seed: int):
        data = load_attribute_dataset(base, train_size=train_size, seed=seed)
        sizes.update(train=len(data.train), test=len(data.test), dataset=data.info.name)
        attr = (data.train_values, data.test_values)

        def measured(model, seconds: float) -> dict:
            return {"metrics": {**attribute_metrics(model, data.train, data.test, attr, probe_samples=probe_samples,
                                                    seed=seed, device=device), TIME.key: seconds}}

        original, _ = _train(model_name, data.train, data.info, config, device, seed, progress)
        yield Call({"method": "Original", "seed": seed}, lambda: measured(original, 0.0),   # doing nothing
                   f"seed {seed}: Original", _done)
        yield Call({"method": "Retrain", "seed": seed},
                   lambda: measured(*_train(model_name, data.plain_train, data.info, config, device, seed, progress)),
                   f"seed {seed}: Retrain", _done)
        for name, fn in methods.items():
            def run(fn=fn) -> dict:
                res = fn(copy_model(original), data.train, forget_attribute=data.train_values,
                         retain_fraction=retain_fraction, seed=seed, device=device)
                return {**measured(res.model, res.timings["total"]), "retain_samples": res.retain_samples_used}

            yield Call({"method": name, "seed": seed}, run, f"seed {seed}: {name}", _done)

    records = run_seeds(seeds, calls_of, log)
    for rec in records:
        if "metrics" in rec:
            m = rec["metrics"]
            m[PROBE_EXCESS.key] = 100.0 * (m["attr_probe_mlp"] - m["attr_majority"])
    for rec, ref in reference_pairs(records, reference="Original"):
        rec["metrics"][TA_DROP.key] = 100.0 * (ref["metrics"]["test_acc"] - rec["metrics"]["test_acc"])
    summary: dict = {}
    for rec in records:
        if "metrics" in rec:
            summary.setdefault(rec["method"], []).append(rec["metrics"])
    summary = {m: column_stats(ms) for m, ms in summary.items()}
    return {"records": records, "summary": summary, "table": format_attribute_table(summary),
            "failed": [f"{r['method']} (seed {r['seed']}): {r['error']}" for r in records if r.get("error")],
            "config": {"task": "attribute", "dataset": sizes.get("dataset", base), "model": model_name,
                       "seeds": seeds, "retain_fraction": retain_fraction, "train_config": config.to_dict(),
                       "train_samples": sizes.get("train"), "test_samples": sizes.get("test"),
                       "probe_samples": probe_samples, "methods": list(methods), "device": str(device)}}


def _done(rec: dict) -> str:
    m = rec["metrics"]
    return (f"TA {100 * m['test_acc']:.1f}%, MLP probe {100 * m['attr_probe_mlp']:.1f}% "
            f"(majority {100 * m['attr_majority']:.1f}%), {m[TIME.key]:.2f} s")


def format_attribute_table(summary: dict) -> str:
    """Markdown: one row per method, mean ± std over seeds as each column declares (accuracies in %)."""
    rows = [[method] + [c.cell(*cells[c.key]) if c.key in cells else "-" for c in COMPARE_COLUMNS]
            for method, cells in summary.items()]
    return markdown_table(["method"] + [c.header for c in COMPARE_COLUMNS], rows)
