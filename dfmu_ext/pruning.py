"""Masked-weight pruning: every affected tensor of the whole model scaled by its unit mask in one
fused multi-tensor op call (weights, biases, norm affines, and during fine-tuning the optimizer
state that would otherwise regrow a pruned unit).

The classifier is not channel-pruned; its *rows* for the forget classes are handled by
``suppress_head``: weight rows zeroed (masked) and biases set to a very low logit, so the head never
predicts a forgotten class — the retrained model's head behaves the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import ops
from .blocks import Block

# The logit a forgotten class is pinned to: exp(-1e4) is 0 in every float format (and fp16-safe).
SUPPRESSED_LOGIT = -1.0e4


@dataclass
class MaskPlan:
    """Which tensors get which mask: built once, applied after every optimizer step."""

    params: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)   # the dim of each tensor that indexes its units

    def add(self, tensor: torch.Tensor, mask: torch.Tensor, dim: int = 0) -> None:
        """Mask ``tensor`` along ``dim`` (0: output units; 1: a Linear's input features, e.g. an MLP's
        neurons as its down projection reads them)."""
        if mask.dim() != 1 or mask.numel() != tensor.shape[dim]:
            raise ValueError(f"a mask of {mask.numel()} values does not fit dim {dim} of a tensor of shape "
                             f"{tuple(tensor.shape)}")
        self.params.append(tensor)
        self.masks.append(mask)
        self.dims.append(dim)

    def tensors_and_masks(self, optimizer=None):
        """The parameters and, with ``optimizer``, every state tensor of the same shape (momentum, Adam moments).

        ``optimizer``: anything with a ``torch.optim``-style ``state`` dict (``{param: {name: tensor}}``),
        e.g. a ``torch.optim.Optimizer`` or the fine-tune's ``MomentumSGD``."""
        tensors, masks = [], []
        dims = self.dims if len(self.dims) == len(self.params) else [0] * len(self.params)
        for p, m, dim in zip(self.params, self.masks, dims):
            # the op scales dim 0: another unit dim is read through a transposed view (masked in place)
            units_first = (lambda t: t) if dim == 0 else (lambda t, d=dim: t.transpose(0, d))
            tensors.append(units_first(p.data))
            masks.append(m)
            if optimizer is not None:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                        tensors.append(units_first(value))
                        masks.append(m)
        return tensors, masks

    @torch.no_grad()
    def apply(self, optimizer=None) -> None:
        tensors, masks = self.tensors_and_masks(optimizer)
        ops.apply_channel_masks_(tensors, masks)


def build_mask_plan(blocks: list[Block], masks: dict[str, torch.Tensor], head: nn.Linear | None = None,
                    head_mask: torch.Tensor | None = None) -> MaskPlan:
    """A plan covering every block with a mask that is not all ones, plus the head's weight rows."""
    plan = MaskPlan()
    for b in blocks:
        m = masks.get(b.name)
        if m is None or bool(torch.all(m == 1)):
            continue
        if m.numel() != b.units:
            raise ValueError(f"mask for {b.name} has {m.numel()} values but the block has {b.units} units")
        for t in b.tensors():
            plan.add(t, m.to(t.device))
    if head is not None and head_mask is not None:
        plan.add(head.weight, head_mask.to(head.weight.device))
    return plan


def head_mask_for(head: nn.Linear, forget_classes) -> torch.Tensor:
    """1 for every class row, 0 for the forget classes."""
    m = torch.ones(head.out_features, dtype=torch.float32, device=head.weight.device)
    m[torch.as_tensor(sorted(set(forget_classes)), dtype=torch.long, device=m.device)] = 0.0
    return m


@torch.no_grad()
def suppress_head(head: nn.Linear, forget_classes) -> None:
    """Pin the forget classes' logits: their bias entries to SUPPRESSED_LOGIT (rows are masked)."""
    if head.bias is not None:
        idx = torch.as_tensor(sorted(set(forget_classes)), dtype=torch.long, device=head.bias.device)
        head.bias[idx] = SUPPRESSED_LOGIT
