"""The causal-LM comparison's frontier (dfmu_ext.experiments.lm_plots) and the script that pools comparisons
run on the same originals (benchmarks/merge_lm_comparisons.py): points computed by hand, plots written
whole, and bad inputs refused with nothing written."""
import copy
import json
import math
import os

import pytest

from _benchmarks import load_benchmark
from dfmu_ext import cli
from dfmu_ext.experiments import lm as lm_exp
from dfmu_ext.experiments.lm_plots import (FQ_FLOOR, frontier_points, missing_references, plot_lm,
                                            plot_lm_frontier)

PNG = b"\x89PNG\r\n\x1a\n"


def _row(fq, relearn, utility, **more):
    return {"forget_quality": fq, "relearn_acc": relearn, "model_utility": utility, "forget_acc": 0.5,
            "forget_para_acc": 0.5, "retain_acc": 0.9, "mia_auc": 0.6, "perplexity": 14.0, "seconds": 1.0, **more}


def _runs(methods_per_seed: dict) -> list[dict]:
    """Runs of two seeds x two shares from ``{method: (per-seed rows)}``."""
    runs = []
    for share in (0.01, 0.1):
        for seed in (0, 1):
            runs.append({"share": share, "seed": seed, "methods": {m: rows[seed] for m, rows in methods_per_seed.items()},
                         "truth_ratios": {m: [1.0, 2.0] for m in methods_per_seed}})
    return runs


RUNS = _runs({"Original": [_row(1e-20, 0.9, 0.96), _row(3e-20, 0.8, 0.98)],
              "Retrain": [_row(1.0, 0.2, 0.95), _row(1.0, 0.1, 0.97)],
              "A": [_row(0.3, 0.4, 0.94), _row(0.1, 0.2, 0.92)],
              "B": [_row(float("nan"), 0.5, 0.90), _row(float("nan"), 0.3, 0.90)]})


def test_frontier_points_by_hand():
    pts = frontier_points(lm_exp.aggregate(RUNS))
    assert list(pts) == [0.01, 0.1]
    fq, relearn, utility = pts[0.1]["A"]
    assert fq == pytest.approx(0.2)                            # mean of 0.3 and 0.1
    assert relearn == pytest.approx(100 * (0.3 - 0.15))        # 100 (mean A − mean Retrain)
    assert utility == pytest.approx(100 * (0.93 - 0.97))       # 100 (mean A − mean Original)
    assert pts[0.1]["Retrain"] == pytest.approx((1.0, 0.0, 100 * (0.96 - 0.97)))
    assert math.isnan(pts[0.01]["B"][0]) and pts[0.01]["B"][2] == pytest.approx(-7.0)


def test_frontier_points_need_the_references():
    summary = lm_exp.aggregate(RUNS)
    assert missing_references(summary) is None
    del summary[0.1]["Retrain"]
    assert missing_references(summary) == "forget share 0.1: the frontier needs the Retrain row(s)"
    with pytest.raises(ValueError, match="forget share 0.1: the frontier needs the Retrain row"):
        frontier_points(summary)


def test_compare_without_a_retrain_row_skips_only_the_frontier(tmp_path, monkeypatch, capsys):
    """A Retrain that failed leaves its row out: `dfmu compare --task lm` still writes its table and bars,
    and says why there is no frontier (one line), instead of failing after every run."""
    runs = [{**r, "methods": {m: v for m, v in r["methods"].items() if m != "Retrain"}} for r in RUNS]
    monkeypatch.setattr(lm_exp, "run_lm_comparison", lambda *a, **k: {"runs": runs, "summary": lm_exp.aggregate(runs)})
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--task", "lm", "--seeds", "2", "--forget-shares", "0.01,0.1", "--methods", "GA",
                     "--device", "cpu", "--out-dir", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["comparison.json", "comparison.png"]
    printed = capsys.readouterr()
    assert "no comparison_frontier.png: forget share 0.01: the frontier needs the Retrain row(s)" in printed.err + printed.out


def test_plots_from_memory_and_from_json(tmp_path):
    summary = lm_exp.aggregate(RUNS)
    read_back = json.loads(json.dumps(summary))                # shares become strings, tuples lists
    mem, back = frontier_points(summary), frontier_points(read_back)
    assert list(back) == list(mem)
    for share in mem:
        for m in mem[share]:
            assert back[share][m] == pytest.approx(mem[share][m], nan_ok=True)
    for name, s in (("mem", summary), ("json", read_back)):
        path = str(tmp_path / f"{name}_frontier.png")
        assert plot_lm_frontier(s, path, "toy") == path
        assert open(path, "rb").read(8) == PNG
        plot_lm(s, str(tmp_path / f"{name}.png"), "toy")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG
    assert FQ_FLOOR > 1e-20                                    # the original's 1e-20 is drawn at the floor
    assert sorted(os.listdir(tmp_path)) == ["json.png", "json_frontier.png", "mem.png", "mem_frontier.png"]


def _merge_module():
    return load_benchmark("merge_lm_comparisons")


def _report(runs):
    return {"runs": runs, "summary": lm_exp.aggregate(runs), "corpus": {"people": 4},
            "config": {"shares": [0.01, 0.1], "seeds": [0, 1]}}


