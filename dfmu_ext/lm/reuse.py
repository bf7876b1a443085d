r"""What the causal-LM fine-tune need not compute again or at all, told exactly: a key equal for two
inputs only when they are the same (the distillation teacher's logits are reused per distinct batch),
and whether the input embedding enters a loss's graph only through lookups (a term whose tokens
hold none of the trained rows then adds exactly zero to the embedding's gradient, and its backward
may stop above the embedding). Used by :class:`dfmu_ext.tasks.lm_finetune.LMObjective`.
"""
from __future__ import annotations

import torch

__all__ = ["exact_key", "lookups_only"]


def lookups_only(term: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``weight`` enters ``term``'s autograd graph only through embedding lookups (no tied
    output head, no other use), so that its gradient can be nonzero only on the looked-up rows."""
    uses, seen, stack = [], set(), [term.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None and getattr(child, "variable", None) is weight:
                uses.append(type(node).__name__)
            elif child is not None:
                stack.append(child)
    return bool(uses) and all(u.startswith("EmbeddingBackward") for u in uses)


def exact_key(value):
    """A hashable value equal for two inputs exactly when they are the same (a tensor: its dtype, shape
    and bytes; any dtype, bfloat16 too)."""
    if not isinstance(value, torch.Tensor):
        return repr(value)
    raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return value.dtype, tuple(value.shape), raw.numpy().tobytes()
