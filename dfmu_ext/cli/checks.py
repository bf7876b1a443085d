"""The command line's input checks: each mistake a user can make becomes one :class:`UsageError`
line; output paths are checked before anything is written."""
from __future__ import annotations

import os
import sys
import tempfile

import torch

from ..zoo import data as data_mod
from ..zoo.checkpoints import CheckpointError, load_checkpoint


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


def prepare_folder(folder: str, flag: str) -> None:
    """Create ``folder`` when missing and make sure files can be created in it (before any work)."""
    folder = folder or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the {flag} folder {folder!r}: {exc.strerror or exc}") from None


def would_create(folders: list[str]) -> list[str]:
    """The first missing ancestor of each folder (what ``makedirs`` would create), for clean-up."""
    out = []
    for f in folders:
        f = os.path.abspath(f or ".")
        top = None
        while not os.path.exists(f):
            top, f = f, os.path.dirname(f)
        if top:
            out.append(top)
    return out
