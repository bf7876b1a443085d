"""Forgetting samples and sub-classes: forget_indices through unlearn, score_and_prune, evaluate and
every baseline; the coarse-label data sets; and the bad inputs (clear errors, nothing modified)."""
import copy

import numpy as np
import pytest
import torch

import dfmu_ext
from dfmu_ext import baselines
from dfmu_ext._common import resolve_forget_set
from dfmu_ext.blocks import classifier_of
from dfmu_ext.experiments.scenarios import average_gap, run_scenario, scenario_forget_set
from dfmu_ext.pruning import SUPPRESSED_LOGIT
from dfmu_ext.splits import dataset_labels
from dfmu_ext import training
from dfmu_ext.zoo import coarse
from dfmu_ext.zoo.data import DatasetInfo, find_fashion_mnist, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_indices(digits):
    gen = torch.Generator().manual_seed(1)
    return torch.randperm(len(digits[0]), generator=gen)[:120]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_resolve_forget_set(digits, random_indices):
    train = digits[0]
    fs = resolve_forget_set(train, forget_indices=random_indices.flip(0))
    assert not fs.by_classes and torch.equal(fs.indices, torch.sort(random_indices).values)
    forget, retain = fs.split(train)
    assert len(forget) == 120 and len(retain) == len(train) - 120
    assert set(forget.indices).isdisjoint(retain.indices)
    assert fs.describe()["forget_samples"] == 120 and len(fs.describe()["forget_indices_sha256"]) == 64
    by_class = resolve_forget_set(train, [3])
    assert by_class.classes == [3] and torch.equal(by_class.indices, torch.nonzero(dataset_labels(train) == 3).flatten())


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one"),
    ({"forget_classes": [3], "forget_indices": [1, 2]}, "exactly one"),
    ({"forget_indices": []}, "empty"),
    ({"forget_indices": [0, 10 ** 6]}, r"must lie in \[0, "),
    ({"forget_indices": [-1, 2]}, r"must lie in \[0, "),
    ({"forget_indices": [4, 7, 4]}, "duplicate"),
])
def test_bad_forget_sets_modify_nothing(digits, original, kwargs, match):
    train = digits[0]
    model = copy.deepcopy(original)
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        dfmu_ext.unlearn(model, train, retain_fraction=0.3, **kwargs)
    assert _same(before, _state(model))
    for name in ("FT", "SSD", "Retrain"):
        with pytest.raises(ValueError, match=match):
            baselines.METHODS[name](model, train, retain_fraction=0.3, **kwargs)
    assert _same(before, _state(model))


def test_indices_covering_a_whole_class_are_refused(digits, original):
    train = digits[0]
    whole = torch.nonzero(dataset_labels(train) == 5).flatten()
    with pytest.raises(ValueError, match=r"forget_classes=\[5\]"):
        dfmu_ext.unlearn(copy.deepcopy(original), train, forget_indices=torch.cat([whole, torch.tensor([0])]))
    with pytest.raises(ValueError, match="every training sample"):
        resolve_forget_set(train, forget_indices=torch.arange(len(train)))


def test_unlearn_samples_leaves_the_head_rows_alone(digits, original, random_indices):
    train, test, _ = digits
    model = copy.deepcopy(original)
    res = dfmu_ext.unlearn(model, train, forget_indices=random_indices, retain_fraction=0.3, seed=0)
    head_name, head = classifier_of(model)
    assert head_name not in res.masks
    assert bool((head.bias > SUPPRESSED_LOGIT / 2).all()), "no class row is pinned when samples are forgotten"
    assert res.forget_samples_used <= 120 and res.info["forget_samples"] == 120
    again = dfmu_ext.unlearn(copy.deepcopy(original), train, forget_indices=random_indices, retain_fraction=0.3, seed=0)
    assert _same(_state(model), _state(again.model))
    m = dfmu_ext.evaluate(model, train, test, forget_indices=random_indices, seed=0)
    assert np.isnan(m["forget_test_acc"]) and np.isnan(m["probe_forget_acc"])
    assert 0.0 <= m["forget_acc"] <= 1.0 and 0.0 <= m["mia_efficacy"] <= 1.0


def test_score_and_prune_with_a_mask(digits, original):
    train = digits[0]
    x, y = train.tensors[0][:64], train.tensors[1][:64]
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::4] = True
    model = copy.deepcopy(original)
    res = dfmu_ext.score_and_prune(model, (x, y), forget_mask=mask)
    assert res.counts.tolist() == [48.0, 16.0]
    with pytest.raises(ValueError, match="whole classes"):
        dfmu_ext.score_and_prune(copy.deepcopy(original), (x, y), forget_mask=mask, head=True)
    with pytest.raises(ValueError, match="exactly one"):
        dfmu_ext.score_and_prune(copy.deepcopy(original), (x, y), [3], forget_mask=mask)
    with pytest.raises(ValueError, match="entries for a batch"):
        dfmu_ext.score_and_prune(copy.deepcopy(original), (x, y), forget_mask=mask[:10])


