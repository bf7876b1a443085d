"""Beyond whole classes: forget a sub-class (a fine class inside a coarse class) or a random share
of the training samples, with every applicable method beside Retrain.

* **Sub-class** (a coarse-label data set, e.g. ``fashion-mnist-coarse``, forget Sneaker): the forget
  set is the fine class's training samples; "accuracy" on them means predicting their coarse label.
  Metrics: forget-sub-class accuracy (train: ``forget_acc``; test: ``forget_test_acc``), the sibling
  sub-classes' test accuracy (same coarse class), RA, TA (test samples outside the sub-class),
  MIA-efficacy and the probe (coarse label recovered from the sub-class's test features).
* **Random samples** (SalUn / l1-sparse protocol): a seeded random ``fraction`` of the training set.
  Metrics: UA, RA, TA, MIA-efficacy.

For both, the field's summary number is the average absolute gap to Retrain (same seed) over
UA (= 1 - forget_acc), RA, TA and MIA-efficacy. Head-mask does not apply (no class row to remove).
"""
from __future__ import annotations

import copy
import math
import os
import time
import traceback

import torch

from .._io import markdown_table, write_json
from ..baselines import SPECS, resolve_methods
from ..eval import evaluate, predict_logits
from ..steps import StepOptions
from ..zoo import data as data_mod
from ..zoo.checkpoints import cached_original
from ..zoo.coarse import subclass_indices
from .compare import mean_std, method_kwargs_for

__all__ = ["scenario_forget_set", "run_scenario", "average_gap", "GAP_KEYS"]

#: (metric, shown as 1 - value) entering the average gap to Retrain.
GAP_KEYS = (("forget_acc", True), ("retain_acc", False), ("test_acc", False), ("mia_efficacy", False))


def scenario_forget_set(info, train_set, *, subclass=None, random_fraction=None, seed: int = 0) -> dict:
    """``{"forget_indices", "test_forget_indices", "sibling_test_indices", "label"}`` for a sub-class
    (name or id) or a random ``fraction`` of ``train_set`` (seeded) — exactly one of the two."""
    if (subclass is None) == (random_fraction is None):
        raise ValueError("give exactly one of subclass and random_fraction")
    if subclass is not None:
        tr_idx, te_idx, coarse = subclass_indices(info, subclass)
        fine_test = info.fine.test
        siblings = [f for f, c in enumerate(info.fine.coarse_of) if c == coarse and fine_test[fine_test == f].numel()]
        fine_id = int(info.fine.train[tr_idx[0]])
        sib = torch.nonzero(torch.isin(fine_test, torch.tensor([f for f in siblings if f != fine_id]))).flatten()
        return {"forget_indices": tr_idx, "test_forget_indices": te_idx, "sibling_test_indices": sib,
                "label": f"sub-class {info.fine.names[fine_id]} of {info.class_names[coarse]}"}
    if not 0.0 < float(random_fraction) < 1.0:
        raise ValueError(f"the random forget fraction must lie in (0, 1), got {random_fraction}")
    n = len(train_set)
    gen = torch.Generator().manual_seed(int(seed) + 60013)
    k = max(1, int(round(float(random_fraction) * n)))
    idx = torch.sort(torch.randperm(n, generator=gen)[:k]).values
    return {"forget_indices": idx, "test_forget_indices": None, "sibling_test_indices": None,
            "label": f"random {100 * float(random_fraction):g}% of the training samples"}


def average_gap(metrics: dict, reference: dict) -> float:
    """Mean of |m - r| over UA, RA, TA and MIA-efficacy (the field's summary number)."""
    gaps = []
    for key, invert in GAP_KEYS:
        m, r = metrics.get(key), reference.get(key)
        if m is None or r is None or not (math.isfinite(m) and math.isfinite(r)):
            continue
        gaps.append(abs((1 - m if invert else m) - (1 - r if invert else r)))
    return sum(gaps) / len(gaps) if gaps else float("nan")


def _sibling_accuracy(model, test_set, indices, device) -> float:
    if indices is None or indices.numel() == 0:
        return float("nan")
    logits, labels = predict_logits(model, torch.utils.data.Subset(test_set, indices.tolist()), device=device)
    return (logits.argmax(1) == labels).float().mean().item()


