"""The baseline unlearning methods and the comparison runner, on digits with a tiny CNN (CPU, fast)."""
import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F

import dfmu_ext
from dfmu_ext import baselines
from dfmu_ext import training
from dfmu_ext.zoo import models
from dfmu_ext.blocks import classifier_of
from dfmu_ext.eval import accuracy
from dfmu_ext.splits import split_forget_retain, stratified_fraction
from dfmu_ext.pruning import SUPPRESSED_LOGIT
from dfmu_ext.result import UnlearnResult

CLASSES = [3]
FRACTION = 0.3
FAST = {"FT": {"epochs": 2}, "GA": {"epochs": 2}, "RL": {"epochs": 2}, "l1-sparse": {"epochs": 2},
        "SalUn": {"epochs": 1}, "SCRUB": {"epochs": 2, "msteps": 1}, "SSD": {}, "head-mask": {}, "DFMU": {},
        "DeepUnlearning": {"retain_samples": 200, "forget_samples": 50},
        "Retrain": {"config": training.TrainConfig(epochs=1, lr=0.05)}}


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def original(digits):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    train, _, info = digits
    torch.manual_seed(0)
    m = models.build_model("cnn", info.in_channels, info.num_classes, info.image_size, width=8)
    training.train_model(m, train, training.TrainConfig(epochs=3, lr=0.05), progress=False)
    torch.set_num_threads(before)
    return m.eval()


@pytest.fixture(scope="module")
def split(digits):
    forget, retain = split_forget_retain(digits[0], CLASSES)
    return forget, retain, len(stratified_fraction(retain, FRACTION, seed=0))


def _run(name, original, train, seed=0, **kw):
    model = copy.deepcopy(original)
    res = baselines.METHODS[name](model, train, CLASSES, FRACTION, seed=seed, progress=False,
                                  **{**FAST[name], **kw})
    return model, res


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_registry_names():
    # the public registry's names and table order (dfmu_ext.baselines.METHODS is public API)
    assert list(baselines.METHODS) == ["Retrain", "FT", "GA", "RL", "l1-sparse", "SalUn", "SSD", "SCRUB",
                                       "head-mask", "DFMU", "DeepUnlearning", "GradDiff", "NPO", "SimNPO", "RMU",
                                       "SelectivePruning", "LEACE", "INLP"]
    assert baselines.methods_for("classification") == ["Retrain", "FT", "GA", "RL", "l1-sparse", "SalUn", "SSD",
                                                       "SCRUB", "head-mask", "DFMU", "DeepUnlearning"]
    assert set(FAST) == set(CLASSIFIER_METHODS)  # every classifier method has a quick setting here
    assert baselines.methods_for("causal-lm") == ["Retrain", "GA", "DFMU", "GradDiff", "NPO", "SimNPO", "RMU",
                                                        "SelectivePruning"]
    assert list(baselines.SPECS) == list(baselines.METHODS)
    assert {n for n, s in baselines.SPECS.items() if not s.budgeted} == {"Retrain", "GA", "head-mask"}
    for name, spec in baselines.SPECS.items():  # the registry's epochs are the functions' own defaults
        epochs = inspect.signature(spec.fn).parameters.get("epochs")
        assert spec.default_epochs == (epochs.default if epochs is not None else None), name
    # `trains` says which methods take the step engine's options; the functions agree.
    assert {n for n, s in baselines.SPECS.items() if not s.trains} == {"SSD", "head-mask", "DeepUnlearning",
                                                                        "SelectivePruning", "LEACE", "INLP"}
    takes_steps = {n for n, s in baselines.SPECS.items()
                   if "steps" in inspect.signature(s.fn).parameters}
    assert takes_steps == {n for n, s in baselines.SPECS.items() if s.trains} - {"DFMU"}  # DFMU: **kwargs
    assert "steps" in inspect.signature(dfmu_ext.unlearn).parameters


#: The classifier methods, read from the registry (which also holds methods for causal LMs only:
#: tests/test_lm_baselines.py); test_registry_names pins them.
CLASSIFIER_METHODS = baselines.methods_for("classification")


