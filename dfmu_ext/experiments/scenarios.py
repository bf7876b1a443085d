"""Beyond whole classes: forget a sub-class (a fine class inside a coarse class) or a random share
of the training samples, with every applicable method beside Retrain.

* **Sub-class** (a coarse-label data set, e.g. ``fashion-mnist-coarse``, forget Sneaker): the forget
  set is the fine class's training samples; "accuracy" on them means predicting their coarse label.
  Metrics: forget-sub-class accuracy (train: ``forget_acc``; test: ``forget_test_acc``), the sibling
  sub-classes' test accuracy (same coarse class), RA, TA (test samples outside the sub-class),
  MIA-efficacy and the probe (coarse label recovered from the sub-class's test features).
* **Random samples** (SalUn / l1-sparse protocol): a seeded random ``fraction`` of the training set.
  Metrics: UA, RA, TA, MIA-efficacy.
* **Given samples** (``forget_indices``, e.g. ``dfmu compare --forget-indices FILE``): the training
  samples a deletion request names; scored like random samples (kind ``"random"``).

For both, the field's summary number is the average absolute gap to Retrain (same seed) over
UA (= 1 - forget_acc), RA, TA and MIA-efficacy. Head-mask does not apply (no class row to remove).
The table adds the signed per-seed gaps to Retrain on the forget metric and on its cost (sub-class:
forget-test and siblings; random: forget accuracy, MIA-efficacy and TA), and
``scenario_frontier.png`` plots them (:func:`dfmu_ext.experiments.plots.plot_scenario_frontier`).

**A scenario counts only if it can fail.** "Within x points of Retrain" is evidence of forgetting only
when doing nothing is *not* within x points of Retrain. So every run also scores "Original" (the
untouched model) and :func:`discrimination` compares it with Retrain on the forget metrics: when
Retrain barely differs from the original (a sub-class its look-alike siblings cover, e.g. Sneaker
inside footwear; a random share of a model that hardly memorises its training samples), every method
that does nothing "matches Retrain", and the scenario is a *sanity check* (nothing should change,
nothing should break) — not a test of forgetting. The verdict is printed under the table's title and
stored in ``scenario.json`` under ``"discrimination"``; without Retrain it is unknown.
"""
from __future__ import annotations

import copy
import math
import os
import time

import torch

from .._common import resolve_forget_set
from .._io import markdown_table
from ..baselines import SPECS, resolve_methods
from ..eval import evaluate, predict_logits
from ..eval.metrics import METRICS, Metric
from ..steps import StepOptions
from ..zoo import data as data_mod
from ..zoo.checkpoints import cached_original
from ..zoo.coarse import subclass_indices
from .compare import load_data, method_kwargs_for, original_for
from .plots import plot_scenario_frontier
from .runner import (TIME, Call, finish_report, gap_to_reference, group, mean_std, output_folder, quiet_log,
                     reference_pairs, resolve_device, resolve_seeds, run_seeds)

__all__ = ["scenario_forget_set", "run_scenario", "average_gap", "GAP_KEYS", "discrimination", "signed_gaps",
           "SUBCLASS_MIN_GAP", "RANDOM_MIN_GAP", "DISCRIMINATION_METRICS", "SIGNED_GAPS", "KINDS"]

#: The metrics entering the average gap to Retrain (UA, RA, TA, MIA-efficacy: the field's summary number).
GAP_KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")
_GAP_METRICS = tuple(m for m in METRICS if m.key in GAP_KEYS)
#: The average gap to Retrain (a run's ``gap_to_retrain``, a fraction) as the table shows it.
GAP = Metric("gap_to_retrain", "avg gap to Retrain", fmt=".2f")
#: The siblings' test accuracy (a run's ``metrics["sibling_test_acc"]``, :func:`_sibling_accuracy`).
SIBLINGS = Metric("sibling_test_acc", "siblings")

#: The two scenario kinds.
KINDS = ("subclass", "random")

