"""Dataset plumbing shared by every stage: labels, forget/retain splits, stratified fractions, batches.

Every function takes any map-style dataset whose items are ``(input, label)`` — the input a tensor
or a :class:`dfmu_ext.model_io.Inputs` (dict samples go through :func:`dfmu_ext.model_io.as_pairs`
first); a
``TensorDataset`` (and a ``Subset`` of one) takes a fast path that never touches items one by one.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .model_io import stack


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """All labels of ``dataset`` as a 1-D int64 CPU tensor, in index order."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].reshape(-1).long().cpu()
    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)
        return parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).reshape(-1).long().cpu()
    n = len(dataset)  # type: ignore[arg-type]
    return torch.tensor([int(dataset[i][1]) for i in range(n)], dtype=torch.long)


def split_forget_retain(dataset: Dataset, forget_classes: Iterable[int]) -> tuple[Subset, Subset]:
    """(forget subset, retain subset) of ``dataset`` by label membership in ``forget_classes``."""
    labels = dataset_labels(dataset)
    is_forget = torch.isin(labels, torch.as_tensor(sorted(set(forget_classes)), dtype=torch.long))
    forget_idx = torch.nonzero(is_forget).flatten().tolist()
    retain_idx = torch.nonzero(~is_forget).flatten().tolist()
    return Subset(dataset, forget_idx), Subset(dataset, retain_idx)


def stratified_fraction(dataset: Dataset, fraction: float, seed: int = 0) -> Subset:
    """A class-stratified random ``fraction`` of ``dataset`` (at least one sample per present class).

    Reproducible for a given ``seed``; the chosen indices are sorted so that iteration order does
    not depend on the draw.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = dataset_labels(dataset)
    if fraction == 1.0:
        return Subset(dataset, list(range(len(labels))))
    gen = torch.Generator().manual_seed(seed)
    chosen: list[torch.Tensor] = []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        k = max(1, int(round(fraction * idx.numel())))
        chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    picked = torch.sort(torch.cat(chosen)).values.tolist() if chosen else []
    return Subset(dataset, picked)


def make_loader(dataset: Dataset, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                sampler=None) -> DataLoader:
    """A single-process DataLoader (our datasets are in-memory tensors; workers only add start-up cost)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      generator=gen, sampler=sampler, num_workers=0)


def take_batch(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the items at ``indices`` into one ``(x, y)`` batch."""
    if isinstance(dataset, TensorDataset):
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return dataset.tensors[0][idx], dataset.tensors[1][idx].long()
    if isinstance(dataset, Subset):
        return take_batch(dataset.dataset, [dataset.indices[i] for i in indices])
    items = [dataset[i] for i in indices]
    xs = stack([x for x, _ in items])
    ys = torch.tensor([int(y) for _, y in items], dtype=torch.long)
    return xs, ys


class DictDataset(Dataset):
    """Dict samples over in-memory columns, as a Hugging Face ``datasets.Dataset`` in torch format
    gives them: sample ``i`` is ``{name: column[i] for every column, label_key: int(labels[i])}``.

    ``targets`` holds every label (so labels are read without building samples).
    """

    def __init__(self, columns: dict, labels: torch.Tensor, label_key: str = "labels"):
        labels = torch.as_tensor(labels).reshape(-1).long()
        bad = [k for k, v in columns.items() if torch.as_tensor(v).shape[0] != labels.shape[0]]
        if bad or label_key in columns:
            raise ValueError(f"columns {bad or [label_key]} do not fit {labels.shape[0]} labels under {label_key!r}")
        self.columns = {k: torch.as_tensor(v) for k, v in columns.items()}
        self.targets = labels
        self.label_key = label_key

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.columns.items()}, self.label_key: int(self.targets[i])}


class ShiftedCopies(Dataset):
    r"""Each sample of ``base`` (image tensors ``(..., H, W)``) moved by a seeded shift
    :math:`(d_y, d_x) \ne (0, 0)`, :math:`|d| \le` ``pixels``, wrapping round (``torch.roll``), its label
    kept: inputs a model has not seen in this position. For a model that memorised its training
    images, copies of retain images moved a pixel or two score about as unseen images do (Fashion-MNIST,
    40 epochs on 6k images, true-label probability at the 10th / 25th / 50th percentile: 1 pixel 0.47 /
    0.97 / 1.0, 2 pixels 0.08 / 0.78 / 0.99, the test set 0.34 / 0.97 / 1.0, members 0.99 / 1.0 / 1.0), so
    they stand in for ``nonmembers`` (``unlearn(nonmembers="shifted")``; benchmarks/RESULTS.md, "Shifted
    copies as non-members")."""

    def __init__(self, base: Dataset, pixels: int, seed: int = 0):
        if pixels < 1:
            raise ValueError(f"pixels must be >= 1, got {pixels}")
        self.base, self.pixels = base, int(pixels)
        moves = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1) if dy or dx]
        pick = torch.randint(len(moves), (len(base),), generator=torch.Generator().manual_seed(int(seed)))
        self.shifts = torch.tensor(moves)[pick]          # (N, 2): each sample's (dy, dx)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        dy, dx = (int(v) for v in self.shifts[i])
        return torch.roll(x, (dy, dx), dims=(-2, -1)), y


def shift_pixels(height: int, width: int) -> int:
    """The stand-ins' shift for an image of ``height`` x ``width``: about 3.5% of its shorter side, at
    least one pixel (1 up to 41 pixels, 8 at 224). Two pixels at 28 brought a memorising CNN to Retrain's
    MIA-efficacy but pushed a memorising ResNet-18 6 points of forget accuracy past Retrain; one pixel
    stays within 1.4 points of Retrain's forget accuracy on both (benchmarks/RESULTS.md)."""
    return max(1, round(min(height, width) / 28))
