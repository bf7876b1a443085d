"""The two fused ops, as typed Python wrappers over ``torch.ops.dfmu_ext``.

Both ops are declared once in ``csrc/ops.cpp`` and implemented per dispatch key (CPU, CUDA); the
fake (meta) implementations below let them trace under ``torch.compile(fullgraph=True)``.

Argument errors have one source: the C++ validators shared by both backends
(``csrc/block_importance.h``, ``csrc/channel_masks.h``), which raise ``TypeError`` / ``ValueError``
through the dispatcher before any tensor is touched. The wrappers add no checks of their own.
``python -m dfmu_ext.buildcheck`` checks that such errors reach Python whole on this build (a
library with its own static libstdc++ cuts or crashes them: the suspected cause of the process
deaths once seen on the lent GPU machine's torch 2.11 build).
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _loader  # noqa: F401  (loads the compiled library, registering the ops)

__all__ = ["block_importance", "apply_channel_masks_", "REDUCE_MODES"]

REDUCE_MODES = ("abs", "square", "signed")


def block_importance(act: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor | None = None,
                     num_groups: int = 1, channel_dim: int = 1, reduce: str = "abs", *,
                     act_scale: torch.Tensor | None = None, act_shift: torch.Tensor | None = None,
                     check_groups: bool = True) -> torch.Tensor:
    r"""Per-group, per-unit gradient x activation importance in one read of ``act`` and ``grad``.

    For a sample :math:`n` and unit (channel) :math:`c`,

    .. math::
        a_{n,p,c} = \mathrm{act}_{n,p,c}\, \sigma_c + \tau_c, \qquad
        s_{n,c} = \sum_{p} a_{n,p,c}\, g_{n,p,c}, \qquad
        I_{k,c} = \sum_{n:\ \mathrm{groups}_n = k} r(s_{n,c}),

    where :math:`\sigma` = ``act_scale`` and :math:`\tau` = ``act_shift`` (1 and 0 when omitted),
    :math:`p` runs over every non-batch, non-channel position and :math:`r` is
    :math:`|\cdot|` (``"abs"``, first-order Taylor importance, Molchanov et al. 2017),
    :math:`(\cdot)^2` (``"square"``, a Fisher-like score) or the identity (``"signed"``).
    :math:`s_{n,c}` is the first-order change of sample :math:`n`'s loss if unit :math:`c` were
    zeroed, so :math:`I_{k,c}` says how much group :math:`k` relies on the unit.

    Args:
        act, grad: same shape ``(N, ...)``, batch first; float16, bfloat16, float32 or float64.
            NCHW-contiguous and channels_last layouts are read in place; other strides are copied once.
        groups: optional int tensor ``(N,)`` of group ids in ``[0, num_groups)``; ``None`` puts every
            sample in group 0.
        num_groups: number of output rows ``K >= 1``.
        channel_dim: the unit axis (negative allowed, never 0).
        reduce: ``"abs"``, ``"square"`` or ``"signed"``.
        act_scale, act_shift: optional ``(C,)`` per-unit affine applied to ``act`` as it is read. An
            eval-mode BatchNorm is such an affine (:math:`\sigma = \gamma/\sqrt{v+\epsilon}`,
            :math:`\tau = \beta - \mu\sigma`), so a norm's output can be scored from its *input*,
            which autograd keeps for the backward anyway: no copy of the output is held.
        check_groups: verify that every id lies in ``[0, num_groups)`` (one device sync on CUDA).
            Pass False only for ids already known to be in range (e.g. validated once for many
            calls); out-of-range ids are then ignored, never read or written out of bounds. Above 32
            groups the ids are always checked (the CUDA kernel's sorted path needs valid ids).

    Returns:
        ``(num_groups, C)`` float32 (float64 for float64 inputs). Accumulation is in float32/float64
        and deterministic: equal inputs give bit-identical outputs.
    """
    return torch.ops.dfmu_ext.block_importance.default(act, grad, groups, int(num_groups), int(channel_dim),
                                                        str(reduce), act_scale, act_shift, bool(check_groups))


def apply_channel_masks_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    r"""In place, for every ``i``: ``tensors[i][u, ...] *= masks[i][u]`` for every unit ``u`` of dim 0.

    ``masks[i]`` is 1-D with one value per unit: 0/1 to prune, :math:`\beta \in [0, 1]` to dampen.
    Products are computed in float32 (float64 for float64 tensors) and rounded once. On CUDA the
    whole list is processed in a few multi-tensor launches, not one per tensor. Every argument is
    validated before any tensor is written: a rejected call modifies nothing.
    """
    tensors, masks = list(tensors), list(masks)
    if not tensors and not masks:
        return  # the dispatcher needs at least one tensor to pick a kernel
    torch.ops.dfmu_ext.apply_channel_masks_.default(tensors, masks)


@torch.library.register_fake("dfmu_ext::block_importance")
def _block_importance_fake(act, grad, groups, num_groups, channel_dim, reduce, act_scale=None, act_shift=None,
                           check_groups=True):
    torch._check(act.dim() >= 2, lambda: "block_importance: act must have a batch and a channel dimension")
    torch._check(act.shape == grad.shape, lambda: "block_importance: act and grad must have the same shape")
    torch._check(num_groups >= 1, lambda: "block_importance: num_groups must be >= 1")
    dtype = torch.float64 if act.dtype == torch.float64 else torch.float32
    return act.new_empty((num_groups, act.size(channel_dim)), dtype=dtype)


@torch.library.register_fake("dfmu_ext::apply_channel_masks_")
def _apply_channel_masks_fake(tensors, masks):
    torch._check(len(tensors) == len(masks), lambda: "apply_channel_masks_: one mask per tensor")
    return None
