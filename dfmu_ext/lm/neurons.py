r"""The MLP neurons of a language model: which they are, one scoring pass over them, and their masks.

A transformer block's MLP maps the hidden state up to :math:`m` neurons and back down:
:math:`h = \phi(x W_{up})` (Llama: :math:`\phi(x W_{gate}) \odot x W_{up}`), then :math:`h W_{down}`.
Neuron :math:`c` is feature :math:`c` of :math:`h`, the *input* of the down projection. So the
neurons are found generically: a layer (``nn.Linear``, or the ``Conv1D`` of GPT-2 in
``transformers``) called once per forward that narrows its input (``in > out``) while a sibling
in the same parent module widens its input to exactly that width (``out == in`` of the narrowing
one, ``out > in``) is a down projection, and its input features are the neurons. An attention
block's projections never match (GPT-2's ``c_attn`` widens, but its ``c_proj`` does not narrow;
a grouped-query ``k_proj`` narrows but no sibling widens to its input width).

**Scoring.** For sequences :math:`n` with next-token loss :math:`\ell_n` summed over their scored
tokens (:mod:`dfmu_ext.lm.task`), one forward and one backward of :math:`L = \sum_n \ell_n` give,
at every down projection's input :math:`h_{n,t,c}` and its gradient :math:`g_{n,t,c}`,

.. math:: I_{k,c} = \sum_{n \in k} \Big| \sum_{t} m_{n,t}\, h_{n,t,c}\, g_{n,t,c} \Big|,

the first-order change of group :math:`k`'s loss if neuron :math:`c` were removed (exactly
:math:`h_c \partial L/\partial h_c`, also for Llama's gated MLP), :math:`m` the attention mask, computed by
the fused ``block_importance`` op. Token ids carry no gradient: the backward is taken at the
embeddings' outputs (:class:`dfmu_ext.importance.EmbeddingCut`), so no parameter gradient is made.

**Masking.** Zeroing neuron :math:`c` zeroes column :math:`c` of :math:`W_{down}` (row :math:`c` of
a ``Conv1D``'s weight): whatever :math:`h_c` is, it adds exactly nothing to the block's output.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .._common import eval_mode
from ..importance import EmbeddingCut
from ..model_io import Inputs, adapted
from ..pruning import MaskPlan
from .task import sequence_nll

RETAIN, FORGET = 0, 1


def _is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear with a transposed (in, out) weight)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and module.weight.dim() == 2


def _widths(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a Linear or Conv1D."""
    w = module.weight
    return (int(w.shape[0]), int(w.shape[1])) if _is_conv1d(module) else (int(w.shape[1]), int(w.shape[0]))


@dataclass
class NeuronLayer:
    """One MLP's neurons: the input features of its down projection ``layer``."""

    name: str            # qualified name of the down projection
    layer: nn.Module
    units: int           # neurons (the down projection's input width)
    unit_dim: int        # the weight's dim that indexes them: 1 for nn.Linear, 0 for Conv1D
    depth: int           # execution order among the model's MLPs

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight


def mlp_neuron_layers(model: nn.Module, example: Inputs) -> list[NeuronLayer]:
    """The MLPs' down projections of ``model`` in execution order, found with one eval forward of
    ``example`` (a batch of inputs). Raises ValueError (one line) when there is none."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    order: list[nn.Module] = []

    def seen(module, _inputs):
        calls[module] = calls.get(module, 0) + 1
        if calls[module] == 1:
            order.append(module)

    handles = [m.register_forward_pre_hook(seen) for m in model.modules()
               if isinstance(m, nn.Linear) or _is_conv1d(m)]
    try:
        with adapted(model), eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    parent = {m: names[m].rpartition(".")[0] for m in order}
    layers: list[NeuronLayer] = []
    for m in order:
        n_in, n_out = _widths(m)
        if calls[m] != 1 or n_in <= n_out:
            continue
        widening = [s for s in order if s is not m and parent[s] == parent[m] and _widths(s)[1] == n_in
                    and _widths(s)[0] < n_in]
        if widening:
            layers.append(NeuronLayer(names[m], m, n_in, 0 if _is_conv1d(m) else 1, len(layers)))
    if not layers:
        raise ValueError("found no MLP in the model: no layer narrows back the width a sibling layer widened to "
                         "(an MLP's up and down projections)")
    return layers


def mlp_projections(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules beside the down projection ``layer`` in its MLP (its up and gate projections)."""
    name = {m: n for n, m in model.named_modules()}[layer]
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return [m for m in parent.children() if m is not layer and any(True for _ in m.parameters())]