def run_scenario(dataset: str, model_name: str, *, subclass=None, random_fraction=None, fraction: float = 0.13,
                 seeds=3, methods="all", device="cpu", out_dir: str = "runs/scenario", use_cache: bool = True,
                 max_epochs: int | None = None, train_epochs: int | None = None, progress: bool = False,
                 quiet: bool = False, eval_kwargs: dict | None = None, steps: StepOptions | None = None) -> dict:
    """Run ``methods`` x ``seeds`` on one scenario; write ``scenario.json``; print and return the table.

    The original of each seed is the cached one (trained on the coarse labels for a sub-class).
    Methods that cannot forget samples (head-mask) are skipped with a note. ``steps``: precision and
    layout of every method that trains (:class:`dfmu_ext.steps.StepOptions`).
    """
    log = (lambda *m: None) if quiet else (lambda *m: print(*m, flush=True))
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    dataset = data_mod.canonical_name(dataset)
    train_set, test_set, info = data_mod.load_dataset(dataset)
    seeds = list(range(int(seeds))) if isinstance(seeds, int) else [int(s) for s in seeds]
    names = [n for n in resolve_methods(methods) if n != "head-mask"]
    skipped = ["head-mask"] if "head-mask" in resolve_methods(methods) else []
    eval_kwargs = dict(eval_kwargs or {})
    runs, start = [], time.perf_counter()
    label = None
    for seed in seeds:
        scen = scenario_forget_set(info, train_set, subclass=subclass, random_fraction=random_fraction, seed=seed)
        label = scen["label"]
        original, meta = cached_original(dataset, model_name, device, seed, epochs=train_epochs,
                                         use_cache=use_cache, progress=progress, log=log)
        for name in ["Original"] + names:
            spec = SPECS.get(name)
            rec = {"method": name, "seed": seed}
            try:
                model = copy.deepcopy(original)
                if spec is not None:
                    kwargs = method_kwargs_for(spec, meta, max_epochs, steps=steps)
                    frac = spec.fixed_fraction if not spec.budgeted and spec.fixed_fraction else fraction
                    res = spec.fn(model, train_set, None, frac, forget_indices=scen["forget_indices"], device=device,
                                  seed=seed, progress=progress, **kwargs)
                    model = res.model
                    rec.update(time_s=res.timings["total"], retain_samples=res.retain_samples_used)
                rec["metrics"] = evaluate(model, train_set, test_set, forget_indices=scen["forget_indices"],
                                          test_forget_indices=scen["test_forget_indices"], device=device, seed=seed,
                                          **eval_kwargs)
                rec["metrics"]["sibling_test_acc"] = _sibling_accuracy(model, test_set, scen["sibling_test_indices"],
                                                                       device)
                log(f"{name} seed {seed}: UA {100 * (1 - rec['metrics']['forget_acc']):.1f}%, "
                    f"RA {100 * rec['metrics']['retain_acc']:.1f}%")
            except Exception as exc:  # one failing method must not lose the others' results
                rec["error"] = f"{type(exc).__name__}: {exc}"
                rec["traceback"] = traceback.format_exc()
                log(f"{name} seed {seed}: FAILED ({rec['error']})")
            runs.append(rec)
        ref = next((r for r in runs if r["method"] == "Retrain" and r["seed"] == seed and "metrics" in r), None)
        for r in runs:
            if r["seed"] == seed and "metrics" in r and ref is not None:
                r["gap_to_retrain"] = average_gap(r["metrics"], ref["metrics"])

    columns = [("UA", "forget_acc", True), ("forget-test", "forget_test_acc", False),
               ("siblings", "sibling_test_acc", False), ("RA", "retain_acc", False), ("TA", "test_acc", False),
               ("MIA", "mia_efficacy", False), ("probe", "probe_forget_acc", False)]
    rows = []
    for name in ["Original"] + names:
        rs = [r for r in runs if r["method"] == name and "metrics" in r]
        if not rs:
            continue
        cells = [name]
        for _, key, inv in columns:
            m, s, n = mean_std([(1 - r["metrics"][key]) if inv else r["metrics"][key] for r in rs])
            cells.append("-" if n == 0 else f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if n > 1 else ""))
        g, gs, gn = mean_std([r.get("gap_to_retrain") for r in rs])
        cells.append("-" if gn == 0 else f"{100 * g:.2f}" + (f" ± {100 * gs:.2f}" if gn > 1 else ""))
        t, ts, tn = mean_std([r.get("time_s") for r in rs])
        cells.append("-" if tn == 0 else f"{t:.2f}")
        rows.append(cells)
    header = ["method"] + [c for c, _, _ in columns] + ["avg gap to Retrain", "time (s)"]
    table = markdown_table(header, rows)
    title = f"{info.name} / {model_name}: forget {label}, {len(seeds)} seed(s), {100 * fraction:g}% retain data"
    print(f"\n{title}")
    print(table)
    if skipped:
        print("head-mask skipped: it removes whole classes' rows, not samples")
    os.makedirs(out_dir, exist_ok=True)
    report = {"title": title, "dataset": info.name, "model": model_name, "scenario": label, "fraction": fraction,
              "seeds": seeds, "methods": names, "steps": (steps or StepOptions()).to_dict(), "runs": runs,
              "table": table, "skipped": skipped,
              "total_seconds": time.perf_counter() - start}
    write_json(os.path.join(out_dir, "scenario.json"), report)
    return report
