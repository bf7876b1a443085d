"""The command line's input checks: each mistake a user can make becomes one :class:`UsageError`
line; output paths are checked before anything is written."""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile

import numpy as np
import torch

from .._io import OutputBatch, temp_prefix
from ..distributed import env_world_size
from ..zoo import data as data_mod
from ..zoo.checkpoints import CheckpointError, load_checkpoint
from ..zoo.coarse import subclass_indices

#: What --classes means when it is not given (and no other forget option is).
DEFAULT_CLASSES = "3"


class UsageError(SystemExit):
    """A mistake in the command's input: printed as one ``error: ...`` line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def progress_enabled(args) -> bool:
    """Progress bars only on a terminal; otherwise the log's one line per stage is the progress."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def logger_for(args):
    quiet = getattr(args, "quiet", False)
    return (lambda *msg: None) if quiet else (lambda *msg: print(*msg, flush=True))


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def parse_dataset(name: str) -> str:
    try:
        return data_mod.canonical_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_classes(text: str, num_classes: int, labels: torch.Tensor | None = None) -> list[int]:
    try:
        classes = sorted({int(c) for c in str(text).split(",") if c.strip() != ""})
    except ValueError:
        raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise UsageError(f"--classes must name classes in [0, {num_classes}), got {text!r}")
    if len(classes) >= num_classes:
        raise UsageError(f"--classes names all {num_classes} classes: nothing would remain to classify")
    if labels is not None:
        present = set(torch.unique(labels).tolist())
        empty = [c for c in classes if c not in present]
        if empty:
            raise UsageError(f"--classes {','.join(map(str, empty))}: no training sample has that label, "
                             "so there is nothing to forget (the forget set is empty)")
        if present <= set(classes):
            raise UsageError("--classes covers every label in the training data: no retain data would be left")
    return classes