@pytest.mark.parametrize("name", [n for n in baselines.methods_for("classification") if n != "head-mask"])
def test_every_baseline_forgets_samples(digits, original, random_indices, name):
    train = digits[0]
    fast = {"FT": {"epochs": 1}, "GA": {"epochs": 1}, "RL": {"epochs": 1}, "l1-sparse": {"epochs": 1},
            "SalUn": {"epochs": 1}, "SCRUB": {"epochs": 1, "msteps": 1},
            "Retrain": {"config": training.TrainConfig(epochs=1, lr=0.05)}}.get(name, {})
    res = baselines.METHODS[name](copy.deepcopy(original), train, None, 0.3, forget_indices=random_indices, seed=0,
                                  **fast)
    assert res.timings["total"] > 0 and res.info.get("forget_samples", 120) == 120
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_head_mask_refuses_samples(digits, original, random_indices):
    with pytest.raises(ValueError, match="not applicable to sample forgetting"):
        baselines.METHODS["head-mask"](copy.deepcopy(original), digits[0], forget_indices=random_indices)


def test_subclass_indices_and_scenarios():
    fine = coarse.FineLabels(torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor([2, 1, 0, 2]), ("a", "b", "c"), (0, 1, 1))
    info = DatasetInfo("toy", 2, 1, (1, 1), ("A", "BC"), "test", fine=fine)
    tr, te, c = coarse.subclass_indices(info, "C")
    assert tr.tolist() == [2, 3] and te.tolist() == [0, 3] and c == 1
    assert coarse.subclass_indices(info, 1)[0].tolist() == [1, 4]
    with pytest.raises(ValueError, match="unknown sub-class"):
        coarse.subclass_indices(info, "zebra")
    with pytest.raises(ValueError, match="outside"):
        coarse.subclass_indices(info, 7)
    plain = DatasetInfo("plain", 2, 1, (1, 1), ("A", "B"), "test")
    with pytest.raises(ValueError, match="no sub-classes"):
        coarse.subclass_indices(plain, 0)
    scen = scenario_forget_set(info, list(range(6)), subclass="c")
    assert scen["sibling_test_indices"].tolist() == [1] and scen["test_forget_indices"].tolist() == [0, 3]
    rnd = scenario_forget_set(info, list(range(100)), random_fraction=0.1, seed=3)
    assert rnd["forget_indices"].numel() == 10
    assert torch.equal(rnd["forget_indices"], scenario_forget_set(info, list(range(100)), random_fraction=0.1,
                                                                   seed=3)["forget_indices"])
    ref = {"forget_acc": 0.9, "retain_acc": 0.95, "test_acc": 0.9, "mia_efficacy": 0.2}
    assert average_gap(ref, ref) == 0
    assert abs(average_gap({**ref, "retain_acc": 0.91}, ref) - 0.01) < 1e-12


def test_cifar20_absent_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR-100 python version"):
        load_dataset("cifar20", root=tmp_path)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST files not installed")
def test_fashion_mnist_coarse():
    train, test, info = load_dataset("fashion-mnist-coarse")
    assert info.num_classes == 5 and info.class_names[3] == "footwear"
    tr, te, c = coarse.subclass_indices(info, "Sneaker")
    assert c == 3 and tr.numel() == 6000 and te.numel() == 1000
    assert bool((train.tensors[1][tr] == 3).all())


def test_random_scenario_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    rep = run_scenario("digits", "mlp", random_fraction=0.1, seeds=1, methods="Retrain,DFMU,head-mask",
                       out_dir=str(tmp_path / "out"), train_epochs=2, quiet=True)
    assert rep["skipped"] == ["head-mask"] and (tmp_path / "out" / "scenario.json").is_file()
    dfmu = next(r for r in rep["runs"] if r["method"] == "DFMU")
    assert "metrics" in dfmu and dfmu["gap_to_retrain"] >= 0


