r"""The one experiment runner under every comparison (classes :mod:`.compare`, scenarios
:mod:`.scenarios`, language models :mod:`.lm`): the seed × method loop with error capture, the
mean ± std over seeds, the gap to Retrain, and the report's files.

A task wrapper gives, per seed, a generator of :class:`Call`\ s (one method on one setting); the
generator loads that seed's original before its first call and may finish work after its last (e.g.
the battery of the original). :func:`run_seeds` runs every call; a call that raises is recorded with
its ``error`` and ``traceback`` and the others go on. Records are flat dicts (``method``, ``seed``,
the wrapper's own fields, then what the call returned: ``metrics``, timings, ...).

Over seeds, every number is summarised by :func:`mean_std`: the mean and the sample standard
deviation (``ddof = 1``) of its finite values. The gap to Retrain is
:math:`\frac{1}{|K|}\sum_{k \in K} |\tilde m_k - \tilde r_k|` over the declared metrics :math:`K`
(:class:`dfmu_ext.eval.metrics.Metric`; :math:`\tilde m` the value as shown, e.g. UA = 1 - forget
accuracy) whose two values are finite, :math:`r` the same seed's (and setting's) Retrain
(:func:`reference_pairs`, :func:`gap_to_reference`).
"""
from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .._io import write_json
from ..eval.metrics import Metric

__all__ = ["Call", "attempt", "run_seeds", "resolve_seeds", "resolve_device", "quiet_log", "mean_std", "stat",
           "column_stats", "group", "reference_pairs", "gap_to_reference", "output_folder", "finish_report", "TIME"]

#: The wall time of one method call (its result's ``timings["total"]``), as the classifier tables show it.
TIME = Metric("time_s", "time (s)", scale=1.0, fmt=".3g")


@dataclass
class Call:
    """One method call of a run. ``record``: the fields naming it (``method``, ``seed``, ...);
    ``fn()``: runs the method and returns the fields to add (``metrics``, timings, ...); ``label``:
    how the log names it; ``done(record)``: the log line after success; ``start``: a line logged
    before it runs."""

    record: dict
    fn: Callable[[], dict]
    label: str
    done: Callable[[dict], str] | None = None
    start: str | None = None


def attempt(call: Call, log: Callable[..., None]) -> dict:
    """The call's record, completed by what ``call.fn()`` returns, or by its ``error`` and
    ``traceback`` when it raises (one failing method must not lose the others' results)."""
    rec = dict(call.record)
    if call.start:
        log(call.start)
    try:
        rec.update(call.fn())
        if call.done is not None:
            log(f"{call.label}: {call.done(rec)}")
    except Exception as exc:
        rec["error"] = f"{type(exc).__name__}: {exc}"
        rec["traceback"] = traceback.format_exc()
        log(f"{call.label}: FAILED ({rec['error']})")
    return rec


def run_seeds(seeds: Iterable[int], calls_of: Callable[[int], Iterator[Call]],
              log: Callable[..., None]) -> list[dict]:
    """The seed × method loop: every call of ``calls_of(seed)`` for each seed, in order, each through
    :func:`attempt`. Each call runs as soon as it is yielded, before the generator resumes, so a call
    may read the generator's current loop variables. Returns the records."""
    runs = []
    for seed in seeds:
        for call in calls_of(seed):
            runs.append(attempt(call, log))
    return runs


def resolve_seeds(seeds) -> list[int]:
    """An int ``n`` -> seeds ``0 .. n-1``; a sequence -> its ints. One-line ValueError when empty."""
    out = list(range(int(seeds))) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
    if not out:
        raise ValueError("no seed to run")
    return out


def quiet_log(quiet: bool) -> Callable[..., None]:
    """The progress log: ``print`` (flushed), or nothing when ``quiet``."""
    return (lambda *msg: None) if quiet else (lambda *msg: print(*msg, flush=True))


def resolve_device(device) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; anything else as ``torch.device``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# over seeds
# --------------------------------------------------------------------------------------------

def mean_std(values) -> tuple[float, float, int]:
    """``(mean, std, n)`` of the finite values (``None`` and NaN/inf skipped): the sample standard
    deviation (``ddof = 1``), 0 for one value; ``(nan, nan, 0)`` when none is finite."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def stat(values) -> dict:
    """:func:`mean_std` as ``{"mean", "std", "n"}``."""
    m, s, n = mean_std(values)
    return {"mean": m, "std": s, "n": n}


def column_stats(dicts: list[dict], summary=mean_std) -> dict:
    """``{key: summary(values)}`` for every key of ``dicts`` (in order of first appearance), over the
    dicts that have it."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return {k: summary([d[k] for d in dicts if k in d]) for k in keys}


def group(records: list[dict], by: Callable[[dict], object]) -> dict:
    """The successful records (no ``error``), grouped by ``by(record)`` in order of first appearance."""
    out: dict = {}
    for r in records:
        if not r.get("error"):
            out.setdefault(by(r), []).append(r)
    return out


# --------------------------------------------------------------------------------------------
# the gap to Retrain
# --------------------------------------------------------------------------------------------

def reference_pairs(records: list[dict], by: tuple[str, ...] = ("seed",),
                    reference: str = "Retrain") -> Iterator[tuple[dict, dict]]:
    """``(record, reference record)`` for every record with ``metrics`` whose setting (the fields
    ``by``: the seed, and e.g. the forget share) has a ``reference`` record with ``metrics``."""
    refs = {tuple(r.get(k) for k in by): r for r in records if r["method"] == reference and "metrics" in r}
    for r in records:
        ref = refs.get(tuple(r.get(k) for k in by))
        if ref is not None and "metrics" in r:
            yield r, ref


def gap_to_reference(metrics: dict, reference: dict, declared, scale: float = 1.0) -> float:
    r"""``scale`` × the mean of :math:`|\tilde m_k - \tilde r_k|` over the ``declared`` metrics
    (:class:`dfmu_ext.eval.metrics.Metric`, compared as shown) finite in both; NaN when none is."""
    gaps = []
    for metric in declared:
        m, r = metrics.get(metric.key), reference.get(metric.key)
        if m is None or r is None or not (math.isfinite(m) and math.isfinite(r)):
            continue
        gaps.append(abs(metric.shown(m) - metric.shown(r)))
    return scale * sum(gaps) / len(gaps) if gaps else float("nan")


# --------------------------------------------------------------------------------------------
# the report's files
# --------------------------------------------------------------------------------------------

def output_folder(out_dir: str, outputs=None) -> str:
    """Where the files go: ``out_dir``, or its staging folder in ``outputs`` (an
    :class:`dfmu_ext._io.OutputBatch`, published by the caller with its other files); created."""
    folder = outputs.folder(out_dir) if outputs is not None else out_dir
    os.makedirs(folder, exist_ok=True)
    return folder


def finish_report(report: dict, folder: str, out_dir: str, name: str, outputs, log) -> dict:
    """Name the plots by their final paths, write ``report`` as ``folder/name`` (atomically), set
    ``report["json"]`` to its final path and, unless staged, log what was written."""
    if outputs is not None and "plots" in report:  # the plots' final paths, not their staging place
        report["plots"] = {k: outputs.final_path(p) for k, p in report["plots"].items()}
    path = os.path.join(folder, name)
    write_json(path, report)
    report["json"] = os.path.join(out_dir, name)
    if outputs is None:  # staged files are announced by whoever publishes them
        plots = ", ".join(os.path.basename(p) for p in report.get("plots", {}).values())
        log(f"wrote {path}" + (f" and {plots}" if plots else ""))
    return report
