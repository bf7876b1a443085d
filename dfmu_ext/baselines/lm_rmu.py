r"""RMU (Representation Misdirection for Unlearning; Li et al. 2024, "The WMDP Benchmark") for causal
LMs, OpenUnlearning's recipe on the shared loop of :mod:`._lm_recipe`.

RMU works on one layer's hidden state instead of the output. Let :math:`a_\theta(x) \in
\mathbb{R}^{T \times d}` be the output of transformer block :math:`l` (the residual stream after it),
:math:`a_0` the same for the frozen original, :math:`u` a fixed random unit vector (drawn once,
seeded: :math:`u = r/\|r\|`, :math:`r \sim U[0,1)^d` as in WMDP) and :math:`c` the steering
coefficient. With :math:`M_n` the scored positions of sequence :math:`n` (labels :math:`\ne -100`),

.. math:: D(a, b) = \frac{1}{N}\sum_n \frac{1}{|M_n|}\sum_{t \in M_n} \frac{1}{d}\,\|a_{n,t} - b_{n,t}\|^2,
   \qquad L_{RMU} = \gamma\, D(a_\theta(x_f), c\,u) + \alpha\, D(a_\theta(x_r), a_0(x_r)):

the forget activations are pushed to a large random direction (scrambling what later layers read),
the retain activations are held where the original had them. Only the MLP down projections' weights
of blocks :math:`l-2 .. l` are trained (WMDP's and OpenUnlearning's ``down_proj`` recipe; every other
parameter is frozen for the call and its ``requires_grad`` restored after).

**Layer choice.** OpenUnlearning steers layer 7 (0-based) of its 16-layer Llama-3.2-1B, i.e.
:math:`l = L/2 - 1`, and trains layers 5-7; the same rule on :math:`L` blocks is :math:`l =
\max(\lfloor L/2\rfloor - 1, 0)` and blocks :math:`\max(l-2, 0) .. l` (the zoo's 4-layer Llama: block
1, down projections of blocks 0 and 1). The blocks are found generically: the MLPs' down projections
(:func:`dfmu_ext.lm.neurons.mlp_neuron_layers`, in execution order) and, for each, its nearest
ancestor held in an ``nn.ModuleList`` (Llama's ``model.layers.i``, GPT-2's ``transformer.h.i``);
a model without such a list steers the output of the MLP module itself.

Both losses depend only on activations up to block :math:`l`, so the retain passes (and the frozen
original's) stop there; the forget pass runs to the logits only to log the forget NLL.

**Numbers.** :math:`\gamma = 1`. OpenUnlearning's config for the ``down_proj`` recipe has
:math:`\alpha = 1000`, :math:`c = 300` (WMDP: 1200 and 6.5) and says they depend on the model and data
("tune them carefully"), so :math:`\alpha`, :math:`c` and the learning rate were chosen on the
development split of :mod:`.lm_simnpo`'s docstring (zoo Llama, original seed 0, 10 people drawn with
seed 100, 13% retain; the mean norm of block 1's output on the forget answers is 24.5) by the same
gap to Retrain (forget / para / prob / retain / MIA AUC / gap, 10 epochs, batch 32, 2026-12-05):

=============================  ======  ======  ======  ======  ======  =====
lr, c, alpha                   forget  para    prob    retain  MIA     gap
=============================  ======  ======  ======  ======  ======  =====
Original                       0.970   0.900   0.727   0.965   0.987   54.3
Retrain                        0.140   0.120   0.098   0.987   0.531   0.0
1e-3, 25, 1000                 0.970   0.900   0.727   0.965   0.987   54.3
1e-3, 100, 1000                0.970   0.900   0.726   0.965   0.986   54.3
1e-2, 100, 1000                0.970   0.880   0.722   0.965   0.986   53.8
1e-2, 100, 100                 0.970   0.840   0.676   0.967   0.984   52.0
3e-2, 100, 100                 0.940   0.840   0.648   0.957   0.980   51.0
1e-2, 300, 100                 0.490   0.420   0.195   0.798   0.713   22.3
1e-2, 100, 30                  0.460   0.360   0.179   0.790   0.651   19.1
1e-2, 100, 20                  0.450   0.440   0.145   0.772   0.644   20.1
**1e-2, 100, 10**              0.180   0.140   0.041   0.510   0.399   14.5
3e-3, 100, 10                  0.790   0.700   0.405   0.883   0.950   41.2
1e-2, 25, 10                   0.590   0.560   0.374   0.915   0.872   31.6
=============================  ======  ======  ======  ======  ======  =====

With OpenUnlearning's :math:`\alpha` nothing moves (the retain term holds the two trained matrices
in place); the forget effect grows with :math:`c^2/\alpha`, and at the chosen point the retain facts
pay (0.51): on these small models the forget and retain people share the steered layer's features.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .._common import eval_mode
from ..lm.task import check_scored, forward_logits, lm_loss, take
from ..lm.neurons import mlp_neuron_layers
from ..model_io import adapted, copy_model
from ..result import UnlearnResult
from ..steps import StepOptions
from ._lm_recipe import check_recipe, forget_loop
from ._plumbing import LMSetup
from .registry import register

__all__ = ["rmu", "rmu_distance", "rmu_layers", "control_vector", "RMU_LR", "RMU_STEERING", "RMU_ALPHA"]

#: The lr and steering coefficient picked on the development split (module docstring).
RMU_LR = 1e-2
RMU_STEERING = 100.0
#: The retain weight picked on the development split (OpenUnlearning's config: 1000; module docstring).
RMU_ALPHA = 10.0


def rmu_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r""":math:`D(a, b)`: per sequence the mean over its masked positions of the mean squared difference
    over features, then the mean over sequences (``a``: (N, T, d); ``b``: (N, T, d) or broadcastable;
    ``mask``: (N, T) bool, every row with a True)."""
    sq = (a.float() - b.float()).pow(2).mean(-1)
    m = mask.to(sq.dtype)
    return ((sq * m).sum(1) / m.sum(1).clamp_min(1)).mean()


def control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    r""":math:`c\,u`, :math:`u = r/\|r\|`, :math:`r \sim U[0,1)^{d}` from a generator seeded with ``seed``."""
    r = torch.rand(dim, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    return (r / r.norm() * coeff).float()


def _block_of(model: nn.Module, layer: nn.Module) -> nn.Module:
    """The nearest ancestor of ``layer`` whose parent is an ``nn.ModuleList``; else the module that
    holds ``layer`` (its MLP)."""
    names = {m: n for n, m in model.named_modules()}
    path = names[layer].split(".")
    for cut in range(len(path) - 1, 0, -1):
        parent = model.get_submodule(".".join(path[:cut - 1])) if cut > 1 else model
        if isinstance(parent, nn.ModuleList):
            return model.get_submodule(".".join(path[:cut]))
    return model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model


def rmu_layers(model: nn.Module, example) -> tuple[nn.Module, list[nn.Module], int]:
    """``(steered block, trained down projections, l)`` by the module docstring's rule."""
    downs = [n.layer for n in mlp_neuron_layers(model, example)]
    l = max(len(downs) // 2 - 1, 0)
    return _block_of(model, downs[l]), downs[max(l - 2, 0):l + 1], l


class _Stop(Exception):
    """Raised by the capture hook to end a forward once the steered block has run."""


class _Capture:
    """Forward hook on the steered block: keeps its output (the first element of a tuple) and, when
    ``stop`` is set, ends the forward there."""

    def __init__(self, block: nn.Module):
        self.out, self.stop = None, False
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        self.out = output[0] if isinstance(output, (tuple, list)) else output
        if self.stop:
            raise _Stop

    def activations(self, model: nn.Module, x) -> torch.Tensor:
        """The block's output on ``x``; the forward stops at the block."""
        self.stop = True
        try:
            with adapted(model):
                model(x)
        except _Stop:
            pass
        finally:
            self.stop = False
        return self.out


@register("RMU", "causal-lm", budgeted=True, default_epochs=10)
def rmu(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
        forget_indices=None, epochs: int = 10, lr: float = RMU_LR, batch_size: int = 32,
        steering_coeff: float = RMU_STEERING, alpha: float = RMU_ALPHA, gamma: float = 1.0,
        weight_decay: float = 0.01, warmup_epochs: float = 1.0, device=None, seed: int = 0,
        progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    r"""RMU: minimise :math:`\gamma D(a_\theta(x_f), c\,u) + \alpha D(a_\theta(x_r), a_0(x_r))` over
    the down projections of blocks :math:`l-2..l` (the module's recipe; :math:`c` = ``steering_coeff``,
    :math:`u` seeded by ``seed``). The frozen original is a copy of the model made before the first step."""
    check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs, gamma, alpha)
    if not steering_coeff > 0:
        raise ValueError(f"steering_coeff must be > 0, got {steering_coeff}")
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    xf0, yf0 = take(setup.forget_set, range(min(len(setup.forget_set), 2)))
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")
    t0 = time.perf_counter()
    block, trained, l = rmu_layers(model, xf0.to(setup.device))
    reference = copy_model(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    ref_block = dict(zip(model.modules(), reference.modules()))[block]
    capture, ref_capture = _Capture(block), _Capture(ref_block)
    flags = {p: p.requires_grad for p in model.parameters()}
    names = {m: n for n, m in model.named_modules()}
    u = None

    def objective(m, _pos, xf, yf, retain):
        nonlocal u
        logits = forward_logits(m, xf)  # the capture keeps block l's output on the way
        act = capture.out
        if u is None:
            u = control_vector(act.shape[-1], steering_coeff, seed).to(act.device)
        loss = gamma * rmu_distance(act, u, yf != -100)
        if alpha:
            xr, yr = retain
            with torch.no_grad(), eval_mode(reference):
                ref = ref_capture.activations(reference, xr)
            loss = loss + alpha * rmu_distance(capture.activations(m, xr), ref, yr != -100)
        return loss, lm_loss(logits.detach(), yf)

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in trained:
            lin.weight.requires_grad_(True)
        info, retain_used = forget_loop(setup, model, "RMU", objective, epochs=epochs, lr=lr, batch_size=batch_size,
                                         weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                                         use_retain=bool(alpha), progress=progress)
    finally:
        capture.handle.remove()
        ref_capture.handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    info.update(steering_coeff=steering_coeff, alpha=alpha, gamma=gamma, layer=l, steered=names[block],
                trained=[names[t] + ".weight" for t in trained])
    return setup.result(model, "RMU", retain_used, len(setup.forget_set), info,
                        {"unlearn": time.perf_counter() - t0})
