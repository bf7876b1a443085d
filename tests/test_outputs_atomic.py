"""The outputs of one CLI call are all or nothing: a write that fails (a full disk, an unwritable
folder), at any point, is one ``error:`` line with exit status 2 and leaves no output and no temp file;
a later run removes the partials a killed run left (``.tmp-<pid>-...`` of a process that is gone).

Full disks are simulated by failing ``dfmu_ext._io._write_fd``, where every output's bytes reach the
disk, half-way through the chosen file; one test uses a real full tmpfs where mounting is allowed."""
import errno
import json
import os
import subprocess
import sys

import pytest

from dfmu_ext import _io, cli
from dfmu_ext._io import OutputBatch, OutputError, remove_stale_temps
from dfmu_ext.record import record_path_for

from _own_mlp import write_own_mlp

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")]

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, digits):
    """A small MLP trained on 400 digits, its weights and the data (inputs, in their own folder)."""
    d = tmp_path_factory.mktemp("inputs")
    tr, te, _ = digits
    write_own_mlp(d, {"train_x": tr.tensors[0][:400], "train_y": tr.tensors[1][:400], "test_x": te.tensors[0][:150],
                      "test_y": te.tensors[1][:150]})
    return ["--arch", f"{d / 'arch.py'}:build", "--weights", str(d / "w.pt"), "--data", str(d / "data.pt"),
            "--device", "cpu", "--quiet"]