def test_cli_forget_random_and_subclass_errors(tmp_path, monkeypatch, capsys):
    from dfmu_ext import cli

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    ckpt, out = tmp_path / "o.pt", tmp_path / "f.pt"
    assert cli.main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--out", str(ckpt),
                     "--device", "cpu", "--quiet"]) == 0
    assert cli.main(["forget", "--ckpt", str(ckpt), "--forget-random", "0.1", "--out", str(out), "--device", "cpu",
                     "--quiet", "--precision", "fp32", "--channels-last", "off"]) == 0
    printed = capsys.readouterr()
    assert "random 10% of the training samples" in printed.out
    # the forget term saw nothing to move in random samples: said on one line, without the runner's file:line
    said = [ln for ln in printed.err.splitlines() if "ForgettingWarning" in ln]
    assert len(said) == 1 and said[0].startswith("warning: ForgettingWarning: DFMU: ") and "nonmembers=" in said[0]
    with pytest.raises(SystemExit) as exc:
        cli.main(["forget", "--ckpt", str(ckpt), "--forget-subclass", "Sneaker", "--out", str(tmp_path / "g.pt"),
                  "--device", "cpu", "--quiet"])
    assert exc.value.code == 2 and "no sub-classes" in capsys.readouterr().err
    assert not (tmp_path / "g.pt").exists()
    with pytest.raises(SystemExit) as exc:
        cli.main(["forget", "--ckpt", str(ckpt), "--forget-random", "1.5", "--out", str(tmp_path / "h.pt"),
                  "--device", "cpu", "--quiet"])
    assert exc.value.code == 2
    assert cli.main(["compare", "--dataset", "digits", "--model", "mlp", "--epochs", "2", "--forget-random", "0.1",
                     "--fractions", "0.13", "--seeds", "1", "--methods", "DFMU,head-mask", "--out-dir",
                     str(tmp_path / "cmp"), "--device", "cpu", "--quiet"]) == 0
    assert (tmp_path / "cmp" / "scenario.json").is_file()


def test_cifar20_reads_cifar100_python_files(tmp_path):
    import pickle

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def split(name, n):
        fine = [int(f) for f in rng.integers(0, 100, n)]
        fine[:3] = [11, 12, 40]  # 11 and 12 share a superclass below; 40 another
        coarse = [f // 5 for f in fine]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}, f)
        return fine

    fine_train = split("train", 40)
    split("test", 12)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f)
    train, test, info = load_dataset("cifar20", root=tmp_path)
    assert info.num_classes == 20 and train.tensors[0].shape == (40, 3, 32, 32)
    assert train.tensors[1].tolist() == [f // 5 for f in fine_train]
    tr, te, c = coarse.subclass_indices(info, "f12")
    assert c == 2 and tr.tolist() == [i for i, f in enumerate(fine_train) if f == 12]
    (folder / "train").write_bytes(b"not a pickle")
    coarse._load_cifar100_dir.cache_clear()
    with pytest.raises(ValueError, match="not a CIFAR-100 python file"):
        load_dataset("cifar20", root=tmp_path)


def test_mixed_groupings_split_every_look_alike_pair():
    from dfmu_ext.zoo.coarse import FASHION_MNIST_MIXED

    look_alikes = [(0, 6), (2, 4), (5, 7), (7, 9)]  # T-shirt/Shirt, Pullover/Coat, Sandal/Sneaker, Sneaker/Boot
    for name, groups in FASHION_MNIST_MIXED.items():
        members = sorted(f for g in groups.values() for f in g)
        assert members == list(range(10)), name  # a partition of the ten classes
        group_of = {f: g for g, fs in groups.items() for f in fs}
        for a, b in look_alikes:
            assert group_of[a] != group_of[b], (name, a, b)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST files not installed")
def test_fashion_mnist_mixed_and_6k():
    train, test, info = load_dataset("fashion-mnist-mixed3")
    assert info.num_classes == 3 and info.name == "fashion-mnist-mixed3"
    tr, te, c = coarse.subclass_indices(info, "Sandal")
    assert c == 0 and tr.numel() == 6000 and bool((train.tensors[1][tr] == 0).all())
    _, _, info2 = load_dataset("fmnist-mixed2")
    assert info2.num_classes == 2
    a, t6, i6 = load_dataset("fashion-mnist-6k")
    b, _, _ = load_dataset("fashion-mnist-6k")
    assert len(a) == 6000 and len(t6) == 10000 and i6.name == "fashion-mnist-6k"
    assert torch.equal(a.tensors[0], b.tensors[0])  # the same subset every time
    assert torch.bincount(a.tensors[1]).tolist() == [600] * 10
    from dfmu_ext.zoo.models import default_train_config
    assert default_train_config("cnn", "cpu", dataset="fashion-mnist-6k").epochs == 40
    assert default_train_config("cnn", "cpu", dataset="fashion-mnist").epochs == 3


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Fashion-MNIST files not installed")
def test_cli_compare_subclass_on_a_two_class_set_ignores_the_classes_default(tmp_path, monkeypatch):
    """--classes defaults to 3, which a 2-class coarse set does not have: with --forget-subclass it
    must not be read (it was, and `dfmu compare --forget-subclass` refused every such data set)."""
    from dfmu_ext import cli
    from dfmu_ext.cli import commands

    seen = {}
    monkeypatch.setattr(commands, "run_scenario", lambda dataset, model, **kw: seen.update(dataset=dataset, **kw))
    assert cli.main(["compare", "--dataset", "fashion-mnist-mixed2", "--forget-subclass", "Sneaker",
                     "--fractions", "0.13", "--seeds", "1", "--methods", "Retrain,DFMU",
                     "--out-dir", str(tmp_path / "out"), "--device", "cpu", "--quiet"]) == 0
    assert seen["dataset"] == "fashion-mnist-mixed2" and seen["subclass"] == "Sneaker"
