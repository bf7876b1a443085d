"""Compare unlearning methods (DFMU and the baselines) on one data set and model.

    dfmu compare --dataset fashion-mnist --model cnn --classes 3 \\
        --fractions 0.01,0.05,0.13,0.25,1.0 --seeds 3 --methods all --out-dir runs/compare

Per seed, the original model is trained once (or loaded from the demo's cache,
``$DFMU_CACHE/{dataset}-{model}-{device}-seed{seed}.pt``); every method then starts from a deep
copy of that same original. Methods whose result does not depend on the retain fraction
(``baselines.FRACTION_INDEPENDENT``: Retrain on all retain data, GA on forget data only, head-mask
on no data) run once per seed. Results are aggregated as mean ± std over seeds per (method,
fraction), printed as a Markdown table, written as JSON and as two PNG plots (all files atomic).
"""
from __future__ import annotations

import copy
import math
import os
import time
import traceback

import numpy as np
import torch

from . import baselines
from . import data as data_mod
from . import models as models_mod
from . import training
from .datautil import split_forget_retain, stratified_fraction
from .metrics import evaluate
from .report import write_json

__all__ = ["run_comparison", "resolve_methods", "format_comparison_table", "add_compare_parser", "cmd_compare"]

#: (column, metric key, shown as 1 - value)
TABLE_METRICS = [("UA", "forget_acc", True), ("RA", "retain_acc", False), ("TA", "test_acc", False),
                 ("MIA-efficacy", "mia_efficacy", False), ("probe", "probe_forget_acc", False)]


def resolve_methods(spec) -> list[str]:
    """``"all"``, a comma-separated string or a list of names (case-insensitive) -> registry names."""
    if isinstance(spec, str):
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = list(spec)
    if any(n.lower() == "all" for n in names):
        return list(baselines.METHODS)
    lookup = {k.lower(): k for k in baselines.METHODS}
    lookup.update({"l1": "l1-sparse", "l1sparse": "l1-sparse", "headmask": "head-mask", "retrain": "Retrain"})
    out = []
    for n in names:
        key = n.lower()
        if key not in lookup:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(baselines.METHODS)} or 'all'")
        if lookup[key] not in out:
            out.append(lookup[key])
    if not out:
        raise ValueError("no method named")
    return out


def _cache_path(dataset: str, model_name: str, device: torch.device, seed: int, epochs: int | None) -> str:
    root = os.path.expanduser(os.environ.get("DFMU_CACHE", "~/.cache/dfmu"))
    suffix = f"-e{epochs}" if epochs else ""  # a non-default recipe must not collide with the demo's cache
    return os.path.join(root, f"{dataset}-{model_name}-{device.type}-seed{seed}{suffix}.pt")


def _original(dataset: str, model_name: str, info, train_set, device: torch.device, seed: int,
              train_epochs: int | None, use_cache: bool, progress: bool, log):
    """(model, meta) of the original for ``seed``: from the cache, else trained (and cached)."""
    from . import cli  # lazy: cli imports this module to register the subcommand

    path = _cache_path(dataset, model_name, device, seed, train_epochs)
    if use_cache and os.path.isfile(path):
        model, meta = cli.load_checkpoint(path, device)
        if meta.get("dataset") == info.name and meta.get("model") == model_name:
            log(f"seed {seed}: using the cached original model {path}")
            return model, meta
    config = training.default_train_config(model_name, device.type)
    if train_epochs:
        config.epochs = int(train_epochs)
    torch.manual_seed(seed)
    model = models_mod.build_model(model_name, info.in_channels, info.num_classes, info.image_size,
                                   **config.model_kwargs).to(device)
    log(f"seed {seed}: training the original {model_name} on {info.name} ({config.epochs} epochs, {device})")
    hist = training.train_model(model, train_set, config, device=device, seed=seed, progress=progress)
    meta = {"model": model_name, "model_kwargs": dict(config.model_kwargs), "dataset": info.name,
            "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size),
            "seed": seed, "train_seconds": hist["total_seconds"], "train_config": config.to_dict()}
    if use_cache:
        cli.save_checkpoint(path, model, meta)
    return model, meta


