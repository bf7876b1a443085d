"""Small helpers every stage shares, each written once: where a model lives, which classes are being
forgotten, train/eval mode that is always restored, seeded randomness, and the training-batch loop.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .splits import dataset_labels, make_loader


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else of its first buffer, else the CPU."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_device(model: nn.Module, device=None) -> torch.device:
    """``device`` when given, else the model's own device."""
    return torch.device(device) if device is not None else model_device(model)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# the forget set
# --------------------------------------------------------------------------------------------

def normalise_classes(forget_classes) -> list[int]:
    """An int, a 0-d tensor or any iterable of ints -> the sorted distinct classes. Raises on none."""
    if isinstance(forget_classes, (int, np.integer)) or (
            isinstance(forget_classes, torch.Tensor) and forget_classes.dim() == 0):
        forget_classes = [int(forget_classes)]
    classes = sorted({int(c) for c in forget_classes})
    if not classes:
        raise ValueError("forget_classes is empty: name at least one class to forget")
    return classes


def check_classes_in_head(classes: list[int], num_outputs: int) -> None:
    """The forget classes must be outputs of the classifier, and some output must remain."""
    if min(classes) < 0 or max(classes) >= num_outputs:
        raise ValueError(f"forget classes {classes} are not among the model's {num_outputs} classes")
    if len(classes) >= num_outputs:
        raise ValueError("every class would be forgotten: nothing would remain to classify")


@dataclass(frozen=True)
class ForgetSet:
    """What is to be forgotten, resolved against one training set: whole classes or given samples.

    Attributes:
        classes: the forget classes, or None when samples were named.
        indices: sorted int64 indices (into the training set) of every forget sample.
        is_forget: bool, one entry per training sample.
    """

    classes: list[int] | None
    indices: torch.Tensor
    is_forget: torch.Tensor

    @property
    def by_classes(self) -> bool:
        return self.classes is not None

    def split(self, train_set: Dataset) -> tuple[Subset, Subset]:
        """(forget subset, retain subset) of ``train_set``, each in index order."""
        retain = torch.nonzero(~self.is_forget).flatten().tolist()
        return Subset(train_set, self.indices.tolist()), Subset(train_set, retain)

    def describe(self) -> dict:
        """What was forgotten, for reports: the classes, or the count and a sha256 of the indices."""
        if self.by_classes:
            return {"forget_classes": list(self.classes)}
        digest = hashlib.sha256(self.indices.numpy().astype("<i8").tobytes()).hexdigest()
        return {"forget_samples": int(self.indices.numel()), "forget_indices_sha256": digest}


def resolve_forget_set(train_set: Dataset, forget_classes=None, forget_indices=None) -> ForgetSet:
    """Check and resolve exactly one of ``forget_classes`` / ``forget_indices`` against ``train_set``.

    Raises ValueError (nothing is modified) when both or neither are given, the training set is
    empty, a class is absent or every class would go, or the indices are empty, out of range,
    duplicated, cover every sample, or cover every sample of a class (forget that class instead).
    """
    if (forget_classes is None) == (forget_indices is None):
        raise ValueError("give exactly one of forget_classes and forget_indices")
    if train_set is None or len(train_set) == 0:  # type: ignore[arg-type]
        raise ValueError("train_set is empty")
    labels = dataset_labels(train_set)
    present = set(torch.unique(labels).tolist())
    if forget_classes is not None:
        classes = normalise_classes(forget_classes)
        missing = [c for c in classes if c not in present]
        if missing:
            raise ValueError(f"forget classes {missing} have no sample in train_set: they do not occur in the "
                             f"training labels {sorted(present)}")
        if present <= set(classes):
            raise ValueError("every class in train_set would be forgotten: no class would remain")
        is_forget = torch.isin(labels, torch.as_tensor(classes, dtype=torch.long))
        return ForgetSet(classes, torch.nonzero(is_forget).flatten(), is_forget)
    idx = torch.as_tensor(np.asarray(forget_indices)).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("forget_indices is empty: name at least one sample to forget")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"forget_indices must be integers, got {idx.dtype}")
    idx = idx.long()
    n = labels.numel()
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"forget_indices must lie in [0, {n}), got values in [{int(idx.min())}, {int(idx.max())}]")
    idx = torch.sort(idx).values
    dup = idx[1:][idx[1:] == idx[:-1]]
    if dup.numel():
        raise ValueError(f"forget_indices holds {dup.numel()} duplicate(s), e.g. {int(dup[0])}")
    if idx.numel() == n:
        raise ValueError("forget_indices name every training sample: no retain data is left")
    is_forget = torch.zeros(n, dtype=torch.bool)
    is_forget[idx] = True
    whole = [c for c in sorted(present) if bool(is_forget[labels == c].all())]
    if whole:
        raise ValueError(f"forget_indices cover every training sample of class(es) {whole}: forget whole classes "
                         f"with forget_classes={whole}")
    return ForgetSet(None, idx, is_forget)


# --------------------------------------------------------------------------------------------
# modes and randomness
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model.train(training)`` for the block; every module's own flag is restored on exit, also on error."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model: nn.Module):
    """Eval mode for the block (BatchNorm uses its running statistics), flags restored after."""
    return module_mode(model, False)


def train_mode(model: nn.Module):
    """Train mode for the block, flags restored after."""
    return module_mode(model, True)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed the global RNGs (CPU and ``device``'s CUDA generator) inside a forked RNG state, so
    stochastic layers are reproducible and the caller's random stream is left untouched."""
    devices = []
    if device is not None and device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


# --------------------------------------------------------------------------------------------
# the training-batch loop
# --------------------------------------------------------------------------------------------

class TrainBatches:
    """Seeded ``(x, y)`` batches of ``dataset`` on ``device``, with an optional progress bar.

    * shuffled by a generator seeded with ``seed`` (or ordered by ``sampler``, e.g. a
      ``DistributedSampler``), so a seed reproduces the order;
    * a batch of a single sample is skipped when ``skip_singletons`` (BatchNorm cannot train on one);
    * ``len()`` is the loader's batch count (the skipped singleton included), which schedules and
      "fraction of an epoch" computations use.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, *,
                 shuffle: bool = True, sampler=None, skip_singletons: bool = True, desc: str = "",
                 progress: bool = False, engine=None):
        self.loader = make_loader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, seed=seed,
                                  sampler=sampler)
        self.device = device
        self.skip_singletons = skip_singletons
        self.desc = desc
        self.progress = progress
        self.engine = engine  # a steps.StepEngine: puts each batch in its memory layout

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bar = tqdm(self.loader, desc=self.desc, leave=False, unit="batch", disable=not self.progress)
        try:
            for x, y in bar:
                if self.skip_singletons and x.shape[0] < 2:
                    continue
                x = x.to(self.device, non_blocking=True)
                yield (self.engine.batch(x) if self.engine is not None else x,
                       torch.as_tensor(y).to(self.device, non_blocking=True).long())
        finally:
            bar.close()

