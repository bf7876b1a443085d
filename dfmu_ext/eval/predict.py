"""Every forward pass the evaluation makes: one eval-mode, ``no_grad`` pass over a dataset in index
order that returns logits, labels and (optionally) the input of one layer — the penultimate
features. Nothing here changes the model; each module's train/eval flag is restored, also on error.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import eval_mode, resolve_device
from ..model_io import model_entry
from ..splits import make_loader

__all__ = ["forward_collect", "predict_logits", "accuracy", "per_class_accuracy", "check_batch_size"]


def check_batch_size(batch_size: int) -> None:
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@torch.no_grad()
@model_entry
def forward_collect(model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device=None,
                    want_logits: bool = True, layer: nn.Module | None = None,
                    feature_rows: torch.Tensor | None = None):
    """One eval-mode pass over ``dataset`` (in index order).

    Returns ``(logits or None, features or None, labels)`` on the CPU, logits as float32. Features
    are the input of ``layer`` (captured by a forward pre-hook, flattened to ``(batch, -1)``), kept
    only for the rows where the boolean ``feature_rows`` is true (all rows when it is None).
    """
    check_batch_size(batch_size)
    device = resolve_device(model, device)
    captured: list[torch.Tensor] = []
    handle = None
    if layer is not None:
        def hook(_module, inputs):
            captured.append(inputs[0].detach())
        handle = layer.register_forward_pre_hook(hook)
    logits_out, feats_out, labels_out = [], [], []
    offset = 0
    try:
        with eval_mode(model):
            for x, y in make_loader(dataset, batch_size=batch_size):
                y = torch.as_tensor(y).long().reshape(-1)
                n = y.numel()
                captured.clear()
                out = model(x.to(device))
                if want_logits:
                    logits_out.append(out.detach().float().cpu())
                if layer is not None:
                    if len(captured) != 1:
                        raise RuntimeError(
                            f"the probed layer ran {len(captured)} times in one forward; expected "
                            "exactly once (pass the penultimate layer explicitly with layer=...)")
                    f = captured[0]
                    if f.shape[0] != n:
                        raise RuntimeError(f"the probed layer's input has batch dimension "
                                           f"{f.shape[0]}, expected {n}")
                    f = f.reshape(n, -1).float().cpu()
                    if feature_rows is not None:
                        f = f[feature_rows[offset:offset + n]]
                    feats_out.append(f)
                labels_out.append(y)
                offset += n
    finally:
        if handle is not None:
            handle.remove()
    labels = torch.cat(labels_out) if labels_out else torch.empty(0, dtype=torch.long)
    logits = (torch.cat(logits_out) if logits_out else torch.empty(0, 0)) if want_logits else None
    feats = (torch.cat(feats_out) if feats_out else torch.empty(0, 0)) if layer is not None else None
    return logits, feats, labels


@model_entry
def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int = 512,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``model`` in eval mode over ``dataset``, both on the CPU."""
    logits, _, labels = forward_collect(model, dataset, batch_size=batch_size, device=device)
    return logits, labels


@model_entry
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 512, device=None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (nan for an empty dataset)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return float("nan")
    logits, labels = predict_logits(model, dataset, batch_size, device)
    return (logits.argmax(1) == labels).float().mean().item()


@model_entry
def per_class_accuracy(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 512,
                       device=None) -> list[float]:
    """Accuracy per class (nan where a class has no sample)."""
    logits, labels = predict_logits(model, dataset, batch_size, device)
    pred = logits.argmax(1) if logits.numel() else labels
    out = []
    for c in range(num_classes):
        sel = labels == c
        out.append((pred[sel] == c).float().mean().item() if sel.any() else float("nan"))
    return out
