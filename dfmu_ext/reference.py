"""Pure-PyTorch definitions of the two ops, computed in float64: the tests' oracle.

Written for clarity, not speed; they share no code with the kernels.
"""
from __future__ import annotations

from typing import Sequence

import torch


def block_importance(act: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor | None = None,
                     num_groups: int = 1, channel_dim: int = 1, reduce: str = "abs",
                     compute_dtype: torch.dtype = torch.float64, act_scale: torch.Tensor | None = None,
                     act_shift: torch.Tensor | None = None) -> torch.Tensor:
    """``out[k, c] = sum_{n: groups[n]=k} r(sum_{p} a[n,..c..] * grad[n,..c..])`` in ``compute_dtype``,
    with ``a = act * act_scale[c] + act_shift[c]`` (``act`` itself when both are None).

    Group ids outside ``[0, num_groups)`` are dropped (what the op does with ``check_groups=False``).
    ``compute_dtype=act.dtype`` gives "the same computation in the input's own precision", whose
    error against the float64 result calibrates the tolerance for low-precision inputs.
    """
    cd = channel_dim % act.dim()
    a = act.to(compute_dtype).movedim(cd, 1)
    unit_shape = (1, -1) + (1,) * (a.dim() - 2)
    if act_scale is not None:
        a = a * act_scale.to(compute_dtype).reshape(unit_shape)
    if act_shift is not None:
        a = a + act_shift.to(compute_dtype).reshape(unit_shape)
    g = grad.to(compute_dtype).movedim(cd, 1)
    s = (a * g).reshape(a.shape[0], a.shape[1], -1).sum(-1)  # (N, C)
    if reduce == "abs":
        r = s.abs()
    elif reduce == "square":
        r = s * s
    elif reduce == "signed":
        r = s
    else:
        raise ValueError(f"unknown reduce {reduce!r}")
    ids = torch.zeros(a.shape[0], dtype=torch.long, device=act.device) if groups is None else groups.long()
    keep = (ids >= 0) & (ids < num_groups)
    out = torch.zeros(num_groups, a.shape[1], dtype=compute_dtype, device=act.device)
    out.index_add_(0, ids[keep], r[keep])
    return out


def apply_channel_masks(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors ``t * m`` broadcast along dim 0, the product taken in float64 and rounded once.

    The mask's values are those of the op's math precision: float32 unless ``t`` is float64.
    """
    out = []
    for t, m in zip(tensors, masks):
        shape = (-1,) + (1,) * (t.dim() - 1)
        m = m.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        out.append((t.double() * m.double().reshape(shape)).to(t.dtype))
    return out


def neighbour_targets(forget_features: torch.Tensor, retain_features: torch.Tensor, retain_labels: torch.Tensor,
                      num_classes: int, k: int) -> torch.Tensor:
    """Label histograms of each forget sample's ``k`` most cosine-similar retain samples, one sample
    at a time in float64 (ties: lower index first), as a plain loop."""
    f = forget_features.double()
    r = retain_features.double()
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, r.shape[0])
    out = torch.zeros(f.shape[0], num_classes, dtype=torch.float64)
    for i in range(f.shape[0]):
        sims = [(float(torch.dot(f[i], r[j])), j) for j in range(r.shape[0])]
        sims.sort(key=lambda s: (-s[0], s[1]))
        for _, j in sims[:k]:
            out[i, int(retain_labels[j])] += 1.0 / k
    return out


def own_token_floor(logits: torch.Tensor, q_dense: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor,
                    floor: float) -> torch.Tensor:
    """The LM forget term's own-token floor as a plain loop in float64: for every scored position
    ``(i, t)`` whose own next token ``y = labels[i, t + 1]`` has target weight ``q_dense[i, t, y] <
    floor``, ``max(0, log softmax(logits[i, t])[y] - log floor)``; summed and divided by the number
    of scored positions."""
    total = logits.double().sum() * 0.0   # (a graph even where nothing is floored)
    for i in range(scored.shape[0]):
        for t in range(scored.shape[1]):
            if not bool(scored[i, t]) or float(q_dense[i, t].sum()) == 0.0:
                continue
            y = int(labels[i, t + 1])
            if float(q_dense[i, t, y]) >= floor:
                continue
            logp = torch.log_softmax(logits[i, t].double(), dim=0)[y]
            total = total + torch.clamp(logp - torch.log(torch.tensor(floor, dtype=torch.float64)), min=0.0)
    return total / max(int(scored.sum()), 1)