def _stats(values: list[float]) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def _aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r.get("error"):
            continue
        groups.setdefault((r["method"], r["fraction"]), []).append(r)
    out = []
    for (method, fraction), rs in groups.items():
        row = {"method": method, "fraction": fraction, "once": rs[0]["once"], "seeds": [r["seed"] for r in rs]}
        for key in list(rs[0]["metrics"]):
            m, s, n = _stats([r["metrics"][key] for r in rs])
            row[key] = {"mean": m, "std": s, "n": n}
        for key in ("time_s", "retain_samples", "forget_samples"):
            m, s, n = _stats([r[key] for r in rs])
            row[key] = {"mean": m, "std": s, "n": n}
        out.append(row)
    return out


def _pm(stat: dict, pct: bool = True, invert: bool = False) -> str:
    m, s, n = stat["mean"], stat["std"], stat["n"]
    if n == 0 or not math.isfinite(m):
        return "-"
    if invert:
        m = 1.0 - m
    if pct:
        return f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if n > 1 else "")
    return f"{m:.3g}" + (f" ± {s:.2g}" if n > 1 else "")


def _fraction_label(row: dict) -> str:
    if row["method"] == "Original":
        return "-"
    if row["once"]:
        return f"{100 * row['fraction']:g}% (once)" if row["fraction"] is not None else "n/a (once)"
    return f"{100 * row['fraction']:g}%"


