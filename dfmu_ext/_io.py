"""Files and tables. Every output is written atomically (temp file in the same folder, then rename),
so a crash or a full disk never leaves a half-written report, checkpoint or plot behind; a failed
write raises :class:`OutputError` (an ``OSError`` naming the output). The outputs of one call that
belong together (a model, its deletion record, its report) go through one :class:`OutputBatch`:
written under temp names in their destination folders and published together at the end, or all
removed.

Temp names follow one pattern, ``.tmp-<pid>-<random>-<name>``: the pid tells a later run which
partials were left by a process that no longer runs (:func:`remove_stale_temps`)."""
from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from typing import Sequence

#: Every temp file and folder of this package starts with this.
TEMP_PREFIX = ".tmp-"
_TEMP_RE = re.compile(r"^\.tmp-(\d+)-")


class OutputError(OSError):
    """An output that could not be written (full disk, unwritable folder): ``path`` names the output
    (not its temp file), ``reason`` says why, ``errno`` is kept. The CLI prints it as one line."""

    def __init__(self, path: str, reason: str, errno: int | None = None, note: str = ""):
        super().__init__(errno, reason, path)
        self.path, self.reason, self.note = path, reason, note

    def __str__(self) -> str:
        return f"cannot write {self.path!r}: {self.reason}" + (f" ({self.note})" if self.note else "")


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def temp_prefix() -> str:
    """``.tmp-<pid>-``: the start of this process's temp names."""
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _write_fd(fd: int, data: bytes) -> None:
    """The one place where output bytes reach the disk (closes ``fd``). A full disk shows up here."""
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _discard(path: str | None) -> None:
    """Remove a temp file or folder, best effort: clean-up on a failing disk must not hide the first error."""
    if not path:
        return
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``; raises
    :class:`OutputError` (nothing left behind) when the folder or the disk refuses."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(), suffix="-" + os.path.basename(path))
        _write_fd(fd, data)
        os.replace(tmp, path)
    except OutputError:
        _discard(tmp)
        raise
    except OSError as exc:
        _discard(tmp)
        raise OutputError(path, _reason(exc), exc.errno) from exc
    except BaseException:
        _discard(tmp)
        raise


