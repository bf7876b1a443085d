"""The deletion record (dfmu_ext.record), the weights hash (dfmu_ext.weights) and the cache lock."""
import json
import os
import threading
import time

import pytest
import torch
from torch import nn

import dfmu_ext
from dfmu_ext import record as rec_mod
from dfmu_ext.weights import WeightsError, fit_state_dict, state_dict_sha256

pytestmark = pytest.mark.usefixtures("one_thread")


def test_state_dict_hash_is_defined_by_names_dtypes_shapes_and_values(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    h = state_dict_sha256(m)
    assert h == state_dict_sha256(m.state_dict()) == state_dict_sha256(dict(reversed(list(m.state_dict().items()))))
    # the container does not matter: a bare state_dict, a checkpoint dict, a dfmu checkpoint
    torch.save(m.state_dict(), tmp_path / "a.pt")
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "b.pt")
    from dfmu_ext.zoo.checkpoints import save_checkpoint
    save_checkpoint(str(tmp_path / "c.pt"), m, {"model": "x"})
    from dfmu_ext.weights import load_state_dict_file
    assert {state_dict_sha256(load_state_dict_file(str(tmp_path / f))) for f in ("a.pt", "b.pt", "c.pt")} == {h}
    # ... but every value, dtype, shape and name does
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["0.weight"][0, 0] += 1e-6
    assert state_dict_sha256(sd) != h
    sd = dict(m.state_dict())
    sd["0.bias"] = sd["0.bias"].double()
    assert state_dict_sha256(sd) != h
    sd = dict(m.state_dict())
    sd["0.bias"] = sd["0.bias"].reshape(1, 3)
    assert state_dict_sha256(sd) != h
    sd = dict(m.state_dict())
    sd["renamed"] = sd.pop("0.bias")
    assert state_dict_sha256(sd) != h
    # the documented definition, spelled out for one tensor
    import hashlib
    t = torch.tensor([1.0, 2.0])
    want = hashlib.sha256(b"w\0torch.float32\0" + b"2\0" + b"8\0" + t.numpy().tobytes()).hexdigest()
    assert state_dict_sha256({"w": t}) == want
    assert state_dict_sha256({"b": torch.tensor([True, False]), "h": torch.zeros(2, dtype=torch.bfloat16)})


def test_fit_state_dict_diff():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = dict(m.state_dict())
    sd["1.weight"] = torch.zeros(5, 3)
    sd["extra"] = torch.zeros(1)
    del sd["0.bias"]
    with pytest.raises(WeightsError) as e:
        fit_state_dict(m, sd)
    msg = str(e.value)
    assert "1 missing: 0.bias" in msg and "1 unexpected: extra" in msg and "1.weight (5, 3) vs model (2, 3)" in msg


def test_unlearn_writes_a_record(tmp_path, digits):
    from dfmu_ext import training
    from dfmu_ext.zoo import models

    tr, te, info = digits
    torch.manual_seed(0)
    model = models.build_model("mlp", info.in_channels, info.num_classes, info.image_size)
    training.train_model(model, tr, training.TrainConfig(epochs=2), progress=False)
    h_in = state_dict_sha256(model)
    path = tmp_path / "sub" / "rec.json"
    res = dfmu_ext.unlearn(model, tr, [2, 5], record=str(path), progress=False, seed=1)
    r = json.loads(path.read_text())
    assert r["format"] == rec_mod.RECORD_FORMAT and r["hash_format"] == "state_dict-sha256-v1"
    assert r["input"]["weights_sha256"] == h_in != r["output"]["weights_sha256"] == state_dict_sha256(res.model)
    labels = tr.tensors[1]
    forget_idx = torch.nonzero((labels == 2) | (labels == 5)).flatten().tolist()
    assert r["forgotten"] == {"classes": [2, 5], "samples": len(forget_idx),
                              "indices_sha256": rec_mod.indices_sha256(forget_idx)}
    assert r["retain_used"]["count"] == res.retain_samples_used and r["retain_used"]["total"] == len(labels) - len(forget_idx)
    # the retain indices are the seeded stratified budget: recomputable
    from dfmu_ext.splits import split_forget_retain, stratified_fraction
    _, retain = split_forget_retain(tr, [2, 5])
    budget = stratified_fraction(retain, 0.13, seed=1)
    assert r["retain_used"]["indices_sha256"] == rec_mod.indices_sha256(rec_mod.root_indices(budget))
    assert r["config"]["retain_fraction"] == 0.13 and r["config"]["mode"] == "prune" and r["seed"] == 1
    assert set(r["config"]["selection"]) >= {"mode", "fraction_first"} and "lr" in r["config"]["finetune"]
    assert r["environment"]["dfmu_ext"] == dfmu_ext.__version__ and r["environment"]["build_info"]
    assert set(r["timings"]) == {"scoring", "targets", "pruning", "finetune", "guard", "total"} and "metrics" not in r
    # the forget samples read (scoring pass and forget term): counted and hashed
    assert r["forget_read"]["count"] == res.forget_samples_used == len(res.info["forget_read"])
    assert r["scoring_forget_samples"] <= r["forget_read"]["count"] <= r["forgotten"]["samples"]
    ok, expected, actual = rec_mod.verify(str(path), res.model)
    assert ok and expected == actual
    assert not rec_mod.verify(str(path), {k: v + 1 for k, v in res.model.state_dict().items()
                                          if v.is_floating_point()})[0]


def test_read_record_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    for p in (tmp_path / "nope.json", tmp_path / "x.json"):
        with pytest.raises(rec_mod.RecordError):
            rec_mod.read_record(str(p))


def test_cached_original_waits_for_the_lock_then_reads(tmp_path, monkeypatch):
    import fcntl

    from dfmu_ext.zoo import checkpoints

    monkeypatch.setenv("DFMU_CACHE", str(tmp_path / "cache"))
    dev = torch.device("cpu")
    path = checkpoints.cache_path("digits", "mlp", dev, 0, 1)
    assert os.path.basename(path) == "digits-mlp-cpu-seed0-e1.pt"
    model, meta = checkpoints.train_original("digits", "mlp", dev, 0, epochs=1)
    os.makedirs(os.path.dirname(path))
    logs, result = [], {}
    with open(path + ".lock", "a+b") as lock:  # another process is training this original
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: result.update(
            out=checkpoints.cached_original("digits", "mlp", dev, 0, epochs=1, log=logs.append)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "cached_original must wait while the lock is held"
        checkpoints.save_checkpoint(path, model, meta)  # ... and finishes writing it
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    t.join(60)
    assert not t.is_alive()
    assert any("waiting" in m for m in logs) and any("using the cached" in m for m in logs), logs
    assert not any("training" in m for m in logs), "the waiting process must read, not train again"
    assert state_dict_sha256(result["out"][0]) == state_dict_sha256(model)