def format_comparison_table(rows: list[dict]) -> str:
    """Markdown: one row per (method, fraction); metrics in %, mean ± std over seeds."""
    header = (["method", "retain data"] + [c for c, _, _ in TABLE_METRICS]
              + ["time (s)", "retain samples", "forget samples"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["method"], _fraction_label(r)]
        cells += [_pm(r[k], invert=inv) for _, k, inv in TABLE_METRICS]
        if r["method"] == "Original":
            cells += ["-", "-", "-"]
        else:
            cells += [_pm(r["time_s"], pct=False), f"{r['retain_samples']['mean']:.0f}",
                      f"{r['forget_samples']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_note(methods: list[str]) -> str:
    once = [m for m in methods if m in baselines.FRACTION_INDEPENDENT]
    if not once:
        return ""
    parts = {"Retrain": "Retrain uses all retain data (the gold standard)",
             "GA": "GA reads only forget data", "head-mask": "head-mask reads no data"}
    return ("(once) = run once per seed, independent of the retain fraction: "
            + "; ".join(parts[m] for m in once) + ". UA = 1 - forget-set accuracy; all metrics in %.")


def _savefig_atomic(fig, path: str) -> None:
    from .report import save_figure_atomic

    save_figure_atomic(fig, path)


def _headline_fraction(fractions: list[float]) -> float:
    return min(fractions, key=lambda f: (abs(math.log(f / 0.13)), f))


def _plot(rows: list[dict], fractions: list[float], out_dir: str, title: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [r["method"] for r in rows if r["method"] != "Original"]
    methods = list(dict.fromkeys(methods))
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    paths = {"retain_vs_fraction": os.path.join(out_dir, "retain_vs_fraction.png"),
             "time_vs_retain": os.path.join(out_dir, "time_vs_retain.png")}

    # 1. retain accuracy vs retain-data fraction
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs_all = sorted(fractions)
    for m in methods:
        mr = sorted((r for r in rows if r["method"] == m), key=lambda r: r["fraction"] or 0)
        if mr[0]["once"]:
            v, s = 100 * mr[0]["retain_acc"]["mean"], 100 * mr[0]["retain_acc"]["std"]
            if math.isfinite(v):
                ax.axhline(v, color=colors[m], ls="--", lw=1.2, label=f"{m} (once)")
                if s > 0:
                    ax.axhspan(v - s, v + s, color=colors[m], alpha=0.08)
            continue
        xs = [r["fraction"] for r in mr]
        ys = [100 * r["retain_acc"]["mean"] for r in mr]
        es = [100 * r["retain_acc"]["std"] for r in mr]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=colors[m], label=m)
    orig = [r for r in rows if r["method"] == "Original"]
    if orig:
        ax.axhline(100 * orig[0]["retain_acc"]["mean"], color="black", ls=":", lw=1, label="original")
    if len(xs_all) > 1 and xs_all[0] > 0 and xs_all[-1] / xs_all[0] > 4:
        ax.set_xscale("log")
    ax.set_xticks(xs_all)
    ax.set_xticklabels([f"{100 * f:g}%" for f in xs_all])
    ax.set_xlabel("retain data used (stratified fraction)")
    ax.set_ylabel("retain accuracy RA (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    _savefig_atomic(fig, paths["retain_vs_fraction"])

    # 2. wall time (log) vs retain accuracy, one point per method (at the headline fraction)
    head = _headline_fraction(fractions)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in methods:
        mr = [r for r in rows if r["method"] == m]
        r = mr[0] if mr[0]["once"] else next((x for x in mr if x["fraction"] == head), None)
        if r is None:
            continue
        t, y = r["time_s"]["mean"], 100 * r["retain_acc"]["mean"]
        if not (math.isfinite(t) and math.isfinite(y)) or t <= 0:
            continue
        ax.errorbar([t], [y], xerr=[[min(r["time_s"]["std"], 0.99 * t)], [r["time_s"]["std"]]],
                    yerr=[100 * r["retain_acc"]["std"]], marker="o", ms=6, capsize=3, color=colors[m])
        ax.annotate(m, (t, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time of the unlearning call (s, log scale)")
    ax.set_ylabel("retain accuracy RA (%)")
    ax.set_title(f"{title}\nper-fraction methods at {100 * head:g}% of the retain data", fontsize=10)
    fig.tight_layout()
    _savefig_atomic(fig, paths["time_vs_retain"])
    return paths


def run_comparison(dataset: str, model_name: str, classes, fractions=(0.13,), seeds=1, methods="all",
                   device="cpu", out_dir: str = "runs/compare", *, method_kwargs: dict | None = None,
                   max_epochs: int | None = None, train_epochs: int | None = None, use_cache: bool = True,
                   progress: bool = False, quiet: bool = False, eval_kwargs: dict | None = None,
                   eval_fraction: float = 1.0, plots: bool = True) -> dict:
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
        max_epochs: caps the ``epochs`` of the epoch-based baselines (``baselines.EPOCH_METHODS``)
            for quick runs; Retrain keeps the original recipe.
        train_epochs: overrides the original's (and therefore Retrain's) training epochs; such
            originals are cached under a separate name.
        use_cache: read/write originals in the demo's cache.
        eval_kwargs: extra keywords for :func:`dfmu_ext.evaluate` (e.g. ``probe_samples``).
        eval_fraction: evaluate UA/RA/MIA/probe on a class-stratified fraction of the training
            set (seeded, the same for every method) instead of all of it — for quick runs; the
            test set is always used whole. The methods always get the whole training set.

    Returns the report dict (also written as JSON): ``config``, ``original`` (per seed), ``runs``
    (one per method call, failures recorded with ``error``), ``rows`` (aggregates) and ``table``.
    """
    def log(*msg):
        if not quiet:
            print(*msg, flush=True)

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dataset = data_mod.default_dataset() if dataset == "auto" else dataset
    classes = [int(classes)] if isinstance(classes, (int, np.integer)) else sorted({int(c) for c in classes})
    fractions = sorted({float(f) for f in fractions})
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions}")
    seeds = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seed to run")
    names = resolve_methods(methods)
    method_kwargs = {k: dict(v) for k, v in (method_kwargs or {}).items()}
    method_kwargs_json = {m: _plain(kw) for m, kw in method_kwargs.items()}
    unknown = set(method_kwargs) - set(baselines.METHODS)
    if unknown:
        raise ValueError(f"method_kwargs names unknown methods {sorted(unknown)}")
    eval_kwargs = dict(eval_kwargs or {})

    train_set, test_set, info = data_mod.load_dataset(dataset)
    if not classes or min(classes) < 0 or max(classes) >= info.num_classes:
        raise ValueError(f"classes must lie in [0, {info.num_classes}), got {classes}")
    _, retain_set = split_forget_retain(train_set, classes)
    if not 0.0 < float(eval_fraction) <= 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1], got {eval_fraction}")
    eval_train = train_set if eval_fraction == 1.0 else stratified_fraction(train_set, eval_fraction, seed=12345)
    start = time.perf_counter()
    runs: list[dict] = []
    originals: dict[int, dict] = {}
    for seed in seeds:
        original, meta = _original(dataset, model_name, info, train_set, device, seed, train_epochs, use_cache,
                                   progress, log)
        original.eval()
        originals[seed] = evaluate(original, eval_train, test_set, classes, device=device, seed=seed, **eval_kwargs)
        log(f"seed {seed}: original RA {100 * originals[seed]['retain_acc']:.1f}%, "
            f"forget acc {100 * originals[seed]['forget_acc']:.1f}%")
        for name in names:
            once = name in baselines.FRACTION_INDEPENDENT
            run_fracs = [1.0 if name == "Retrain" else None] if once else fractions
            for frac in run_fracs:
                kwargs = dict(method_kwargs.get(name, {}))
                if name == "Retrain" and "config" not in kwargs:
                    kwargs["config"] = training.TrainConfig(**meta["train_config"])
                if max_epochs and name in baselines.EPOCH_METHODS:
                    kwargs["epochs"] = min(int(kwargs.get("epochs", 10 ** 9)), int(max_epochs),
                                           _default_epochs(name))
                model = copy.deepcopy(original)
                rec = {"method": name, "fraction": frac, "seed": seed, "once": once,
                       "kwargs": _plain(kwargs)}
                label = f"{name} @ {'once' if frac is None else f'{100 * frac:g}%'} seed {seed}"
                try:
                    res = baselines.METHODS[name](model, train_set, classes, frac if frac is not None else 1.0,
                                                  device=device, seed=seed, progress=progress, **kwargs)
                    rec["metrics"] = evaluate(res.model, eval_train, test_set, classes, device=device, seed=seed,
                                              **eval_kwargs)
                    rec.update(time_s=res.timings["total"], retain_samples=res.retain_samples_used,
                               forget_samples=res.forget_samples_used,
                               timings={k: float(v) for k, v in res.timings.items()})
                    log(f"{label}: RA {100 * rec['metrics']['retain_acc']:.1f}%, "
                        f"UA {100 * (1 - rec['metrics']['forget_acc']):.1f}%, {res.timings['total']:.2f} s")
                except Exception as exc:  # one failing method must not lose the others' results
                    rec["error"] = f"{type(exc).__name__}: {exc}"
                    rec["traceback"] = traceback.format_exc()
                    log(f"{label}: FAILED ({rec['error']})")
                runs.append(rec)
                del model

    rows = _aggregate(runs)
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order[r["method"]], r["fraction"] if r["fraction"] is not None else -1))
    orig_row = {"method": "Original", "fraction": None, "once": True, "seeds": seeds}
    for key in originals[seeds[0]]:
        m, s, n = _stats([originals[sd][key] for sd in seeds])
        orig_row[key] = {"mean": m, "std": s, "n": n}
    table_rows = [orig_row] + rows
    table = format_comparison_table(table_rows)
    note = _table_note(names)
    failed = [f"{r['method']} (seed {r['seed']}): {r['error']}" for r in runs if r.get("error")]
    title = f"{info.name} / {model_name}, forget {classes}, {len(seeds)} seed(s), {device.type}"
    print(f"\n{title}")  # the table is the result: printed also when quiet
    print(table)
    if note:
        print(note)
    for f in failed:
        print(f"failed: {f}")
    os.makedirs(out_dir, exist_ok=True)
    report = {
        "config": {"dataset": info.name, "source": info.source, "model": model_name, "forget_classes": classes,
                   "fractions": fractions, "seeds": seeds, "methods": names, "device": str(device),
                   "max_epochs": max_epochs, "train_epochs": train_epochs, "method_kwargs": method_kwargs_json,
                   "retain_samples_total": len(retain_set), "eval_kwargs": eval_kwargs,
                   "eval_fraction": eval_fraction, "eval_train_samples": len(eval_train)},
        "original": {str(s): m for s, m in originals.items()},
        "runs": runs, "rows": table_rows, "table": table, "note": note, "failed": failed,
        "total_seconds": time.perf_counter() - start,
    }
    json_path = os.path.join(out_dir, "comparison.json")
    if plots and rows:
        report["plots"] = _plot(table_rows, fractions, out_dir, title)
    write_json(json_path, report)
    report["json"] = json_path
    log(f"wrote {json_path}" + (" and " + ", ".join(os.path.basename(p) for p in report.get("plots", {}).values())
                                if report.get("plots") else ""))
    return report


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


def _default_epochs(name: str) -> int:
    import inspect

    return int(inspect.signature(baselines.METHODS[name]).parameters["epochs"].default)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _parse_fractions(text: str) -> list[float]:
    try:
        out = [float(f) for f in str(text).split(",") if f.strip()]
    except ValueError:
        raise SystemExit(f"error: --fractions must be comma-separated numbers, got {text!r}")
    if not out or any(not 0.0 < f <= 1.0 for f in out):
        raise SystemExit(f"error: --fractions must lie in (0, 1], got {text!r}")
    return out


def cmd_compare(args) -> int:
    from . import cli

    device = cli._device(args.device)
    dataset = cli._resolve_dataset(args.dataset)
    _, _, info = data_mod.load_dataset(dataset)
    classes = cli._parse_classes(args.classes, info.num_classes)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    if args.seeds < 1:
        raise SystemExit("error: --seeds must be >= 1")
    run_comparison(dataset, args.model, classes, _parse_fractions(args.fractions), args.seeds, methods, device,
                   args.out_dir, max_epochs=args.max_epochs, train_epochs=args.epochs,
                   use_cache=not args.no_cache, progress=not args.quiet, quiet=args.quiet)
    return 0


def add_compare_parser(subparsers) -> None:
    """Register ``dfmu compare`` on an ``argparse`` sub-parser collection."""
    c = subparsers.add_parser("compare", help="compare DFMU with the baselines (table, JSON, plots)")
    c.add_argument("--dataset", default="auto", help="fashion-mnist | cifar10 | digits | auto")
    c.add_argument("--model", default="cnn", choices=list(models_mod.MODEL_NAMES))
    c.add_argument("--classes", default="3", help="comma-separated class ids to forget")
    c.add_argument("--fractions", default="0.01,0.05,0.13,0.25,1.0", help="comma-separated retain-data fractions")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    c.add_argument("--methods", default="all", help="'all' or comma-separated: " + ",".join(baselines.METHODS))
    c.add_argument("--out-dir", default="runs/compare")
    c.add_argument("--max-epochs", type=int, default=None,
                   help="cap the epochs of the epoch-based baselines (quick runs); Retrain keeps its recipe")
    c.add_argument("--epochs", type=int, default=None, help="override the original's (and Retrain's) epochs")
    c.add_argument("--no-cache", action="store_true", help="train the originals afresh, do not use the cache")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    c.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    c.set_defaults(func=cmd_compare)
