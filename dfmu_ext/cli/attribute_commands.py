"""``dfmu demo --task attribute``: forget an attribute (a stamp in a corner of half of every class's
images) from a small CNN's features while its labels stay (docs/attribute.md).

The run: the stamped data set (:func:`dfmu_ext.zoo.attributes.load_attribute_dataset`; ``--dataset
auto`` means digits here, the fast one), the original trained on it, then DFMU
(``unlearn(forget_attribute=values)``) and LEACE (when ``concept-erasure`` is installed) on copies of
it; with ``--retrain`` also Retrain, trained on the same images never stamped. Each row: the task's
test accuracy, the linear and MLP probes' accuracy at reading the attribute from the penultimate
features, the majority rate a probe that learnt nothing scores, and the method's seconds. ``report.json`` and ``report.png`` are written
through one :class:`~dfmu_ext._io.OutputBatch`: both or neither.

``--model lm`` runs the causal-LM variant instead, and ``dfmu compare --task attribute`` compares
methods over seeds (both in :mod:`.attribute_compare`).
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import torch

from .._io import OutputBatch, markdown_table, save_figure_atomic, write_json
from ..baselines.attribute import ATTRIBUTE_METHODS
from ..eval.attribute import ATTRIBUTE_METRICS, attribute_metrics
from ..model_io import copy_model
from ..training.classifier import TrainConfig, train_model
from ..unlearn import unlearn
from ..zoo.attributes import load_attribute_dataset
from ..zoo.models import build_model
from ..experiments.lm_attribute import LM_ATTRIBUTE_METRICS
from .attribute_compare import LM_MODEL, cmd_attribute_compare, cmd_attribute_lm_demo
from .checks import UsageError, check_outputs, logger_for, parse_dataset, parse_device, prepare_folder, progress_enabled

__all__ = ["cmd_attribute_demo", "attribute_demo_or", "attribute_compare_or", "plot_attribute_rows"]

#: The demo's recipe for the original and Retrain (the one tests/test_attribute.py trains digits with):
#: a few epochs of SGD suffice for the 8x8 digits.
DEMO_EPOCHS = 8
DEMO_LR = 0.05
DEMO_BATCH = 64
#: The classification flags that name what to forget; the attribute is the forget request here.
_REFUSED = (("classes", "--classes"), ("forget_subclass", "--forget-subclass"), ("forget_random", "--forget-random"),
            ("forget_people", "--forget-people"), ("forget_indices", "--forget-indices"), ("people", "--people"))


def _lm_only(args) -> bool:
    """Whether ``--model lm`` was given; a one-line error when it is given without ``--task attribute``."""
    lm = getattr(args, "model", None) == LM_MODEL
    if lm and getattr(args, "task", None) != "attribute":
        raise UsageError(f"--model {LM_MODEL} is for --task attribute (a causal LM forgets one attribute of every "
                         "person); to forget people use --task lm")
    return lm


def attribute_demo_or(cmd):
    """``cmd`` with ``--task attribute`` sent to :func:`cmd_attribute_demo` (``--model lm``:
    :func:`.attribute_compare.cmd_attribute_lm_demo`) instead."""
    def run(args) -> int:
        lm = _lm_only(args)
        if getattr(args, "task", None) != "attribute":
            return cmd(args)
        _check_flags(args, lm)
        return cmd_attribute_lm_demo(args, plot_lm_rows) if lm else cmd_attribute_demo(args)
    return run


def attribute_compare_or(cmd):
    """``cmd`` with ``--task attribute`` sent to :func:`.attribute_compare.cmd_attribute_compare`."""
    def run(args) -> int:
        lm = _lm_only(args)
        if getattr(args, "task", None) != "attribute":
            return cmd(args)
        _check_flags(args, lm)
        return cmd_attribute_compare(args, lambda a: TrainConfig(epochs=a.epochs or DEMO_EPOCHS, lr=DEMO_LR,
                                                                   batch_size=DEMO_BATCH))
    return run


def _check_flags(args, lm: bool = False) -> None:
    what = ("one attribute of every person; the people stay" if lm
            else "the stamp; every sample keeps its label")
    for attr, flag in _REFUSED:
        if lm and attr == "people":   # the corpus's size: the LM variant reads it
            continue
        if getattr(args, attr, None) is not None:
            raise UsageError(f"{flag} does not apply to --task attribute (it forgets {what})")
    if getattr(args, "battery", False):
        raise UsageError("--battery does not apply to --task attribute (its tests are for whole classes)")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")


def _train(model_name: str, train_set, info, epochs: int, device, seed: int, progress: bool):
    torch.manual_seed(seed)
    model = build_model(model_name, info.in_channels, info.num_classes).to(device)
    start = time.perf_counter()
    train_model(model, train_set, TrainConfig(epochs=epochs, lr=DEMO_LR, batch_size=DEMO_BATCH), device=device,
                seed=seed, progress=progress)
    return model, time.perf_counter() - start


def cmd_attribute_demo(args) -> int:
    _check_flags(args)
    if getattr(args, "attribute", None) not in (None, "stamp"):
        raise UsageError(f"--attribute must be stamp for an image model, got {args.attribute!r}")
    device, log, progress = parse_device(args.device), logger_for(args), progress_enabled(args)
    dataset = "digits" if args.dataset == "auto" else parse_dataset(args.dataset)
    check_outputs([args.out_dir, os.path.join(args.out_dir, "report.json"), os.path.join(args.out_dir, "report.png")],
                  [])
    try:
        data = load_attribute_dataset(dataset, seed=args.seed)
    except ValueError as exc:
        raise UsageError(f"--task attribute: {exc}") from None
    epochs = args.epochs or DEMO_EPOCHS
    model_name = args.model or "cnn"
    attr = (data.train_values, data.test_values)
    rows = []

    def measure(name: str, model, seconds: float) -> None:
        rows.append({"method": name, "seconds": seconds,
                     **attribute_metrics(model, data.train, data.test, attr, seed=args.seed, device=device)})
        log(f"{name}: done in {seconds:.1f} s")

    with OutputBatch() as batch:
        prepare_folder(args.out_dir, "--out-dir", batch)
        log(f"{dataset}: {len(data.train)} training images, the stamp on half of every class; "
            f"training the original ({model_name}, {epochs} epochs)")
        original, seconds = _train(model_name, data.train, data.info, epochs, device, args.seed, progress)
        measure("original", original, seconds)
        if args.retrain:
            retrain, seconds = _train(model_name, data.plain_train, data.info, epochs, device, args.seed, progress)
            measure("Retrain", retrain, seconds)
        result = unlearn(copy_model(original), data.train, forget_attribute=data.train_values,
                         retain_fraction=args.retain_fraction, mode=args.mode, device=device, seed=args.seed,
                         progress=progress)
        measure("DFMU", result.model, result.timings["total"])
        if importlib.util.find_spec("concept_erasure") is not None:   # LEACE's package is an optional extra
            result = ATTRIBUTE_METHODS["LEACE"](copy_model(original), data.train, data.train_values,
                                                retain_fraction=args.retain_fraction, device=device, seed=args.seed)
            measure("LEACE", result.model, result.timings["total"])
        else:
            log("note: LEACE skipped (pip install concept-erasure, or the package's [hf] extra)")
        report = {"task": "attribute", "dataset": dataset, "attribute": data.attribute, "model": model_name,
                  "epochs": epochs, "retain_fraction": args.retain_fraction, "seed": args.seed,
                  "train_samples": len(data.train), "test_samples": len(data.test), "rows": rows}
        write_json(batch.file(os.path.join(args.out_dir, "report.json")), report)
        plot_attribute_rows(rows, batch.file(os.path.join(args.out_dir, "report.png")),
                            f"{dataset}: forget the stamp, keep the labels (seed {args.seed})")
        batch.publish()
    for line in format_rows(rows).splitlines():
        log(line)
    log(f"wrote report.json and report.png in {args.out_dir}")
    return 0


def format_rows(rows: list[dict]) -> str:
    """The rows as a Markdown table, each metric as its :data:`ATTRIBUTE_METRICS` declaration shows it."""
    header = ["method"] + [m.header for m in ATTRIBUTE_METRICS] + ["seconds"]
    body = [[r["method"]] + [format(m.scale * r[m.key], m.fmt) for m in ATTRIBUTE_METRICS] + [f"{r['seconds']:.2f}"]
            for r in rows]
    return markdown_table(header, body)


def plot_lm_rows(rows: list[dict], path: str, title: str) -> None:
    """:func:`plot_attribute_rows` for the LM variant: the forgotten attribute's accuracy (trained and
    paraphrased questions, after the relearning attack) and the other attributes', the people's majority line."""
    keys = ("attr_acc", "attr_para_acc", "attr_relearn_acc", "other_acc")
    plot_attribute_rows(rows, path, title, bars=[m for m in LM_ATTRIBUTE_METRICS if m.key in keys])


def plot_attribute_rows(rows: list[dict], path: str, title: str, bars=None) -> None:
    """Grouped bars (one group per method; ``bars``: the declared metrics to draw, default task
    accuracy, linear probe, MLP probe; in %) and the majority rate as a dashed line: a probe (or an
    answer) at the line reads nothing of the attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = list(bars) if bars is not None else [m for m in ATTRIBUTE_METRICS if m.key != "attr_majority"]
    width = 0.8 / len(bars)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(rows), 4.6))
    for i, m in enumerate(bars):
        vals = [m.scale * r[m.key] for r in rows]
        pos = x + (i - (len(bars) - 1) / 2) * width
        ax.bar(pos, vals, width * 0.92, label=m.label)
        for p, v in zip(pos, vals):   # inside the bar's top, rotated: no two labels overlap (short bars: above)
            inside = v > 12
            ax.text(p, v - 2 if inside else v + 1, f"{v:.0f}", ha="center", va="top" if inside else "bottom",
                    rotation=90, fontsize=7, color="white" if inside else "black")
    majority = 100.0 * float(np.mean([r["attr_majority"] for r in rows]))
    ax.axhline(majority, color="black", linestyle="--", linewidth=1.2, label=f"majority rate ({majority:.0f} %)")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['method']}\n{r['seconds']:.2f} s" for r in rows], fontsize=9)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure_atomic(fig, path)