def mlp_input_layers(model: nn.Module, layers: list[NeuronLayer]) -> list[NeuronLayer]:
    """The MLPs' other projections (up, gate) as :class:`NeuronLayer` records of their *input*
    features (the hidden state they read): ``unit_dim`` is the weight's input dim."""
    names = {m: n for n, m in model.named_modules()}
    out = []
    for l in layers:
        for m in mlp_projections(model, l.layer):
            if isinstance(m, nn.Linear) or _is_conv1d(m):
                out.append(NeuronLayer(names[m], m, _widths(m)[0], 0 if _is_conv1d(m) else 1, l.depth))
    return out


@dataclass
class NeuronScores:
    layers: list[NeuronLayer]
    scores: dict[str, torch.Tensor]   # layer name -> (2, units) float32: row 0 retain, row 1 forget
    counts: torch.Tensor              # (2,) sequences per group
    loss: float                       # the summed next-token loss of the batch


def score_neurons(model: nn.Module, inputs: Inputs, labels: torch.Tensor, forget_mask: torch.Tensor,
                  layers: list[NeuronLayer] | None = None, reduce: str = "abs", max_tokens: int = 8192,
                  comm=None) -> NeuronScores:
    """The scoring pass over the MLP neurons (one forward, one backward of the summed next-token
    loss of ``labels``' scored tokens). ``forget_mask`` (N,) marks the forget sequences. The model's
    parameters, gradients and modes are left as they were.

    The sequences go through in chunks of at most ``max_tokens`` positions (at least one sequence):
    :math:`I_{k,c}` is a sum over sequences of a per-sequence term, so the chunks' scores add up to
    the whole batch's, while the activations and the ``(n, T, vocab)`` logits are held for one chunk
    only (a 256-sequence scoring batch of a 1B model otherwise holds 64 fine-tune batches' worth).
    For the same reason, under a process group (``comm``: a :class:`dfmu_ext.distributed.Comm`) each
    rank scores its own shard and the scores, counts and loss are summed over ranks (in float64)."""
    if not isinstance(inputs, Inputs) or "input_ids" not in inputs:
        raise ValueError("a causal-LM scoring batch is an Inputs with 'input_ids'")
    n = int(inputs.shape[0])
    if n == 0:
        raise ValueError("the scoring batch is empty")
    if labels.shape != inputs["input_ids"].shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                         f"{tuple(inputs['input_ids'].shape)}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    groups = torch.as_tensor(forget_mask, dtype=torch.bool).reshape(-1).long()
    if groups.numel() != n:
        raise ValueError(f"forget_mask has {groups.numel()} entries for a batch of {n} sequences")
    layers = layers if layers is not None else mlp_neuron_layers(model, inputs[:1])
    per = max(1, max_tokens // max(1, int(labels.shape[1])))
    scores: dict[str, torch.Tensor] = {}
    total = 0.0
    device = None
    with eval_mode(model), adapted(model):
        for start in range(0, n, per):
            part, loss, device = _score_chunk(model, inputs[start:start + per], labels[start:start + per],
                                              groups[start:start + per], layers, reduce)
            total += loss
            for name, s in part.items():
                scores[name] = s if name not in scores else scores[name] + s
    for l in layers:
        if l.name not in scores:  # its output does not reach the loss
            scores[l.name] = torch.zeros(2, l.units, device=device)
    counts = torch.stack([(groups == RETAIN).sum(), (groups == FORGET).sum()]).double()
    if comm is not None and comm.world_size > 1:
        summed = torch.tensor([total], dtype=torch.float64)
        comm.all_reduce_sum_([*(scores[l.name] for l in layers), counts, summed])
        total = float(summed)
    return NeuronScores(layers, {l.name: scores[l.name] for l in layers}, counts, total)


def _score_chunk(model: nn.Module, inputs: Inputs, labels: torch.Tensor, groups: torch.Tensor,
                 layers: list[NeuronLayer], reduce: str) -> tuple[dict[str, torch.Tensor], float, torch.device]:
    """One chunk's forward and backward: each layer's ``(2, units)`` scores, the summed loss, the device."""
    by_module = {l.layer: l for l in layers}
    pad = inputs.get("attention_mask")
    scores: dict[str, torch.Tensor] = {}
    handles: list = []
    group_ids: list[torch.Tensor] = []

    def on_grad(layer: NeuronLayer, box: list, grad: torch.Tensor) -> None:
        h = box.pop()  # the hook's only reference: the activation is freed once it is scored
        if pad is not None and pad.shape == grad.shape[:2]:
            grad = grad * pad.to(grad.device, grad.dtype).unsqueeze(-1)  # padded positions add nothing
        scores[layer.name] = ops.block_importance(h.detach(), grad.detach(), group_ids[0], 2, -1, reduce,
                                                  check_groups=False)

    def on_input(module, args):
        h = args[0] if args else None
        if isinstance(h, torch.Tensor) and h.requires_grad:
            handles.append(h.register_hook(functools.partial(on_grad, by_module[module], [h])))

    hooks = [l.layer.register_forward_pre_hook(on_input) for l in layers]
    try:
        with EmbeddingCut(model) as cut, torch.enable_grad():
            logits = model(inputs)
            if not cut.outputs:
                raise ValueError("the model's nn.Embedding layers were not called on the token inputs")
            if logits.dim() != 3:
                raise ValueError(f"a causal LM must return (N, T, vocab) logits, got {tuple(logits.shape)}")
            device = logits.device
            loss = sequence_nll(logits, labels.to(device)).sum()
            del logits  # the loss keeps what its backward needs; the logits themselves are not needed again
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the scoring loss is {loss.item()}: the model or the batch has NaN/inf")
            group_ids.append(groups.to(device))
            torch.autograd.backward(loss, inputs=cut.outputs)
    finally:
        for h in hooks + handles:
            h.remove()
    return scores, float(loss.item()), device


def neuron_mask_plan(layers: list[NeuronLayer], masks: dict[str, torch.Tensor]) -> MaskPlan:
    """A :class:`dfmu_ext.pruning.MaskPlan` that scales each layer's neurons by ``masks[name]``
    (0 removes a neuron): the down projection's weight along its input dim. Layers whose mask is
    all ones are left out."""
    plan = MaskPlan()
    for l in layers:
        m = masks.get(l.name)
        if m is None or bool(torch.all(m == 1)):
            continue
        if m.numel() != l.units:
            raise ValueError(f"mask for {l.name} has {m.numel()} values but the MLP has {l.units} neurons")
        plan.add(l.weight, m.to(l.weight.device, torch.float32), dim=l.unit_dim)
    return plan


@contextlib.contextmanager
def neuron_inputs(layers: list[NeuronLayer]):
    """Collect each layer's input (the neurons' activations, ``(N, T, units)``) during forwards in the
    block: yields a dict name -> list of detached tensors."""
    seen: dict[str, list[torch.Tensor]] = {l.name: [] for l in layers}
    hooks = [l.layer.register_forward_pre_hook(
        lambda _m, args, name=l.name: seen[name].append(args[0].detach()) if args else None) for l in layers]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()
