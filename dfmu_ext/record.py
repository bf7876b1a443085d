"""The deletion record: a JSON file saying which weights were turned into which, what was forgotten,
with which data, method, configuration, software and hardware — so that a deletion can be audited.

Written by ``dfmu forget`` (beside the output, ``<out stem>.record.json``) and by
``dfmu_ext.unlearn(..., record=path)``; checked by ``dfmu verify --record R --weights W`` or
:func:`verify`. Fields (``format`` = :data:`RECORD_FORMAT`):

* ``input.weights_sha256`` / ``output.weights_sha256`` — :func:`dfmu_ext.weights.state_dict_sha256`
  of the weights before and after (``hash_format`` names the definition);
* ``forgotten`` — ``classes``, ``samples`` (count in the training data) and ``indices_sha256``;
* ``retain_used`` — ``count`` and ``indices_sha256`` of the retain samples the method read, with
  ``total`` (retain samples available); ``indices_sha256`` is ``null`` with a ``note`` when the
  indices are unknown;
* ``method``, ``config`` (every setting), ``seed``, ``device``, ``timings`` (seconds),
  ``metrics`` (when they were computed), ``environment`` (package, torch, CUDA, Python versions and
  ``dfmu_ext.build_info()``), ``created_utc``;
* from :func:`dfmu_ext.unlearn`: ``guard`` (the retention guard's measurements: the original's score,
  each stage's, the final drop, its standard error, whether it stayed within the tolerance, whether it
  warned) and ``forget_side`` (where the forget side stopped and why: ``ended`` is ``"reached"``,
  ``"limit"``, ``"plateau"`` or ``"guard"``; ``kept_steps``, the steps of the state it kept; ``easings``,
  how often a refused chunk was retried at half the learning rate; with non-members, ``auc_before`` and
  ``auc``, the forget samples' membership AUC against them).

An index hash is the SHA-256 of the sorted indices into the training set as little-endian int64.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ._io import jsonable, write_json
from .weights import HASH_FORMAT, WeightsError, load_state_dict_file, state_dict_sha256

__all__ = ["RECORD_FORMAT", "RecordError", "indices_sha256", "root_indices", "environment", "build_record",
           "unlearn_record", "write_record", "read_record", "verify", "record_path_for"]

RECORD_FORMAT = "dfmu_ext.deletion-record.v1"


class RecordError(ValueError):
    """A record file that is missing, unreadable or not a deletion record."""


def indices_sha256(indices: Iterable[int]) -> str:
    """SHA-256 of the sorted indices as little-endian int64 (order of the input does not matter)."""
    arr = np.sort(np.asarray(list(indices), dtype="<i8"))
    return hashlib.sha256(arr.astype("<i8").tobytes()).hexdigest()


def root_indices(dataset: Dataset) -> list[int] | None:
    """Indices of ``dataset``'s samples in the dataset at the bottom of its ``Subset`` chain
    (``None`` when ``dataset`` is not a Subset: then its samples are all of that dataset's)."""
    if not isinstance(dataset, Subset):
        return None
    idx = list(dataset.indices)
    parent = dataset.dataset
    while isinstance(parent, Subset):
        idx = [parent.indices[i] for i in idx]
        parent = parent.dataset
    return [int(i) for i in idx]


def record_path_for(out_path: str) -> str:
    """Where ``dfmu forget --out X.pt`` writes its record: ``X.record.json``."""
    return os.path.splitext(out_path)[0] + ".record.json"


def environment(device=None) -> dict:
    """Versions of everything that shaped the result."""
    from ._loader import __version__, build_info

    env = {"dfmu_ext": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "platform": platform.platform(),
           "build_info": build_info()}
    if device is not None and torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def build_record(*, input_sha256: str | None, output_sha256: str, forget_classes, forget_indices=None,
                 retain_indices=None, retain_count: int | None = None, retain_total: int | None = None,
                 method: str, config: dict, seed: int | None, device, timings: dict, metrics: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The record as a dict (see the module docstring). ``retain_indices`` (indices into the training
    set) gives count and hash; without them pass ``retain_count`` and the hash is ``null`` with a note."""
    forget_indices = None if forget_indices is None else [int(i) for i in forget_indices]
    retain = {"count": int(retain_count if retain_indices is None else len(retain_indices)),
              "indices_sha256": None if retain_indices is None else indices_sha256(retain_indices)}
    if retain_indices is None:
        retain["note"] = "the method did not report which retain samples it read; only their count is recorded"
    if retain_total is not None:
        retain["total"] = int(retain_total)
    rec = {
        "format": RECORD_FORMAT,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hash_format": HASH_FORMAT,
        "input": {"weights_sha256": input_sha256},
        "output": {"weights_sha256": output_sha256},
        "forgotten": {"classes": None if forget_classes is None else [int(c) for c in forget_classes],
                      "samples": None if forget_indices is None else len(forget_indices),
                      "indices_sha256": None if forget_indices is None else indices_sha256(forget_indices)},
        "retain_used": retain,
        "method": method,
        "config": config,
        "seed": seed,
        "device": str(device),
        "timings": {k: float(v) for k, v in timings.items()},
        "environment": environment(device),
    }
    if metrics is not None:
        rec["metrics"] = metrics
    if extra:
        rec.update(extra)
    return jsonable(rec)


def unlearn_record(result, *, input_sha256: str | None, train_set: Dataset, forget_set: Subset,
                   retain_set: Subset, retain_used: Dataset, config: dict, seed: int,
                   forget_read: Dataset | None = None) -> dict:
    """The record of a :func:`dfmu_ext.unlearn` call (``result`` its :class:`UnlearnResult`).
    ``forget_read``: the forget samples the call read (scoring pass and forget term), recorded under
    ``"forget_read"`` as a count and the hash of their training-set indices."""
    from ._common import model_device

    used = root_indices(retain_used)
    extra = {"scoring_forget_samples": result.info["scoring_forget_samples"], "train_samples": len(train_set)}
    for measured in ("guard", "forget_side"):   # what the retention guard measured, where forgetting stopped
        if result.info.get(measured) is not None:
            extra[measured] = result.info[measured]
    if forget_read is not None:
        read = root_indices(forget_read)
        extra["forget_read"] = {"count": len(forget_read),
                                "indices_sha256": None if read is None else indices_sha256(sorted(read))}
    return build_record(input_sha256=input_sha256, output_sha256=state_dict_sha256(result.model),
                        forget_classes=config["forget_classes"], forget_indices=root_indices(forget_set),
                        retain_indices=used, retain_count=len(retain_used), retain_total=len(retain_set),
                        method=result.method, config=config, seed=seed, device=model_device(result.model),
                        timings=result.timings, extra=extra)


def write_record(path: str, record: dict) -> None:
    """Write ``record`` as JSON, atomically (the folder is created when missing)."""
    write_json(str(path), record)


def read_record(path: str) -> dict:
    """A record file as a dict; :class:`RecordError` when missing, unreadable or not a record."""
    if not os.path.isfile(path):
        raise RecordError(f"record {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path!r} is not a readable JSON record: {exc}") from None
    if not isinstance(rec, dict) or rec.get("format") != RECORD_FORMAT:
        raise RecordError(f"{path!r} is not a dfmu deletion record (format {RECORD_FORMAT!r})")
    if rec.get("hash_format") != HASH_FORMAT or not isinstance(rec.get("output", {}).get("weights_sha256"), str):
        raise RecordError(f"{path!r}: unknown hash format {rec.get('hash_format')!r} or no output hash")
    return rec


def verify(record_path: str, weights) -> tuple[bool, str, str]:
    """``(matches, recorded hash, actual hash)``: are ``weights`` (a file path, a state_dict or a
    module) the output the record describes? Raises :class:`RecordError` / ``WeightsError`` for
    unreadable inputs."""
    rec = read_record(record_path)
    if isinstance(weights, (str, os.PathLike)):
        weights = load_state_dict_file(str(weights))
    actual = state_dict_sha256(weights)
    expected = rec["output"]["weights_sha256"]
    return actual == expected, expected, actual


__all__ += ["WeightsError"]
