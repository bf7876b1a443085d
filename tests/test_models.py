"""Tests for dfmu_ext.models: shapes, the last-Linear-is-the-head convention, gradient flow."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfmu_ext.blocks import classifier_of
from dfmu_ext.zoo.models import IMAGE_MODEL_NAMES, MLP, ResNet18, SmallCNN, build_model

SHAPES = [(1, 28), (3, 32), (1, 8), (3, 8)]
SMALL = {"cnn": {"width": 8}, "resnet18": {"width": 8}, "mlp": {}}
ALLOWED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.MaxPool2d,
           nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Sequential)


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name, c, s, classes=7, **kw):
    torch.manual_seed(0)
    return build_model(name, c, classes, image_size=(s, s), **{**SMALL[name], **kw})


@pytest.mark.parametrize("name", IMAGE_MODEL_NAMES)  # the token transformer: test_text_and_norms.py
@pytest.mark.parametrize("c,s", SHAPES)
def test_output_shape(name, c, s):
    model = _build(name, c, s)
    x = torch.randn(4, c, s, s)
    assert model(x).shape == (4, 7)
    model.eval()
    assert model(x[:1]).shape == (1, 7)


@pytest.mark.parametrize("name", IMAGE_MODEL_NAMES)  # the token transformer: test_text_and_norms.py
def test_last_linear_is_the_head(name):
    model = _build(name, 1, 28).eval()
    head = classifier_of(model)[1]
    assert head.out_features == 7
    feats = {}
    h = head.register_forward_hook(lambda m, i, o: feats.update(x=i[0]))
    x = torch.randn(5, 1, 28, 28)
    out = model(x)
    h.remove()
    # the model's output is the head applied to its input: nothing after the last Linear
    torch.testing.assert_close(out, nn.functional.linear(feats["x"], head.weight, head.bias))
    assert feats["x"].dim() == 2 and feats["x"].shape[1] == head.in_features


@pytest.mark.parametrize("name", IMAGE_MODEL_NAMES)  # the token transformer: test_text_and_norms.py
def test_gradient_reaches_every_parameter(name):
    model = _build(name, 3, 32)
    loss = nn.functional.cross_entropy(model(torch.randn(6, 3, 32, 32)), torch.arange(6))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", IMAGE_MODEL_NAMES)  # the token transformer: test_text_and_norms.py
def test_only_visible_layers_and_no_inplace_relu(name):
    model = _build(name, 1, 28)
    for m in model.modules():
        if m is model or type(m).__name__ == "BasicBlock":
            continue
        assert isinstance(m, ALLOWED), type(m)
        if isinstance(m, nn.ReLU):
            assert not m.inplace


def test_conv_followed_by_bn_in_cnn():
    model = SmallCNN(1, 10, width=4)
    mods = list(model.features)
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    assert all(isinstance(mods[i + 1], nn.BatchNorm2d) for i in convs)
    assert [mods[i].out_channels for i in convs] == [4, 8, 16, 32]


def test_resnet18_structure():
    model = ResNet18(3, 10)  # the standard width-64 network
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20  # stem + 16 block convs + 3 shortcut convs
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert ResNet18(1, 10, width=16).fc.in_features == 128


def test_mlp_hidden_and_build_model_errors():
    m = build_model("mlp", 1, 10, image_size=8, hidden=(32,))
    assert isinstance(m, MLP)
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 32), (32, 10)]
    assert isinstance(build_model("ResNet-18", 3, 10, width=4), ResNet18)
    assert isinstance(build_model("SmallCNN", 1, 10), SmallCNN)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg16", 3, 10)
    with pytest.raises(ValueError):
        classifier_of(nn.Sequential(nn.Conv2d(1, 1, 1)))
