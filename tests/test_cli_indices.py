"""`dfmu forget/compare --forget-indices FILE`: the three file types, the samples they name reach the
library and the deletion record, and every bad file is one ``error:`` line (exit 2) before any work,
with nothing written."""
import json

import numpy as np
import pytest
import torch

from dfmu_ext import cli
from dfmu_ext.cli.checks import read_forget_indices
from dfmu_ext.record import indices_sha256, record_path_for

from _cli_errors import assert_one_line_error
from _own_mlp import write_own_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, digits):
    """A small MLP trained on 400 digits, its weights, and the data as a .pt file (fast end to end)."""
    d = tmp_path_factory.mktemp("tiny")
    tr, te, _ = digits
    x, y, tx, ty = tr.tensors[0][:400], tr.tensors[1][:400], te.tensors[0][:150], te.tensors[1][:150]
    write_own_mlp(d, {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty})
    return {"dir": d, "arch": f"{d / 'arch.py'}:build", "weights": str(d / "w.pt"), "data": str(d / "data.pt"),
            "y": y}


def _own(tiny, *extra):
    return ["--arch", tiny["arch"], "--weights", tiny["weights"], "--data", tiny["data"], "--device", "cpu",
            "--quiet", *extra]


def _some_indices(labels, per_class=3):
    """A few samples of every class (never a whole class)."""
    return sorted(int(i) for c in range(10) for i in torch.nonzero(labels == c).flatten()[:per_class])


# --------------------------------------------------------------------------------------------
# the file types
# --------------------------------------------------------------------------------------------

def test_the_three_file_types_read_the_same_indices(tmp_path):
    want = [5, 3, 17, 0, 42]
    (tmp_path / "a.txt").write_text("# samples the request names\n5, 3\n17\t0   # two more\n\n42,\n")
    np.save(tmp_path / "b.npy", np.array(want, dtype=np.int32))
    np.save(tmp_path / "c.npy", np.array(want, dtype=np.uint64))
    (tmp_path / "d.json").write_text(json.dumps(want))
    (tmp_path / "e.json").write_text(json.dumps({"indices": want, "reason": "GDPR request 17"}))
    (tmp_path / "F.TXT").write_text("5 3 17 0 42")
    for name in ("a.txt", "b.npy", "c.npy", "d.json", "e.json", "F.TXT"):
        assert read_forget_indices(str(tmp_path / name)) == want, name


def test_forget_own_data_with_indices_reaches_the_record(tiny, tmp_path, capsys):
    idx = _some_indices(tiny["y"])
    path = tmp_path / "delete.txt"
    path.write_text("\n".join(map(str, reversed(idx))) + "\n")
    out = tmp_path / "o" / "forgot.pt"
    assert cli.main(["forget", *_own(tiny, "--forget-indices", str(path), "--out", str(out))]) == 0
    rec = json.loads(open(record_path_for(str(out))).read())
    assert rec["forgotten"]["classes"] is None and rec["forgotten"]["samples"] == len(idx)
    assert rec["forgotten"]["indices_sha256"] == indices_sha256(idx)
    assert rec["forgotten"]["indices_file"] == str(path)
    report = json.loads((tmp_path / "o" / "forgot-report" / "report.json").read_text())
    assert report["forgotten"] == f"{len(idx)} given training samples" and report["forget_classes"] is None
    assert cli.main(["verify", "--record", record_path_for(str(out)), "--weights", str(out)]) == 0
    assert not [p for p in tmp_path.rglob(".tmp-*")], "temp files left behind"