def full_disk(monkeypatch, name, nth=1, err=errno.ENOSPC):
    """The ``nth`` write of a file whose name contains ``name`` fails half-way (as on a full disk);
    returns the list of matching writes seen."""
    real = _io._write_fd
    seen = []

    def write(fd, data):
        if name in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            seen.append(name)
            if len(seen) == nth:
                os.write(fd, data[: len(data) // 2])
                os.close(fd)
                raise OSError(err, os.strerror(err))
        real(fd, data)

    monkeypatch.setattr(_io, "_write_fd", write)
    return seen


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _fails_cleanly(capsys, argv, root, before=()):
    """Exit status 2, one ``error:`` line, and ``root`` holds exactly what it held before."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert _files(root) == sorted(before), "a failed call must leave no output and no temp file"
    return lines[0]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------------------------
# the CLI: a write that fails anywhere leaves nothing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,nth,err,output", [
    ("record.json", 1, errno.ENOSPC, "record"),   # written inside unlearn()
    ("record.json", 3, errno.ENOSPC, "record"),   # completed by the CLI, after the model
    ("report.json", 1, errno.ENOSPC, "report.json"),
    ("report.png", 1, errno.ENOSPC, "report.png"),
    ("forgot.pt", 1, errno.ENOSPC, "model"),
    ("forgot.pt", 1, errno.EACCES, "model"),       # a folder that turned unwritable
])
def test_forget_leaves_nothing_when_a_write_fails(tiny, tmp_path, capsys, monkeypatch, name, nth, err, output):
    seen = full_disk(monkeypatch, name, nth, err)
    out = tmp_path / "runs" / "forgot.pt"
    line = _fails_cleanly(capsys, ["forget", *tiny, "--classes", "3", "--out", str(out)], tmp_path)
    assert len(seen) >= nth, "the injected failure did not happen"
    final = {"record": record_path_for(str(out)), "model": str(out),
             "report.json": str(tmp_path / "runs" / "forgot-report" / "report.json"),
             "report.png": str(tmp_path / "runs" / "forgot-report" / "report.png")}[output]
    assert line == f"error: cannot write {final!r}: {os.strerror(err)} (no output of this call was kept)"


def test_forget_keeps_what_was_there_before(tiny, tmp_path, capsys, monkeypatch):
    """Folders that existed stay, with the user's files in them; the previous outputs are untouched
    (the new ones were never published)."""
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")
    (out_dir / "forgot.pt").write_bytes(b"previous model")
    full_disk(monkeypatch, "report.png")
    _fails_cleanly(capsys, ["forget", *tiny, "--classes", "3", "--out", str(out_dir / "forgot.pt")], tmp_path,
                   before=["runs", "runs/forgot.pt", "runs/notes.txt"])
    assert (out_dir / "forgot.pt").read_bytes() == b"previous model"


def test_forget_removes_what_it_published_when_publishing_fails(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs" / "forgot.pt"
    record = record_path_for(str(out))
    real = os.replace

    def replace(src, dst):
        if os.path.abspath(dst) == record:  # the record goes last: the report and the model are out by then
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real(src, dst)

    monkeypatch.setattr(_io.os, "replace", replace)
    line = _fails_cleanly(capsys, ["forget", *tiny, "--classes", "3", "--out", str(out)], tmp_path)
    assert line.startswith(f"error: cannot write {record!r}: Permission denied")


def test_compare_leaves_nothing_when_a_write_fails(tiny, tmp_path, capsys, monkeypatch):
    seen = full_disk(monkeypatch, "time_vs_retain.png")
    _fails_cleanly(capsys, ["compare", *tiny, "--classes", "3", "--fractions", "0.13", "--seeds", "1", "--methods",
                            "head-mask", "--out-dir", str(tmp_path / "cmp")], tmp_path)
    assert seen


def test_compare_scenarios_are_one_batch(tiny, tmp_path, capsys, monkeypatch):
    """Two retain fractions write two folders; the second one's failure takes the first one's files too."""
    seen = full_disk(monkeypatch, "scenario.json", nth=2)
    line = _fails_cleanly(capsys, ["compare", *tiny, "--forget-random", "0.1", "--fractions", "0.1,0.2", "--seeds",
                                   "1", "--methods", "head-mask", "--out-dir", str(tmp_path / "cmp")], tmp_path)
    assert len(seen) == 2 and str(tmp_path / "cmp" / "retain0.2" / "scenario.json") in line


def test_a_later_run_removes_stale_partials(tiny, tmp_path, capsys):
    out_dir, report_dir = tmp_path / "runs", tmp_path / "runs" / "forgot-report"
    report_dir.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getppid()
    stale = [out_dir / f".tmp-{dead}-ab12cd34-forgot.pt", out_dir / f".tmp-{dead}-forgot.record.json",
             report_dir / f".tmp-{dead}-x1y2z3w4-report.png"]
    for p in stale:
        p.write_bytes(b"half")
    (out_dir / f".tmp-{dead}-k9j8h7g6").mkdir()  # a staged folder
    (out_dir / f".tmp-{dead}-k9j8h7g6" / "report.json").write_text("{")
    live = out_dir / f".tmp-{alive}-00aa11bb-forgot.pt"  # another run, still writing
    live.write_bytes(b"in progress")
    other = out_dir / ".tmp-notes.txt"  # not our naming: not ours to remove
    other.write_text("mine")
    assert cli.main(["forget", *tiny, "--classes", "3", "--out", str(out_dir / "forgot.pt")]) == 0
    assert not any(p.exists() for p in stale) and not (out_dir / f".tmp-{dead}-k9j8h7g6").exists()
    assert live.read_bytes() == b"in progress" and other.read_text() == "mine"
    assert (out_dir / "forgot.pt").is_file() and (report_dir / "report.png").is_file()
    assert json.loads(open(record_path_for(str(out_dir / "forgot.pt"))).read())["forgotten"]["classes"] == [3]


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real, tiny tmpfs (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk(tiny, full_tmpfs, capsys):
    """32 KiB: the record and report.json fit, report.png does not."""
    line = _fails_cleanly(capsys, ["forget", *tiny, "--classes", "3", "--out", str(full_tmpfs / "forgot.pt")],
                          full_tmpfs)
    assert "No space left on device (no output of this call was kept)" in line


# --------------------------------------------------------------------------------------------
# the helpers in dfmu_ext._io
# --------------------------------------------------------------------------------------------

def test_batch_publishes_together_record_last(tmp_path, monkeypatch):
    order = []
    real = os.replace
    monkeypatch.setattr(_io.os, "replace", lambda s, d: (order.append(os.path.basename(d)), real(s, d)))
    with OutputBatch() as batch:
        rec = batch.file(str(tmp_path / "a" / "m.record.json"), last=True)
        folder = batch.folder(str(tmp_path / "rep"))
        model = batch.file(str(tmp_path / "a" / "m.pt"))
        _io.atomic_write_bytes(rec, b"{}")
        _io.write_json(os.path.join(folder, "report.json"), {"x": 1})
        _io.atomic_write_bytes(model, b"weights")
        assert batch.final_path(model) == str(tmp_path / "a" / "m.pt")
        assert batch.final_path(os.path.join(folder, "report.json")) == str(tmp_path / "rep" / "report.json")
        assert not (tmp_path / "a" / "m.pt").exists(), "nothing is published before publish()"
        order.clear()
        batch.publish()
    assert order == ["report.json", "m.pt", "m.record.json"]
    assert _files(tmp_path) == ["a", "a/m.pt", "a/m.record.json", "rep", "rep/report.json"]


def test_batch_removes_everything_on_error(tmp_path):
    (tmp_path / "input.pt").write_bytes(b"user data")
    with pytest.raises(KeyError):
        with OutputBatch(protect=[str(tmp_path / "input.pt")]) as batch:
            _io.atomic_write_bytes(batch.file(str(tmp_path / "new" / "deeper" / "m.pt")), b"w")
            _io.write_json(os.path.join(batch.folder(str(tmp_path / "rep")), "report.json"), {})
            raise KeyError("a bug")
    assert _files(tmp_path) == ["input.pt"]  # the folders it created are gone too


def test_write_errors_are_output_errors(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="cannot write") as e:
        _io.atomic_write_bytes(str(tmp_path / "a_file" / "m.pt"), b"w")
    assert isinstance(e.value, OSError) and e.value.errno in (errno.EEXIST, errno.ENOTDIR)
    assert _files(tmp_path) == ["a_file"]


def test_remove_stale_temps_only_takes_dead_processes_partials(tmp_path):
    dead = _dead_pid()
    names = {f".tmp-{dead}-aa-m.pt": False, f".tmp-{os.getpid()}-bb-m.pt": True, f".tmp-{os.getppid()}-cc": True,
             ".tmp-probe-x": True, "m.pt": True, f".tmp-{dead}-kept-by-request": True, ".tmp-0-zero": False}
    for n in names:
        (tmp_path / n).write_text("x")
    removed = remove_stale_temps(str(tmp_path), keep=[str(tmp_path / f".tmp-{dead}-kept-by-request")])
    assert sorted(os.path.basename(p) for p in removed) == sorted(n for n, stays in names.items() if not stays)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, stays in names.items() if stays)


def test_text_table_never_runs_two_cells_together():
    # the LM report printed "55.6 ± 38.5" and "7.94e-05 ± 0.000119" as one cell at a fixed width of 16
    from dfmu_ext._io import text_table

    header = ["method", "relearn acc", "forget quality"]
    rows = [["Original", "55.6 ± 38.5", "7.94e-05 ± 0.000119"], ["DFMU", "27.8 ± 9.6", "0.213 ± 0.187"]]
    lines = text_table(header, rows).splitlines()
    assert len(lines) == 3
    for line, cells in zip(lines, [header, *rows]):
        assert [c.strip() for c in line.split("  ") if c.strip()] == cells   # two spaces between any two cells
    assert len({len(line) for line in lines}) == 1                          # right-aligned to one edge
