"""Which metrics can tell hiding from forgetting: for every metric, do {Original, head-mask} differ
from Retrain beyond the seed-to-seed spread?

A metric *separates* when, in every (forget classes, seed) pair set given, the range of the hiding
models' values and the range of Retrain's values do not overlap. ``z`` = the gap between the two
means divided by the pooled standard deviation (how many spreads apart). With one seed there is no
spread to judge against, and the verdict says so.
"""
from __future__ import annotations

import math

import numpy as np

from .._io import markdown_table

__all__ = ["separation", "separation_table"]

HIDING = ("Original", "head-mask")


def separation(hiding: list[float], forgetting: list[float]) -> dict:
    """``{"separates", "z", "hiding", "retrain"}`` for one metric (values per seed)."""
    h = [v for v in hiding if v is not None and math.isfinite(v)]
    f = [v for v in forgetting if v is not None and math.isfinite(v)]
    if not h or not f:
        return {"separates": None, "z": float("nan"), "hiding": float("nan"), "retrain": float("nan")}
    gap = abs(float(np.mean(h)) - float(np.mean(f)))
    pooled = math.sqrt((np.var(h, ddof=1) if len(h) > 1 else 0.0) / 2 + (np.var(f, ddof=1) if len(f) > 1 else 0.0) / 2)
    disjoint = max(h) < min(f) or min(h) > max(f)
    enough = len(h) > 2 and len(f) > 1
    return {"separates": bool(disjoint) if enough else None, "z": gap / pooled if pooled > 0 else float("inf"),
            "hiding": float(np.mean(h)), "retrain": float(np.mean(f))}


def separation_table(runs: list[dict], originals: dict, keys: list[str]) -> tuple[str, dict]:
    """Markdown table and per-metric verdicts from a comparison's runs (``method``, ``seed``,
    ``metrics``) and the originals' metrics per seed."""
    verdicts = {}
    for key in keys:
        hiding = [m.get(key) for m in originals.values()]
        hiding += [r["metrics"].get(key) for r in runs if r["method"] == "head-mask" and "metrics" in r]
        retrain = [r["metrics"].get(key) for r in runs if r["method"] == "Retrain" and "metrics" in r]
        verdicts[key] = separation(hiding, retrain)
    rows = []
    for key, v in verdicts.items():
        said = {True: "yes", False: "no", None: "n/a (needs >= 2 seeds)"}[v["separates"]]
        rows.append([key, "-" if not math.isfinite(v["hiding"]) else f"{100 * v['hiding']:.1f}",
                     "-" if not math.isfinite(v["retrain"]) else f"{100 * v['retrain']:.1f}",
                     "-" if not math.isfinite(v["z"]) else f"{v['z']:.1f}", said])
    table = markdown_table(["metric", "Original / head-mask (%)", "Retrain (%)", "gap / spread", "separates"], rows)
    return table, verdicts