#: Smallest |Original - Retrain| gap (points) on the forget sub-class's test accuracy for a sub-class
#: scenario to count. That accuracy is measured on one fine class's test images (1,000 for
#: Fashion-MNIST, 100 for CIFAR-20): its seed-to-seed spread alone is a few points (binomial s.e. 3
#: points at 90% on 100 images), and between "doing nothing" and Retrain there must be room to tell a
#: method that forgot from one that did not. benchmarks/RESULTS.md measured Sneaker in footwear (gap
#: 0.0) and Shirt in tops (gap 1.7): both sanity checks, however well a method "matched Retrain".
SUBCLASS_MIN_GAP = 10.0
#: Smallest gap (points) for a random-sample scenario, on *each* of forget accuracy and MIA-efficacy
#: (the protocol's two forget metrics; either one under it and "equal to Retrain" on it is what doing
#: nothing scores). Here the gap is the model's memorisation of its training samples; under 3 points
#: it is the size of MIA-efficacy's seed-to-seed spread and of the spread between methods
#: (benchmarks/RESULTS.md, random 10% of Fashion-MNIST: Original 1.3 / 2.3 points from Retrain, MIA
#: std 1.4 over 2 seeds — doing nothing ranked among the best methods).
RANDOM_MIN_GAP = 3.0
#: kind -> (metric, how it is named in the verdict, threshold in points): what discrimination compares.
DISCRIMINATION_METRICS = {
    "subclass": (("forget_test_acc", "the forget sub-class's test images", SUBCLASS_MIN_GAP),),
    "random": (("forget_acc", "forget-set accuracy", RANDOM_MIN_GAP),
               ("mia_efficacy", "MIA-efficacy", RANDOM_MIN_GAP)),
}
#: kind -> (the gap, keyed in a run's "gaps_to_retrain", in points; the metric it is taken on, or None
#: for |forget|+|sibling|).
SIGNED_GAPS = {
    "subclass": ((Metric("forget", "forget gap", 1.0, "+.1f"), "forget_test_acc"),
                 (Metric("sibling", "sibling gap", 1.0, "+.1f"), "sibling_test_acc"),
                 (Metric("forget_plus_sibling", r"\|forget\|+\|sibling\|", 1.0), None)),  # "|" escaped: Markdown
    "random": ((Metric("forget", "forget gap", 1.0, "+.1f"), "forget_acc"),
               (Metric("mia", "MIA gap", 1.0, "+.1f"), "mia_efficacy"),
               (Metric("test", "TA gap", 1.0, "+.1f"), "test_acc")),
}
_EPS = 1e-9  # a gap of exactly the threshold counts (10.0 points computed as 9.999999999 in floats)


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown scenario kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def signed_gaps(metrics: dict, reference: dict, kind: str) -> dict:
    """The signed gaps to Retrain (``reference``, same seed) in points: sub-class ``{"forget",
    "sibling", "forget_plus_sibling"}`` (forget-test and sibling test accuracy minus Retrain's, and
    |forget| + |sibling|); random ``{"forget", "mia", "test"}`` (forget accuracy, MIA-efficacy and TA
    minus Retrain's). NaN where a metric is missing."""
    out = {}
    for gap, metric in SIGNED_GAPS[_check_kind(kind)]:
        if metric is None:
            f, s = out.get("forget", float("nan")), out.get("sibling", float("nan"))
            out[gap.key] = abs(f) + abs(s)
            continue
        m, r = metrics.get(metric), reference.get(metric)
        out[gap.key] = 100 * (m - r) if _finite(m) and _finite(r) else float("nan")
    return out


def _mean_metric(per_seed: list[dict], key: str) -> float:
    return mean_std([m.get(key) for m in per_seed])[0]


