"""The `dfmu` command line end to end on digits (small, CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dfmu_ext import cli


def test_train_forget_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "orig.pt"
    out = tmp_path / "forgot.pt"
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "3", "--out", str(ckpt),
                     "--device", "cpu", "--quiet"]) == 0
    blob = torch.load(ckpt, weights_only=True)
    assert blob["meta"]["model"] == "mlp" and blob["meta"]["dataset"] == "digits"
    mtime = os.path.getmtime(ckpt)
    assert cli.main(["forget", "--ckpt", str(ckpt), "--classes", "3", "--out", str(out), "--device", "cpu",
                     "--quiet", "--report-dir", str(tmp_path / "rep")]) == 0
    printed = capsys.readouterr().out
    assert "| DFMU |" in printed and "| original |" in printed
    assert os.path.getmtime(ckpt) == mtime, "the input checkpoint must never be rewritten"
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["forget_classes"] == [3]
    assert report["metrics"]["DFMU"]["forget_acc"] <= 0.01
    assert report["retain_samples_used"] <= 0.14 * report["retain_samples_total"]
    assert (tmp_path / "rep" / "report.png").stat().st_size > 10_000
    forgot = torch.load(out, weights_only=True)
    assert forgot["meta"]["forgotten_classes"] == [3]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*")), "temp files left behind"


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["forget", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o.pt"), "--device", "cpu"])
    bogus = tmp_path / "bogus.pt"
    torch.save({"x": torch.zeros(1)}, bogus)
    with pytest.raises(SystemExit, match="not a dfmu checkpoint"):
        cli.main(["forget", "--ckpt", str(bogus), "--out", str(tmp_path / "o.pt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="never overwritten"):
        cli.main(["forget", "--ckpt", str(bogus), "--out", str(bogus), "--device", "cpu"])
    with pytest.raises(SystemExit):
        cli.main(["forget", "--ckpt", str(bogus), "--out", str(tmp_path / "o.pt"), "--retain-fraction", "0"])


@pytest.mark.slow  # a fresh interpreter: `python -m dfmu_ext` in a subprocess
def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "dfmu_ext", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "forget" in out.stdout
