r"""A generated data set for attribute unlearning: every image carries a nuisance attribute
independent of its label.

The attribute is a *stamp*: a bright ``s x s`` square in the image's top-left corner (``s`` = 1/7
of the side, at least 2: 4 pixels on 28x28 Fashion-MNIST, 2 on 8x8 digits), set to the data set's brightest
normalised value. It is drawn **per class, half and half**, from a generator seeded with ``seed``:
in every class exactly :math:`\lfloor n_c/2 \rfloor` or :math:`\lceil n_c/2 \rceil` images are
stamped, so :math:`P(a=1 \mid y) = 1/2` for every label (up to one image per class) and the
attribute tells nothing about the label. A network trained on the labels still encodes it in its
penultimate features — the corner square drives its convolutions — which is what attribute
unlearning has to remove (:class:`dfmu_ext.tasks.attribute.AttributeTask`).

``plain_train`` / ``plain_test`` are the same images without any stamp: Retrain for an attribute is
the model trained on them (data that never carried the attribute).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from .data import load_dataset
from .sources import DatasetInfo

ATTRIBUTES = ("stamp",)


@dataclass
class AttributeData:
    """``train`` / ``test`` (stamped where the values are 1), ``train_values`` / ``test_values`` (one
    int64 per sample: 1 = stamped), the un-stamped ``plain_train`` / ``plain_test``, and the base set's info."""

    train: TensorDataset
    test: TensorDataset
    train_values: torch.Tensor
    test_values: torch.Tensor
    plain_train: TensorDataset
    plain_test: TensorDataset
    info: DatasetInfo
    attribute: str = "stamp"


def balanced_values(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """One 0/1 value per sample, half of every class 1 (the odd one out drawn), from a generator
    seeded with ``seed``: the values are independent of the labels by construction."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    gen = torch.Generator().manual_seed(int(seed) + 7340033)
    values = torch.zeros(labels.numel(), dtype=torch.long)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        order = idx[torch.randperm(idx.numel(), generator=gen)]
        half = idx.numel() // 2 + int(torch.randint(0, 2, (1,), generator=gen)) * (idx.numel() % 2)
        values[order[:half]] = 1
    return values


def stamp(x: torch.Tensor, values: torch.Tensor, level: float) -> torch.Tensor:
    """A copy of the images ``x`` (N, C, H, W) with the top-left ``s x s`` square set to ``level``
    where ``values`` is 1 (``s = max(2, round(min(H, W) / 7))``)."""
    if x.dim() != 4:
        raise ValueError(f"stamp expects images (N, C, H, W), got shape {tuple(x.shape)}")
    values = torch.as_tensor(values).reshape(-1).bool()
    if values.numel() != x.shape[0]:
        raise ValueError(f"{values.numel()} attribute values for {x.shape[0]} images")
    s = max(2, round(min(x.shape[2], x.shape[3]) / 7))
    out = x.clone()
    out[values, :, :s, :s] = level
    return out


def _take(ds: TensorDataset, size: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = ds.tensors
    if size is None or size >= x.shape[0]:
        return x, y
    if size < 2:
        raise ValueError(f"a data set size must be >= 2, got {size}")
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed) + 104723))[:size]
    idx = idx.sort().values
    return x[idx], y[idx]


def load_attribute_dataset(base: str = "auto", attribute: str = "stamp", *, train_size: int | None = None,
                           test_size: int | None = None, seed: int = 0, root=None) -> AttributeData:
    """The base data set (``"auto"``: Fashion-MNIST when installed, else digits) with ``attribute``
    drawn half and half per class in each split (seeded), and its un-stamped twin.

    ``train_size`` / ``test_size`` take seeded random subsets (all samples when None). The stamp's
    level is the brightest value of the normalised training images."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
    train, test, info = load_dataset(base, root=root)
    if len(info.image_size) != 2 or not isinstance(train, TensorDataset):
        raise ValueError(f"attribute data needs an image data set, got {info.name}")
    tr_x, tr_y = _take(train, train_size, seed)
    te_x, te_y = _take(test, test_size, seed + 1)
    level = float(tr_x.max())
    tr_v = balanced_values(tr_y, seed)
    te_v = balanced_values(te_y, seed + 1)
    return AttributeData(TensorDataset(stamp(tr_x, tr_v, level), tr_y), TensorDataset(stamp(te_x, te_v, level), te_y),
                         tr_v, te_v, TensorDataset(tr_x, tr_y), TensorDataset(te_x, te_y), info, attribute)
