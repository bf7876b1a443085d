"""The plots a person looks at: the forget report (per-class accuracy, pruned units per block), the
comparison (retain accuracy vs data, time vs retain accuracy) and the scenario frontier (distance to
Retrain on the forget metric vs its cost). Every PNG is written atomically."""
from __future__ import annotations

import math
import os
import textwrap

from .._io import save_figure_atomic
from ..eval.evaluate import BATTERY
from ..eval.metrics import METRICS
from .runner import mean_std

__all__ = ["plot_summary", "plot_comparison", "plot_frontier", "plot_scenario_frontier", "scenario_frontier_rows",
           "method_styles", "legend_name"]

#: The declared metrics the comparison plots read (their axis names from the declarations).
_DECLARED = {m.key: m for m in (*METRICS, *BATTERY)}
_RA = _DECLARED["retain_acc"]
#: The frontier's two x axes: a forget-class read-out each, lower is more forgotten.
_FRONTIER = (_DECLARED["probe_forget_acc"], _DECLARED["relearn_k5"])


def plot_summary(path: str, class_names: list[str], per_class: dict[str, list[float]], forget_classes: list[int],
                 pruned_units: dict[str, int], total_units: dict[str, int], title: str = "") -> None:
    """Two panels: per-class test accuracy of each model; pruned units per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    n = len(class_names)
    width = 0.8 / max(1, len(per_class))
    for i, (label, accs) in enumerate(per_class.items()):
        xs = [c + (i - (len(per_class) - 1) / 2) * width for c in range(n)]
        ax1.bar(xs, [100 * (a if a == a else 0) for a in accs], width, label=label)
    for c in forget_classes:
        ax1.axvspan(c - 0.45, c + 0.45, color="red", alpha=0.08)
    ax1.set_xticks(range(n))
    ax1.set_xticklabels(class_names, rotation=35, ha="right", fontsize=8)
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_ylim(0, 118)
    ax1.set_title("per-class accuracy (forgotten classes shaded)")
    ax1.legend(fontsize=8, loc="upper center", ncol=max(1, len(per_class)), frameon=False)
    names = list(total_units)
    shares = [100 * pruned_units.get(k, 0) / max(1, total_units[k]) for k in names]
    ax2.bar(range(len(names)), shares, color="tab:purple")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=70, ha="right", fontsize=6)
    ax2.set_ylabel("units pruned (%)")
    ax2.set_title("pruned units per block (in execution order)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def _headline_fraction(fractions: list[float]) -> float:
    return min(fractions, key=lambda f: (abs(math.log(f / 0.13)), f))


def plot_comparison(rows: list[dict], fractions: list[float], out_dir: str, title: str) -> dict[str, str]:
    """``retain_vs_fraction.png`` (RA vs the retain-data fraction, one line per budgeted method,
    a band per once-per-seed method) and ``time_vs_retain.png`` (wall time vs RA at the headline
    fraction); returns their paths."""
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
    ax.set_ylabel(_RA.axis)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, paths["retain_vs_fraction"])

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
    ax.set_ylabel(_RA.axis)
    ax.set_title(f"{title}\nper-fraction methods at {100 * head:g}% of the retain data", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, paths["time_vs_retain"])
    return paths


def plot_frontier(rows: list[dict], fractions: list[float], out_dir: str, title: str) -> dict[str, str]:
    """``frontier.png``: retain accuracy against the probe and against the relearning attack, one point
    per method (budgeted methods at the headline fraction), mean ± std over seeds. The ideal point is
    Retrain's: RA as high, probe and relearning as low."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = _headline_fraction(fractions)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, metric in zip(axes, _FRONTIER):
        key = metric.key
        for i, r in enumerate(rows):
            if r["method"] != "Original" and not r["once"] and r["fraction"] != head:
                continue
            if key not in r or "retain_acc" not in r:
                continue
            x, y = 100 * r[key]["mean"], 100 * r["retain_acc"]["mean"]
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            ax.errorbar([x], [y], xerr=[100 * r[key]["std"]], yerr=[100 * r["retain_acc"]["std"]], marker="o",
                        ms=6, capsize=3, color=plt.cm.tab20(i % 20))
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4 - 12 * (i % 2)), fontsize=8)
        ax.set_xlabel(metric.axis + " — lower is more forgotten")
        ax.set_ylabel(_RA.axis)
    fig.suptitle(f"{title}\nbudgeted methods at {100 * head:g}% of the retain data", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "frontier.png")
    save_figure_atomic(fig, path)
    return {"frontier": path}


#: kind -> (cost key in a run's "gaps_to_retrain", x label, y label) of the scenario frontier.
_SCENARIO_AXES = {
    "subclass": ("sibling", "|forget-test accuracy − Retrain's| (points): lower = closer to Retrain",
                 "cost: |sibling test accuracy − Retrain's| (points)"),
    "random": ("test", "|forget-set accuracy − Retrain's| (points): lower = closer to Retrain",
               "cost: |TA − Retrain's| (points)"),
}
#: Marker shapes of the methods (the star is Retrain's, the X the original's).
_METHOD_MARKERS = "osD^vP<>phd8H"
#: The reference rows' legend names.
_REFERENCE_NAMES = {"Retrain": "Retrain (the target)", "Original": "Original (doing nothing)"}


