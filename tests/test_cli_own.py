"""`dfmu forget/compare/verify` with a model and data of one's own, the deletion record, and the
rule that every CLI error is one line ``error: ...`` with exit status 2 and writes nothing."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from dfmu_ext import cli
from dfmu_ext.record import record_path_for

from _cli_errors import assert_one_line_error
from _own_mlp import arch_source, write_own_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = arch_source(hidden=32)


@pytest.fixture(scope="module")
def own(tmp_path_factory, digits):
    """An architecture file, trained weights (bare state_dict) and digits as a .pt data file."""
    d = tmp_path_factory.mktemp("own")
    tr, te, _ = digits
    model = write_own_mlp(d, {"train_x": tr.tensors[0], "train_y": tr.tensors[1], "test_x": te.tensors[0],
                              "test_y": te.tensors[1]}, arch_file="my_arch.py", default_hidden=32, epochs=3)
    return {"dir": d, "arch": f"{d / 'my_arch.py'}:build", "weights": str(d / "w.pt"), "data": str(d / "data.pt"),
            "state": model.state_dict(), "tr": tr, "te": te}


def _forget_args(own, out, *extra, weights=None, data=None, arch=None):
    return ["forget", "--arch", arch or own["arch"], "--weights", weights or own["weights"],
            "--data", data or own["data"], "--classes", "3", "--out", str(out), "--device", "cpu", "--quiet", *extra]


def test_forget_own_model_record_and_verify(own, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "forgot.pt"  # the output folder is created
    mtime = os.path.getmtime(own["weights"])
    assert cli.main(_forget_args(own, out)) == 0
    assert os.path.getmtime(own["weights"]) == mtime
    state = torch.load(out, weights_only=True)
    assert set(state) == set(own["state"])  # a bare state_dict of the user's architecture
    rec_path = record_path_for(str(out))
    assert rec_path.endswith("forgot.record.json") and os.path.isfile(rec_path)
    rec = json.loads(open(rec_path).read())
    from dfmu_ext.weights import state_dict_sha256
    assert rec["input"]["weights_sha256"] == state_dict_sha256(own["state"])
    assert rec["output"]["weights_sha256"] == state_dict_sha256(state)
    assert rec["forgotten"]["classes"] == [3] and rec["forgotten"]["samples"] == int((own["tr"].tensors[1] == 3).sum())
    assert rec["retain_used"]["count"] > 0 and len(rec["retain_used"]["indices_sha256"]) == 64
    assert rec["method"] == "DFMU" and rec["config"]["retain_fraction"] == 0.13 and rec["seed"] == 0
    assert rec["environment"]["torch"] == torch.__version__ and "with_cuda" in rec["environment"]["build_info"]
    assert rec["metrics"]["DFMU"]["forget_acc"] <= 0.01 and "original" in rec["metrics"]
    assert rec["timings"]["total"] > 0 and rec["device"] == "cpu"
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")], "temp files left behind"
    capsys.readouterr()
    # verify: 0 for the described file, 1 for another, 2 for an unreadable record
    assert cli.main(["verify", "--record", rec_path, "--weights", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["verify", "--record", rec_path, "--weights", own["weights"]]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["verify", "--record", own["weights"], "--weights", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_forget_image_folder(own, tmp_path, digits):
    from PIL import Image

    from dfmu_ext.zoo import custom

    root = tmp_path / "imgs"
    raw = (np.asarray(digits[0].tensors[0]) - float(digits[0].tensors[0].min()))
    raw = (255 * raw / raw.max()).astype(np.uint8)
    labels = digits[0].tensors[1].numpy()
    for split, rng in (("train", range(0, 300)), ("test", range(300, 400))):
        for i in rng:
            if labels[i] < 3:
                folder = root / split / f"class_{labels[i]}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(raw[i, 0]).save(folder / f"{i}.png")
    tr, te, info = custom.load_data(str(root), custom.parse_normalize("0.5,0.25"))
    assert info.class_names == ("class_0", "class_1", "class_2") and tr.tensors[0].shape[1:] == (1, 8, 8)
    order = [i for c in range(3) for i in sorted((i for i in range(300) if labels[i] == c), key=lambda i: f"{i}.png")]
    want = (torch.from_numpy(raw[order]).float() / 255 - 0.5) / 0.25
    assert torch.equal(tr.tensors[1], torch.from_numpy(labels[order]).long())
    assert torch.allclose(tr.tensors[0], want, atol=1e-6)
    out = tmp_path / "o" / "f.pt"
    assert cli.main(_forget_args(own, out, "--normalize", "0.5,0.25", "--arch-kwargs", '{"classes": 3}',
                                 "--classes", "1", data=str(root), weights=str(_three_class_weights(tmp_path, tr)))) == 0
    rec = json.loads(open(record_path_for(str(out))).read())
    assert rec["data"]["class_names"] == ["class_0", "class_1", "class_2"] and rec["forgotten"]["classes"] == [1]


def _three_class_weights(tmp_path, tr):
    from dfmu_ext import training

    ns = {}
    exec(ARCH, ns)
    torch.manual_seed(0)
    m = ns["build"](classes=3)
    training.train_model(m, tr, training.TrainConfig(epochs=2), progress=False)
    path = tmp_path / "w3.pt"
    torch.save({"state_dict": m.state_dict(), "epoch": 2}, path)  # a checkpoint dict holding state_dict
    return path


def test_compare_own_model(own, tmp_path):
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--arch", own["arch"], "--weights", own["weights"], "--data", own["data"],
                     "--classes", "3", "--fractions", "0.13", "--seeds", "1", "--methods", "Retrain,head-mask,DFMU",
                     "--epochs", "1", "--out-dir", str(out), "--device", "cpu", "--quiet"]) == 0
    rep = json.loads((out / "comparison.json").read_text())
    runs = {r["method"]: r for r in rep["runs"]}
    assert not rep["failed"] and set(runs) == {"Retrain", "head-mask", "DFMU"}
    assert runs["Retrain"]["kwargs"]["config"]["epochs"] == 1
    assert runs["DFMU"]["metrics"]["forget_acc"] <= 0.01


def test_compare_runs_every_trained_method_on_one_step_setting(own, tmp_path):
    out = tmp_path / "cmp16"
    assert cli.main(["compare", "--arch", own["arch"], "--weights", own["weights"], "--data", own["data"],
                     "--classes", "3", "--fractions", "0.13", "--seeds", "1", "--methods", "Retrain,head-mask,DFMU",
                     "--epochs", "1", "--precision", "bf16", "--out-dir", str(out), "--device", "cpu",
                     "--quiet"]) == 0
    rep = json.loads((out / "comparison.json").read_text())
    runs = {r["method"]: r for r in rep["runs"]}
    assert not rep["failed"]
    assert rep["config"]["steps"]["precision"] == "bf16"
    for name in ("Retrain", "DFMU"):  # they train: both get the setting
        assert runs[name]["kwargs"]["steps"]["precision"] == "bf16", name
    assert "steps" not in runs["head-mask"]["kwargs"]  # reads no data, trains nothing
    assert runs["DFMU"]["metrics"]["forget_acc"] <= 0.01


# --------------------------------------------------------------------------------------------
# errors: one line, exit status 2, nothing written
# --------------------------------------------------------------------------------------------

def _bad_weights(tmp_path, own, kind):
    p = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return str(p)
    if kind == "corrupt":
        p.write_bytes(os.urandom(2000))
    elif kind == "truncated":
        p.write_bytes(open(own["weights"], "rb").read()[:3000])
    elif kind == "foreign":
        torch.save([1, 2, 3], p)
    elif kind == "pickle":
        import pickle
        p.write_bytes(pickle.dumps(np.random.RandomState(0)))
    elif kind == "nan":
        sd = {k: v.clone() for k, v in own["state"].items()}
        sd["1.weight"][0, 0] = float("nan")
        torch.save(sd, p)
    elif kind == "inf":
        sd = {k: v.clone() for k, v in own["state"].items()}
        sd["3.bias"][1] = float("inf")
        torch.save(sd, p)
    elif kind == "extra_key":
        torch.save({**own["state"], "4.weight": torch.zeros(2)}, p)
    return str(p)


@pytest.mark.parametrize("kind,match", [
    ("missing", "does not exist"), ("corrupt", "not a readable weights file"),
    ("truncated", "not a readable weights file"), ("foreign", "holds no state_dict"),
    ("pickle", "not a readable weights file"), ("nan", "NaN or Inf"), ("inf", "NaN or Inf"),
    ("extra_key", "1 unexpected: 4.weight"),
])
def test_bad_weights_are_one_line(own, tmp_path, capsys, kind, match):
    w = _bad_weights(tmp_path, own, kind)
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "out" / "f.pt", weights=w), tmp_path, match)


def test_weights_that_do_not_fit_the_architecture(own, tmp_path, capsys):
    line = assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", "--arch-kwargs", '{"hidden": 16}'),
                                  tmp_path, "do not fit the architecture")
    assert "wrong shape" in line and "1.weight (32, 64) vs model (16, 64)" in line
    sd = dict(own["state"])
    del sd["3.bias"]
    torch.save(sd, tmp_path / "short.pt")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", weights=str(tmp_path / "short.pt")),
                           tmp_path, "1 missing: 3.bias")


@pytest.mark.parametrize("kind", ["missing", "corrupt", "truncated", "foreign"])
def test_bad_ckpt_is_one_line(tmp_path, capsys, kind, own):
    from dfmu_ext.zoo.checkpoints import save_checkpoint

    p = tmp_path / "c.pt"
    if kind == "corrupt":
        p.write_bytes(os.urandom(500))
    elif kind == "truncated":
        save_checkpoint(str(tmp_path / "full.pt"), torch.nn.Linear(64, 10), {"model": "mlp"})
        p.write_bytes((tmp_path / "full.pt").read_bytes()[:700])
        (tmp_path / "full.pt").unlink()
    elif kind == "foreign":
        torch.save(own["state"], p)
    assert_one_line_error(capsys, ["forget", "--ckpt", str(p), "--out", str(tmp_path / "o" / "f.pt"),
                                    "--device", "cpu"], tmp_path, "")


def _data_file(tmp_path, own, **change):
    blob = {"train_x": own["tr"].tensors[0], "train_y": own["tr"].tensors[1], "test_x": own["te"].tensors[0],
            "test_y": own["te"].tensors[1]}
    for k, v in change.items():
        if v is None:
            del blob[k]
        else:
            blob[k] = v
    p = tmp_path / "d.pt"
    torch.save(blob, p)
    return str(p)


def test_bad_data_is_one_line(own, tmp_path, capsys):
    tr_y = own["tr"].tensors[1]
    cases = [
        (dict(test_y=None), "lacks test_y"),
        (dict(train_y=tr_y[:-5]), "train_y must be"),
        (dict(test_x=own["te"].tensors[0][:, :, :4]), "test_x samples are"),
        (dict(train_x=own["tr"].tensors[0].to(torch.uint8)), "floating point"),
        (dict(train_y=torch.where(tr_y == 2, -1, tr_y)), "labels must lie in"),
        (dict(class_names=["a", "b"]), "labels must lie in [0, 2)"),
        (dict(train_x=own["tr"].tensors[0].reshape(len(tr_y), -1)[:, :10],
              test_x=own["te"].tensors[0].reshape(len(own["te"].tensors[1]), -1)[:, :10]), "does not accept the data"),
    ]
    for change, match in cases:
        path = _data_file(tmp_path, own, **change)
        assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt", data=path), tmp_path, match)
        os.unlink(path)
    bad = tmp_path / "d.npz"
    np.savez(bad, train_x=np.zeros((3, 64), np.float32))
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt", data=str(bad)), tmp_path,
                           "lacks train_y")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt", data=str(tmp_path / "junk.npz")),
                           tmp_path, "not a readable data file")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt", "--normalize", "0.5,0.2"), tmp_path,
                           "image folders only")


def test_empty_forget_set(own, tmp_path, capsys):
    keep = own["tr"].tensors[1] != 3
    path = _data_file(tmp_path, own, train_x=own["tr"].tensors[0][keep], train_y=own["tr"].tensors[1][keep])
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt", data=path), tmp_path,
                           "forget set is empty")


def test_unwritable_output_folder(own, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "a_file" / "sub" / "f.pt"), tmp_path,
                           "cannot write to the --out folder")


def test_output_that_is_a_folder(own, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "adir"), tmp_path, "is a folder")


def test_output_would_overwrite_an_input(own, tmp_path, capsys):
    assert_one_line_error(capsys, _forget_args(own, own["weights"]), own["dir"], "would overwrite the input --weights")
    assert_one_line_error(capsys, _forget_args(own, own["data"]), own["dir"], "would overwrite the input --data")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", "--record", own["weights"]), own["dir"],
                           "would overwrite the input --weights")


def test_usage_errors_are_one_line(own, tmp_path, capsys):
    assert_one_line_error(capsys, ["forget", "--out", "x.pt", "--bogus-flag"], tmp_path, "unrecognized arguments")
    assert_one_line_error(capsys, ["nonsense"], tmp_path, "invalid choice")
    assert_one_line_error(capsys, ["forget", "--out", str(tmp_path / "f.pt")], tmp_path, "give --ckpt")
    assert_one_line_error(capsys, ["forget", "--arch", own["arch"], "--out", str(tmp_path / "f.pt")], tmp_path,
                           "missing --weights, --data")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", arch="no_such_module_x:build"), tmp_path,
                           "cannot be imported")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", arch=own["arch"] + "_nope"), tmp_path,
                           "has no callable")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", "--arch-kwargs", "{bad"), tmp_path,
                           "not valid JSON")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", "--classes", "10"), tmp_path,
                           "[0, 10)")
    assert_one_line_error(capsys, _forget_args(own, tmp_path / "f.pt", "--precision", "fp16", "--device", "cpu"),
                           tmp_path, "fp16 needs a CUDA device")
    assert_one_line_error(capsys, ["compare", "--dataset", "digits", "--precision", "fp16", "--device", "cpu",
                                    "--out-dir", str(tmp_path / "c")], tmp_path, "fp16 needs a CUDA device")


def test_library_input_errors_are_one_line_but_bugs_keep_their_traceback(own, tmp_path, capsys, monkeypatch):
    def input_error(*a, **k):
        raise ValueError("score_samples must be >= 2\n(second line)")

    monkeypatch.setattr(cli.commands, "run_forget", input_error)
    line = assert_one_line_error(capsys, _forget_args(own, tmp_path / "o" / "f.pt"), tmp_path, "score_samples")
    assert "second line" in line  # folded into the one line

    def bug(*a, **k):
        raise KeyError("a genuine bug")

    monkeypatch.setattr(cli.commands, "run_forget", bug)
    with pytest.raises(KeyError):
        cli.main(_forget_args(own, tmp_path / "o2" / "f.pt"))


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import argparse

    class Fake:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr(sys, "stderr", Fake(False))
    assert cli.checks.progress_enabled(argparse.Namespace(quiet=False)) is False
    monkeypatch.setattr(sys, "stderr", Fake(True))
    assert cli.checks.progress_enabled(argparse.Namespace(quiet=False)) is True
    assert cli.checks.progress_enabled(argparse.Namespace(quiet=True)) is False


def test_every_flag_has_help(capsys):
    import argparse

    parser = cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert set(subs.choices) == {"train", "forget", "verify", "demo", "compare"}
    for name, sp in [("dfmu", parser), *subs.choices.items()]:
        for action in sp._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as e:
            sp.parse_args(["--help"])
        assert e.value.code == 0
    help_of = {c.dest: c.help for c in subs._choices_actions}
    assert all(help_of.get(n) for n in subs.choices)


@pytest.fixture(scope="module")
def package_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--out", str(d / "new" / "o.pt"),
                     "--device", "cpu", "--quiet"]) == 0
    return d / "new" / "o.pt"


def test_forget_ckpt_writes_a_record_that_verifies(package_ckpt, tmp_path, capsys):
    out = tmp_path / "f" / "forgot.pt"
    assert cli.main(["forget", "--ckpt", str(package_ckpt), "--classes", "1", "--out", str(out), "--device", "cpu",
                     "--quiet"]) == 0
    rec = json.loads(open(record_path_for(str(out))).read())
    assert rec["model"]["name"] == "mlp" and rec["input"]["path"] == str(package_ckpt)
    assert rec["metrics"]["DFMU"]["forget_acc"] <= 0.05
    assert cli.main(["verify", "--record", record_path_for(str(out)), "--weights", str(out)]) == 0
    assert cli.main(["verify", "--record", record_path_for(str(out)), "--weights", str(package_ckpt)]) == 1


@pytest.mark.parametrize("kind,match", [("nan", "NaN or Inf"), ("misfit", "1 of the wrong shape"),
                                        ("no_state", "damaged dfmu checkpoint")])
def test_ckpt_with_bad_weights_is_one_line(package_ckpt, tmp_path, capsys, kind, match):
    blob = torch.load(package_ckpt, weights_only=True)
    key = next(iter(blob["state_dict"]))
    if kind == "nan":
        blob["state_dict"][key] = blob["state_dict"][key].clone().fill_(float("nan"))
    elif kind == "misfit":
        blob["state_dict"][key] = torch.zeros(3, 3)
    else:
        del blob["state_dict"]
    torch.save(blob, tmp_path / "bad.pt")
    assert_one_line_error(capsys, ["forget", "--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o" / "f.pt"),
                                    "--device", "cpu"], tmp_path, match)


# --------------------------------------------------------------------------------------------
# fine labels of one's own: --forget-subclass on --data
# --------------------------------------------------------------------------------------------

FINE_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _coarse_blob(digits, n_train=400, n_test=150):
    """Digits under three coarse labels (digit % 3), the digit kept as the fine label."""
    tr, te, _ = digits
    y, ty = tr.tensors[1][:n_train], te.tensors[1][:n_test]
    return {"train_x": tr.tensors[0][:n_train], "train_y": y % 3, "test_x": te.tensors[0][:n_test],
            "test_y": ty % 3, "class_names": ["c0", "c1", "c2"], "train_fine": y, "test_fine": ty,
            "fine_names": FINE_NAMES}


@pytest.fixture(scope="module")
def fine_own(tmp_path_factory, digits):
    """A 3-class MLP trained on the coarse labels, and the data with fine labels as .pt and .npz."""
    d = tmp_path_factory.mktemp("fine")
    blob = _coarse_blob(digits)
    write_own_mlp(d, blob, arch_file="my_arch.py", default_hidden=32, hidden=16, classes=3)
    np.savez(d / "data.npz", **{k: np.asarray(v) for k, v in blob.items()})
    return {"dir": d, "blob": blob, "args": ["--arch", f"{d / 'my_arch.py'}:build", "--arch-kwargs",
                                             '{"hidden": 16, "classes": 3}', "--weights", str(d / "w.pt"),
                                             "--device", "cpu", "--quiet"]}


def test_own_fine_labels_are_loaded(fine_own):
    from dfmu_ext.zoo import custom

    for name in ("data.pt", "data.npz"):
        _, _, info = custom.load_data(str(fine_own["dir"] / name))
        assert info.fine.names == tuple(FINE_NAMES) and info.fine.coarse_of == tuple(d % 3 for d in range(10))
        assert torch.equal(info.fine.train, fine_own["blob"]["train_fine"])


def test_forget_and_compare_a_subclass_of_own_data(fine_own, tmp_path):
    out = tmp_path / "o" / "forgot.pt"
    data = str(fine_own["dir"] / "data.pt")
    assert cli.main(["forget", *fine_own["args"], "--data", data, "--forget-subclass", "seven",
                     "--out", str(out)]) == 0
    rec = json.loads(open(record_path_for(str(out))).read())
    sevens = int((fine_own["blob"]["train_fine"] == 7).sum())
    assert rec["forgotten"]["classes"] is None and rec["forgotten"]["samples"] == sevens
    report = json.loads((tmp_path / "o" / "forgot-report" / "report.json").read_text())
    assert report["forgotten"] == "sub-class seven of c1"
    assert 0.0 <= report["metrics"]["DFMU"]["forget_test_acc"] <= 1.0  # scored on the test sevens
    cmp = tmp_path / "cmp"
    assert cli.main(["compare", *fine_own["args"], "--data", str(fine_own["dir"] / "data.npz"),
                     "--forget-subclass", "7", "--fractions", "0.25", "--seeds", "1", "--methods", "Retrain,DFMU",
                     "--epochs", "1", "--out-dir", str(cmp)]) == 0
    rep = json.loads((cmp / "scenario.json").read_text())
    assert rep["kind"] == "subclass" and rep["scenario"] == "sub-class seven of c1"
    runs = {r["method"]: r for r in rep["runs"]}
    assert set(runs) == {"Original", "Retrain", "DFMU"} and "sibling_test_acc" in runs["DFMU"]["metrics"]
    assert rep["discrimination"]["known"]


def _fine_case(blob, kind):
    b = dict(blob)
    if kind == "only_train":
        del b["test_fine"]
    elif kind == "names_only":
        del b["train_fine"], b["test_fine"]
    elif kind == "short":
        b["train_fine"] = b["train_fine"][:-1]
    elif kind == "float":
        b["test_fine"] = b["test_fine"].float()
    elif kind == "two_coarse":  # fine class 7 (in c1) also names the fives (in c2)
        b["train_fine"] = torch.where(b["train_fine"] == 5, 7, b["train_fine"])
    elif kind == "few_names":
        b["fine_names"] = FINE_NAMES[:5]
    return b


@pytest.mark.parametrize("kind,match", [
    ("only_train", "train_fine needs test_fine too"), ("names_only", "fine_names needs train_fine and test_fine"),
    ("short", "train_fine must be (400,) to match train_y"), ("float", "test_fine must hold integer fine-class ids"),
    ("two_coarse", "fine class 'seven' has samples labelled 1 and 2"), ("few_names", "fine labels must lie in [0, 5)"),
])
def test_bad_fine_labels_are_one_line(fine_own, tmp_path, capsys, kind, match):
    torch.save(_fine_case(fine_own["blob"], kind), tmp_path / "d.pt")
    assert_one_line_error(capsys, ["forget", *fine_own["args"], "--data", str(tmp_path / "d.pt"), "--forget-subclass",
                                    "seven", "--out", str(tmp_path / "o" / "f.pt")], tmp_path, match)


def test_bad_subclass_requests_are_one_line(fine_own, tmp_path, capsys):
    run = ["forget", *fine_own["args"], "--out", str(tmp_path / "o" / "f.pt"), "--data"]
    blob = fine_own["blob"]
    no_fine = {k: v for k, v in blob.items() if k not in ("train_fine", "test_fine", "fine_names")}
    torch.save(no_fine, tmp_path / "plain.pt")
    assert_one_line_error(capsys, run + [str(tmp_path / "plain.pt"), "--forget-subclass", "seven"], tmp_path,
                           "no sub-classes")
    data = str(fine_own["dir"] / "data.pt")
    assert_one_line_error(capsys, run + [data, "--forget-subclass", "eleven"], tmp_path, "unknown sub-class 'eleven'")
    torch.save({**blob, "fine_names": FINE_NAMES + ["ten"]}, tmp_path / "unused.pt")  # fine id 10 has no sample
    assert_one_line_error(capsys, run + [str(tmp_path / "unused.pt"), "--forget-subclass", "ten"], tmp_path,
                           "no training sample has that fine label")
    def only_zero_in_c0(y, fine):  # c0 held 0, 3, 6, 9: move 3, 6, 9 to c1
        return torch.where((fine % 3 == 0) & (fine != 0), 1, y)

    torch.save({**blob, "train_y": only_zero_in_c0(blob["train_y"], blob["train_fine"]),
                "test_y": only_zero_in_c0(blob["test_y"], blob["test_fine"])}, tmp_path / "lone.pt")
    assert_one_line_error(capsys, run + [str(tmp_path / "lone.pt"), "--forget-subclass", "zero"], tmp_path,
                           "is every training sample of class 0 (c0): forget the class with --classes 0 instead")
