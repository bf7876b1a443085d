"""Compare unlearning methods (DFMU and the baselines) on one data set and model.

    dfmu compare --dataset fashion-mnist --model cnn --classes 3 \\
        --fractions 0.01,0.05,0.13,0.25,1.0 --seeds 3 --methods all --out-dir runs/compare

Per seed, the original model is trained once (or loaded from the demo's cache,
``$DFMU_CACHE/{dataset}-{model}-{device}-seed{seed}.pt``); every method then starts from a deep
copy of that same original. Methods whose result does not depend on the retain fraction
(``MethodSpec.budgeted`` is False: Retrain on all retain data, GA on forget data only, head-mask
on no data) run once per seed. Results are aggregated as mean ± std over seeds per (method,
fraction), printed as a Markdown table, written as JSON and as two PNG plots (all files atomic).
"""
from __future__ import annotations

import copy
import time

from .._common import normalise_classes
from .._io import markdown_table
from ..baselines import SPECS, resolve_methods
from ..eval import BATTERY_KEYS, battery_metrics, evaluate
from ..eval.evaluate import BATTERY
from ..eval.metrics import METRICS, Metric
from ..splits import split_forget_retain, stratified_fraction
from ..steps import StepOptions
from ..zoo import data as data_mod
from .. import training
from ..zoo.checkpoints import cached_original
from .meta import separation_table
from .plots import plot_comparison, plot_frontier
from .runner import (TIME, Call, column_stats, finish_report, group, mean_std, output_folder, quiet_log,
                     resolve_device, resolve_seeds, run_seeds, stat)

__all__ = ["run_comparison", "format_comparison_table", "aggregate", "mean_std", "table_note", "method_kwargs_for",
           "own_original", "original_for", "load_data", "TABLE_METRICS"]

#: The protocol's metrics as the comparison shows them; with whole classes the forget classes' test
#: accuracy is left out (UA on their training samples already reads the forgetting).
TABLE_METRICS = tuple(m for m in METRICS if m.key != "forget_test_acc")
#: The battery's columns, shown when it ran (see dfmu_ext.eval.battery_metrics).
BATTERY_COLUMNS = tuple(m for m in BATTERY if m.table)


def method_kwargs_for(spec, meta: dict, max_epochs: int | None, given: dict | None = None,
                      model_factory=None, steps: StepOptions | None = None) -> dict:
    """The keywords one method runs with: ``given`` (the caller's), Retrain's training recipe from the
    original's checkpoint ``meta`` (and ``model_factory``, for a model of one's own), the epochs
    capped at ``max_epochs`` for the methods that have epochs, and ``steps`` (one precision / layout
    for every method that trains)."""
    kwargs = dict(given or {})
    if steps is not None and spec.trains:
        kwargs.setdefault("steps", steps)
    if spec.name == "Retrain":
        kwargs.setdefault("config", training.TrainConfig(**meta["train_config"]))
        if model_factory is not None:
            kwargs.setdefault("model_factory", model_factory)
    if max_epochs and spec.default_epochs is not None:
        kwargs["epochs"] = min(int(kwargs.get("epochs", 10 ** 9)), int(max_epochs), spec.default_epochs)
    return kwargs


def own_original(given, device, train_config: training.TrainConfig | None = None):
    """``(original, meta)`` for a model of one's own: a copy of ``given`` on ``device``, and a ``meta``
    holding only what the methods read from a checkpoint's — Retrain's recipe (``train_config``,
    default ``TrainConfig()``)."""
    return copy.deepcopy(given).to(device), {"train_config": (train_config or training.TrainConfig()).to_dict()}


def original_for(seed: int, given, device, train_config, load) -> tuple:
    """``(original, meta)`` of one seed: a copy of the caller's own model ``given`` (:func:`own_original`),
    else ``load(seed)`` (the cache of originals)."""
    return own_original(given, device, train_config) if given is not None else load(seed)


def load_data(dataset, data, original, source=data_mod) -> tuple:
    """``(canonical dataset name or None, (train_set, test_set, info))``: ``data`` when given, else the
    named data set read through ``source`` (the :mod:`dfmu_ext.zoo.data` module). ``original`` (a
    model of one's own) needs ``data``: the data it was trained on."""
    if original is not None and data is None:
        raise ValueError("original= needs data=(train_set, test_set, info): the data it was trained on")
    if data is not None:
        return None, data
    dataset = source.canonical_name(dataset)
    return dataset, source.load_dataset(dataset)


