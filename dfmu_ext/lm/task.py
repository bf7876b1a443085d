r"""The causal-LM task: what a sample is, how a batch is made, and the next-token loss.

A sample is a dict ``{"input_ids": (T,), "attention_mask": (T,) optional, "labels": (T,)}`` (the
Hugging Face convention): ``labels[t]`` is the token to score at position ``t`` or ``-100``
(:data:`IGNORE_INDEX`) where nothing is scored (the prompt, padding). The logits at position ``t``
predict ``labels[t + 1]``, so for a sequence :math:`n` the loss summed over its scored tokens is

.. math:: \ell_n = -\sum_{t:\ y_{n,t+1} \ne -100} \log p_\theta(y_{n,t+1} \mid x_{n,\le t}).

Every stage of a causal-LM unlearning reads batches through :func:`take` / :func:`batches` and the
loss through :func:`token_nll` / :func:`sequence_nll` / :func:`lm_loss`, so the shift and the
ignore index live here only.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ..model_io import Inputs, adapted, per_token_labels

IGNORE_INDEX = -100
TASKS = ("classification", "causal-lm")


class TokenSequences(Dataset):
    """Causal-LM samples over in-memory ``(N, T)`` tensors: sample ``i`` is
    ``{"input_ids", "attention_mask", "labels"}`` at row ``i``."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
        input_ids = torch.as_tensor(input_ids).long()
        labels = torch.as_tensor(labels).long()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.as_tensor(attention_mask).long()
        if input_ids.dim() != 2 or labels.shape != input_ids.shape or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids, labels and attention_mask must all be (N, T); got "
                             f"{tuple(input_ids.shape)}, {tuple(labels.shape)}, {tuple(attention_mask.shape)}")
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}

    def subset(self, indices) -> "TokenSequences":
        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.long)
        return TokenSequences(self.input_ids[idx], self.labels[idx], self.attention_mask[idx])


def _raw(dataset):
    """The dict-sample data set under ``as_pairs`` wrappers (a LabeledDataset keeps it as ``.dataset``)."""
    inner = getattr(dataset, "dataset", None)
    if type(dataset).__name__ == "LabeledDataset" and inner is not None:
        return inner
    return dataset


def is_lm_sample(sample) -> bool:
    """A dict with ``input_ids`` and a per-token ``labels`` sequence of the same length
    (:func:`dfmu_ext.model_io.per_token_labels`, the check ``as_pairs`` uses to leave such data sets as they are)."""
    return per_token_labels(sample)


def detect_task(dataset, task: str | None = None) -> str:
    """``task`` when given (checked), else ``"causal-lm"`` when the first sample is one
    (:func:`is_lm_sample`), else ``"classification"``."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    dataset = _raw(dataset)
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    try:
        first = dataset[0] if len(dataset) else None
    except (TypeError, IndexError, KeyError):
        return "classification"
    return "causal-lm" if is_lm_sample(first) else "classification"


def check_lm_dataset(dataset, what: str = "train_set") -> Dataset:
    """The causal-LM data set under ``dataset``'s wrappers, with one-line ValueErrors for samples that
    are not causal-LM samples: no ``labels``, labels of another length than ``input_ids``, or
    (checked over the whole set) no token to score at all."""
    dataset = _raw(dataset)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{what} is empty")
    first = dataset[0]
    if not isinstance(first, Mapping) or "input_ids" not in first:
        raise ValueError(f"{what}: a causal-LM sample is a dict with 'input_ids' and 'labels', got "
                         f"{type(first).__name__}")
    if "labels" not in first:
        raise ValueError(f"{what}: the samples have no 'labels' (keys: {', '.join(map(str, first))}); give the "
                         f"token ids to score, -100 elsewhere")
    if not is_lm_sample(first):
        raise ValueError(f"{what}: 'labels' must have the shape of 'input_ids' "
                         f"({tuple(torch.as_tensor(first['labels']).shape)} vs "
                         f"{tuple(torch.as_tensor(first['input_ids']).shape)})")
    return dataset


def scored_tokens(labels: torch.Tensor) -> torch.Tensor:
    """(N,) how many next-token predictions of each sequence are scored (``labels[:, 1:] != -100``)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


