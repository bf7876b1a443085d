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
accumulated: scoring changes nothing in the model. Token ids cannot carry a gradient: for a batch
with no floating-point input, the outputs of the model's ``nn.Embedding`` layers are cut from
the graph (detached, then made to require a gradient) and the backward is taken with respect to
them — still one forward and one backward, and still no parameter gradient.

Padding: for a token batch with an ``attention_mask`` :math:`m_{n,t}`, an ``(N, T, C)`` block
output is read as :math:`m_{n,t}\, g_{n,t,c}`, so padded positions add nothing to
:math:`\sum_p a_{n,p,c} g_{n,p,c}` even in a model whose pooling would let them reach the loss.

Memory: the pass keeps no activation that the backward does not keep anyway. An eval-mode
BatchNorm is a per-channel affine, :math:`a = z\sigma + \tau` with
:math:`\sigma = \gamma/\sqrt{v + \epsilon}`, :math:`\tau = \beta - \mu\sigma`, and autograd saves its
input :math:`z` for the backward; the op reads :math:`z` and applies the affine as it reads, so the
norm's output need not be held (holding every block's output until its gradient arrived cost
+55% peak memory on a ResNet-18). Each held input is released as soon as its gradient is consumed.
Hooks are attached as the forward runs, before an in-place op (a ReLU) can rebase the tensor.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._common import eval_mode
from .blocks import BATCH_NORMS, Block, BlockTracer
from .distributed import Comm
from .model_io import Inputs, is_token_batch, padding_mask

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


def _folded_batchnorm(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) with ``norm(z) == z * scale + shift`` per channel, for a BatchNorm that uses
    its running statistics (eval mode); None when the norm normalises with batch statistics."""
    if not isinstance(norm, BATCH_NORMS) or norm.training or norm.running_mean is None or norm.running_var is None:
        return None
    with torch.no_grad():
        dtype = torch.float64 if norm.running_var.dtype == torch.float64 else torch.float32
        scale = torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.to(dtype)
        shift = -norm.running_mean.to(dtype) * scale
        if norm.bias is not None:
            shift = shift + norm.bias.to(dtype)
    return scale, shift


class EmbeddingCut:
    """Forward hooks that replace every ``nn.Embedding`` output by a detached copy that requires a
    gradient: the points the backward of a token batch is taken at."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def _cut(self, _module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            output = output.detach().requires_grad_(True)
            self.outputs.append(output)
            return output
        return None

    def __enter__(self) -> "EmbeddingCut":
        for m in self.model.modules():
            if isinstance(m, nn.Embedding):
                self._handles.append(m.register_forward_hook(self._cut))
        if not self._handles:
            raise ValueError("the inputs are integer tokens and the model has no nn.Embedding to score at: give "
                             "floating-point inputs or a model that embeds its tokens with nn.Embedding")
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _grad_inputs(x):
    """``x`` with every floating-point tensor detached and made to require a gradient; integer
    tensors (token ids, masks) are passed as they are: the backward of a token batch is taken at the
    embedding outputs (:class:`EmbeddingCut`), for a plain ``LongTensor`` batch as for dict samples."""
    def grad_leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True) if t.is_floating_point() else t

    return x.map(grad_leaf) if isinstance(x, Inputs) else grad_leaf(x)