#: The per-call numbers a comparison row summarises beside the metrics.
_COSTS = ("time_s", "retain_samples", "forget_samples")


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (method, fraction) over its successful runs: every metric and cost as
    ``{"mean", "std", "n"}`` over seeds (:func:`dfmu_ext.experiments.runner.mean_std`)."""
    out = []
    for (method, fraction), rs in group(runs, lambda r: (r["method"], r["fraction"])).items():
        row = {"method": method, "fraction": fraction, "once": rs[0]["once"], "seeds": [r["seed"] for r in rs]}
        row.update(column_stats([r["metrics"] for r in rs], stat))
        row.update(column_stats([{k: r[k] for k in _COSTS} for r in rs], stat))
        out.append(row)
    return out


def _pm(st: dict | None, metric: Metric) -> str:
    """One row's ``{"mean", "std", "n"}`` of ``metric`` as its table cell ("-" when absent)."""
    return "-" if st is None else metric.cell(metric.shown(st["mean"]), st["std"], st["n"])


def _fraction_label(row: dict) -> str:
    if row["method"] == "Original":
        return "-"
    if row["once"]:
        return f"{100 * row['fraction']:g}% (once)" if row["fraction"] is not None else "n/a (once)"
    return f"{100 * row['fraction']:g}%"


def format_comparison_table(rows: list[dict]) -> str:
    """Markdown: one row per (method, fraction); metrics in %, mean ± std over seeds."""
    columns = list(TABLE_METRICS) + [m for m in BATTERY_COLUMNS if any(m.key in r for r in rows)]
    header = ["method", "retain data"] + [m.header for m in columns] + [TIME.header, "retain samples", "forget samples"]
    lines = []
    for r in rows:
        cells = [r["method"], _fraction_label(r)] + [_pm(r.get(m.key), m) for m in columns]
        if r["method"] == "Original":
            cells += ["-", "-", "-"]
        else:
            cells += [_pm(r["time_s"], TIME), f"{r['retain_samples']['mean']:.0f}",
                      f"{r['forget_samples']['mean']:.0f}"]
        lines.append(cells)
    return markdown_table(header, lines)


def table_note(methods: list[str]) -> str:
    once = [m for m in methods if not SPECS[m].budgeted]
    if not once:
        return ""
    parts = {"Retrain": "Retrain uses all retain data (the gold standard)",
             "GA": "GA reads only forget data", "head-mask": "head-mask reads no data"}
    return ("(once) = run once per seed, independent of the retain fraction: "
            + "; ".join(parts[m] for m in once) + ". UA = 1 - forget-set accuracy; all metrics in %.")


