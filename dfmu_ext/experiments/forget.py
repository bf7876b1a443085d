"""The forget report: evaluate the original, unlearn with DFMU, evaluate again (optionally beside
Retrain), print the table and write ``report.json`` and ``report.png``. What ``dfmu forget`` and
``dfmu demo`` show."""
from __future__ import annotations

import copy
import math
import os

import torch
from torch import nn

from .._common import resolve_forget_set
from .._io import markdown_table, write_json
from ..baselines import retrain as retrain_method
from ..distributed import Comm, current_comm
from ..eval import evaluate, per_class_accuracy, tv_distance
from ..record import read_record, write_record
from ..splits import dataset_labels
from ..steps import StepOptions
from ..unlearn import unlearn
from ..zoo import data as data_mod
from ..zoo.models import build_model
from ..training.classifier import TrainConfig
from ..eval.evaluate import BATTERY
from ..eval.metrics import METRICS, Metric
from .plots import plot_summary
from .scenarios import scenario_forget_set

__all__ = ["run_forget", "format_table", "ROW_KEYS"]

#: The report's columns: the protocol's metrics (as declared in dfmu_ext.eval.metrics), then the
#: battery's shown ones when it ran.
ROW_KEYS = METRICS
BATTERY_ROW_KEYS = tuple(m for m in BATTERY if m.table)


