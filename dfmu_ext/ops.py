"""The two fused ops, as typed Python wrappers over ``torch.ops.dfmu_ext``.

Both ops are declared once in ``csrc/ops.cpp`` and implemented per dispatch key (CPU, CUDA); the
fake (meta) implementations below let them trace under ``torch.compile(fullgraph=True)``.
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
            calls); out-of-range ids are then ignored, never read or written out of bounds.

    Returns:
        ``(num_groups, C)`` float32 (float64 for float64 inputs). Accumulation is in float32/float64
        and deterministic: equal inputs give bit-identical outputs.
    """
    _check_importance_args(act, grad, groups, num_groups, channel_dim, reduce, act_scale, act_shift,
                           bool(check_groups))
    # The ids were range-checked above (when asked): the kernel need not repeat the device sync.
    return torch.ops.dfmu_ext.block_importance.default(act, grad, groups, int(num_groups), int(channel_dim),
                                                        str(reduce), act_scale, act_shift, False)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Above this many groups the CUDA kernel segments the batch by sorting, which needs valid ids (and
#: syncs anyway), so the range is always checked there (csrc/cuda/launch.h: kMaxDirectGroups).
_MAX_DIRECT_GROUPS = 32


def _check_importance_args(act, grad, groups, num_groups, channel_dim, reduce, act_scale=None, act_shift=None,
                           check_range=True) -> None:
    """The C++ kernels check the same things; checking here first gives the same messages without
    relying on C++ exceptions crossing the dispatcher (which crashed on one torch 2.11 build)."""
    if torch.compiler.is_compiling():
        return
    if not isinstance(act, torch.Tensor) or not isinstance(grad, torch.Tensor):
        raise TypeError("block_importance: act and grad must be tensors")
    if act.dim() < 2:
        raise ValueError(f"block_importance: act must have a batch and a channel dimension, got shape {tuple(act.shape)}")
    if act.shape != grad.shape:
        raise ValueError(f"block_importance: act and grad must have the same shape, got {tuple(act.shape)} and "
                         f"{tuple(grad.shape)}")
    if act.device != grad.device:
        raise ValueError(f"block_importance: act is on {act.device} but grad is on {grad.device}")
    if act.dtype != grad.dtype:
        raise TypeError(f"block_importance: act and grad must have the same dtype, got {act.dtype} and {grad.dtype}")
    if act.dtype not in _FLOATS:
        raise TypeError(f"block_importance: act and grad must be float16, bfloat16, float32 or float64, got {act.dtype}")
    if not -act.dim() <= channel_dim < act.dim():
        raise ValueError(f"block_importance: channel_dim {channel_dim} is out of range for a {act.dim()}-D act")
    if channel_dim % act.dim() == 0:
        raise ValueError("block_importance: channel_dim must not be the batch dimension 0")
    if reduce not in REDUCE_MODES:
        raise ValueError(f"block_importance: reduce must be 'abs', 'square' or 'signed', got '{reduce}'")
    if num_groups < 1:
        raise ValueError(f"block_importance: num_groups must be >= 1, got {num_groups}")
    if groups is not None:
        if groups.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"block_importance: groups must be an int64 or int32 tensor, got {groups.dtype}")
        if groups.dim() != 1 or groups.shape[0] != act.shape[0]:
            raise ValueError(f"block_importance: groups must be 1-D with one id per sample ({act.shape[0]}), got "
                             f"shape {tuple(groups.shape)}")
        if groups.device != act.device:
            raise ValueError(f"block_importance: groups is on {groups.device} but act is on {act.device}")
        if groups.numel() and (check_range or num_groups > _MAX_DIRECT_GROUPS):
            bounds = torch.aminmax(groups)  # one reduction and one device->host copy (a single sync)
            lo, hi = torch.stack([bounds.min, bounds.max]).tolist()
            if lo < 0 or hi >= num_groups:
                raise ValueError(f"block_importance: group ids must lie in [0, num_groups={num_groups}), got ids "
                                 f"in [{lo}, {hi}]")
    units = act.shape[channel_dim]
    for name, v in (("act_scale", act_scale), ("act_shift", act_shift)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"block_importance: {name} must be a floating-point tensor, got "
                            f"{getattr(v, 'dtype', type(v).__name__)}")
        if v.dim() != 1 or v.shape[0] != units:
            raise ValueError(f"block_importance: {name} must be 1-D with one value per unit ({units}), got shape "
                             f"{tuple(v.shape)}")
        if v.device != act.device:
            raise ValueError(f"block_importance: {name} is on {v.device} but act is on {act.device}")


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
    if torch.compiler.is_compiling():
        torch.ops.dfmu_ext.apply_channel_masks_.default(tensors, masks)
        return
    if len(tensors) != len(masks):
        raise ValueError(f"apply_channel_masks_: got {len(tensors)} tensors but {len(masks)} masks")
    # The same kernel, validating first and reporting a problem instead of throwing: one call, C++-speed
    # checks (a Python loop over a ResNet-50's 161 tensors cost ~150 us), no C++ exception crossing the
    # dispatcher (which crashed on one torch 2.11 build).
    problem = torch.ops.dfmu_ext.try_apply_channel_masks_.default(tensors, masks)
    if problem:
        _raise_mask_problem(problem >> 32, problem & 0xFFFFFFFF, tensors, masks)


# try_apply_channel_masks_'s problem codes (csrc/channel_masks.h: ProblemCode) -> (exception, message
# from index i, tensors t, masks m); the words are the C++ op's own (problem_message).
_MASK_PROBLEMS = {
    1: (TypeError, lambda i, t, m: f"tensors[{i}] must be float16, bfloat16, float32 or float64, got {t[i].dtype}"),
    2: (TypeError, lambda i, t, m: f"masks[{i}] must be a floating-point tensor, got {m[i].dtype}"),
    3: (ValueError, lambda i, t, m: f"tensors[{i}] must have a unit dimension 0, got a 0-D tensor"),
    4: (ValueError, lambda i, t, m: f"masks[{i}] must be 1-D, got shape {tuple(m[i].shape)}"),
    5: (ValueError, lambda i, t, m: f"masks[{i}] has {m[i].shape[0]} values but tensors[{i}] has {t[i].shape[0]} "
                                    "units in dim 0"),
    6: (ValueError, lambda i, t, m: f"tensors[{i}] is on {t[i].device} but masks[{i}] is on {m[i].device}"),
    7: (ValueError, lambda i, t, m: f"tensors[{i}] is on {t[i].device} but tensors[0] is on {t[0].device}"),
    8: (ValueError, lambda i, t, m: f"tensors[0] is on {t[0].device}, which this build has no kernel for"),
    9: (ValueError, lambda i, t, m: f"got {len(t)} tensors but {len(m)} masks"),
}


def _raise_mask_problem(code: int, i: int, tensors, masks) -> None:
    """Raise the exception for try_apply_channel_masks_'s (code, index)."""
    exc, message = _MASK_PROBLEMS.get(code, _MASK_PROBLEMS[9])
    raise exc("apply_channel_masks_: " + message(i, tensors, masks))


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


@torch.library.register_fake("dfmu_ext::try_apply_channel_masks_")
def _try_apply_channel_masks_fake(tensors, masks):
    torch._check(len(tensors) == len(masks), lambda: "apply_channel_masks_: one mask per tensor")
    return 0