def method_styles(methods) -> dict[str, dict]:
    """One marker style per method, for the frontier plots (``plt.plot(..., **style)``): Retrain a black
    star and the original a grey X, both filled and drawn under the methods; every other method, in order,
    its own hollow marker and ``tab10`` colour (a method on top of a reference point stays visible)."""
    import matplotlib.pyplot as plt

    styles, j = {}, 0
    for m in methods:
        if m == "Retrain":
            styles[m] = dict(marker="*", ms=16, color="black", zorder=2)
        elif m == "Original":
            styles[m] = dict(marker="X", ms=12, color="darkgray", zorder=2)
        else:
            styles[m] = dict(marker=_METHOD_MARKERS[j % len(_METHOD_MARKERS)], ms=9, color=plt.cm.tab10(j % 10),
                             mfc="none", mew=1.8, zorder=3)
            j += 1
    return styles


def legend_name(method: str) -> str:
    """A row's name in a frontier legend: the reference rows say what they are."""
    return _REFERENCE_NAMES.get(method, method)


def scenario_frontier_rows(runs: list[dict], kind: str) -> list[dict]:
    """Per-seed scenario runs (records with ``"method"`` and ``"gaps_to_retrain"``, as
    :func:`dfmu_ext.experiments.scenarios.run_scenario` stores them) -> one row per method, in order of
    first appearance: ``{"method", "seeds", "forget_gap": {"mean", "std"}, "cost": {"mean", "std"}}``,
    the mean ± std over seeds of the *absolute* per-seed gaps to Retrain, in points (cost: the
    sibling gap for a sub-class, the TA gap for random samples)."""
    if kind not in _SCENARIO_AXES:
        raise ValueError(f"unknown scenario kind {kind!r}; choose one of {', '.join(_SCENARIO_AXES)}")
    cost_key = _SCENARIO_AXES[kind][0]
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        gs = [r["gaps_to_retrain"] for r in runs if r["method"] == method and r.get("gaps_to_retrain")]
        x, sx, n = mean_std([abs(g["forget"]) for g in gs if g.get("forget") is not None])
        y, sy, _ = mean_std([abs(g[cost_key]) for g in gs if g.get(cost_key) is not None])
        if n:
            out.append({"method": method, "seeds": n, "forget_gap": {"mean": x, "std": sx},
                        "cost": {"mean": y, "std": sy}})
    return out


def plot_scenario_frontier(runs_or_rows: list[dict], kind: str, out_path: str, title: str) -> str:
    """One point per method: x = |forget gap to Retrain|, y = its cost (|sibling gap| for a sub-class,
    |TA gap| for random samples), mean over seeds with std error bars, in points. Retrain sits at
    (0, 0) (a black star), the original — doing nothing — is a grey X; the methods have distinct
    marker / colour pairs and are named in a legend beside the axes with their (x, y), so no label
    can cover another or a point. ``runs_or_rows``: per-seed runs or :func:`scenario_frontier_rows`'
    rows. Written atomically to ``out_path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kind not in _SCENARIO_AXES:
        raise ValueError(f"unknown scenario kind {kind!r}; choose one of {', '.join(_SCENARIO_AXES)}")
    rows = list(runs_or_rows)
    if any("gaps_to_retrain" in r or "seed" in r for r in rows):
        rows = scenario_frontier_rows(rows, kind)
    _, xlabel, ylabel = _SCENARIO_AXES[kind]
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(10, 5.4), layout="constrained")
    xmax = ymax = 0.0
    handles = []
    styles = method_styles([r["method"] for r in rows if math.isfinite(r["forget_gap"]["mean"])])   # (those drawn)
    for r in rows:
        m = r["method"]
        x, sx = r["forget_gap"]["mean"], r["forget_gap"]["std"]
        y, sy = r["cost"]["mean"], r["cost"]["std"]
        if not math.isfinite(x):
            continue
        if not math.isfinite(y):
            y, sy = 0.0, 0.0  # no cost measured (e.g. a coarse class without siblings)
        sx = sx if math.isfinite(sx) and sx > 0 else 0.0
        sy = sy if math.isfinite(sy) and sy > 0 else 0.0
        style, name = styles[m], legend_name(m)
        if sx or sy:  # the gaps are absolute values: the bars stop at 0
            ax.errorbar([x], [y], xerr=[[min(sx, x)], [sx]], yerr=[[min(sy, y)], [sy]], fmt="none", capsize=3,
                        elinewidth=1, ecolor=style["color"], alpha=0.6, zorder=1)
        ax.plot([x], [y], ls="none", **style)
        handles.append(Line2D([], [], ls="none", label=f"{name}: ({x:.1f}, {y:.1f})", **style))
        xmax = max(xmax, x + sx)
        ymax = max(ymax, y + sy)
    xmax, ymax = max(xmax, 1.0), max(ymax, 1.0)
    ax.set_xlim(-0.05 * xmax, 1.1 * xmax)
    ax.set_ylim(-0.05 * ymax, 1.1 * ymax)
    ax.grid(alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8,
              frameon=False, title="method: (|forget gap|, cost)\nmean over seeds, bars: std", title_fontsize=8)
    ax.set_title("\n".join(textwrap.fill(line, 100) for line in title.splitlines()), fontsize=9)
    save_figure_atomic(fig, out_path)
    return out_path
