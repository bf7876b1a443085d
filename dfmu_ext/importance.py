r"""The one scoring pass: per-block forget and retain importance from one forward and one backward.

With the model in eval mode (BatchNorm uses its running statistics, so every sample's gradient is
its own), one batch holding forget and retain samples goes forward, and
:math:`L = \sum_n \mathrm{CE}(f(x_n), y_n)` goes backward. At each block's output
:math:`a` (after its norm) a gradient hook hands :math:`a` and :math:`g = \partial L/\partial a` to
the fused ``block_importance`` op, which returns for every group :math:`k` and unit :math:`c`

.. math:: I_{k,c} = \sum_{n \in k} \Big| \sum_p a_{n,p,c}\, g_{n,p,c} \Big|,

the first-order (Taylor) estimate of how much group :math:`k`'s loss would change if the unit
were removed (Molchanov et al., 2017). Group 0 is the retain samples, group 1 the forget samples.
The backward is taken with respect to the *input* only, so no parameter gradient is computed or
accumulated: scoring changes nothing in the model, and each activation is released as soon as its
gradient has been consumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .blocks import Block, BlockTracer

RETAIN, FORGET = 0, 1


@dataclass
class ScoringResult:
    blocks: list[Block]
    scores: dict[str, torch.Tensor]   # block name -> (2, units) float32: row 0 retain, row 1 forget
    counts: torch.Tensor              # (2,) samples per group (summed over ranks under torch.distributed)
    loss: float
    logits: torch.Tensor              # the pass's logits (detached), e.g. for the pre-pruning accuracy


def _channel_dim(block: Block) -> int:
    # Linear outputs carry units last ((N, C) or (N, T, C)); conv and norm outputs carry them in dim 1.
    return -1 if isinstance(block.layer, nn.Linear) else 1


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tiny score tensors over ranks in one collective (never activations)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1).to(tensors[0].device, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def score_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forget_classes, *,
                 reduce: str = "abs") -> ScoringResult:
    """Run the scoring pass (one forward, one backward) and return blocks, scores and counts.

    The model's parameters, buffers, gradients and train/eval mode are left as they were.
    Raises FloatingPointError on a non-finite loss, ValueError on unusable inputs.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and labels disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("the scoring batch is empty")
    forget = torch.as_tensor(sorted(set(int(c) for c in forget_classes)), dtype=torch.long, device=y.device)
    groups = torch.isin(y, forget).long()

    was_training = model.training
    model.eval()
    handles = []
    scores: dict[str, torch.Tensor] = {}
    try:
        x_in = x.detach().clone().requires_grad_(True)
        with BlockTracer(model, capture=True) as tracer:
            try:
                logits = model(x_in)
            except RuntimeError as exc:
                raise ValueError(f"the model rejected the scoring batch of shape {tuple(x.shape)}: {exc}") from exc
        blocks = tracer.blocks()
        if logits.dim() != 2 or int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
            raise ValueError(f"labels must index the model's {logits.shape[-1]} class outputs")
        # fp16/bf16 logits are summed in fp32; fp32/fp64 keep their own precision.
        lowp = logits.dtype in (torch.float16, torch.bfloat16)
        loss = F.cross_entropy(logits.float() if lowp else logits, y, reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the scoring loss is {loss.item()}: the model or the batch has NaN/inf")
        group_ids = groups.to(logits.device)

        pending = {b.name: tracer.outputs[b.output_module] for b in blocks}
        tracer.outputs.clear()

        def hook_for(block: Block):
            def on_grad(grad: torch.Tensor):
                act = pending.pop(block.name)  # release the activation as soon as it has been used
                scores[block.name] = ops.block_importance(act.detach(), grad.detach(), group_ids, 2,
                                                          _channel_dim(block), reduce)
            return on_grad

        for b in blocks:
            out = pending[b.name]
            if out.requires_grad:
                handles.append(out.register_hook(hook_for(b)))
        torch.autograd.backward(loss, inputs=[x_in])
        pending.clear()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    for b in blocks:  # a block whose output does not reach the loss has zero importance
        if b.name not in scores:
            scores[b.name] = torch.zeros(2, b.units, device=logits.device)
    scores = {b.name: scores[b.name] for b in blocks}  # execution order (hooks fire in reverse)
    counts = torch.stack([(groups == RETAIN).sum(), (groups == FORGET).sum()]).to(logits.device, torch.float64)
    ordered = [scores[b.name] for b in blocks] + [counts]
    _all_reduce_sum(ordered)
    return ScoringResult(blocks, scores, counts.cpu(), float(loss.item()), logits.detach())
