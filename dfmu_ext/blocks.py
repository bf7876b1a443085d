"""Block discovery: which units of a model DFMU can score and prune.

A *block* is one Conv1d/2d/3d or Linear layer whose output units (dim 0 of its weight) are the
prunable units, together with the norm that directly consumes its output, if any: a BatchNorm, a
GroupNorm after a convolution, a LayerNorm or RMSNorm over a Linear's units. Zeroing a unit means
zeroing its row of the weight and bias *and* the norm's per-unit affine entries, so that in eval
mode the unit's output after the norm is exactly 0 (the norm would otherwise add its shift; the
per-unit scale of a Group/Layer/RMS norm is zero too, whatever the other units' statistics).

In a transformer, the Linear layers called as modules are the blocks: the MLP's neurons (its first
Linear), the channels of the attention projections (q, k, v and output), the classifier excepted.

Discovery is generic: it runs one forward pass with hooks and records which module consumes which
module's output tensor, so it works for residual networks, nested containers and user models alike,
not a list of known architectures. The last Linear in ``model.modules()`` order is the classifier:
it is not channel-pruned (its rows are classes, handled by head masking) — unless a model names its
own (:func:`classifier_of`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._common import eval_mode
from .model_io import adapted, explicit_classifier

SCORABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RMS_NORMS = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
NORMS = BATCH_NORMS + (nn.GroupNorm, nn.LayerNorm) + _RMS_NORMS


def is_norm(module: nn.Module) -> bool:
    """A norm that may follow a block: torch's Batch/Group/Layer/RMS norms, or a model's own RMSNorm
    class (Llama-style: a class named ``*RMSNorm`` with a 1-D ``weight``)."""
    if isinstance(module, NORMS):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(w, torch.Tensor) and w.dim() == 1


def norm_units(norm: nn.Module, layer: nn.Module) -> int | None:
    """How many per-unit channels ``norm`` has when it normalises ``layer``'s output unit by unit in
    its affine, else None: BatchNorm (``num_features``), GroupNorm after a convolution
    (``num_channels``), LayerNorm/RMSNorm over the last dimension after a Linear (whose units are last).
    A LayerNorm after a convolution normalises the last *spatial* dimension, not the units: no."""
    if isinstance(norm, BATCH_NORMS):
        return norm.num_features
    conv = not isinstance(layer, nn.Linear)
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels if conv else None
    if conv:
        return None
    shape = getattr(norm, "normalized_shape", None)
    if shape is not None:
        return int(shape[0]) if len(tuple(shape)) == 1 else None
    w = getattr(norm, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def norm_affine(norm: nn.Module) -> list[torch.Tensor]:
    """The norm's per-unit affine parameters (weight, bias), those it has."""
    return [p for p in (getattr(norm, "weight", None), getattr(norm, "bias", None))
            if isinstance(p, torch.Tensor) and p.dim() == 1]


@dataclass
class Block:
    """One prunable layer and the norm that follows it."""

    name: str                     # qualified name of the conv/linear in model.named_modules()
    layer: nn.Module
    norm: nn.Module | None        # the BatchNorm applied directly to the layer's output
    norm_name: str | None
    units: int                    # out_channels / out_features
    depth: int                    # execution order among the model's blocks (0 = first)

    @property
    def output_module(self) -> nn.Module:
        """Where the unit's output is observed: after the norm when there is one."""
        return self.norm if self.norm is not None else self.layer

    def tensors(self) -> list[torch.Tensor]:
        """Every parameter whose dim 0 indexes this block's units."""
        out = [self.layer.weight]
        if getattr(self.layer, "bias", None) is not None:
            out.append(self.layer.bias)
        if self.norm is not None:
            out += norm_affine(self.norm)
        return out


