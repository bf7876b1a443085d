"""Block discovery: which units of a model DFMU can score and prune.

A *block* is one Conv1d/2d/3d or Linear layer whose output units (dim 0 of its weight) are the
prunable units, together with the BatchNorm that directly consumes its output, if any. Zeroing a
unit means zeroing its row of the weight and bias *and* the norm's affine entries, so that in eval
mode the unit's output after the norm is exactly 0 (the norm would otherwise add its shift).

Discovery is generic: it runs one forward pass with hooks and records which module consumes which
module's output tensor, so it works for residual networks, nested containers and user models alike,
not a list of known architectures. The last Linear in ``model.modules()`` order is the classifier:
it is not channel-pruned (its rows are classes, handled by head masking).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._common import eval_mode

SCORABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
        if self.norm is not None and self.norm.affine:
            out += [self.norm.weight, self.norm.bias]
        return out


def classifier_of(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the classifier: the last nn.Linear in ``model.named_modules()`` order."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ValueError("the model has no nn.Linear classifier; DFMU needs one to find the class outputs")
    return last


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
        return self.norm_of.get(layer) is norm and getattr(norm, "num_features", None) == layer.weight.shape[0]

    def __enter__(self) -> "BlockTracer":
        for m in self.model.modules():
            if isinstance(m, SCORABLE):
                self._handles.append(m.register_forward_hook(self._after_layer))
            elif isinstance(m, NORMS):
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
            if norm is not None and norm.num_features != units:
                norm = None
            blocks.append(Block(name, layer, norm, self.names.get(norm) if norm is not None else None, units,
                                len(blocks)))
        if not blocks:
            raise ValueError("the model has no prunable block (a Conv1d/2d/3d or Linear layer before the classifier)")
        return blocks


def discover_blocks(model: nn.Module, example: torch.Tensor) -> list[Block]:
    """Blocks of ``model`` in execution order, found with one no-grad eval forward of ``example``.

    A layer called more than once per forward (weight sharing) is skipped: its units have no single
    output to score. Raises ValueError when no prunable block exists.
    """
    with eval_mode(model), BlockTracer(model) as tracer, torch.no_grad():
        model(example)
    return tracer.blocks()
