"""The shared training-step engine: per-device defaults, bf16 autocast and channels_last on the CPU,
loss scaling, and that every method accepts it (masked units stay exactly zero in any precision)."""
import copy

import pytest
import torch

import dfmu_ext
from dfmu_ext import baselines
from dfmu_ext.finetune import FinetuneConfig
from dfmu_ext.steps import StepEngine, StepOptions
from dfmu_ext import training
from dfmu_ext.zoo import models

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_per_device(original):
    cpu = StepEngine(original, torch.device("cpu"))
    assert cpu.describe() == {"precision": "fp32", "channels_last": True} and cpu.loss_scale is None
    mlp = models.MLP(64, 10)
    assert not StepEngine(mlp, torch.device("cpu"), StepOptions(channels_last=True)).channels_last  # no conv
    assert not StepEngine(mlp, torch.device("cpu")).channels_last
    assert not StepEngine(original, torch.device("cpu"), StepOptions(channels_last=False)).channels_last
    with pytest.raises(ValueError, match="precision must be one of"):
        StepEngine(original, torch.device("cpu"), StepOptions(precision="fp8"))
    with pytest.raises(ValueError, match="channels_last must be"):
        StepOptions(channels_last="yes").validate()
    with pytest.raises(ValueError, match="fp16 training needs a CUDA device"):
        StepEngine(original, torch.device("cpu"), StepOptions(precision="fp16"))


def test_cpu_default_is_bitwise_the_explicit_fp32_channels_last(digits, original):
    train = digits[0]
    a = dfmu_ext.unlearn(copy.deepcopy(original), train, [3], 0.3, seed=0)
    b = dfmu_ext.unlearn(copy.deepcopy(original), train, [3], 0.3, seed=0,
                         steps=StepOptions(precision="fp32", channels_last=True))
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


@pytest.mark.parametrize("options", [StepOptions("bf16", False), StepOptions("fp32", True), StepOptions("bf16", True)])
def test_low_precision_and_layout_keep_masks_and_quality(digits, original, options):
    train, test, _ = digits
    ref = dfmu_ext.unlearn(copy.deepcopy(original), train, [3], 0.3, seed=0)
    res = dfmu_ext.unlearn(copy.deepcopy(original), train, [3], 0.3, seed=0, steps=options,
                           finetune=FinetuneConfig(epochs=1))
    assert all(p.dtype == torch.float32 for p in res.model.parameters())
    named = dict(res.model.named_modules())
    for name, mask in res.masks.items():
        w = named[name].weight
        assert bool((w[mask == 0] == 0).all()), f"{name}: a pruned unit regrew under {options}"
    if options.channels_last:
        conv = next(m for m in res.model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    m_ref = dfmu_ext.evaluate(ref.model, train, test, [3], mia=False, probe=False)
    m = dfmu_ext.evaluate(res.model, train, test, [3], mia=False, probe=False)
    assert m["forget_acc"] <= 0.02
    assert abs(m["test_acc"] - m_ref["test_acc"]) < 0.03, (m, m_ref)


@pytest.mark.parametrize("name", ["FT", "GA", "RL", "SalUn", "SCRUB", "l1-sparse", "Retrain"])
def test_every_training_method_takes_the_engine(digits, original, name):
    kw = {"Retrain": {"config": training.TrainConfig(epochs=1, lr=0.05)}, "SCRUB": {"epochs": 1, "msteps": 1}}.get(
        name, {"epochs": 1})
    res = baselines.METHODS[name](copy.deepcopy(original), digits[0], [3], 0.3, seed=0,
                                  steps=StepOptions("bf16", True), **kw)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_loss_scaling_skips_an_overflowing_step():
    """The fp16 schedule, driven on the CPU by setting a loss scale by hand."""
    model = torch.nn.Linear(3, 2)
    engine = StepEngine(model, torch.device("cpu"), StepOptions("fp32", False))
    engine.loss_scale = 8.0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3)
    assert engine.backward_step(model(x).sum(), opt)
    assert not torch.equal(before["weight"], model.weight)
    # gradients equal the unscaled ones: compare with a plain step from the same weights
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    opt.zero_grad()
    engine.backward_step(model(x).sum(), opt)
    twin(x).sum().backward()
    twin_opt.step()
    torch.testing.assert_close(model.weight, twin.weight)
    opt.zero_grad()
    kept = model.weight.detach().clone()
    assert not engine.backward_step(model(x).sum() * float("inf"), opt)
    assert engine.loss_scale == 4.0 and torch.equal(model.weight, kept)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precisions(digits, original, precision):
    train, test, _ = digits
    model = copy.deepcopy(original).cuda()
    res = dfmu_ext.unlearn(model, train, [3], 0.3, seed=0, steps=StepOptions(precision, "auto"))
    m = dfmu_ext.evaluate(res.model, train, test, [3], mia=False, probe=False)
    assert m["forget_acc"] <= 0.02 and m["test_acc"] > 0.8