def _last_linear(module: nn.Module, prefix: str) -> tuple[str, nn.Linear] | None:
    last = None
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            last = (f"{prefix}.{name}" if prefix and name else prefix or name, m)
    return last


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the classifier: the ``nn.Linear`` whose rows are the classes.

    In order: the module named by ``classifier=`` (an active :func:`dfmu_ext.model_io.adapted`), or
    the last Linear inside it when it is a head module; timm's ``model.get_classifier()``; a
    transformers-style attribute ``classifier`` or ``score`` (or the last Linear inside it); else the
    last ``nn.Linear`` in ``model.named_modules()`` order. Raises ValueError (one line) when none is
    a Linear.
    """
    names = {m: n for n, m in model.named_modules()}
    explicit = explicit_classifier(model)
    candidates: list[tuple[str, nn.Module]] = []
    if explicit is not None:
        candidates.append((explicit, model.get_submodule(explicit)))
    else:
        get = getattr(model, "get_classifier", None)
        if callable(get):
            try:
                head = get()
            except Exception:  # a get_classifier of another meaning: fall through to the rules below
                head = None
            if isinstance(head, nn.Module) and head in names:
                candidates.append((names[head], head))
        for attr in ("classifier", "score"):
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module) and head in names:
                candidates.append((names[head], head))
        candidates.append(("", model))
    for name, module in candidates:
        found = _last_linear(module, name)
        if found is not None:
            return found
    if explicit is not None:
        raise ValueError(f"classifier={explicit!r} holds no nn.Linear")
    raise ValueError("the model has no nn.Linear classifier: pass classifier= (the name of the module whose "
                     "outputs are the classes)")


class BlockTracer:
    """Hooks that watch one forward pass and work out the blocks from the tensors that flow.

    A norm belongs to a layer when its input *is* the layer's output tensor. ``on_output``, when
    given, is called as ``on_output(module, norm_input, output)`` right after every layer
    (``norm_input=None``) and norm forward, *before* any later op (an in-place ReLU, say) can
    touch the output, so that a scoring pass can hook the gradients as the forward runs.
    """

    def __init__(self, model: nn.Module, on_output: Callable[[nn.Module, torch.Tensor | None, torch.Tensor], None]
                 | None = None):
        self.model = model
        self.on_output = on_output
        self.head_name, _ = classifier_of(model)
        self.names = {m: n for n, m in model.named_modules()}
        self.calls: dict[nn.Module, int] = {}
        self.order: list[nn.Module] = []
        self.norm_of: dict[nn.Module, nn.Module] = {}
        self._produced_by: dict[int, nn.Module] = {}
        self._keep_alive: list[torch.Tensor] = []  # ids are only unique while the tensors live
        self._handles: list = []

    def _after_layer(self, module, _inputs, output):
        self.calls[module] = self.calls.get(module, 0) + 1
        if self.calls[module] == 1:
            self.order.append(module)
        if isinstance(output, torch.Tensor):
            self._produced_by[id(output)] = module
            self._keep_alive.append(output)
            if self.on_output is not None:
                self.on_output(module, None, output)

    def _before_norm(self, module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            producer = self._produced_by.get(id(inputs[0]))
            if producer is not None and producer not in self.norm_of:
                self.norm_of[producer] = module

    def _after_norm(self, module, inputs, output):
        if self.on_output is not None and isinstance(output, torch.Tensor) and inputs \
                and isinstance(inputs[0], torch.Tensor):
            self.on_output(module, inputs[0], output)

    def producer_of(self, tensor: torch.Tensor) -> nn.Module | None:
        """The layer whose output ``tensor`` is (during the traced forward), else None."""
        return self._produced_by.get(id(tensor))

    def norm_belongs_to(self, norm: nn.Module, layer: nn.Module) -> bool:
        """Whether ``norm`` will be ``layer``'s block norm (the rule of :meth:`blocks`)."""
        return self.norm_of.get(layer) is norm and norm_units(norm, layer) == layer.weight.shape[0]

    def __enter__(self) -> "BlockTracer":
        for m in self.model.modules():
            if isinstance(m, SCORABLE):
                self._handles.append(m.register_forward_hook(self._after_layer))
            elif is_norm(m):
                self._handles.append(m.register_forward_pre_hook(self._before_norm))
                self._handles.append(m.register_forward_hook(self._after_norm))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._produced_by.clear()
        self._keep_alive.clear()

    def blocks(self) -> list[Block]:
        """The blocks seen, in execution order. Raises ValueError when there is none."""
        blocks: list[Block] = []
        for layer in self.order:
            name = self.names[layer]
            if name == self.head_name or self.calls[layer] != 1:
                continue  # the classifier, or a shared layer with no single output to score
            units = layer.weight.shape[0]
            norm = self.norm_of.get(layer)
            if norm is not None and norm_units(norm, layer) != units:
                norm = None
            blocks.append(Block(name, layer, norm, self.names.get(norm) if norm is not None else None, units,
                                len(blocks)))
        if not blocks:
            raise ValueError("the model has no prunable block (a Conv1d/2d/3d or Linear layer before the classifier)")
        return blocks


def discover_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """Blocks of ``model`` in execution order, found with one eval forward of ``example``.

    The forward runs with gradients enabled, as the scoring pass does: ``nn.TransformerEncoderLayer``
    takes a fused path without them that calls none of its Linear modules.

    A layer called more than once per forward (weight sharing) is skipped: its units have no single
    output to score. Raises ValueError when no prunable block exists.
    """
    with adapted(model), eval_mode(model), BlockTracer(model) as tracer, torch.enable_grad():
        model(example)
    return tracer.blocks()
