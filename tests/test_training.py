"""Tests for dfmu_ext.training: the recipe learns, is reproducible, and fails loudly."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from dfmu_ext.eval import accuracy
from dfmu_ext.zoo.models import build_model
from dfmu_ext.training import TrainConfig, train_model
from dfmu_ext.zoo.models import default_train_config


pytestmark = pytest.mark.usefixtures("one_thread")




def _model(name, info, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, info.in_channels, info.num_classes, info.image_size, **kw)


@pytest.mark.parametrize("name,config", [
    ("mlp", TrainConfig(epochs=2, lr=0.05, batch_size=64)),
    ("cnn", TrainConfig(epochs=2, lr=0.05, batch_size=32)),
])
def test_learns_digits(digits, name, config):
    train, test, info = digits
    model = _model(name, info, **({"width": 8} if name == "cnn" else {}))
    hist = train_model(model, train, config, "cpu", progress=False, eval_set=test)
    assert accuracy(model, test) > 0.8
    assert len(hist["loss"]) == len(hist["accuracy"]) == len(hist["seconds"]) == 2
    assert hist["loss"][1] < hist["loss"][0]
    assert hist["eval_accuracy"][-1] == pytest.approx(accuracy(model, test))
    assert hist["lr"][-1] == pytest.approx(0.0, abs=1e-9)  # cosine ends at 0
    assert hist["steps"] == 2 * ((len(train) + config.batch_size - 1) // config.batch_size)
    assert hist["config"]["lr"] == 0.05 and all(s > 0 for s in hist["seconds"])


def test_reproducible_with_seed(digits):
    train, _, info = digits
    train = Subset(train, range(512))
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=64)
    states = []
    for seed in (3, 3, 4):
        model = _model("cnn", info, width=4)
        train_model(model, train, cfg, "cpu", seed=seed, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_does_not_touch_callers_rng(digits):
    train, _, info = digits
    model = _model("mlp", info)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_model(model, train, TrainConfig(epochs=1), "cpu", progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_nan_loss_raises(digits):
    _, _, info = digits
    x = torch.randn(64, 1, 8, 8)
    x[5] = float("nan")
    bad = TensorDataset(x, torch.randint(0, 10, (64,)))
    with pytest.raises(FloatingPointError, match="nan"):
        train_model(_model("mlp", info), bad, TrainConfig(epochs=1, batch_size=16), "cpu", progress=False)


def test_empty_dataset_raises(digits):
    _, _, info = digits
    empty = TensorDataset(torch.empty(0, 1, 8, 8), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        train_model(_model("mlp", info), empty, TrainConfig(epochs=1), "cpu", progress=False)


class _ListDataset(Dataset):
    """A plain map-style dataset with int labels: train_model must not need a TensorDataset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_generic_dataset_singleton_batch_and_mode_restored(digits):
    train, _, info = digits
    x, y = train.tensors
    ds = _ListDataset(x[:33], y[:33])  # 33 = 2*16 + 1: the lone last sample would break BatchNorm
    model = _model("mlp", info).eval()
    hist = train_model(model, ds, TrainConfig(epochs=2, batch_size=16), "cpu", progress=True)
    assert hist["steps"] == 4 and hist["samples"] == 33
    assert not model.training


def test_default_configs():
    cnn = default_train_config("cnn", "cpu")
    assert (cnn.epochs, cnn.lr, cnn.batch_size, cnn.optimizer) == (3, 0.05, 128, "sgd")
    assert default_train_config("mlp").epochs == 5
    gpu = default_train_config("resnet18", "cuda")
    cpu = default_train_config("resnet18", "cpu")
    assert gpu.epochs == 10 and gpu.model_kwargs == {"width": 64}
    assert cpu.epochs < gpu.epochs and cpu.model_kwargs == {"width": 16}
    assert default_train_config("resnet18", "cuda:1").epochs == 10
    with pytest.raises(ValueError):
        default_train_config("vgg", "cpu")
    with pytest.raises(ValueError):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)


def test_onecycle_and_adamw_run(digits):
    train, test, info = digits
    model = _model("mlp", info)
    cfg = TrainConfig(epochs=1, lr=0.01, batch_size=128, optimizer="adamw", schedule="onecycle")
    train_model(model, train, cfg, "cpu", progress=False)
    assert accuracy(model, test) > 0.5
