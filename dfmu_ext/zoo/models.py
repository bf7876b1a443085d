"""Classifiers defined in the package (torchvision does not load beside our torch builds).

All models are built only from Conv2d / Linear / BatchNorm / ReLU / pooling / Flatten modules plus
residual additions, so that block discovery (a conv or linear unit and the norm that follows it)
sees every layer through ``named_modules()``. Two conventions the unlearning pipeline relies on:

* the last ``nn.Linear`` in ``model.modules()`` order is the classifier, and its input is the
  penultimate feature vector (used by the linear-probe metric);
* every ReLU is a separate, *non-inplace* module, so that an activation captured by a hook on a
  conv/norm output is never overwritten before its gradient arrives.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn

from ..training.classifier import TrainConfig
from ..training.families import ModelFamily, family_of, register_family
from .text import TokenTransformer

__all__ = ["SmallCNN", "BasicBlock", "ResNet18", "MLP", "build_model", "MODEL_NAMES", "IMAGE_MODEL_NAMES", "canonical_model_name",
           "model_name_of", "init_weights", "default_train_config", "model_train_config", "DATASET_EPOCHS"]

MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet18", "mlp", "transformer")
#: The models of image data sets (the transformer reads token ids: :mod:`.text`).
IMAGE_MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet18", "mlp")


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def init_weights(model: nn.Module) -> None:
    """He init for convs (ReLU nets), unit/zero BN affines: the standard CIFAR ResNet recipe."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SmallCNN(nn.Module):
    """A plain VGG-style CNN: four conv(3x3)-BN-ReLU blocks of widths w, 2w, 4w, 8w, each of the
    first three followed by 2x2 max-pooling, then global average pooling and
    Linear(8w -> hidden)-ReLU-Linear(hidden -> classes).

    Pooling after every block (rather than two convs per stage) keeps the full-resolution
    activations to w channels: on the 2-core CI machines training is bound by memory traffic
    over activations, and this layout trains a Fashion-MNIST epoch about 4x faster than
    [32, 32, pool, 64, 64, pool] while reaching ~90% test accuracy in 2 epochs. Global pooling
    makes it independent of the input size (8x8 digits to 32x32 CIFAR). Four conv layers give
    the depth that per-layer pruning schedules need.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w), nn.MaxPool2d(2),
            *_conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
            *_conv_bn_relu(4 * w, 8 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * w, hidden)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.classifier(self.relu(self.fc(x)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut, add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem (no max-pool), BasicBlocks [2, 2, 2, 2] with widths
    w, 2w, 4w, 8w and strides 1, 2, 2, 2, adaptive average pooling, Linear head.

    ``width=64`` is the standard network (11.2M parameters); a smaller width (e.g. 16, 0.7M) keeps
    CPU runs of the same architecture affordable.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        layers, cin = [], w
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = w * 2 ** i
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


class MLP(nn.Module):
    """Flatten, then Linear-BN1d-ReLU hidden layers, then a Linear head."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        cin = in_features
        for h in hidden:
            layers += [nn.Linear(cin, h), nn.BatchNorm1d(h), nn.ReLU()]
            cin = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def canonical_model_name(name: str) -> str:
    """``"SmallCNN"``, ``"res-net"``, ``"resnet_18"`` ... -> one of ``MODEL_NAMES`` (raises otherwise)."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = {"smallcnn": "cnn", "resnet": "resnet18"}.get(key, key)
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return key


def model_name_of(model: nn.Module) -> str | None:
    """The ``MODEL_NAMES`` entry of a package model (its registered family,
    :func:`dfmu_ext.training.families.family_of`), None for any other module."""
    family = family_of(model)
    return family.name if family is not None and family.name in MODEL_NAMES else None


def build_model(name: str, in_channels: int, num_classes: int,
                image_size: int | tuple[int, int] = (28, 28), **kw) -> nn.Module:
    """Build ``name`` (one of ``MODEL_NAMES``) for inputs of ``in_channels`` x ``image_size``.

    Extra keywords go to the model (``width`` for cnn/resnet18, ``hidden`` for mlp, ``dim``,
    ``depth``, ``heads``, ``mlp_dim`` for transformer). The image size only matters to the MLP (its
    input width); the convolutional models pool globally. For the transformer (token data sets,
    :mod:`.text`) ``in_channels`` is the vocabulary size and ``image_size[0]`` the sequence length.
    """
    key = canonical_model_name(name)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if key == "cnn":
        return SmallCNN(in_channels, num_classes, **kw)
    if key == "resnet18":
        return ResNet18(in_channels, num_classes, **kw)
    if key == "mlp":
        return MLP(in_channels * h * w, num_classes, **kw)
    if key == "transformer":
        return TokenTransformer(in_channels, num_classes, max_len=h, **kw)
    raise AssertionError(key)


# --------------------------------------------------------------------------------------------
# the default training recipes of the package's models
# --------------------------------------------------------------------------------------------

#: Data sets whose recipe differs from the model's: ``fashion-mnist-6k`` exists to give an original
#: that memorised its training samples (train accuracy ~100%, a clear train-test gap), which takes
#: many epochs on 6,000 images (the random-sample scenario that can fail; benchmarks/RESULTS.md).
DATASET_EPOCHS = {"fashion-mnist-6k": 40}


def default_train_config(model_name: str, device_type: str = "cpu", dataset: str | None = None) -> TrainConfig:
    """The recipe for ``model_name`` ("cnn", "resnet18", "mlp") on ``device_type`` ("cpu"/"cuda"),
    with the epochs of :data:`DATASET_EPOCHS` when ``dataset`` is one of them.

    * cnn: 3 epochs, SGD lr 0.05, batch 128, cosine (same on every device: it is cheap).
    * mlp: 5 epochs, SGD lr 0.05, batch 128, cosine.
    * transformer (the token data sets' model): 6 epochs, AdamW lr 1e-3, weight decay 0.01, batch 64, cosine.
    * resnet18 on cuda: the standard network (width 64), 10 epochs, SGD lr 0.1, batch 128, cosine.
    * resnet18 on cpu: a reduced recipe, since the full network takes hours per epoch on two
      cores: width 16 (0.7M parameters instead of 11.2M), 2 epochs, lr 0.1, batch 128.
    """
    config = model_train_config(model_name, device_type)
    if dataset in DATASET_EPOCHS:
        config.epochs = DATASET_EPOCHS[dataset]
    return config


def model_train_config(model_name: str, device_type: str = "cpu") -> TrainConfig:
    """The recipe of the model ``model_name`` on ``device_type`` (:func:`default_train_config`
    without a data set); the registered families' recipe (:mod:`dfmu_ext.training.families`)."""
    key = canonical_model_name(model_name)
    dev = str(device_type).split(":")[0]
    if key == "cnn":
        return TrainConfig(epochs=3, lr=0.05, batch_size=128)
    if key == "mlp":
        return TrainConfig(epochs=5, lr=0.05, batch_size=128)
    if key == "transformer":
        return TrainConfig(epochs=6, lr=1e-3, batch_size=64, optimizer="adamw", weight_decay=0.01)
    if key == "resnet18":
        if dev == "cuda":
            return TrainConfig(epochs=10, lr=0.1, batch_size=128, model_kwargs={"width": 64})
        return TrainConfig(epochs=2, lr=0.1, batch_size=128, model_kwargs={"width": 16})
    raise ValueError(f"no default training recipe for model {model_name!r}")


def _register(name: str, cls: type) -> None:
    """The model family of ``cls`` (:mod:`dfmu_ext.training.families`): Retrain reads its recipe and
    its constructor's initialisation from there."""
    register_family(ModelFamily(name, functools.partial(model_train_config, name), init_weights), cls)


for _name, _cls in (("cnn", SmallCNN), ("resnet18", ResNet18), ("mlp", MLP), ("transformer", TokenTransformer)):
    _register(_name, _cls)
