"""Model families: for a kind of model, its name, its default recipe and its fresh-weights init.

Retrain needs two things about a model that only its maker knows: the recipe it was trained with
(when none is given) and how its constructor initialises it (so that "fresh weights" means the
weights a new model would start from). The module that defines the models registers them here
(the zoo: ``cnn``, ``resnet18``, ``mlp``, ``transformer``), so the methods read them without
importing that module, and a user can register a family of their own the same way::

    register_family(ModelFamily("mynet", recipe=lambda device_type: TrainConfig(epochs=5)), MyNet)

A model belongs to the family of its exact class (a subclass may train differently, so it does not
inherit its parent's recipe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .classifier import TrainConfig

__all__ = ["ModelFamily", "register_family", "family_of", "family_named"]


@dataclass(frozen=True)
class ModelFamily:
    """One kind of model.

    Attributes:
        name: its name (lower case), e.g. ``"cnn"``.
        recipe: ``recipe(device_type) -> TrainConfig``, the default training recipe on ``"cpu"`` /
            ``"cuda"`` (a fresh object per call: callers may change it).
        init: ``init(model)``, the initialisation the constructor applies after the modules' own
            ``reset_parameters()``; None when the constructor adds nothing.
    """

    name: str
    recipe: Callable[[str], TrainConfig]
    init: Callable[[nn.Module], None] | None = None

    def __post_init__(self):
        if not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"a model family's name must be non-empty lower case, got {self.name!r}")


_BY_CLASS: dict[type, ModelFamily] = {}
_BY_NAME: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily, *classes: type) -> ModelFamily:
    """Register ``family`` for the model ``classes``; registering the same family again is a no-op
    (module reloads), another family under a taken name or class a ValueError."""
    known = _BY_NAME.get(family.name)
    if known is not None and known != family:
        raise ValueError(f"a different model family is already registered as {family.name!r}")
    for cls in classes:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"model families hold nn.Module classes, got {cls!r}")
        if _BY_CLASS.get(cls, family).name != family.name:
            raise ValueError(f"{cls.__name__} already belongs to the model family {_BY_CLASS[cls].name!r}")
    _BY_NAME[family.name] = family
    for cls in classes:
        _BY_CLASS[cls] = family
    return family


def family_of(model: nn.Module) -> ModelFamily | None:
    """The family registered for ``type(model)``, None for any other module."""
    return _BY_CLASS.get(type(model))


def family_named(name: str) -> ModelFamily:
    """The family registered as ``name`` (case-insensitive); one-line ValueError otherwise."""
    family = _BY_NAME.get(str(name).strip().lower())
    if family is None:
        raise ValueError(f"no model family {name!r} is registered (known: {', '.join(_BY_NAME) or 'none'}); "
                         "pass the training recipe instead")
    return family
