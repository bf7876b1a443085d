"""Scenarios count only if they can fail: the Original-vs-Retrain discrimination check (a pure function,
its thresholds and edge cases), the signed gaps to Retrain, the frontier plot, and run_scenario end to
end on a tiny coarse-label data set built from digits (coarse class = digit // 2)."""
import copy
import json
import math
import types

import pytest
import torch
from torch.utils.data import TensorDataset

from dfmu_ext.experiments import scenarios
from dfmu_ext.experiments.plots import plot_scenario_frontier, scenario_frontier_rows
from dfmu_ext.experiments.scenarios import (RANDOM_MIN_GAP, SUBCLASS_MIN_GAP, discrimination, run_scenario,
                                            signed_gaps)

pytestmark = pytest.mark.usefixtures("one_thread")

SUB = {"forget_test_acc": 0.969, "sibling_test_acc": 0.95, "forget_acc": 0.99, "test_acc": 0.9, "mia_efficacy": 0.1}
RND = {"forget_acc": 0.99, "retain_acc": 0.99, "test_acc": 0.9, "mia_efficacy": 0.1}


# ------------------------------------------------------------------ discrimination (pure)

def test_subclass_retrain_equal_to_original_is_flagged():
    d = discrimination(SUB, dict(SUB), "subclass")
    assert d["known"] and d["discriminative"] is False and d["gap_points"] == 0
    assert "CANNOT tell forgetting from doing nothing" in d["message"] and "sanity check" in d["message"]
    assert "< 10" in d["message"] and d["message"].startswith("discrimination: Original 96.9% vs Retrain 96.9%")


def test_subclass_large_gap_passes():
    d = discrimination(SUB, {**SUB, "forget_test_acc": 0.015}, "subclass")
    assert d["discriminative"] is True and math.isclose(d["gap_points"], 95.4)
    assert d["message"] == ("discrimination: Original 96.9% vs Retrain 1.5% on the forget sub-class's test images "
                            "(gap 95.4 points): this scenario can tell forgetting from doing nothing")
    assert d["gaps"]["forget_test_acc"]["below_threshold"] is False


def test_random_retrain_equal_to_original_is_flagged():
    d = discrimination(RND, dict(RND), "random")
    assert d["discriminative"] is False and set(d["gaps"]) == {"forget_acc", "mia_efficacy"}
    assert "CANNOT" in d["message"]


def test_random_large_gaps_pass_and_either_small_gap_fails():
    retrain = {**RND, "forget_acc": 0.90, "mia_efficacy": 0.30}
    d = discrimination(RND, retrain, "random")
    assert d["discriminative"] is True and math.isclose(d["gap_points"], 9.0)
    assert "forget-set accuracy Original 99.0% vs Retrain 90.0% (gap 9.0 points)" in d["message"]
    # a large forget-accuracy gap does not rescue an MIA-efficacy gap under the threshold, nor vice versa
    only_forget = discrimination(RND, {**retrain, "mia_efficacy": 0.12}, "random")
    assert only_forget["discriminative"] is False and only_forget["gaps"]["mia_efficacy"]["below_threshold"]
    assert "MIA-efficacy Original 10.0% vs Retrain 12.0% (gap 2.0 points < 3)" in only_forget["message"]
    only_mia = discrimination(RND, {**retrain, "forget_acc": 0.98}, "random")
    assert only_mia["discriminative"] is False and only_mia["gaps"]["forget_acc"]["below_threshold"]


@pytest.mark.parametrize("kind,key,threshold", [("subclass", "forget_test_acc", SUBCLASS_MIN_GAP),
                                                ("random", "forget_acc", RANDOM_MIN_GAP)])
def test_threshold_edges(kind, key, threshold):
    assert (SUBCLASS_MIN_GAP, RANDOM_MIN_GAP) == (10.0, 3.0)
    base = SUB if kind == "subclass" else RND
    ret = SUB if kind == "subclass" else {**RND, "mia_efficacy": 0.5}  # MIA gap large: forget_acc decides
    orig = {**base, key: 0.95}
    at = {**ret, key: 0.95 - threshold / 100}            # exactly the threshold (float rounding included)
    under = {**ret, key: 0.95 - threshold / 100 + 0.001}  # 0.1 point under
    above = {**ret, key: 0.95 + threshold / 100 + 0.001}  # the gap is absolute: Retrain may score higher
    assert discrimination(orig, at, kind)["discriminative"] is True
    assert discrimination(orig, under, kind)["discriminative"] is False
    assert discrimination(orig, above, kind)["discriminative"] is True