def discrimination(original, retrain, kind: str, *, seeds=None, missing: str = "Retrain was not run") -> dict:
    """Can this scenario tell forgetting from doing nothing? Compares the untouched model ("Original")
    with Retrain on the forget metrics (sub-class: ``forget_test_acc``; random: ``forget_acc`` and
    ``mia_efficacy``). A pure function.

    ``original`` / ``retrain``: ``evaluate``'s metrics dict, or lists of them — one per seed, paired
    by position (the same seed's original and Retrain; ``seeds`` names them). With lists the verdict
    is taken on the means over seeds and the per-seed gaps are kept under ``"per_seed"``.
    ``retrain`` None or empty: the verdict is unknown (``missing`` says why).

    A sub-class gap under :data:`SUBCLASS_MIN_GAP` points, or a random-sample forget-accuracy or
    MIA-efficacy gap under :data:`RANDOM_MIN_GAP` points, makes the scenario non-discriminative: a
    sanity check only, since "equal to Retrain" is then also what doing nothing scores.

    Returns ``{"kind", "known", "discriminative" (True / False / None when unknown),
    "threshold_points", "gap_points" (the smallest deciding gap), "gaps": {metric: {"original",
    "retrain", "gap_points", "below_threshold"}}, "seeds", "per_seed", "message"}`` (accuracies as
    fractions, gaps in points); ``message`` is the one line :func:`run_scenario` prints.
    """
    _check_kind(kind)
    spec = DISCRIMINATION_METRICS[kind]
    threshold = spec[0][2]
    origs = list(original) if isinstance(original, (list, tuple)) else ([original] if original is not None else [])
    rets = list(retrain) if isinstance(retrain, (list, tuple)) else ([retrain] if retrain is not None else [])
    seeds = list(seeds) if seeds is not None else None
    out = {"kind": kind, "known": False, "discriminative": None, "threshold_points": threshold,
           "gap_points": None, "gaps": {}, "seeds": seeds, "per_seed": []}
    if not rets:
        out["message"] = (f"discrimination: unknown — {missing}, so nothing tells forgetting from doing nothing "
                          "here (add Retrain to the methods)")
        return out
    if len(origs) != len(rets):
        raise ValueError(f"original and retrain must pair one to one (one per seed), got {len(origs)} and "
                         f"{len(rets)}")
    if seeds is not None and len(seeds) != len(rets):
        raise ValueError(f"seeds must name each pair, got {len(seeds)} seeds for {len(rets)} pairs")
    for i, (o, r) in enumerate(zip(origs, rets)):
        entry = {"seed": seeds[i] if seeds is not None else i, "gaps": {}}
        for key, _, _ in spec:
            ov, rv = o.get(key), r.get(key)
            entry["gaps"][key] = {"original": ov, "retrain": rv,
                                  "gap_points": abs(100 * (ov - rv)) if _finite(ov) and _finite(rv) else None}
        out["per_seed"].append(entry)
    parts, below = [], []
    for key, what, thr in spec:
        ov, rv = _mean_metric(origs, key), _mean_metric(rets, key)
        if not (_finite(ov) and _finite(rv)):
            continue
        gap = abs(100 * (ov - rv))
        low = gap < thr - _EPS
        out["gaps"][key] = {"original": ov, "retrain": rv, "gap_points": gap, "below_threshold": low}
        below.append(low)
        vals = f"Original {100 * ov:.1f}% vs Retrain {100 * rv:.1f}%"
        gap_txt = f"gap {gap:.1f} points" + (f" < {thr:g}" if low else "")
        parts.append(f"{vals} on {what} ({gap_txt})" if kind == "subclass" else f"{what} {vals} ({gap_txt})")
    head = "discrimination" + (f" (means over {len(rets)} seeds)" if len(rets) > 1 else "") + ": "
    if not out["gaps"]:
        names = " and ".join(k for k, _, _ in spec)
        out["message"] = head + f"unknown — Original or Retrain has no finite {names}"
        return out
    out["known"] = True
    out["discriminative"] = not any(below)
    out["gap_points"] = min(g["gap_points"] for g in out["gaps"].values())
    verdict = ("this scenario can tell forgetting from doing nothing" if out["discriminative"] else
               "this scenario CANNOT tell forgetting from doing nothing — a sanity check only "
               "(\"equal to Retrain\" is also what doing nothing scores)")
    out["message"] = head + ", ".join(parts) + ": " + verdict
    return out


def _one_scenario(subclass, random_fraction, forget_indices) -> None:
    if sum(v is not None for v in (subclass, random_fraction, forget_indices)) != 1:
        raise ValueError("give exactly one of subclass, random_fraction and forget_indices")


def scenario_forget_set(info, train_set, *, subclass=None, random_fraction=None, forget_indices=None,
                        seed: int = 0) -> dict:
    """``{"forget_indices", "test_forget_indices", "sibling_test_indices", "label"}`` for a sub-class
    (name or id), a random ``fraction`` of ``train_set`` (seeded) or given ``forget_indices`` (into
    ``train_set``, checked by :func:`dfmu_ext._common.resolve_forget_set`) — exactly one of the three."""
    _one_scenario(subclass, random_fraction, forget_indices)
    if forget_indices is not None:
        idx = resolve_forget_set(train_set, forget_indices=forget_indices).indices
        return {"forget_indices": idx, "test_forget_indices": None, "sibling_test_indices": None,
                "label": f"{idx.numel()} given training samples"}
    if subclass is not None:
        tr_idx, te_idx, coarse = subclass_indices(info, subclass)
        if tr_idx.numel() == 0:
            raise ValueError(f"sub-class {subclass!r} has no training sample: there is nothing to forget")
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
    """Mean of |m - r| over UA, RA, TA and MIA-efficacy (the field's summary number; the runner's
    :func:`dfmu_ext.experiments.runner.gap_to_reference` over :data:`GAP_KEYS`)."""
    return gap_to_reference(metrics, reference, _GAP_METRICS)


