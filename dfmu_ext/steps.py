r"""The training step every method shares: precision, memory layout and the backward/step, chosen
once per device, so that DFMU's fine-tune, the original training, Retrain and every baseline run on
the same engine and their time ratios stay fair.

* ``precision``: ``"fp32"``; ``"bf16"`` (autocast to bfloat16: no loss scaling needed, its exponent
  is float32's); ``"fp16"`` (autocast to float16 with a dynamic loss scale,
  :math:`\nabla_\theta (sL)/s`, skipping steps whose gradients overflow); ``"auto"`` = bf16 on a CUDA
  device that supports it, fp16 on an older CUDA device, fp32 on the CPU (CPU autocast is slower
  than float32 on most CPUs and would change every CPU result).
* ``channels_last``: NHWC memory for 4-D activations and conv weights (tensor cores read it without
  transposes; oneDNN's CPU convolutions are faster on it too); ``"auto"`` = on for models that hold a
  Conv2d, on every device. Measured on a 2-core CPU (benchmarks/RESULTS.md): 1.36x the fp32
  fine-tune's samples/s, Retrain 1.4x faster, metrics within seed noise of NCHW's.

Parameters, optimizer state and the masks stay float32: autocast only changes the dtype the ops
compute in, so masked units stay exactly zero whatever the precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .model_io import Inputs

__all__ = ["StepOptions", "StepEngine", "PRECISIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class StepOptions:
    """How training steps run; ``"auto"`` picks per device (see the module docstring)."""

    precision: str = "auto"
    channels_last: str | bool = "auto"

    def validate(self, device: torch.device | str | None = None) -> None:
        """Raises ValueError for options that cannot run (on ``device``, when given)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.channels_last not in ("auto", True, False):
            raise ValueError(f"channels_last must be 'auto', True or False, got {self.channels_last!r}")
        if self.precision == "fp16" and device is not None and torch.device(device).type != "cuda":
            raise ValueError("fp16 training needs a CUDA device (use bf16 or fp32 on the CPU)")

    def to_dict(self) -> dict:
        return asdict(self)


class StepEngine:
    """The resolved options for one model on one device: prepares the model and each batch, runs
    the forward under autocast and the backward + optimizer step (with loss scaling for fp16)."""

    def __init__(self, model: nn.Module, device: torch.device, options: StepOptions | None = None):
        options = options or StepOptions()
        options.validate(device)
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        precision = options.precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        self.precision = precision
        has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
        layout = options.channels_last
        self.channels_last = has_conv if layout == "auto" else bool(layout and has_conv)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # fp16's dynamic loss scale (the usual schedule: start at 2^16, halve on overflow, double
        # after 2000 clean steps); kept here rather than in torch.amp.GradScaler so that it works
        # with any optimizer (the fine-tune's MomentumSGD has no param_groups).
        self.loss_scale = 2.0 ** 16 if precision == "fp16" else None
        self._clean_steps = 0

    def describe(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last}

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put the model's 4-D parameters in the chosen memory layout (in place; values unchanged)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def batch(self, x):
        """``x`` (a tensor or :class:`dfmu_ext.model_io.Inputs`) with its 4-D tensors in the chosen layout."""
        if isinstance(x, Inputs):
            return x.map(self.batch)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self):
        """The forward's precision context (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer, before_step=None) -> bool:
        """``loss.backward()``, ``before_step()`` (e.g. a gradient mask), ``optimizer.step()``.

        With fp16 the loss is scaled by :math:`s` and the gradients unscaled before
        ``before_step``; a step whose gradients are not finite is skipped and :math:`s` halved.
        Returns whether the step was taken.
        """
        if self.loss_scale is None:
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            return True
        (loss * self.loss_scale).backward()
        params = _optimizer_params(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.loss_scale)
        finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
        if not finite:
            self.loss_scale /= 2.0
            self._clean_steps = 0
            for p in params:
                p.grad = None
            return False
        if before_step is not None:
            before_step()
        optimizer.step()
        self._clean_steps += 1
        if self._clean_steps % 2000 == 0:
            self.loss_scale *= 2.0
        return True


def _optimizer_params(optimizer) -> list[torch.Tensor]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is not None:
        return [p for g in groups for p in g["params"]]
    return list(optimizer.params)
