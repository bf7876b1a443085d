"""The one experiment runner (dfmu_ext.experiments.runner) under the class, scenario and LM comparisons:
its seed × method loop keeps going past a failing method, its mean ± std and gap to Retrain against
independent references, and the metric declarations the tables read."""
import math
import statistics

import pytest

from dfmu_ext.eval.evaluate import BATTERY
from dfmu_ext.eval.lm import LM_BATTERY
from dfmu_ext.eval.metrics import METRIC_KEYS, METRICS, Metric
from dfmu_ext.experiments import lm as lm_exp
from dfmu_ext.experiments.compare import TABLE_METRICS, format_comparison_table, run_comparison
from dfmu_ext.experiments.runner import (Call, column_stats, gap_to_reference, mean_std, reference_pairs,
                                         resolve_seeds, run_seeds)


def test_mean_std_matches_the_statistics_module():
    values = [0.91, 0.875, None, float("nan"), 0.93, float("inf"), 0.9]
    finite = [0.91, 0.875, 0.93, 0.9]
    m, s, n = mean_std(values)
    assert n == 4
    assert m == pytest.approx(statistics.fmean(finite), abs=1e-15)
    assert s == pytest.approx(statistics.stdev(finite), abs=1e-15)  # the sample std (n - 1)
    assert mean_std([0.5]) == (0.5, 0.0, 1)
    m, s, n = mean_std([None, float("nan")])
    assert n == 0 and math.isnan(m) and math.isnan(s)
    assert column_stats([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": (2.0, math.sqrt(2.0), 2), "b": (2.0, 0.0, 1)}


def test_gap_to_reference_compares_shown_values_and_skips_non_finite():
    declared = [m for m in METRICS if m.key in ("forget_acc", "retain_acc", "test_acc")]
    metrics = {"forget_acc": 0.2, "retain_acc": 0.9, "test_acc": float("nan")}
    ref = {"forget_acc": 0.0, "retain_acc": 0.95, "test_acc": 0.9}
    # UA is compared as 1 - forget accuracy: |0.8 - 1.0| and |0.9 - 0.95|; TA is not finite in both
    assert gap_to_reference(metrics, ref, declared) == pytest.approx((0.2 + 0.05) / 2, abs=1e-15)
    assert gap_to_reference(metrics, ref, declared, scale=100.0) == pytest.approx(12.5, abs=1e-12)
    assert math.isnan(gap_to_reference({}, ref, declared))


def test_reference_pairs_pair_each_setting_with_its_own_retrain():
    recs = [{"method": "Retrain", "seed": 0, "share": 0.1, "metrics": {"x": 1}},
            {"method": "A", "seed": 0, "share": 0.1, "metrics": {"x": 2}},
            {"method": "A", "seed": 0, "share": 0.2, "metrics": {"x": 3}},  # no Retrain at this share
            {"method": "Retrain", "seed": 1, "share": 0.1, "error": "boom"},
            {"method": "A", "seed": 1, "share": 0.1, "metrics": {"x": 4}}]
    pairs = [(r["metrics"]["x"], ref["metrics"]["x"]) for r, ref in reference_pairs(recs, by=("seed", "share"))]
    assert pairs == [(1, 1), (2, 1)]


def test_the_loop_records_a_failure_and_goes_on():
    done_after = []

    def calls_of(seed):
        for name in ("ok", "boom", "ok2"):
            def fn(name=name):
                if name == "boom":
                    raise RuntimeError(f"boom at seed {seed}")
                return {"metrics": {"v": seed}}
            yield Call({"method": name, "seed": seed}, fn, f"{name} {seed}", lambda rec: "fine")
        done_after.append(seed)  # the work after the seed's last call runs too

    lines = []
    runs = run_seeds(resolve_seeds(2), calls_of, lines.append)
    assert [(r["method"], r["seed"]) for r in runs] == [(m, s) for s in (0, 1) for m in ("ok", "boom", "ok2")]
    failed = [r for r in runs if "error" in r]
    assert [r["error"] for r in failed] == ["RuntimeError: boom at seed 0", "RuntimeError: boom at seed 1"]
    assert all("Traceback" in r["traceback"] and "metrics" not in r for r in failed)
    assert all(r["metrics"] == {"v": r["seed"]} for r in runs if "error" not in r)
    assert done_after == [0, 1] and "boom 1: FAILED (RuntimeError: boom at seed 1)" in lines
    with pytest.raises(ValueError, match="no seed"):
        resolve_seeds([])


def test_metric_cells_and_the_declarations():
    ua = Metric("forget_acc", "UA", invert=True)
    assert ua.cell(ua.shown(0.25), 0.01, 2) == "75.0 ± 1.0" and ua.cell(0.5, 0.0, 1) == "50.0"
    assert Metric("g", "gap", 1.0, "+.1f").cell(-0.04, 1.25, 3) == "-0.0 ± 1.2"
    assert ua.cell(float("nan"), 0.0, 0) == "-" and ua.axis == "UA (%)"
    assert METRIC_KEYS == tuple(m.key for m in METRICS)
    for declared in (METRICS, BATTERY, LM_BATTERY):  # one declaration per key
        assert len({m.key for m in declared}) == len(declared)
    row = {"method": "X", "fraction": 0.5, "once": False, "time_s": {"mean": 1.0, "std": 0.0, "n": 1},
           "retain_samples": {"mean": 10, "std": 0, "n": 1}, "forget_samples": {"mean": 0, "std": 0, "n": 1},
           **{m.key: {"mean": 0.25, "std": 0.0, "n": 1} for m in (*METRICS, *BATTERY)}}
    header, _, cells = format_comparison_table([row]).splitlines()
    shown = [m for m in (*TABLE_METRICS, *BATTERY) if m.table]
    assert header.split(" | ")[2:2 + len(shown)] == [m.header for m in shown]
    assert cells.split(" | ")[2] == "75.0"  # UA = 1 - forget accuracy


def test_comparison_keeps_the_other_methods_when_one_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    rep = run_comparison("digits", "mlp", [3], [0.13], 1, ["FT", "head-mask"], "cpu", str(tmp_path / "out"),
                         method_kwargs={"FT": {"no_such_keyword": 1}}, train_epochs=1, quiet=True, plots=False,
                         eval_kwargs={"probe_samples": 300})
    (ft,) = [r for r in rep["runs"] if r["method"] == "FT"]
    assert ft["error"].startswith("TypeError") and "no_such_keyword" in ft["error"] and "metrics" not in ft
    assert rep["failed"] == [f"FT (seed 0): {ft['error']}"]
    assert [r["method"] for r in rep["rows"]] == ["Original", "head-mask"]


def test_lm_comparison_keeps_the_other_methods_when_one_fails(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from dfmu_ext.baselines import SPECS
    from dfmu_ext.zoo.people import PeopleConfig

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    out = lm_exp.run_lm_comparison({"Boom": boom, "GA": SPECS["GA"].fn}, shares=(0.25,), seeds=(0,),
                                   corpus_config=PeopleConfig(num_people=8, holdout_people=8),
                                   train_config=lm_exp.LMTrainConfig(epochs=2))
    (run,) = out["runs"]
    assert run["failed"] == {"Boom": "RuntimeError: boom"}
    assert list(run["methods"]) == ["Original", "Retrain", "GA"] and list(out["summary"][0.25]) == list(run["methods"])
    ref, ga = run["methods"]["Retrain"], run["methods"]["GA"]
    expected = 100.0 * statistics.fmean(abs(ga[k] - ref[k]) for k in lm_exp.GAP_KEYS)
    assert ga["gap"] == pytest.approx(expected, abs=1e-9) and ref["gap"] == 0.0