def score_blocks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, forget_classes=None, *,
                 forget_mask: torch.Tensor | None = None, reduce: str = "abs",
                 comm: Comm | None = None) -> ScoringResult:
    """Run the scoring pass (one forward, one backward) and return blocks, scores and counts.

    The forget group is ``forget_classes``' samples, or where ``forget_mask`` is true (exactly one
    of the two). The model's parameters, buffers, gradients and train/eval mode are left as they were. With a
    process-group ``comm``, ``(x, y)`` is this rank's shard and the (tiny) scores and counts are
    summed over ranks. Raises FloatingPointError on a non-finite loss, ValueError on unusable inputs.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs and labels disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("the scoring batch is empty")
    if (forget_classes is None) == (forget_mask is None):
        raise ValueError("give exactly one of forget_classes and forget_mask")
    if forget_mask is None:
        forget = torch.as_tensor(sorted(set(int(c) for c in forget_classes)), dtype=torch.long, device=y.device)
        forget_mask = torch.isin(y, forget)
    groups = torch.as_tensor(forget_mask, dtype=torch.bool).to(y.device).reshape(-1).long()
    if groups.numel() != y.shape[0]:
        raise ValueError(f"forget_mask has {groups.numel()} entries for a batch of {y.shape[0]} samples")

    scores: dict[str, torch.Tensor] = {}
    held: dict[nn.Module, tuple] = {}        # module -> (tensor to read, act_scale, act_shift)
    handles: dict[nn.Module, object] = {}    # module -> its gradient hook
    seen: set[nn.Module] = set()
    block_of: dict[nn.Module, Block] = {}    # output module -> block, known once the forward is done
    group_ids: torch.Tensor | None = None
    tracer: BlockTracer
    pad = padding_mask(x)  # (N, T), 1 = a real token

    def drop(module: nn.Module) -> None:
        held.pop(module, None)
        handle = handles.pop(module, None)
        if handle is not None:
            handle.remove()

    def on_grad(module: nn.Module, grad: torch.Tensor) -> None:
        entry = held.pop(module, None)  # release the activation as soon as it has been used
        block = block_of.get(module)
        if entry is None or block is None:
            return
        act, scale, shift = entry
        if pad is not None and act.dim() == 3 and _channel_dim(block) == -1 and act.shape[:2] == pad.shape:
            grad = grad * pad.to(grad.device, grad.dtype).unsqueeze(-1)  # padded positions add nothing
        # group_ids are 0/1 by construction: no range check, so no device sync per block.
        scores[block.name] = ops.block_importance(act.detach(), grad.detach(), group_ids, 2, _channel_dim(block),
                                                  reduce, act_scale=scale, act_shift=shift, check_groups=False)

    def on_output(module: nn.Module, norm_input: torch.Tensor | None, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        if module in seen:  # called twice in one forward: no single output to score
            drop(module)
            return
        seen.add(module)
        if norm_input is None:
            held[module] = (output, None, None)
        else:
            producer = tracer.producer_of(norm_input)
            if producer is not None and producer in held and tracer.norm_belongs_to(module, producer):
                drop(producer)  # the layer is scored after its norm
            fold = _folded_batchnorm(module)
            held[module] = (norm_input, *fold) if fold is not None else (output, None, None)
        handles[module] = output.register_hook(functools.partial(on_grad, module))

    with eval_mode(model):
        try:
            tokens = is_token_batch(x)
            x_in = _grad_inputs(x)
            cut = EmbeddingCut(model) if tokens else contextlib.nullcontext()
            with cut, BlockTracer(model, on_output=on_output) as tracer:
                try:
                    logits = model(x_in)
                except RuntimeError as exc:
                    raise ValueError(f"the model rejected the scoring batch of shape {tuple(x.shape)}: "
                                     f"{exc}") from exc
            grad_at = cut.outputs if tokens else [t for t in (x_in.values() if isinstance(x_in, Inputs) else [x_in])
                                                  if t.requires_grad]
            if tokens and not cut.outputs:
                raise ValueError("the model's nn.Embedding layers were not called on the token inputs: nothing to "
                                 "score at")
            blocks = tracer.blocks()
            block_of.update({b.output_module: b for b in blocks})
            for module in list(held):  # outputs that are no block's: nothing to hold
                if module not in block_of:
                    drop(module)
            if logits.dim() != 2 or int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                raise ValueError(f"labels must index the model's {logits.shape[-1]} class outputs")
            # fp16/bf16 logits are summed in fp32; fp32/fp64 keep their own precision.
            lowp = logits.dtype in (torch.float16, torch.bfloat16)
            loss = F.cross_entropy(logits.float() if lowp else logits, y, reduction="sum")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the scoring loss is {loss.item()}: the model or the batch has NaN/inf")
            group_ids = groups.to(logits.device)
            torch.autograd.backward(loss, inputs=grad_at)
        finally:
            for module in list(handles):
                drop(module)
            held.clear()

    for b in blocks:  # a block whose output does not reach the loss has zero importance
        if b.name not in scores:
            scores[b.name] = torch.zeros(2, b.units, device=logits.device)
    scores = {b.name: scores[b.name] for b in blocks}  # execution order (hooks fire in reverse)
    counts = torch.stack([(groups == RETAIN).sum(), (groups == FORGET).sum()]).to(logits.device, torch.float64)
    ordered = [scores[b.name] for b in blocks] + [counts]
    (comm or Comm()).all_reduce_sum_(ordered)
    return ScoringResult(blocks, scores, counts.cpu(), float(loss.item()), logits.detach())