@pytest.mark.parametrize("name", CLASSIFIER_METHODS)
def test_budget_result_and_reproducible(name, original, digits, split):
    train = digits[0]
    forget, _, budget = split
    model_a, res = _run(name, original, train)
    assert isinstance(res, UnlearnResult)
    assert res.method == name and res.model is model_a
    assert res.timings["total"] > 0
    assert 0 <= res.retain_samples_used <= budget
    assert 0 <= res.forget_samples_used <= len(forget)
    if name in ("GA", "head-mask"):
        assert res.retain_samples_used == 0
    if name == "head-mask":
        assert res.forget_samples_used == 0
    changed = any(not torch.equal(p, q) for p, q in zip(original.parameters(), model_a.parameters()))
    assert changed, f"{name} did not change the model"
    model_b, _ = _run(name, original, train)
    for (n, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p, q), f"{name}: {n} differs between two runs with the same seed"


def test_ssd_only_dampens(original, digits):
    model, res = _run("SSD", original, digits[0])
    assert res.info["dampened"] > 0
    for (n, p0), p1 in zip(original.named_parameters(), model.parameters()):
        assert torch.all(p1.abs() <= p0.abs()), n
        assert torch.all((p1 == 0) | (torch.sign(p1) == torch.sign(p0))), f"{n}: a sign flipped"


def test_head_mask_only_touches_the_classifier(original, digits):
    model, res = _run("head-mask", original, digits[0])
    head_name, head = classifier_of(model)
    for (n, p0), p1 in zip(original.named_parameters(), model.parameters()):
        if not n.startswith(head_name + "."):
            assert torch.equal(p0, p1), n
    assert torch.all(head.weight[CLASSES] == 0)
    assert torch.all(head.bias[CLASSES] == SUPPRESSED_LOGIT)
    keep = [c for c in range(head.out_features) if c not in CLASSES]
    _, orig_head = classifier_of(original)
    assert torch.equal(head.weight[keep], orig_head.weight[keep])
    forget, _ = split_forget_retain(digits[0], CLASSES)
    assert accuracy(model, forget) == 0.0


def _forget_loss(model, forget):
    x, y = forget.dataset.tensors[0][forget.indices], forget.dataset.tensors[1][forget.indices]
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_ga_increases_forget_loss(original, digits, split):
    forget = split[0]
    model, res = _run("GA", original, digits[0])
    assert _forget_loss(model, forget) > _forget_loss(copy.deepcopy(original), forget) + 0.05
    assert res.info["forget_ce"][-1] > res.info["forget_ce"][0]


def _all_finite(model):
    return all(torch.isfinite(t).all() for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())


def test_ga_divergence_keeps_the_last_finite_model(original, digits):
    """Runaway gradient ascent stops at the last finite epoch instead of returning NaN weights."""
    model, res = _run("GA", original, digits[0], epochs=4, lr=2.0)
    assert res.info["ascent_diverged_in_epoch"] == 3
    assert _all_finite(model)


def test_scrub_max_step_divergence_is_undone(original, digits, monkeypatch):
    """A max-step epoch whose KL turns non-finite is rolled back (weights and momentum); the
    min-steps then run on the last finite model."""
    from dfmu_ext.baselines import distill as scrub_module
    real_kl, calls = scrub_module.kl_distill, []

    def kl_nan_in_first_max_epoch(student, teacher, T):
        calls.append(1)
        out = real_kl(student, teacher, T)
        return out * float("nan") if len(calls) <= 2 else out  # the class-3 forget set is 2 batches

    monkeypatch.setattr(scrub_module, "kl_distill", kl_nan_in_first_max_epoch)
    model, res = _run("SCRUB", original, digits[0], epochs=2, msteps=2)
    assert res.info["ascent_diverged_in_epoch"] == 1
    assert len(res.info["max_kl"]) == 1 and len(res.info["min_loss"]) == 2  # no further max-steps
    assert _all_finite(model)


@pytest.mark.parametrize("name", ["FT", "l1-sparse"])
def test_finetune_keeps_retain_accuracy(name, original, digits, split):
    retain = split[1]
    model, _ = _run(name, original, digits[0])
    assert accuracy(model, retain) >= accuracy(original, retain) - 0.05


def test_l1_pulls_weights_towards_zero(original, digits):
    ft, _ = _run("FT", original, digits[0])
    l1, _ = _run("l1-sparse", original, digits[0], alpha=5e-3)
    norm = lambda m: sum(p.abs().sum().item() for p in m.parameters())  # noqa: E731
    assert norm(l1) < norm(ft)


def test_rl_and_salun_forget(original, digits, split):
    forget = split[0]
    for name in ("RL", "SalUn"):
        model, _ = _run(name, original, digits[0], epochs=2)
        assert accuracy(model, forget) < accuracy(original, forget) - 0.3, name