def _fmt(metric: Metric, v) -> str:
    """One model's value of ``metric`` as shown (e.g. UA = 1 - forget accuracy), "-" when absent."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(metric.scale * metric.shown(v), metric.fmt) + ("%" if metric.scale == 100.0 else "")


def format_table(rows: dict[str, dict]) -> str:
    """A Markdown table, one row per model: the metrics in %, then time and retain samples used."""
    keys = list(ROW_KEYS) + [b for b in BATTERY_ROW_KEYS if any(b.key in m for m in rows.values())]
    header = ["model"] + [k.header for k in keys] + ["time", "retain samples"]
    cells = []
    for name, m in rows.items():
        row = [name] + [_fmt(k, m.get(k.key)) for k in keys]
        row.append("-" if m.get("time_s") is None else f"{m['time_s']:.2f} s")
        row.append("-" if m.get("retain_samples") is None else str(m["retain_samples"]))
        cells.append(row)
    return markdown_table(header, cells)


def run_forget(model: nn.Module, meta: dict, classes: list[int] | None, out_dir: str, *, device: torch.device,
               seed: int = 0, retain_fraction: float = 0.13, mode: str = "prune", retrain: bool = False,
               progress: bool = False, log=print, comm: Comm | None = None, data=None, model_factory=None,
               train_config: TrainConfig | None = None, record: str | None = None, subclass=None,
               random_fraction: float | None = None, steps: StepOptions | None = None,
               battery: bool = False, forget_indices=None, outputs=None) -> dict:
    """Unlearn ``classes`` from ``model`` (in place) and report against the original.

    Instead of classes (``classes=None``): ``subclass`` (a fine class of a coarse-label data set,
    by name or id), ``random_fraction`` (a seeded random share of the training samples) or
    ``forget_indices`` (given training samples); see :mod:`dfmu_ext.experiments.scenarios`.
    ``steps``: precision and layout of DFMU's fine-tune and
    of Retrain (:class:`dfmu_ext.steps.StepOptions`). ``battery``: also the verification battery
    (:func:`dfmu_ext.eval.battery_metrics`; whole classes only), the TV distance to Retrain with ``retrain``.

    ``meta`` is the checkpoint's (it names the data set and the training recipe Retrain reuses).
    A model and data of one's own: pass ``data=(train_set, test_set, info)``, and for ``retrain``
    ``model_factory`` (a fresh model) and ``train_config`` (the recipe); ``meta`` then needs only
    ``"model"`` (a name for the table). ``record`` (a path) writes the deletion record there
    (:mod:`dfmu_ext.record`), with the metrics. Under a process group every rank unlearns
    (collectives); then rank 0 alone evaluates, retrains and writes, and the other ranks return
    ``{}``. The table is printed; the report is returned. ``outputs`` (an
    :class:`dfmu_ext._io.OutputBatch`) stages report.json/png for the caller to publish together
    with its other outputs (the model, the record); without it they are written in place.
    """
    comm = comm or current_comm()
    if data is not None:
        train_set, test_set, info = data
    else:
        train_set, test_set, info = data_mod.load_dataset(meta["dataset"])
        if int(dataset_labels(train_set).max()) >= meta["num_classes"]:
            raise ValueError("the checkpoint's class count does not match its dataset")
    names = list(info.class_names)
    original = copy.deepcopy(model)
    rows, per_class = {}, {}
    scen = {"forget_indices": None, "test_forget_indices": None}
    if classes is None:
        scen = scenario_forget_set(info, train_set, subclass=subclass, random_fraction=random_fraction,
                                   forget_indices=forget_indices, seed=seed)
        what = scen["label"]
    else:
        what = f"classes {[names[c] for c in classes]}"

    if battery and classes is None:
        raise ValueError("the battery attacks the forget classes' rows: use it with --classes")

    def ev(m):
        return evaluate(m, train_set, test_set, classes, forget_indices=scen["forget_indices"],
                        test_forget_indices=scen["test_forget_indices"], device=device, seed=seed,
                        battery=battery, original=original)

    def evaluate_original():
        log(f"evaluating the original model on {info.name} ({info.source}) ...")
        rows["original"] = ev(original)
        per_class["original"] = per_class_accuracy(original, test_set, info.num_classes, device=device)

    if comm.world_size == 1:
        evaluate_original()
    log(f"unlearning {what} with {100 * retain_fraction:.0f}% of the retain data ...")
    res = unlearn(model, train_set, classes, retain_fraction, forget_indices=scen["forget_indices"], mode=mode,
                  device=device, seed=seed, progress=progress, comm=comm, record=record, steps=steps)
    if not comm.is_main:
        return {}  # no collective follows: the other ranks may finish while rank 0 evaluates
    if comm.world_size > 1:
        evaluate_original()
    rows["DFMU"] = ev(model)
    rows["DFMU"].update(time_s=res.timings["total"], retain_samples=res.retain_samples_used)
    per_class["DFMU"] = per_class_accuracy(model, test_set, info.num_classes, device=device)
    _, retain_set = resolve_forget_set(train_set, classes, scen["forget_indices"]).split(train_set)

    if retrain:
        log("retraining from scratch on the retain set (the gold standard) ...")

        def fresh():
            return build_model(meta["model"], meta["in_channels"], meta["num_classes"], tuple(meta["image_size"]),
                               **meta.get("model_kwargs", {}))
        config = train_config if train_config is not None else TrainConfig(**meta["train_config"])
        ret = retrain_method(copy.deepcopy(original), train_set, classes, 1.0, model_factory=model_factory or fresh,
                             forget_indices=scen["forget_indices"], device=device, config=config, seed=seed,
                             progress=progress, steps=steps)
        rows["Retrain"] = ev(ret.model)
        if battery:
            for name, m in (("original", original), ("DFMU", model), ("Retrain", ret.model)):
                rows[name]["tv_to_reference"] = tv_distance(m, ret.model, test_set, classes, device=device)
        rows["Retrain"].update(time_s=ret.timings["total"], retain_samples=ret.retain_samples_used)
        per_class["Retrain"] = per_class_accuracy(ret.model, test_set, info.num_classes, device=device)

    t = res.timings
    ranks = f" x {comm.world_size} ranks" if comm.world_size > 1 else ""
    print(f"\n{info.name} / {meta['model']}: forget {what}, device {device}{ranks}")
    print(format_table(rows))
    stages = [k for k in rows["DFMU"] if k.startswith("probe@")]
    if stages:
        print("\nlinear probe by depth (forget-class test accuracy, %): "
              + "; ".join(f"{k[6:]}: " + " / ".join(f"{100 * r[k]:.1f}" for r in rows.values()) for k in stages)
              + f"  ({' / '.join(rows)})")
    targets = f"forget-term targets {t['targets']:.3f} s, " if "targets" in t else ""
    print(f"\nDFMU time: scoring {t['scoring']:.3f} s, {targets}pruning {t['pruning']:.3f} s, "
          f"fine-tune {t['finetune']:.2f} s, total {t['total']:.2f} s; {res.retain_samples_used} of "
          f"{len(retain_set)} retain samples ({100 * res.retain_samples_used / len(retain_set):.1f}%), "
          f"{res.forget_samples_used} forget samples read")
    finetune = {k: v for k, v in res.finetune.to_dict().items() if k != "loss"}
    report = {"dataset": info.name, "source": info.source, "model": meta["model"], "forget_classes": classes,
              "forgotten": what,
              "device": str(device), **({"world_size": comm.world_size} if comm.world_size > 1 else {}),
              "metrics": rows, "timings": res.timings,
              "retain_samples_used": res.retain_samples_used, "retain_samples_total": len(retain_set),
              "pruned_units": res.pruned_units, "total_units": res.total_units, "per_class_test_acc": per_class,
              "finetune": finetune}
    if record is not None:
        rec = read_record(record)
        rec["metrics"] = rows
        rec["retain_samples_total"] = len(retain_set)
        rec["data"] = {"name": info.name, "source": info.source, "class_names": names}
        write_record(record, rec)
    folder = outputs.folder(out_dir) if outputs is not None else out_dir
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "report.json"), report)
    plot_summary(os.path.join(folder, "report.png"), names, per_class, classes or [], res.pruned_units,
                 res.total_units, title=f"DFMU on {info.name} / {meta['model']}")
    if outputs is None:  # staged files are announced by whoever publishes them
        log(f"wrote {os.path.join(out_dir, 'report.json')} and report.png")
    return report