def test_unknown_without_retrain_or_metric():
    d = discrimination(SUB, None, "subclass")
    assert d["known"] is False and d["discriminative"] is None
    assert "unknown" in d["message"] and "Retrain was not run" in d["message"]
    assert discrimination([SUB], [], "random", missing="Retrain failed")["message"].count("Retrain failed") == 1
    nan = discrimination({**SUB, "forget_test_acc": float("nan")}, SUB, "subclass")
    assert nan["discriminative"] is None and "unknown" in nan["message"]
    with pytest.raises(ValueError, match="unknown scenario kind"):
        discrimination(SUB, SUB, "classes")
    with pytest.raises(ValueError, match="pair one to one"):
        discrimination([SUB, SUB], [SUB], "subclass")


def test_several_seeds_decide_on_the_means_and_keep_each_seed():
    # seed 0 alone has a 12-point gap, seed 1 a 4-point one: the mean (8 points) decides
    origs = [{**SUB, "forget_test_acc": 0.97}, {**SUB, "forget_test_acc": 0.95}]
    rets = [{**SUB, "forget_test_acc": 0.85}, {**SUB, "forget_test_acc": 0.91}]
    d = discrimination(origs, rets, "subclass", seeds=[3, 7])
    assert d["discriminative"] is False and math.isclose(d["gap_points"], 8.0)
    assert d["message"].startswith("discrimination (means over 2 seeds): Original 96.0% vs Retrain 88.0%")
    assert [e["seed"] for e in d["per_seed"]] == [3, 7]
    assert [round(e["gaps"]["forget_test_acc"]["gap_points"], 6) for e in d["per_seed"]] == [12.0, 4.0]
    json.dumps(d)  # JSON-ready as it is


def test_signed_gaps():
    ref = {**SUB, "forget_test_acc": 0.10, "sibling_test_acc": 0.90}
    g = signed_gaps({**SUB, "forget_test_acc": 0.15, "sibling_test_acc": 0.88}, ref, "subclass")
    assert math.isclose(g["forget"], 5.0) and math.isclose(g["sibling"], -2.0)
    assert math.isclose(g["forget_plus_sibling"], 7.0)
    r = signed_gaps({**RND, "mia_efficacy": 0.05}, {**RND, "forget_acc": 0.95, "test_acc": 0.91}, "random")
    assert math.isclose(r["forget"], 4.0) and math.isclose(r["mia"], -5.0) and math.isclose(r["test"], -1.0)
    assert math.isnan(signed_gaps({}, ref, "subclass")["forget"])


def test_frontier_rows_and_plot(tmp_path):
    runs = [{"method": m, "seed": s, "gaps_to_retrain": {"forget": f + s, "sibling": -c, "forget_plus_sibling": 0}}
            for m, f, c in (("Original", 40.0, 0.0), ("Retrain", 0.0, 0.0), ("DFMU", -2.0, 1.0), ("FT", 2.0, 1.0))
            for s in (0, 1)]
    runs.append({"method": "GA", "seed": 0, "error": "boom"})
    rows = scenario_frontier_rows(runs, "subclass")
    assert [r["method"] for r in rows] == ["Original", "Retrain", "DFMU", "FT"]
    assert math.isclose(rows[2]["forget_gap"]["mean"], 1.5) and math.isclose(rows[2]["cost"]["mean"], 1.0)
    out = tmp_path / "scenario_frontier.png"
    assert plot_scenario_frontier(runs, "subclass", str(out), "toy") == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------ run_scenario end to end