def load_named_dataset(name: str):
    """``(train, test, info)`` of a package data set, or one :class:`UsageError` line (files missing)."""
    try:
        return data_mod.load_dataset(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the data set {name!r}: {' '.join(str(exc).split())}") from None


def parse_fractions(text: str) -> list[float]:
    try:
        out = [float(f) for f in str(text).split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    if not out or any(not 0.0 < f <= 1.0 for f in out):
        raise UsageError(f"--fractions must lie in (0, 1], got {text!r}")
    return out


def load_ckpt(path: str, device: torch.device):
    try:
        return load_checkpoint(path, device)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.realpath(path).startswith(folder.rstrip(os.sep) + os.sep)


def check_outputs(outputs: list[str], inputs: list[tuple[str, str]]) -> None:
    """No output may be (or lie inside) an input: ``inputs`` are (flag, path) pairs."""
    for out in outputs:
        for flag, path in inputs:
            if path and (same_path(out, path) or (os.path.isdir(path) and inside(out, path))):
                raise UsageError(f"the output {out!r} would overwrite the input {flag} {path!r} "
                                 "(inputs are never overwritten)")


def prepare_folder(folder: str, flag: str, batch: OutputBatch | None = None) -> None:
    """Create ``folder`` when missing and make sure files can be created in it (before any work).
    With ``batch``, the batch creates it (and removes it again if the call fails) and clears it of
    stale partials of killed runs."""
    folder = folder or "."
    try:
        if batch is not None:
            batch.make_folder(folder)
        else:
            os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix(), suffix="-probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the {flag} folder {folder!r}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# --forget-indices and --forget-subclass, checked against the training data before any work
# --------------------------------------------------------------------------------------------

def _indices_error(path: str, why: str) -> UsageError:
    return UsageError(f"--forget-indices {path!r}: {why}")


def _txt_indices(path: str) -> list[int]:
    """Integers separated by whitespace, commas or newlines; ``#`` starts a comment."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        for token in re.split(r"[\s,]+", line.split("#", 1)[0].strip()):
            if not token:
                continue
            if not re.fullmatch(r"[+-]?\d+", token):
                raise _indices_error(path, f"line {number}: {token!r} is not an integer")
            out.append(int(token))
    return out


def _npy_indices(path: str) -> list[int]:
    """A 1-D integer array (read with allow_pickle=False)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError:
        raise
    except Exception as exc:  # numpy raises ValueError/EOFError/UnpicklingError for what is no .npy array
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _indices_error(path, f"not a readable .npy array: {first}") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1:
        shape = getattr(arr, "shape", None)
        raise _indices_error(path, f"must hold a 1-D array of indices, got shape {shape}")
    if arr.dtype.kind not in "iu":
        raise _indices_error(path, f"must hold integers, got a {arr.dtype} array")
    return [int(v) for v in arr.tolist()]


def _json_indices(path: str) -> list[int]:
    """A list of integers, or an object whose "indices" is one."""
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
    except json.JSONDecodeError as exc:
        raise _indices_error(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    values = blob.get("indices") if isinstance(blob, dict) else blob
    if not isinstance(values, list):
        raise _indices_error(path, 'must hold a JSON list of integers, or {"indices": [...]}')
    for i, v in enumerate(values):
        if type(v) is not int:  # bool is an int in Python, 3.0 a float: neither names a sample
            raise _indices_error(path, f"item {i} ({json.dumps(v)}) is not an integer")
    return values


_INDEX_READERS = {".txt": _txt_indices, ".npy": _npy_indices, ".json": _json_indices}


def read_forget_indices(path: str) -> list[int]:
    """The integers in a --forget-indices file (``.txt``, ``.npy`` or ``.json``), in file order."""
    if not os.path.exists(path):
        raise _indices_error(path, "does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _INDEX_READERS:
        raise _indices_error(path, f"unknown file type {ext or '(no extension)'!r}; use .txt (integers separated "
                                   "by spaces, commas or newlines), .npy (a 1-D integer array) or .json (a list)")
    try:
        return _INDEX_READERS[ext](path)
    except UnicodeDecodeError:
        raise _indices_error(path, "is not UTF-8 text") from None
    except OSError as exc:
        raise _indices_error(path, f"cannot be read: {exc.strerror or exc}") from None


def check_forget_indices(values: list[int], labels: torch.Tensor, path: str,
                         class_names=None) -> torch.Tensor:
    """``values`` as sorted int64 training-set indices, or one :class:`UsageError` line: empty, out of
    range, duplicated, every sample, or every sample of a class (that is what --classes is for). The
    library checks the same (``_common.resolve_forget_set``); here the message names the CLI's options."""
    n = int(labels.numel())
    if not values:
        raise _indices_error(path, "names no index (the file is empty): name at least one training sample")
    low, high = min(values), max(values)
    if low < 0 or high >= n:
        bad = low if low < 0 else high
        raise _indices_error(path, f"index {bad} is out of range: the training set has {n} samples, "
                                   f"indices 0..{n - 1}")
    idx = torch.sort(torch.tensor(values, dtype=torch.long)).values
    dup = idx[1:][idx[1:] == idx[:-1]]
    if dup.numel():
        raise _indices_error(path, f"index {int(dup[0])} appears more than once ({dup.numel()} duplicate(s)); "
                                   "name each sample once")
    if idx.numel() == n:
        raise _indices_error(path, f"names all {n} training samples: no retain data would be left")
    is_forget = torch.zeros(n, dtype=torch.bool)
    is_forget[idx] = True
    whole = [c for c in torch.unique(labels).tolist() if bool(is_forget[labels == c].all())]
    if whole:
        named = ", ".join(f"{c} ({class_names[c]})" if class_names and class_names[c] != str(c) else str(c)
                          for c in whole)
        raise _indices_error(path, f"covers every training sample of class {named}: forget whole classes with "
                                   f"--classes {','.join(map(str, whole))} instead")
    return idx


def parse_forget_indices(path: str, labels: torch.Tensor, class_names=None) -> torch.Tensor:
    """--forget-indices FILE, read and checked against the training labels (sorted int64 indices)."""
    return check_forget_indices(read_forget_indices(path), labels, path, class_names)


def check_subclass(info, subclass: str, labels: torch.Tensor) -> None:
    """--forget-subclass names a fine class of the data, with training samples, that is not the whole
    of its class (then --classes is the option)."""
    try:
        train_idx, _, coarse = subclass_indices(info, subclass)
    except ValueError as exc:
        raise UsageError(f"--forget-subclass {subclass}: {exc}") from None
    if train_idx.numel() == 0:
        raise UsageError(f"--forget-subclass {subclass}: no training sample has that fine label, so there is "
                         "nothing to forget")
    if int((labels == coarse).sum()) == train_idx.numel():
        raise UsageError(f"--forget-subclass {subclass} is every training sample of class {coarse} "
                         f"({info.class_names[coarse]}): forget the class with --classes {coarse} instead")


def forget_term_kwargs(args) -> dict:
    """``unlearn``'s ``forget_term`` for ``--relearn-step`` and ``--relearn-moves`` (checked before anything is
    read); {} without them."""
    moves = getattr(args, "relearn_moves", None)
    if getattr(args, "relearn_step", None) is None:
        if moves is not None:
            raise UsageError("--relearn-moves goes with --relearn-step")
        return {}
    from ..lm.targets import LMForgetTermConfig

    term = LMForgetTermConfig(relearn_step=args.relearn_step, **({"relearn_moves": moves} if moves else {}))
    try:
        term.validate()
    except ValueError as exc:
        raise UsageError(f"--relearn-step: {exc}") from None
    if env_world_size() > 1:
        raise UsageError("--relearn-step runs in one process only, not under torchrun")
    return {"forget_term": term}