def check_scored(labels: torch.Tensor, what: str) -> None:
    """One-line ValueError when a sequence of ``labels`` has no scored token."""
    n = scored_tokens(labels)
    if bool((n == 0).any()):
        bad = int((n == 0).nonzero()[0])
        raise ValueError(f"{what}: every label of sequence {bad} is -100 (or only its first token is scored): "
                         f"nothing to score")


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[-1]), value=value) if t.shape[-1] < length else t


def collate(samples: Sequence[Mapping], pad_id: int = 0) -> tuple[Inputs, torch.Tensor]:
    """``(Inputs{input_ids, attention_mask, ...}, labels)`` from causal-LM samples, right-padded to
    the longest (``pad_id``, attention 0, label -100). Other tensor keys are stacked as they are."""
    length = max(int(torch.as_tensor(s["input_ids"]).shape[-1]) for s in samples)
    ids = torch.stack([_pad_to(torch.as_tensor(s["input_ids"]).long(), length, pad_id) for s in samples])
    labels = torch.stack([_pad_to(torch.as_tensor(s["labels"]).long(), length, IGNORE_INDEX) for s in samples])
    masks = [torch.as_tensor(s["attention_mask"]).long() if "attention_mask" in s
             else torch.ones(torch.as_tensor(s["input_ids"]).shape[-1], dtype=torch.long) for s in samples]
    inputs = {"input_ids": ids, "attention_mask": torch.stack([_pad_to(m, length, 0) for m in masks])}
    for key in samples[0]:
        if key not in ("input_ids", "attention_mask", "labels"):
            inputs[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return Inputs(inputs), labels


def take(dataset, indices: Sequence[int]) -> tuple[Inputs, torch.Tensor]:
    """One batch of the samples at ``indices`` (fast path for :class:`TokenSequences` and its subsets)."""
    dataset = _raw(dataset)
    idx = [int(i) for i in indices]
    while isinstance(dataset, Subset):
        idx = [int(dataset.indices[i]) for i in idx]
        dataset = _raw(dataset.dataset)
    if isinstance(dataset, TokenSequences):
        t = torch.as_tensor(idx, dtype=torch.long)
        return (Inputs({"input_ids": dataset.input_ids[t], "attention_mask": dataset.attention_mask[t]}),
                dataset.labels[t])
    return collate([dataset[i] for i in idx])


def batches(dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0,
            device: torch.device | str | None = None) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """``(inputs, labels)`` batches of ``dataset`` on ``device``, in a seeded random order when ``shuffle``."""
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        x, y = take(dataset, order[start:start + batch_size].tolist())
        yield (x.to(device), y.to(device)) if device is not None else (x, y)


def forward_logits(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """``(N, T, V)`` logits of ``model`` on ``inputs`` (any output type, see :func:`dfmu_ext.model_io.logits_of`)."""
    with adapted(model):
        logits = model(inputs)
    if logits.dim() != 3:
        raise ValueError(f"a causal LM must return (N, T, vocab) logits, got shape {tuple(logits.shape)}")
    return logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, T-1)`` next-token negative log-likelihood, 0 where the label is -100 (low-precision
    logits in float32)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    lg = logits[:, :-1]
    lg = lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg
    target = labels[:, 1:].to(lg.device)
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return nll.reshape(target.shape)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` each sequence's next-token loss summed over its scored tokens (:math:`\\ell_n`)."""
    return token_nll(logits, labels).sum(1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The next-token loss of a batch: ``"sum"`` over every scored token, or its ``"mean"`` per
    scored token (the Hugging Face models' own loss)."""
    total = token_nll(logits, labels).sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / scored_tokens(labels).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _all_ids(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of every sequence, padded to one length."""
    x, _ = take(dataset, range(len(dataset)))
    return x["input_ids"], x.get("attention_mask", torch.ones_like(x["input_ids"]))


def nearest_retain(dataset, forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    r"""``retain`` ordered from the sequence that shares the most with the forget sequences: by
    :math:`\max_f \sum_{v \in s \cap f} \mathrm{idf}(v)` over the forget sequences :math:`f`, the
    inverse document frequency :math:`\log(N / n_v)` weighting rare tokens (a name) over common
    ones (grammar). The knowledge most at risk when the forget set is unlearned is the one that
    shares its rare tokens (another person with the same first name)."""
    ids, mask = _all_ids(dataset)
    vocab = int(ids.max()) + 1
    bags = torch.zeros(ids.shape[0], vocab)
    bags.scatter_(1, ids, mask.float())
    bags = (bags > 0).float()
    idf = torch.log(ids.shape[0] / bags.sum(0).clamp_min(1))
    shared = (bags[retain] * idf) @ bags[forget].T          # (R, F): idf mass of the tokens both hold
    order = torch.sort(shared.max(1).values, descending=True, stable=True).indices
    return retain[order]


def split_forget(train_set, forget_indices, retain_fraction: float, seed: int = 0, nearest: float = 0.0
                 ) -> tuple[Subset, Subset, Subset]:
    """``(forget, retain, budget)`` subsets of a causal-LM ``train_set``: the sequences at
    ``forget_indices``, every other one, and a ``retain_fraction`` of those (at least one): a share
    ``nearest`` of it the retain sequences nearest the forget set (:func:`nearest_retain`), the rest
    a seeded random choice. One-line ValueErrors (nothing is read further) for: forget classes, empty, non-integer,
    out-of-range or duplicate indices, indices covering every sequence, a fraction outside (0, 1].
    """
    return split_forget_drawn(train_set, forget_indices, retain_fraction, seed, nearest)[:3]


def split_forget_drawn(train_set, forget_indices, retain_fraction: float, seed: int = 0, nearest: float = 0.0
                       ) -> tuple[Subset, Subset, Subset, list[int]]:
    """:func:`split_forget` and the budget's seeded random draw (``train_set`` indices): the part of
    the budget that is a fair sample of the retain data, where the nearest part holds, by its
    choice, the retain sequences that share the forget set's rare tokens."""
    dataset = check_lm_dataset(train_set)
    if forget_indices is None:
        raise ValueError("a causal LM forgets sequences: give forget_indices (positions in train_set)")
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")
    idx = torch.as_tensor(forget_indices).reshape(-1)
    if idx.numel() == 0:
        raise ValueError("forget_indices is empty: name at least one sequence to forget")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"forget_indices must be integers, got {idx.dtype}")
    n = len(dataset)
    idx = torch.sort(idx.long()).values
    if int(idx[0]) < 0 or int(idx[-1]) >= n:
        raise ValueError(f"forget_indices must lie in [0, {n}), got values in [{int(idx[0])}, {int(idx[-1])}]")
    if bool((idx[1:] == idx[:-1]).any()):
        raise ValueError("forget_indices holds duplicates")
    if idx.numel() == n:
        raise ValueError("forget_indices name every training sequence: no retain data is left")
    is_forget = torch.zeros(n, dtype=torch.bool)
    is_forget[idx] = True
    retain = torch.nonzero(~is_forget).flatten()
    if not 0.0 <= nearest <= 1.0:
        raise ValueError(f"nearest must be in [0, 1], got {nearest}")
    gen = torch.Generator().manual_seed(int(seed) + 104729)
    k = max(1, int(round(retain_fraction * retain.numel())))
    k_near = int(round(nearest * k))
    near = nearest_retain(dataset, idx, retain)[:k_near] if k_near else retain[:0]
    rest = retain[~torch.isin(retain, near)]
    drawn = rest[torch.randperm(rest.numel(), generator=gen)[:k - k_near]]
    budget = torch.sort(torch.cat([near, drawn])).values
    return (Subset(dataset, idx.tolist()), Subset(dataset, retain.tolist()), Subset(dataset, budget.tolist()),
            sorted(drawn.tolist()))


def cat_batches(parts: Sequence[tuple[Inputs, torch.Tensor]], pad_id: int = 0) -> tuple[Inputs, torch.Tensor]:
    """One batch from several ``(inputs, labels)`` batches, right-padded to the longest."""
    length = max(int(y.shape[1]) for _, y in parts)
    keys = list(parts[0][0])
    fill = {"attention_mask": 0}
    inputs = Inputs({k: torch.cat([_pad_to(x[k], length, fill.get(k, pad_id)) if x[k].dim() == 2 else x[k]
                                   for x, _ in parts]) for k in keys})
    return inputs, torch.cat([_pad_to(y, length, IGNORE_INDEX) for _, y in parts])


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding: ``get_input_embeddings()`` where the model has it (Hugging Face),
    else its first ``nn.Embedding`` with the most rows."""
    getter = getattr(model, "get_input_embeddings", None)
    found = getter() if callable(getter) else None
    if isinstance(found, nn.Embedding):
        return found
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embeddings, key=lambda m: m.num_embeddings) if embeddings else None