def test_salun_changes_only_the_salient_half(original, digits):
    model, res = _run("SalUn", original, digits[0])
    mask = res.info["saliency_mask"]
    assert abs(res.info["masked_fraction"] - 0.5) < 1e-3
    moved = 0
    for (n, p0), p1 in zip(original.named_parameters(), model.parameters()):
        frozen = mask[n] == 0
        assert torch.equal(p1[frozen], p0[frozen]), f"{n}: a weight outside the saliency mask changed"
        moved += int((p1 != p0).sum())
    assert moved > 0


def test_scrub_forgets_more_than_it_costs(original, digits, split):
    forget, retain = split[0], split[1]
    model, res = _run("SCRUB", original, digits[0], epochs=2, msteps=2, lr=0.01)
    assert res.info["max_kl"][-1] > 0
    assert _forget_loss(model, forget) > _forget_loss(copy.deepcopy(original), forget)


def test_retrain_fresh_and_default_recipe(original, digits):
    train = digits[0]
    model = copy.deepcopy(original)
    res = baselines.retrain(model, train, CLASSES, 0.2, seed=1, progress=False,
                            config=training.TrainConfig(epochs=1, lr=0.05))
    assert res.info["config"]["epochs"] == 1
    # model_factory: a fresh model of the same architecture, copied back into the given model
    calls = []

    def factory():
        calls.append(1)
        return models.build_model("cnn", 1, 10, (8, 8), width=8)

    model2 = copy.deepcopy(original)
    res2 = baselines.retrain(model2, train, CLASSES, 0.2, seed=1, progress=False, model_factory=factory,
                             config=training.TrainConfig(epochs=1, lr=0.05))
    assert calls and res2.model is model2
    with pytest.raises(ValueError, match="recipe"):
        baselines.retrain(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), train, CLASSES,
                          progress=False)


def test_retrain_with_a_recipe_of_one_s_own(original, digits):
    """train_fn= and model_factory=: a user's recipe serves as Retrain. The package recipe passed as
    a train_fn gives the same weights as the default path (same seed, same fresh start)."""
    train = digits[0]
    config = training.TrainConfig(epochs=1, lr=0.05)
    a = copy.deepcopy(original)
    ra = baselines.retrain(a, train, CLASSES, 0.2, seed=1, config=config)
    seen = []

    def recipe(model, retain):
        seen.append(len(retain))
        return training.train_model(model, retain, config, seed=1)

    b = copy.deepcopy(original)
    rb = baselines.retrain(b, train, CLASSES, 0.2, seed=1, train_fn=recipe)
    assert seen == [rb.retain_samples_used] == [ra.retain_samples_used]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert rb.info["train_fn"] == "recipe" and rb.info["config"] is None and rb.info["loss"] == ra.info["loss"]
    # a factory with a train_fn of another kind (a few plain SGD steps): the factory's start, run under the seed
    made = []

    def factory():
        made.append(1)
        return models.build_model("cnn", 1, 10, (8, 8), width=8)

    def few_steps(model, retain):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = zip(*(retain[i] for i in range(16)))
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(torch.stack(x)), torch.as_tensor(y)).backward()
            opt.step()

    runs = []
    for _ in range(2):
        m = copy.deepcopy(original)
        res = baselines.retrain(m, train, CLASSES, 0.2, seed=2, model_factory=factory, train_fn=few_steps)
        assert res.model is m and res.info["loss"] is None
        runs.append(m.state_dict())
    assert made == [1, 1] and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # the default recipe comes from the model's family (the zoo registers its models)
    family = dfmu_ext.training.family_of(original)
    assert family is not None and family.name == "cnn" and family.recipe("cpu") == models.default_train_config("cnn")


def test_the_registry_registers_and_dispatches():
    from dfmu_ext.baselines import registry

    spec = baselines.SPECS["Retrain"]
    assert spec.tasks == ("classification", "causal-lm") and spec.fns["classification"] is baselines.retrain
    assert spec.fns["causal-lm"] is baselines.lm_retrain and baselines.SPECS["DFMU"].tasks == ("classification",
                                                                                                "causal-lm", "attribute")
    with pytest.raises(ValueError, match="already has a function for classification"):
        registry.register("GA", budgeted=False)(baselines.finetune)
    with pytest.raises(ValueError, match="budgeted differ"):
        registry.register("FT", "causal-lm", budgeted=False)(baselines.finetune)
    assert baselines.SPECS["FT"].tasks == ("classification",)  # a refused registration changes nothing
    with pytest.raises(ValueError, match="not registered: nope"):
        registry.set_table_order(["Retrain", "nope"])
    with pytest.raises(ValueError, match="first registration"):
        registry.register("brand-new")(baselines.finetune)
    assert "brand-new" not in baselines.SPECS and list(baselines.METHODS) == list(baselines.SPECS)