def _sibling_accuracy(model, test_set, indices, device) -> float:
    if indices is None or indices.numel() == 0:
        return float("nan")
    logits, labels = predict_logits(model, torch.utils.data.Subset(test_set, indices.tolist()), device=device)
    return (logits.argmax(1) == labels).float().mean().item()


def run_scenario(dataset: str | None, model_name: str, *, subclass=None, random_fraction=None, forget_indices=None,
                 fraction: float = 0.13, seeds=3, methods="all", device="cpu", out_dir: str = "runs/scenario",
                 use_cache: bool = True, max_epochs: int | None = None, train_epochs: int | None = None,
                 progress: bool = False, quiet: bool = False, eval_kwargs: dict | None = None,
                 steps: StepOptions | None = None, plots: bool = True, data=None, original=None,
                 model_factory=None, train_config=None, outputs=None) -> dict:
    """Run ``methods`` x ``seeds`` on one scenario; write ``scenario.json`` (and
    ``scenario_frontier.png`` when ``plots``); print and return the table.

    The original of each seed is the cached one (trained on the coarse labels for a sub-class); it is
    scored as "Original" (doing nothing). Under the title a line says whether the scenario can tell
    forgetting from doing nothing (:func:`discrimination`, Original vs Retrain; stored under
    ``"discrimination"``). The table adds each method's signed gaps to the same seed's Retrain, mean ±
    std over seeds (:func:`signed_gaps`; stored per run under ``"gaps_to_retrain"``). Methods that
    cannot forget samples (head-mask) are skipped with a note. ``steps``: precision and layout of
    every method that trains (:class:`dfmu_ext.steps.StepOptions`).

    The scenario is one of ``subclass``, ``random_fraction`` and ``forget_indices`` (see
    :func:`scenario_forget_set`). A model and data of one's own, as in
    :func:`dfmu_ext.experiments.run_comparison`: ``data=(train_set, test_set, info)`` instead of
    ``dataset``, ``original`` (every seed starts from a copy; nothing is trained or cached),
    ``model_factory`` and ``train_config`` for Retrain. ``outputs`` (an
    :class:`dfmu_ext._io.OutputBatch`) stages the files for the caller to publish with its others.
    """
    _one_scenario(subclass, random_fraction, forget_indices)
    kind = "subclass" if subclass is not None else "random"
    log = quiet_log(quiet)
    device = resolve_device(device)
    dataset, (train_set, test_set, info) = load_data(dataset, data, original, data_mod)
    seeds = resolve_seeds(seeds)
    names = [n for n in resolve_methods(methods) if n != "head-mask"]
    skipped = ["head-mask"] if "head-mask" in resolve_methods(methods) else []
    eval_kwargs = dict(eval_kwargs or {})
    start, labels = time.perf_counter(), []

    def calls_of(seed: int):
        """The seed's calls: doing nothing ("Original"), then every method, each on a copy of the original."""
        scen = scenario_forget_set(info, train_set, subclass=subclass, random_fraction=random_fraction,
                                   forget_indices=forget_indices, seed=seed)
        labels.append(scen["label"])
        start_model, meta = original_for(seed, original, device, train_config, lambda s: cached_original(
            dataset, model_name, device, s, epochs=train_epochs, use_cache=use_cache, progress=progress, log=log))
        for name in ["Original"] + names:
            def run(spec=SPECS.get(name)) -> dict:
                model, out = copy.deepcopy(start_model), {}
                if spec is not None:
                    kwargs = method_kwargs_for(spec, meta, max_epochs, model_factory=model_factory, steps=steps)
                    frac = spec.fixed_fraction if not spec.budgeted and spec.fixed_fraction else fraction
                    res = spec.fn(model, train_set, None, frac, forget_indices=scen["forget_indices"], device=device,
                                  seed=seed, progress=progress, **kwargs)
                    model = res.model
                    out.update(time_s=res.timings["total"], retain_samples=res.retain_samples_used)
                out["metrics"] = evaluate(model, train_set, test_set, forget_indices=scen["forget_indices"],
                                          test_forget_indices=scen["test_forget_indices"], device=device, seed=seed,
                                          **eval_kwargs)
                out["metrics"][SIBLINGS.key] = _sibling_accuracy(model, test_set, scen["sibling_test_indices"], device)
                return out

            yield Call({"method": name, "seed": seed}, run, f"{name} seed {seed}",
                       lambda rec: (f"UA {100 * (1 - rec['metrics']['forget_acc']):.1f}%, "
                                    f"RA {100 * rec['metrics']['retain_acc']:.1f}%"))

    runs = run_seeds(seeds, calls_of, log)
    for r, ref in reference_pairs(runs):
        r["gap_to_retrain"] = average_gap(r["metrics"], ref["metrics"])
        r["gaps_to_retrain"] = signed_gaps(r["metrics"], ref["metrics"], kind)
    label = labels[-1]
    by_seed = {name: {r["seed"]: r["metrics"] for r in runs if r["method"] == name and "metrics" in r}
               for name in ("Original", "Retrain")}
    paired = [s for s in seeds if s in by_seed["Original"] and s in by_seed["Retrain"]]
    disc = discrimination([by_seed["Original"][s] for s in paired], [by_seed["Retrain"][s] for s in paired], kind,
                          seeds=paired, missing="Retrain was not run" if "Retrain" not in names else
                          "Retrain (or Original) failed on every seed")

    columns, gap_columns = METRICS + (SIBLINGS,), [g for g, _ in SIGNED_GAPS[kind]]
    groups, rows = group(runs, lambda r: r["method"]), []
    for name in [n for n in ["Original"] + names if n in groups]:
        rs = groups[name]
        rows.append(["Original (doing nothing)" if name == "Original" else name]
                    + [m.cell(*mean_std([m.shown(r["metrics"][m.key]) for r in rs])) for m in columns]
                    + [GAP.cell(*mean_std([r.get(GAP.key) for r in rs]))]
                    + [g.cell(*mean_std([r.get("gaps_to_retrain", {}).get(g.key) for r in rs])) for g in gap_columns]
                    + [TIME.cell(*mean_std([r.get(TIME.key) for r in rs]))])
    header = ["method"] + [m.header for m in (*columns, GAP, *gap_columns, TIME)]
    table = markdown_table(header, rows)
    title = f"{info.name} / {model_name}: forget {label}, {len(seeds)} seed(s), {100 * fraction:g}% retain data"
    print(f"\n{title}")
    print(disc["message"])
    print(table)
    if skipped:
        print("head-mask skipped: it removes whole classes' rows, not samples")
    folder = output_folder(out_dir, outputs)
    report = {"title": title, "dataset": info.name, "model": model_name, "scenario": label, "kind": kind,
              "fraction": fraction, "seeds": seeds, "methods": names, "steps": (steps or StepOptions()).to_dict(),
              "discrimination": disc, "runs": runs, "table": table, "skipped": skipped, "plots": {},
              "total_seconds": time.perf_counter() - start}
    if plots and any("gaps_to_retrain" in r for r in runs):
        path = os.path.join(folder, "scenario_frontier.png")
        verdict = ("may or may not tell forgetting from doing nothing (discrimination unknown)"
                   if disc["discriminative"] is None else
                   f"can tell forgetting from doing nothing (gap {disc['gap_points']:.1f} points)"
                   if disc["discriminative"] else
                   f"CANNOT tell forgetting from doing nothing (gap {disc['gap_points']:.1f} points "
                   f"< {disc['threshold_points']:g}): a sanity check only")
        try:
            report["plots"]["scenario_frontier"] = plot_scenario_frontier(runs, kind, path,
                                                                          f"{title}\nthis scenario {verdict}")
        except Exception as exc:  # a plot must never lose the measured results
            report["plot_error"] = f"{type(exc).__name__}: {exc}"
            log(f"scenario_frontier.png not written ({report['plot_error']})")
    return finish_report(report, folder, out_dir, "scenario.json", outputs, log)
