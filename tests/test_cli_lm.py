"""`dfmu ... --task lm`: the causal-LM side of train, forget, demo and compare, on a small corpus
(--people 8, --epochs 2) so that each runs in seconds; and its one-line usage errors."""
import json
import os

import pytest
import torch

from dfmu_ext import cli
from dfmu_ext.cli.checks import UsageError

pytest.importorskip("transformers")

SMALL = ["--task", "lm", "--people", "8", "--epochs", "2", "--device", "cpu", "--quiet"]


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_demo_lm_prints_and_writes_its_table(cache, capsys):
    out = cache / "demo"
    assert cli.main(["demo", *SMALL[:-1], "--forget-people", "0.25", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for row in ("Original", "Retrain", "DFMU"):
        assert row in printed
    report = json.loads((out / "report.json").read_text())
    (run,) = report["runs"]
    assert run["share"] == 0.25 and len(run["people"]) == 2
    assert set(run["methods"]) == {"Original", "Retrain", "DFMU"}
    assert (out / "report.png").stat().st_size > 0


def test_train_then_forget_lm_checkpoint(cache):
    ckpt, out = cache / "lm.pt", cache / "out" / "forgot.pt"
    assert cli.main(["train", *SMALL, "--out", str(ckpt)]) == 0
    before = ckpt.read_bytes()
    assert cli.main(["forget", "--task", "lm", "--ckpt", str(ckpt), "--forget-people", "0.25", "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    assert ckpt.read_bytes() == before  # the input is never overwritten
    blob = torch.load(out, weights_only=True)
    assert blob["meta"]["unlearned"]["method"] == "DFMU"
    report = json.loads((cache / "out" / "forgot-report" / "report.json").read_text())
    assert report["task"] == "causal-lm" and report["dfmu"]["forget_acc"] <= report["original"]["forget_acc"]
    record = json.loads((cache / "out" / "forgot.record.json").read_text())
    assert record["method"] == "DFMU" and record["forgotten"]["samples"] == report["forget_sequences"]
    # forget named sequences instead of people
    indices = cache / "idx.txt"
    indices.write_text("0 1 2 3")
    out2 = cache / "out2" / "f.pt"
    assert cli.main(["forget", "--task", "lm", "--ckpt", str(ckpt), "--forget-indices", str(indices), "--out",
                     str(out2), "--device", "cpu", "--quiet"]) == 0
    assert json.loads((cache / "out2" / "f-report" / "report.json").read_text())["forget_sequences"] == 4
    # the forget side one simulated relearning step away: the setting reaches unlearn and its record
    out3 = cache / "out3" / "f.pt"
    assert cli.main(["forget", "--task", "lm", "--ckpt", str(ckpt), "--forget-people", "0.25", "--relearn-step",
                     "1e-3", "--out", str(out3), "--device", "cpu", "--quiet"]) == 0
    record = json.dumps(json.loads((cache / "out3" / "f.record.json").read_text()))
    assert record.count('"relearn_step": 0.001') == 1 and record.count('"relearn_moves": "frozen"') == 1
    out4 = cache / "out4" / "f.pt"   # the step on the trained weights instead
    assert cli.main(["forget", "--task", "lm", "--ckpt", str(ckpt), "--forget-people", "0.25", "--relearn-step",
                     "1e-3", "--relearn-moves", "trained", "--out", str(out4), "--device", "cpu", "--quiet"]) == 0
    record = json.dumps(json.loads((cache / "out4" / "f.record.json").read_text()))
    assert record.count('"relearn_moves": "trained"') == 1


def test_compare_lm_runs_the_named_methods(cache):
    out = cache / "cmp"
    assert cli.main(["compare", *SMALL, "--seeds", "1", "--forget-shares", "0.25", "--methods", "DFMU,GA",
                     "--out-dir", str(out)]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert set(result["summary"]["0.25"]) == {"Original", "Retrain", "DFMU", "GA"}
    assert os.path.getsize(out / "comparison.png") > 0
    assert (out / "comparison_frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["demo", "--task", "lm", "--classes", "3"], "--classes is for classifiers"),
    (["demo", "--task", "lm", "--forget-people", "1.5"], "--forget-people must be in"),
    (["demo", "--task", "lm", "--people", "1"], "--people must be >= 2"),
    (["compare", "--task", "lm", "--methods", "SalUn"], "SalUn does not run on causal-lm"),
    (["compare", "--task", "lm", "--fractions", "0.1,0.2"], "one retain fraction"),
    (["forget", "--task", "lm", "--out", "x.pt"], "give --ckpt"),
    (["forget", "--task", "lm", "--out", "x.pt", "--relearn-step", "1.5"], "--relearn-step: forget term: "
                                                                             "relearn_step must be in [0, 1)"),
    (["forget", "--out", "x.pt", "--classes", "3", "--relearn-step", "1e-3"], "--relearn-step goes with --task lm"),
    (["forget", "--out", "x.pt", "--classes", "3", "--relearn-moves", "trained"],
     "--relearn-moves goes with --task lm"),
    (["forget", "--task", "lm", "--out", "x.pt", "--relearn-moves", "trained"],
     "--relearn-moves goes with --relearn-step"),
])
def test_lm_usage_errors_are_one_line(cache, argv, message, capsys):
    with pytest.raises(UsageError) as info:
        cli.main([*argv, "--device", "cpu", "--quiet"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_classifier_command_on_an_lm_checkpoint_says_task_lm(cache):
    ckpt = cache / "lm.pt"
    assert cli.main(["train", *SMALL, "--out", str(ckpt)]) == 0
    with pytest.raises(UsageError, match="--task lm") as info:
        cli.main(["forget", "--ckpt", str(ckpt), "--classes", "3", "--out", str(cache / "o.pt"), "--device", "cpu"])
    assert "\n" not in str(info.value)