def _write(tmp_path, name, runs):
    (tmp_path / name).mkdir()
    path = tmp_path / name / "comparison.json"
    path.write_text(json.dumps(_report(runs)))
    return str(path)


def _variant(runs, method_rows: dict, seconds: float = 7.0):
    """The same originals (their rows as in ``runs`` but for the time), other methods."""
    out = []
    for r in runs:
        refs = {m: {**v, "seconds": seconds} for m, v in r["methods"].items() if m in ("Original", "Retrain")}
        out.append({**r, "methods": {**refs, **{m: rows[r["seed"]] for m, rows in method_rows.items()}}})
    return out


def test_merge_renames_and_pools(tmp_path, capsys):
    mod = _merge_module()
    first = _write(tmp_path, "a", RUNS)
    second = _write(tmp_path, "b", _variant(RUNS, {"A": [_row(0.5, 0.3, 0.95)] * 2,
                                                   "B": [copy.deepcopy(RUNS[0]["methods"]["B"]),
                                                         copy.deepcopy(RUNS[1]["methods"]["B"])]}))
    out = tmp_path / "merged"
    assert mod.main([first, f"{second}:A=A, another setting", "--out-dir", str(out)]) == 0
    merged = json.loads((out / "comparison.json").read_text())
    summary = merged["summary"]["0.1"]
    assert list(summary) == ["Original", "Retrain", "A", "B", "A, another setting"]
    assert summary["A, another setting"]["forget_quality"][0] == pytest.approx(0.5)
    assert summary["Original"]["seconds"][0] == 1.0            # the first input's reference rows are kept
    assert merged["runs"][0]["truth_ratios"]["A, another setting"] == [1.0, 2.0]
    assert merged["config"]["merged_from"] == [first, second]
    for name in ("comparison.png", "comparison_frontier.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "| A, another setting |" in capsys.readouterr().out


def test_merge_pools_one_seed_per_input(tmp_path):
    mod = _merge_module()
    first = _write(tmp_path, "a", RUNS)
    seeds = [_write(tmp_path, f"s{seed}", [r for r in _variant(RUNS, {"C": [_row(0.2, 0.1, 0.9), _row(0.4, 0.3, 0.8)]})
                                          if r["seed"] == seed]) for seed in (0, 1)]
    out = tmp_path / "merged"
    assert mod.main([first, *(f"{p}:C=C pooled" for p in seeds), "--out-dir", str(out)]) == 0
    cell = json.loads((out / "comparison.json").read_text())["summary"]["0.01"]["C pooled"]["forget_quality"]
    assert cell[0] == pytest.approx(0.3) and cell[2] == 2      # the mean of the two seeds' inputs, n = 2


def test_same_measures_ignores_time_and_matches_nan():
    mod = _merge_module()
    a = _row(float("nan"), 0.5, 0.9)
    assert mod.same_measures(a, {**_row(float("nan"), 0.5, 0.9), "seconds": 99.0})
    assert not mod.same_measures(a, _row(0.1, 0.5, 0.9))
    assert not mod.same_measures(a, {**a, "extra": 1.0}) and not mod.same_measures(a, None)


def test_parse_input():
    mod = _merge_module()
    assert mod.parse_input("runs/x/comparison.json") == ("runs/x/comparison.json", {})
    assert mod.parse_input("c.json:DFMU=DFMU, distillation 5;GA=GA (b)") == \
        ("c.json", {"DFMU": "DFMU, distillation 5", "GA": "GA (b)"})
    with pytest.raises(ValueError, match="a rename is OLD=NEW"):
        mod.parse_input("c.json:DFMU=x;=y")


@pytest.mark.parametrize("case, message", [
    ("same name, other numbers", "another method 'A' is in an earlier input"),
    ("other Retrain", "its Retrain row at seed 0, share 0.01 differs"),
    ("other seeds", "its (seed, share) pairs [(5, 0.01), (5, 0.1)] are not"),
    ("unknown rename", "no method named Z to rename"),
    ("out-dir is an input's", "is an input; give another --out-dir"),
])
def test_merge_refuses(tmp_path, capsys, case, message):
    mod = _merge_module()
    first = _write(tmp_path, "a", RUNS)
    second_runs = _variant(RUNS, {"A": [_row(0.5, 0.3, 0.95)] * 2})
    spec, out = None, tmp_path / "merged"
    if case == "other Retrain":
        second_runs[0]["methods"]["Retrain"] = {**second_runs[0]["methods"]["Retrain"], "forget_acc": 0.7}
    if case == "other seeds":
        second_runs = [{**r, "seed": 5} for r in second_runs if r["seed"] == 0]
    second = _write(tmp_path, "b", second_runs)
    if case == "unknown rename":
        spec = f"{second}:Z=z"
    if case == "out-dir is an input's":
        spec, out = f"{second}:A=A2", tmp_path / "a"
    before = (tmp_path / "a" / "comparison.json").read_bytes()
    assert mod.main([first, spec or second, "--out-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "a" / "comparison.json").read_bytes() == before     # the input is never touched
    assert not (tmp_path / "merged").exists()                                # and nothing is written