def jsonable(obj):
    """Tensors as lists, dict keys as strings, non-finite floats as None (JSON has no NaN)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, payload) -> None:
    """``payload`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(jsonable(payload), indent=2) + "\n").encode())


def save_figure_atomic(fig, path: str) -> None:
    """Save a matplotlib figure as PNG (rendered in memory, then :func:`atomic_write_bytes`) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: a header row, a rule, then one line per row of cells."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], gap: int = 2) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, each as wide as its
    widest cell plus ``gap`` spaces, so no two cells ever run together (a fixed width let
    "55.6 ± 38.5" and "7.94e-05 ± 0.000119" print as one)."""
    table = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(len(table[0]))]
    lines = []
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w + gap) for c, w in zip(r[1:], widths[1:])]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# stale partials and all-or-nothing outputs
# --------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    """Is process ``pid`` running on this machine? (Off POSIX: assume so, never remove.)"""
    if os.name != "posix":
        return True
    if pid <= 0:  # 0 would signal our own process group: not a process of its own
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    except (OverflowError, ValueError):  # no such pid can exist
        return False
    return True


def remove_stale_temps(folder: str, keep: Sequence[str] = ()) -> list[str]:
    """Remove the temp files and folders (``.tmp-<pid>-...``) in ``folder`` whose process no longer
    runs on this machine: partials left by a killed run. Files of running processes, other names and
    the paths in ``keep`` stay. Best effort; returns what was removed."""
    keep_real = {os.path.realpath(p) for p in keep if p}
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if os.path.realpath(entry.path) in keep_real:
            continue
        _discard(entry.path)
        if not os.path.lexists(entry.path):
            removed.append(entry.path)
    return removed


def _first_missing(folder: str) -> str | None:
    """The outermost folder ``os.makedirs(folder)`` would create (None when ``folder`` exists)."""
    top = None
    while not os.path.exists(folder):
        top, parent = folder, os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return top


class OutputBatch:
    """The outputs of one call, all or nothing: a model, its deletion record and its report either
    all appear or none does, so no record or report describes an output that is not there.

    Writers write to temp names in the destination folders — :meth:`file` (a temp path beside one
    output) or :meth:`folder` (a temp folder inside an output folder, for writers that take a
    folder) — and :meth:`publish` renames them into place at the end (renames need no disk space:
    the full disk shows while writing, when nothing is published yet). Used as a context manager:
    leaving the block without :meth:`publish` (an exception, also mid-publish) removes every temp,
    every output already published by this batch and every folder it created that is left empty;
    an :class:`OutputError` then names the output, not its temp file. Folders it writes to are
    cleaned of stale partials (:func:`remove_stale_temps`); ``protect`` (the call's inputs) is never
    removed. Files are published folder contents first, then files in the order asked, ``last=True``
    ones at the end (the deletion record, after the model it describes)."""

    def __init__(self, protect: Sequence[str] = ()):
        self._protect = [p for p in protect if p]
        self._files: list[tuple[str, str, bool]] = []   # (temp, final, last)
        self._folders: dict[str, tuple[str, str]] = {}  # realpath(final folder) -> (final folder, temp folder)
        self._created: list[str] = []
        self._prepared: set[str] = set()
        self._published: list[str] = []
        self.published = False

    # -- staging -------------------------------------------------------------------------------
    def make_folder(self, folder: str) -> str:
        """Create ``folder`` when missing (remembered, to remove it again on failure) and remove
        stale partials in it. Raises :class:`OutputError` when it cannot be created."""
        folder = os.path.abspath(folder or ".")
        if folder in self._prepared:
            return folder
        top = _first_missing(folder)
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise OutputError(folder, _reason(exc), exc.errno) from exc
        if top:
            self._created.append(top)
        remove_stale_temps(folder, keep=self._protect)
        self._prepared.add(folder)
        return folder

    def file(self, final: str, *, last: bool = False) -> str:
        """A temp path beside ``final`` for the caller to write; :meth:`publish` renames it to ``final``."""
        final = os.path.abspath(final)
        folder = self.make_folder(os.path.dirname(final))
        temp = os.path.join(folder, f"{temp_prefix()}{secrets.token_hex(4)}-{os.path.basename(final)}")
        self._files.append((temp, final, last))
        return temp

    def folder(self, final_dir: str) -> str:
        """A temp folder inside ``final_dir`` (created) whose files :meth:`publish` moves into ``final_dir``."""
        key = os.path.realpath(final_dir or ".")
        if key not in self._folders:
            final_dir = self.make_folder(final_dir)
            try:
                temp = tempfile.mkdtemp(dir=final_dir, prefix=temp_prefix())
            except OSError as exc:
                raise OutputError(final_dir, _reason(exc), exc.errno) from exc
            self._folders[key] = (final_dir, temp)
        return self._folders[key][1]

    def final_path(self, path: str) -> str:
        """Where ``path`` (a temp this batch handed out, or a file in one of its temp folders) is
        published; any other path is returned unchanged."""
        ap = os.path.abspath(path)
        for temp, final, _ in self._files:
            if ap == temp:
                return final
        for final_dir, temp in self._folders.values():
            if os.path.dirname(ap) == temp:
                return os.path.join(final_dir, os.path.basename(ap))
        return path

    # -- publishing ----------------------------------------------------------------------------
    def _moves(self) -> list[tuple[str, str]]:
        moves = []
        for final_dir, temp in self._folders.values():
            names = sorted(n for n in os.listdir(temp) if not n.startswith(TEMP_PREFIX))
            moves += [(os.path.join(temp, n), os.path.join(final_dir, n)) for n in names]
        moves += [(t, f) for t, f, last in self._files if not last] + [(t, f) for t, f, last in self._files if last]
        missing = [f for t, f in moves if not os.path.lexists(t)]
        if missing:
            raise RuntimeError(f"{missing[0]!r} was never written: nothing of this call is published")
        return moves

    def publish(self) -> list[str]:
        """Rename every staged output into place; returns the published paths. On a failure the
        context manager removes what was published (see the class docstring)."""
        for temp, final in self._moves():
            try:
                os.replace(temp, final)
            except OSError as exc:
                raise OutputError(final, _reason(exc), exc.errno) from exc
            self._published.append(final)
        for _, temp in self._folders.values():
            _discard(temp)
        self.published = True
        return list(self._published)

    def discard(self) -> None:
        """Remove every temp, every output this batch published and every folder it created that
        is left empty (deepest first). Never touches the protected inputs."""
        protected = {os.path.realpath(p) for p in self._protect}
        for path in self._published:
            if os.path.realpath(path) not in protected:
                _discard(path)
        self._published = []
        for temp, _, _ in self._files:
            _discard(temp)
        for _, temp in self._folders.values():
            _discard(temp)
        for top in reversed(self._created):
            for folder, _, _ in (os.walk(top, topdown=False) if os.path.isdir(top) else ()):
                try:
                    os.rmdir(folder)  # only succeeds when empty
                except OSError:
                    pass

    def __enter__(self) -> "OutputBatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.published and exc is None:
            return False
        self.discard()
        if isinstance(exc, OutputError):
            raise OutputError(self.final_path(exc.path), exc.reason, exc.errno,
                              note="no output of this call was kept") from None
        return False