def test_forget_and_compare_package_data_with_indices(tmp_path, monkeypatch, capsys, digits):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "orig.pt"
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(ckpt),
                     "--device", "cpu", "--quiet"]) == 0
    idx = _some_indices(digits[0].tensors[1], per_class=5)
    path = tmp_path / "delete.npy"
    np.save(path, np.array(idx))
    out = tmp_path / "f" / "forgot.pt"
    assert cli.main(["forget", "--ckpt", str(ckpt), "--forget-indices", str(path), "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    rec = json.loads(open(record_path_for(str(out))).read())
    assert rec["forgotten"]["indices_sha256"] == indices_sha256(idx)
    assert torch.load(out, weights_only=True)["meta"]["forgotten_classes"] is None
    cmp = tmp_path / "cmp"
    assert cli.main(["compare", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--forget-indices",
                     str(path), "--fractions", "0.13", "--seeds", "1", "--methods", "DFMU,head-mask",
                     "--out-dir", str(cmp), "--device", "cpu", "--quiet"]) == 0
    rep = json.loads((cmp / "scenario.json").read_text())
    assert rep["scenario"] == f"{len(idx)} given training samples" and rep["skipped"] == ["head-mask"]
    assert [r["method"] for r in rep["runs"]] == ["Original", "DFMU"] and "metrics" in rep["runs"][1]


def test_compare_own_data_with_indices(tiny, tmp_path):
    path = tmp_path / "delete.json"
    path.write_text(json.dumps({"indices": _some_indices(tiny["y"])}))
    out = tmp_path / "cmp"
    assert cli.main(["compare", *_own(tiny, "--forget-indices", str(path), "--fractions", "0.25", "--seeds", "1",
                                      "--methods", "Retrain,DFMU", "--epochs", "1", "--out-dir", str(out))]) == 0
    rep = json.loads((out / "scenario.json").read_text())
    runs = {r["method"]: r for r in rep["runs"]}
    assert set(runs) == {"Original", "Retrain", "DFMU"} and all("metrics" in r for r in runs.values())
    assert runs["DFMU"]["gap_to_retrain"] >= 0 and rep["discrimination"]["known"]
    assert rep["plots"]["scenario_frontier"] == str(out / "scenario_frontier.png")
    assert (out / "scenario_frontier.png").is_file()
    assert not [p for p in tmp_path.rglob(".tmp-*")], "temp files left behind"


# --------------------------------------------------------------------------------------------
# bad files: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------

def _write_bad(tmp_path, kind, labels):
    n = len(labels)
    whole_class = torch.nonzero(labels == 4).flatten().tolist()
    files = {
        "missing": ("nope.txt", None),
        "folder": ("adir.txt", "DIR"),
        "csv": ("idx.csv", "1,2,3"),
        "no_ext": ("indices", "1 2 3"),
        "txt_word": ("a.txt", "1 2\n3 x\n"),
        "txt_float": ("a.txt", "1 2.5"),
        "txt_latin1": ("a.txt", b"1 2 \xe9"),
        "txt_empty": ("a.txt", "# nothing to delete\n\n"),
        "json_invalid": ("a.json", "[1, 2"),
        "json_float": ("a.json", "[1, 2.0]"),
        "json_bool": ("a.json", "[1, true]"),
        "json_object": ("a.json", '{"ids": [1, 2]}'),
        "json_empty": ("a.json", "[]"),
        "npy_float": ("a.npy", np.array([1.0, 2.0])),
        "npy_2d": ("a.npy", np.array([[1, 2], [3, 4]])),
        "npy_object": ("a.npy", np.array([1, "x"], dtype=object)),
        "npy_corrupt": ("a.npy", b"\x93NUMPY garbage"),
        "negative": ("a.txt", "3 -1"),
        "too_large": ("a.txt", f"3 {n}"),
        "duplicate": ("a.txt", "3 7 3"),
        "every_sample": ("a.txt", " ".join(map(str, range(n)))),
        "whole_class": ("a.txt", " ".join(map(str, whole_class + [0]))),
    }
    name, content = files[kind]
    p = tmp_path / "in" / name
    p.parent.mkdir(exist_ok=True)
    if isinstance(content, np.ndarray):
        np.save(p, content, allow_pickle=True)
    elif content == "DIR":
        p.mkdir()
    elif isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    return str(p)


BAD = [("missing", "does not exist"), ("folder", "cannot be read"), ("csv", "unknown file type '.csv'"),
       ("no_ext", "unknown file type '(no extension)'"), ("txt_word", "line 2: 'x' is not an integer"),
       ("txt_float", "'2.5' is not an integer"), ("txt_latin1", "not UTF-8"), ("txt_empty", "names no index"),
       ("json_invalid", "not valid JSON"), ("json_float", "item 1 (2.0) is not an integer"),
       ("json_bool", "item 1 (true) is not an integer"), ("json_object", '{"indices": [...]}'),
       ("json_empty", "names no index"), ("npy_float", "must hold integers, got a float64 array"),
       ("npy_2d", "1-D array"), ("npy_object", "not a readable .npy array"),
       ("npy_corrupt", "not a readable .npy array"), ("negative", "index -1 is out of range"),
       ("too_large", "index 400 is out of range: the training set has 400 samples"),
       ("duplicate", "index 3 appears more than once"), ("every_sample", "names all 400 training samples"),
       ("whole_class", "covers every training sample of class 4: forget whole classes with --classes 4 instead")]


@pytest.mark.parametrize("kind,match", BAD)
def test_bad_index_files_are_one_line(tiny, tmp_path, capsys, kind, match):
    path = _write_bad(tmp_path, kind, tiny["y"])
    line = assert_one_line_error(capsys, ["forget", *_own(tiny, "--forget-indices", path,
                                                           "--out", str(tmp_path / "o" / "f.pt"))], tmp_path, match)
    assert line.startswith(f"error: --forget-indices {path!r}: ")


@pytest.mark.parametrize("kind,match", [("duplicate", "appears more than once"), ("csv", "unknown file type")])
def test_compare_checks_the_file_before_any_work(tiny, tmp_path, capsys, kind, match):
    path = _write_bad(tmp_path, kind, tiny["y"])
    assert_one_line_error(capsys, ["compare", *_own(tiny, "--forget-indices", path, "--out-dir",
                                                     str(tmp_path / "cmp"))], tmp_path, match)


def test_package_data_is_checked_too(tmp_path, capsys, monkeypatch):
    """--ckpt: the indices are checked against the checkpoint's data set before any work (no training)."""
    from dfmu_ext.cli import commands

    monkeypatch.setattr(commands, "run_forget", lambda *a, **k: pytest.fail("the work must not start"))
    monkeypatch.setattr(commands, "load_ckpt", lambda path, device: (torch.nn.Linear(64, 10),
                                                                     {"dataset": "digits", "num_classes": 10}))
    (tmp_path / "i.txt").write_text("0 1437")
    assert_one_line_error(capsys, ["forget", "--ckpt", str(tmp_path / "c.pt"), "--forget-indices",
                                    str(tmp_path / "i.txt"), "--out", str(tmp_path / "o" / "f.pt"), "--device",
                                    "cpu"], tmp_path, "index 1437 is out of range: the training set has 1437")
    assert_one_line_error(capsys, ["compare", "--dataset", "digits", "--forget-indices", str(tmp_path / "i.txt"),
                                    "--out-dir", str(tmp_path / "cmp"), "--device", "cpu"], tmp_path,
                           "index 1437 is out of range")


@pytest.mark.parametrize("other", [["--classes", "3"], ["--forget-random", "0.1"], ["--forget-subclass", "1"]])
def test_indices_exclude_the_other_forget_options(tiny, tmp_path, capsys, other):
    (tmp_path / "i.txt").write_text("1 2 3")
    outputs = {"forget": ["--out", str(tmp_path / "f.pt")], "compare": ["--out-dir", str(tmp_path / "c")]}
    for command, out in outputs.items():
        assert_one_line_error(capsys, [command, *_own(tiny, "--forget-indices", str(tmp_path / "i.txt"), *other,
                                                       *out)], tmp_path,
                               f"argument {other[0]}: not allowed with argument --forget-indices")