@pytest.fixture(scope="module")
def coarse_digits(digits):
    """digits with coarse labels digit // 2 (five coarse classes of two fine ones each)."""
    from dfmu_ext.zoo.coarse import FineLabels
    from dfmu_ext.zoo.data import DatasetInfo

    train, test, info = digits
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    fine = FineLabels(ytr.clone(), yte.clone(), tuple(str(i) for i in range(10)), tuple(i // 2 for i in range(10)))
    cinfo = DatasetInfo("digits-coarse", 5, info.in_channels, info.image_size,
                        ("0-1", "2-3", "4-5", "6-7", "8-9"), "test", info.mean, info.std, fine=fine)
    return TensorDataset(xtr, ytr // 2), TensorDataset(xte, yte // 2), cinfo


@pytest.fixture(scope="module")
def coarse_original(coarse_digits):
    """An MLP trained 2 epochs on the coarse labels, with its checkpoint meta."""
    from dfmu_ext import training
    from dfmu_ext.zoo import checkpoints, models

    train, _, info = coarse_digits
    config = models.default_train_config("mlp", "cpu")
    config.epochs = 2
    torch.manual_seed(0)
    model = models.build_model("mlp", info.in_channels, info.num_classes, info.image_size, **config.model_kwargs)
    training.train_model(model, train, config, seed=0, progress=False)
    return model.eval(), checkpoints.original_meta("mlp", info, 0, config, 0.0)


@pytest.fixture
def patched(monkeypatch, coarse_digits, coarse_original):
    data = types.SimpleNamespace(canonical_name=lambda name: name, load_dataset=lambda name: coarse_digits)
    monkeypatch.setattr(scenarios, "data_mod", data)
    monkeypatch.setattr(scenarios, "cached_original",
                        lambda *a, **k: (copy.deepcopy(coarse_original[0]), dict(coarse_original[1])))


def test_subclass_scenario_end_to_end(tmp_path, patched, capsys):
    out = tmp_path / "out"
    rep = run_scenario("digits-coarse", "mlp", subclass="7", seeds=1, methods="Retrain,DFMU", out_dir=str(out),
                       quiet=True)
    printed = capsys.readouterr().out.splitlines()
    title = next(i for i, line in enumerate(printed) if line.startswith("digits-coarse / mlp: forget sub-class 7"))
    assert printed[title + 1] == rep["discrimination"]["message"]
    assert printed[title + 1].startswith("discrimination: Original ")
    disc = rep["discrimination"]
    assert disc["known"] and isinstance(disc["discriminative"], bool) and disc["kind"] == "subclass"
    assert disc["per_seed"][0]["seed"] == 0
    header = rep["table"].splitlines()[0]
    for col in ("UA", "forget-test", "siblings", "avg gap to Retrain", "forget gap", "sibling gap",
                r"\|forget\|+\|sibling\|", "time (s)"):  # "|" escaped: one Markdown column
        assert f"| {col} |" in header
    lines = rep["table"].splitlines()
    assert lines[2].startswith("| Original (doing nothing) |") and lines[3].startswith("| Retrain | ")
    assert "| +0.0 | +0.0 | 0.0 |" in lines[3]  # Retrain's own gaps
    dfmu = next(r for r in rep["runs"] if r["method"] == "DFMU")
    assert set(dfmu["gaps_to_retrain"]) == {"forget", "sibling", "forget_plus_sibling"}
    png = out / "scenario_frontier.png"
    assert png.is_file() and rep["plots"]["scenario_frontier"] == str(png)
    saved = json.loads((out / "scenario.json").read_text())
    assert saved["discrimination"]["message"] == disc["message"] and saved["kind"] == "subclass"
    assert saved["plots"]["scenario_frontier"] == str(png)


def test_random_scenario_columns_and_unknown_without_retrain(tmp_path, patched, capsys):
    rep = run_scenario("digits-coarse", "mlp", random_fraction=0.1, seeds=1, methods="DFMU", out_dir=str(tmp_path),
                       quiet=True)
    disc = rep["discrimination"]
    assert disc["discriminative"] is None and "Retrain was not run" in disc["message"]
    assert disc["message"] in capsys.readouterr().out
    header = rep["table"].splitlines()[0]
    assert "| forget gap | MIA gap | TA gap |" in header and "sibling gap" not in header
    assert rep["plots"] == {} and not (tmp_path / "scenario_frontier.png").exists()
