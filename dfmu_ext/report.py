"""Tables, JSON and PNG reports; every file is written atomically (temp file, then rename)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Iterable

ROW_KEYS = [("UA", "forget_acc"), ("forget-test", "forget_test_acc"), ("RA", "retain_acc"), ("TA", "test_acc"),
            ("MIA", "mia_efficacy"), ("probe", "probe_forget_acc")]


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and os.replace (never half-written)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, payload: dict) -> None:
    atomic_write_bytes(path, (json.dumps(_jsonable(payload), indent=2) + "\n").encode())


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def format_table(rows: dict[str, dict], extra: Iterable[tuple[str, str]] = (("time", "time_s"),
                                                                           ("retain samples", "retain_samples"))) -> str:
    """A Markdown table, one row per model: UA is shown as 1 - forget accuracy."""
    extra = list(extra)
    header = ["model"] + [h for h, _ in ROW_KEYS] + [h for h, _ in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in rows.items():
        cells = [name]
        for h, k in ROW_KEYS:
            v = m.get(k)
            if h == "UA" and v is not None:
                v = 1.0 - v
            cells.append(_fmt(v))
        for _, k in extra:
            v = m.get(k)
            cells.append("-" if v is None else (f"{v:.2f} s" if k == "time_s" else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    ax2.bar(range(len(names)), [100 * pruned_units.get(k, 0) / max(1, total_units[k]) for k in names], color="tab:purple")
    ax2.set_xticks(range(len(names)))
    ax2.set_xticklabels(names, rotation=70, ha="right", fontsize=6)
    ax2.set_ylabel("units pruned (%)")
    ax2.set_title("pruned units per block (in execution order)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path)


def save_figure_atomic(fig, path: str) -> None:
    """Save a matplotlib figure as PNG via a temp file and os.replace, then close it."""
    import matplotlib.pyplot as plt

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