def test_errors(original, digits):
    train = digits[0]
    with pytest.raises(ValueError):
        baselines.finetune(copy.deepcopy(original), train, [3], 0.0, progress=False)
    with pytest.raises(ValueError):
        baselines.gradient_ascent(copy.deepcopy(original), train, [], progress=False)
    with pytest.raises(ValueError):
        baselines.head_mask(copy.deepcopy(original), train, [12], progress=False)


def test_compare_smoke(tmp_path, monkeypatch, capsys):
    from dfmu_ext.baselines import resolve_methods
    from dfmu_ext.experiments import run_comparison

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    assert resolve_methods("all") == CLASSIFIER_METHODS
    assert resolve_methods("all", task="causal-lm") == baselines.methods_for("causal-lm")
    with pytest.raises(ValueError, match="does not run on classification"):
        resolve_methods("NPO")
    assert resolve_methods("dfmu,HEAD-MASK") == ["DFMU", "head-mask"]
    with pytest.raises(ValueError):
        resolve_methods("nope")
    out = tmp_path / "cmp"
    report = run_comparison("digits", "mlp", [3], [0.13], 1, ["head-mask", "DFMU"], "cpu", str(out),
                            train_epochs=1, quiet=True, eval_kwargs={"probe_samples": 300})
    printed = capsys.readouterr().out
    assert "| DFMU | 13% |" in printed and "(once)" in printed
    blob = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in blob["rows"]] == ["Original", "head-mask", "DFMU"]
    assert not blob["failed"]
    assert blob["rows"][1]["forget_acc"]["mean"] == 0.0
    for png in ("retain_vs_fraction.png", "time_vs_retain.png"):
        assert (out / png).stat().st_size > 5_000
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    assert report["json"] == str(out / "comparison.json")


def test_merge_comparisons_pools_classes_and_prefers_reruns(tmp_path, monkeypatch, capsys):
    """benchmarks/merge_comparisons.py: one row per method over every (class, seed) pair; a failed
    run is replaced by a later successful re-run of the same (classes, method, fraction, seed)."""
    from _benchmarks import load_benchmark
    from dfmu_ext.experiments import run_comparison

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    kw = dict(train_epochs=1, quiet=True, eval_kwargs={"probe_samples": 300}, plots=False)
    run_comparison("digits", "mlp", [3], [0.13], 1, ["head-mask", "DFMU"], "cpu", str(tmp_path / "c3"), **kw)
    run_comparison("digits", "mlp", [5], [0.13], 1, ["head-mask", "DFMU"], "cpu", str(tmp_path / "c5"), **kw)
    # Pretend DFMU failed for class 5 in the first run, then re-run it alone.
    blob = json.loads((tmp_path / "c5" / "comparison.json").read_text())
    for r in blob["runs"]:
        if r["method"] == "DFMU":
            r["error"] = "FloatingPointError: pretend"
    (tmp_path / "c5" / "comparison.json").write_text(json.dumps(blob))
    run_comparison("digits", "mlp", [5], [0.13], 1, ["DFMU"], "cpu", str(tmp_path / "c5_rerun"), **kw)
    capsys.readouterr()

    mod = load_benchmark("merge_comparisons")
    out = tmp_path / "merged"
    assert mod.main([str(tmp_path / d) for d in ("c3", "c5", "c5_rerun")] + ["--out-dir", str(out)]) == 0
    merged = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in merged["rows"]}
    assert set(rows) == {"Original", "head-mask", "DFMU"}
    assert rows["DFMU"]["retain_acc"]["n"] == 2 and rows["head-mask"]["retain_acc"]["n"] == 2
    assert rows["Original"]["retain_acc"]["n"] == 2
    assert not merged["failed"]
    assert (out / "time_vs_retain.png").stat().st_size > 5_000
    assert "| DFMU | 13% |" in capsys.readouterr().out
