r"""The plots of a causal-LM comparison (:func:`dfmu_ext.experiments.lm.run_lm_comparison`'s summary:
``{share: {method: {metric: (mean, std, count)}}}``, from memory or read back from ``comparison.json``).

* :func:`plot_lm`: one panel per measure, one bar per method and forget share.
* :func:`plot_lm_frontier`: forgetting against what is kept, per forget share, one point per method. What
  must be kept is model utility's change against the original's,
  :math:`\Delta U = 100\,(\bar U_m - \bar U_{\mathrm{original}})` points (the seeds' means; the same seeds
  for every method, so it is the mean of the paired changes). Forgetting is read twice:

  - forget quality :math:`\bar F_m` (the mean over seeds of the KS-test p-value of the method's forget truth
    ratios against Retrain's; Retrain's own is 1), on a log scale with the 0.05 line, values below
    :data:`FQ_FLOOR` drawn at it;
  - relearning: :math:`100\,(\bar R_m - \bar R_{\mathrm{Retrain}})` points, the forget facts the relearning
    attack brings back beyond Retrain's (0 is Retrain's level).

  A method in the top right of the first row and at 0 in the second keeps and forgets like Retrain.
"""
from __future__ import annotations

import math

from ..eval.field import FORGET_QUALITY, MODEL_UTILITY
from ..eval.lm import LM_BATTERY
from .plots import legend_name, method_styles

__all__ = ["PLOT_PANELS", "FQ_FLOOR", "plot_lm", "missing_references", "frontier_points", "plot_lm_frontier"]

#: The panels of the LM plot, in order (their titles and scales as declared in dfmu_ext.eval.lm).
PLOT_PANELS = tuple({m.key: m for m in LM_BATTERY}[k] for k in ("forget_acc", "forget_para_acc", "retain_acc",
                                                                "mia_auc", "relearn_acc", "perplexity"))
#: The frontier's lowest forget quality drawn (the original's is ~1e-19: drawn here, so the axis stays legible).
FQ_FLOOR = 1e-6


def _share_key(share) -> float:
    return float(share)


def plot_lm(summary: dict, path: str, title: str = "") -> None:
    """One panel per metric; a group of bars per forget share, one bar per method (mean, std as error bar);
    Retrain's value drawn as a dashed line over its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import save_figure_atomic

    shares = sorted(summary, key=_share_key)
    methods = list(next(iter(summary.values())))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    width = 0.8 / max(1, len(methods))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, PLOT_PANELS):
        key, scale = metric.key, metric.scale
        for i, m in enumerate(methods):
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(shares))]
            means = [summary[s][m].get(key, (math.nan, math.nan))[0] * scale for s in shares]
            stds = [summary[s][m].get(key, (math.nan, math.nan))[1] * scale for s in shares]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=m, color=colours[i % len(colours)])
        if "Retrain" in methods:
            for g, s in enumerate(shares):
                ax.hlines(summary[s]["Retrain"][key][0] * scale, g - 0.45, g + 0.45, colors="black",
                          linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(shares)))
        ax.set_xticklabels([f"forget {_share_key(s):.0%}" for s in shares], fontsize=8)
        ax.set_title(metric.axis, fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), frameon=False, fontsize=9)
    fig.suptitle(title or "entity unlearning (dashed: Retrain)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    save_figure_atomic(fig, path)


def missing_references(summary: dict) -> str | None:
    """None when every forget share of ``summary`` has the ``Original`` and ``Retrain`` rows the frontier is
    drawn against, else a one-line reason (the first share without them)."""
    for share in sorted(summary, key=_share_key):
        missing = [r for r in ("Original", "Retrain") if r not in summary[share]]
        if missing:
            return f"forget share {share}: the frontier needs the {' and '.join(missing)} row(s)"
    return None


def frontier_points(summary: dict) -> dict:
    """``{share: {method: (forget quality, relearning − Retrain's, model utility − original's)}}``, the last
    two in points (the means over seeds; see the module's docstring). Needs the ``Original`` and ``Retrain``
    rows of every share (:func:`missing_references`; a ValueError otherwise); a method without one of the
    three measures gets NaN there."""
    reason = missing_references(summary)
    if reason:
        raise ValueError(reason)
    out = {}
    for share in sorted(summary, key=_share_key):
        rows = summary[share]
        mean = lambda m, k: rows[m][k][0] if k in rows[m] else math.nan  # noqa: E731
        out[_share_key(share)] = {
            m: (mean(m, FORGET_QUALITY.key),
                100 * (mean(m, "relearn_acc") - mean("Retrain", "relearn_acc")),
                100 * (mean(m, MODEL_UTILITY.key) - mean("Original", MODEL_UTILITY.key)))
            for m in rows}
    return out


def plot_lm_frontier(summary: dict, path: str, title: str = "") -> str:
    """Two rows of panels, one column per forget share: forget quality (log scale) against model utility's
    change, and relearning beyond Retrain's against the same change (:func:`frontier_points`). Retrain is a
    black star, the original (doing nothing) a grey X, each method its own hollow marker and colour, named
    once in a legend below the panels, so no label covers a point. Written atomically to ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .._io import save_figure_atomic

    points = frontier_points(summary)
    shares = list(points)
    methods = list(dict.fromkeys(m for rows in points.values() for m in rows))
    styles = method_styles(methods)
    fig, axes = plt.subplots(2, len(shares), figsize=(4.6 * len(shares) + 1, 8.2), squeeze=False,
                             layout="constrained")
    for col, share in enumerate(shares):
        top, bottom = axes[0][col], axes[1][col]
        for m, (fq, relearn, utility) in points[share].items():
            if math.isfinite(fq) and math.isfinite(utility):
                top.plot([max(fq, FQ_FLOOR)], [utility], ls="none", **styles[m])
            if math.isfinite(relearn) and math.isfinite(utility):
                bottom.plot([relearn], [utility], ls="none", **styles[m])
        top.set_xscale("log")
        top.set_xlim(FQ_FLOOR / 3, 3.0)
        top.axvline(0.05, color="black", ls=":", lw=1)
        top.set_title(f"forget {share:.0%} of the entities", fontsize=10)
        top.set_xlabel(f"forget quality (log; dotted: 0.05; ≤ {FQ_FLOOR:g} drawn at it)", fontsize=8)
        bottom.axvline(0.0, color="black", ls=":", lw=1)
        bottom.set_xlabel("relearning − Retrain's (points): 0 = Retrain", fontsize=8)
        for ax in (top, bottom):
            ax.axhline(0.0, color="darkgray", ls="--", lw=1)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("model utility − original's (points)", fontsize=8)
    handles = [Line2D([], [], ls="none", label=legend_name(m), **styles[m]) for m in methods]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False, fontsize=8)
    fig.suptitle(title or "forgetting against what is kept (mean over seeds)", fontsize=10)
    save_figure_atomic(fig, path)
    return path