def run_comparison(dataset: str, model_name: str, classes, fractions=(0.13,), seeds=1, methods="all",
                   device="cpu", out_dir: str = "runs/compare", *, method_kwargs: dict | None = None,
                   max_epochs: int | None = None, train_epochs: int | None = None, use_cache: bool = True,
                   progress: bool = False, quiet: bool = False, eval_kwargs: dict | None = None,
                   eval_fraction: float = 1.0, plots: bool = True, data=None, original=None,
                   model_factory=None, train_config: training.TrainConfig | None = None,
                   battery: bool = False, steps: StepOptions | None = None, outputs=None) -> dict:
    """Run ``methods`` x ``fractions`` x ``seeds`` and write ``comparison.json`` plus two PNGs.

    Args:
        dataset: "fashion-mnist", "cifar10", "digits" or "auto".
        model_name: "cnn", "resnet18" or "mlp".
        classes: the forget classes (int or list of ints).
        fractions: retain-data fractions in (0, 1].
        seeds: an int n (seeds 0..n-1) or a list of seeds.
        methods: "all", a comma-separated string or a list of ``baselines.METHODS`` names.
        device: a torch device or "auto".
        out_dir: where ``comparison.json``, ``retain_vs_fraction.png`` and ``time_vs_retain.png`` go.
        method_kwargs: ``{method: {keyword: value}}`` passed to that method (e.g. ``{"FT": {"lr": 0.02}}``).
        max_epochs: caps the ``epochs`` of the epoch-based baselines (specs with ``default_epochs``)
            for quick runs; Retrain keeps the original recipe.
        train_epochs: overrides the original's (and therefore Retrain's) training epochs; such
            originals are cached under a separate name.
        use_cache: read/write originals in the demo's cache.
        eval_kwargs: extra keywords for :func:`dfmu_ext.evaluate` (e.g. ``probe_samples``).
        eval_fraction: evaluate UA/RA/MIA/probe on a class-stratified fraction of the training
            set (seeded, the same for every method) instead of all of it — for quick runs; the
            test set is always used whole. The methods always get the whole training set.
        data: ``(train_set, test_set, info)`` already loaded (e.g. ``zoo.custom.load_data``) instead of
            loading ``dataset`` by name; ``dataset`` is then ignored.
        original: a trained model of one's own to unlearn from (every seed starts from a copy of it;
            nothing is trained or cached); ``model_name`` is then only its label. Needs ``data``.
        model_factory: with ``original``, builds a fresh model of the same architecture for Retrain
            (default: Retrain re-initialises a copy of ``original`` in place).
        train_config: with ``original``, Retrain's training recipe (default ``TrainConfig()``).
        battery: also the verification battery, with the TV distance to Retrain (run first).
        steps: precision and memory layout of every method that trains
            (:class:`dfmu_ext.steps.StepOptions`; default: each device's ``"auto"``). The originals
            are trained (or read from the cache) as usual, so every setting starts from the same one.
        outputs: an :class:`dfmu_ext._io.OutputBatch`: the files are staged in it (published, or
            removed, together with the caller's other outputs) instead of written in place.

    Returns the report dict (also written as JSON): ``config``, ``original`` (per seed), ``runs``
    (one per method call, failures recorded with ``error``), ``rows`` (aggregates) and ``table``.
    """
    log = quiet_log(quiet)
    device = resolve_device(device)
    classes = normalise_classes(classes)
    fractions = sorted({float(f) for f in fractions})
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
    seeds = resolve_seeds(seeds)
    names = resolve_methods(methods)
    if battery and "Retrain" in names:  # Retrain first: the other rows' TV distance is measured to it
        names = ["Retrain"] + [n for n in names if n != "Retrain"]
    method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
    method_kwargs_json = {m: _plain(kw) for m, kw in method_kwargs.items()}
    unknown = set(method_kwargs) - set(SPECS)
    if unknown:
        raise ValueError(f"method_kwargs names unknown methods {sorted(unknown)}")
    eval_kwargs = dict(eval_kwargs or {})

    dataset, (train_set, test_set, info) = load_data(dataset, data, original)
    if min(classes) < 0 or max(classes) >= info.num_classes:
        raise ValueError(f"classes must lie in [0, {info.num_classes}), got {classes}")
    _, retain_set = split_forget_retain(train_set, classes)
    if not 0.0 < float(eval_fraction) <= 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1], got {eval_fraction}")
    eval_train = train_set if eval_fraction == 1.0 else stratified_fraction(train_set, eval_fraction, seed=12345)
    start = time.perf_counter()
    originals: dict[int, dict] = {}

    def calls_of(seed: int):
        """The seed's calls: every method on every fraction (once for the unbudgeted ones), each on a
        copy of the seed's original; then the original's battery, against that seed's Retrain."""
        start_model, meta = original_for(seed, original, device, train_config, lambda s: cached_original(
            dataset, model_name, device, s, epochs=train_epochs, use_cache=use_cache, progress=progress, log=log))
        start_model.eval()
        battery_kw = {}
        if battery:  # Retrain runs first (see above): its model is the reference of the TV distance
            battery_kw = {"battery": True, "original": start_model, "reference": None}
        originals[seed] = evaluate(start_model, eval_train, test_set, classes, device=device, seed=seed,
                                   **eval_kwargs)
        log(f"seed {seed}: original RA {100 * originals[seed]['retain_acc']:.1f}%, "
            f"forget acc {100 * originals[seed]['forget_acc']:.1f}%")
        for name in names:
            spec = SPECS[name]
            for frac in [spec.fixed_fraction] if not spec.budgeted else fractions:
                kwargs = method_kwargs_for(spec, meta, max_epochs, method_kwargs.get(name), model_factory, steps)

                def run(spec=spec, frac=frac, kwargs=kwargs) -> dict:
                    res = spec.fn(copy.deepcopy(start_model), train_set, classes, frac if frac is not None else 1.0,
                                  device=device, seed=seed, progress=progress, **kwargs)
                    metrics = evaluate(res.model, eval_train, test_set, classes, device=device, seed=seed,
                                       **eval_kwargs, **battery_kw)
                    if battery and spec.name == "Retrain":
                        battery_kw["reference"] = res.model
                        metrics["tv_to_reference"] = 0.0
                    return {"metrics": metrics, "time_s": res.timings["total"],
                            "retain_samples": res.retain_samples_used, "forget_samples": res.forget_samples_used,
                            "timings": {k: float(v) for k, v in res.timings.items()}}

                yield Call({"method": name, "fraction": frac, "seed": seed, "once": not spec.budgeted,
                            "kwargs": _plain(kwargs)}, run,
                           f"{name} @ {'once' if frac is None else f'{100 * frac:g}%'} seed {seed}",
                           lambda rec: (f"RA {100 * rec['metrics']['retain_acc']:.1f}%, "
                                        f"UA {100 * (1 - rec['metrics']['forget_acc']):.1f}%, {rec['time_s']:.2f} s"))
        if battery:
            originals[seed].update(battery_metrics(start_model, eval_train, test_set, classes, original=start_model,
                                                   reference=battery_kw["reference"], seed=seed, device=device))

    runs = run_seeds(seeds, calls_of, log)
    rows = aggregate(runs)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order[r["method"]], r["fraction"] if r["fraction"] is not None else -1))
    orig_row = {"method": "Original", "fraction": None, "once": True, "seeds": seeds}
    orig_row.update(column_stats([originals[sd] for sd in seeds], stat))
    table_rows = [orig_row] + rows
    table = format_comparison_table(table_rows)
    note = table_note(names)
    failed = [f"{r['method']} (seed {r['seed']}): {r['error']}" for r in runs if r.get("error")]
    title = f"{info.name} / {model_name}, forget {classes}, {len(seeds)} seed(s), {device.type}"
    print(f"\n{title}")  # the table is the result: printed also when quiet
    print(table)
    if note:
        print(note)
    for f in failed:
        print(f"failed: {f}")
    meta_table = None
    if battery:
        # The TV distance is left out: Retrain's own is 0 by definition (its floor is another Retrain
        # seed's distance), so "separates" would say nothing there.
        keys = [m.key for m in TABLE_METRICS] + [k for k in originals[seeds[0]] if k.startswith("probe@")] + \
            [k for k in BATTERY_KEYS if k != "tv_to_reference"]
        meta_table, verdicts = separation_table(runs, originals, keys)
        print("\nWhich metrics tell hiding (Original, head-mask) from forgetting (Retrain):")
        print(meta_table)
    folder = output_folder(out_dir, outputs)
    report = {
        "config": {"dataset": info.name, "source": info.source, "model": model_name, "forget_classes": classes,
                   "fractions": fractions, "seeds": seeds, "methods": names, "device": str(device),
                   "max_epochs": max_epochs, "train_epochs": train_epochs, "method_kwargs": method_kwargs_json,
                   "retain_samples_total": len(retain_set), "eval_kwargs": eval_kwargs,
                   "eval_fraction": eval_fraction, "eval_train_samples": len(eval_train),
                   "steps": (steps or StepOptions()).to_dict()},
        "original": {str(s): m for s, m in originals.items()},
        "runs": runs, "rows": table_rows, "table": table, "note": note, "failed": failed,
        "hiding_vs_forgetting": meta_table,
        "total_seconds": time.perf_counter() - start,
    }
    if plots and rows:
        report["plots"] = plot_comparison(table_rows, fractions, folder, title)
        if battery:
            report["plots"].update(plot_frontier(table_rows, fractions, folder, title))
    return finish_report(report, folder, out_dir, "comparison.json", outputs, log)


def _plain(kwargs: dict) -> dict:
    """Keyword values as JSON-friendly data (configs via ``to_dict``, other objects via ``repr``)."""
    out = {}
    for k, v in kwargs.items():
        if hasattr(v, "to_dict"):
            v = v.to_dict()
        elif not isinstance(v, (int, float, str, bool, list, tuple, dict, type(None))):
            v = repr(v)
        out[k] = v
    return out
