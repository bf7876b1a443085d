r"""Deep Unlearning: gradient-free removal of the forget classes' activation subspace from every layer
(Kodge, Saha & Roy, "Deep Unlearning: Fast and Efficient Gradient-free Class Forgetting", TMLR 2024).

For every Conv / Linear layer :math:`l` (the classifier included) the *input* activations of a few
retain and forget samples are collected, one column per sample (Linear) or per receptive-field patch
(Conv: ``F.unfold`` with the layer's kernel, stride, padding and dilation, so a column has the
layout of a row of ``weight.reshape(out, -1)``): :math:`R_r, R_f \in \mathbb{R}^{d \times m}`.

1. **Spaces.** :math:`R = U \Sigma V^\top`; the share of energy of basis vector :math:`i` is
   :math:`\lambda_i = \sigma_i^2 / \sum_j \sigma_j^2`, and it is scaled with :math:`\alpha`:

   .. math:: \tilde\lambda_i = \frac{\alpha \lambda_i}{(\alpha - 1)\lambda_i + 1} \in [0, 1],

   (:math:`\alpha \to \infty` makes every direction with energy count fully; :math:`\alpha = 1`
   keeps the raw energy shares). The scaled "projection" onto a space is
   :math:`P = U \operatorname{diag}(\tilde\lambda) U^\top`; :math:`P_r` with :math:`\alpha_r`,
   :math:`P_f` with :math:`\alpha_f`.
2. **Forget-specific (class-discriminatory) space.** What the forget activations span beyond the
   retain ones: :math:`P_{dis} = P_f - P_f P_r = P_f (I - P_r)`. For an input :math:`x` in the retain
   space, :math:`(I - P_r)x \approx 0`, so :math:`P_{dis} x \approx 0`.
3. **Weight update.** :math:`W_l \leftarrow W_l (I - P_{dis})` for every layer, all computed from
   the activations of the *original* model (one no-grad forward), then applied together. No
   gradient, no training.

With ``head=True`` the classifier's forget rows are also masked (as head-mask / DFMU do), which
guarantees UA = 100%; the paper's method is ``head=False``.

Measured as a step of DFMU (the subspace from the scoring forward's own activations, removed after the
pruning), it did not move the linear probe on Fashion-MNIST and its relearning gain on the dev classes
did not hold on the reporting ones (benchmarks/RESULTS.md), so DFMU does not use it.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .._common import eval_mode, seeded
from ..pruning import build_mask_plan, head_mask_for, suppress_head
from ..result import UnlearnResult
from ..splits import take_batch
from ._plumbing import Setup, make_result
from .registry import register

PROJECTABLE = (nn.Conv2d, nn.Linear)


def layer_columns(module: nn.Module, x: torch.Tensor, max_columns: int, gen: torch.Generator | None = None
                  ) -> torch.Tensor:
    """(d, m) matrix of the layer's input columns (patches for a Conv2d), at most ``max_columns``
    of them (a seeded uniform subsample of the patches)."""
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)                        # (N, C*kh*kw, L)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)      # (d, N*L)
    else:
        cols = x.reshape(-1, x.shape[-1]).t()
    if cols.shape[1] > max_columns:
        idx = torch.randperm(cols.shape[1], generator=gen)[:max_columns].to(cols.device)
        cols = cols[:, idx]
    return cols.float()


class InputRecorder:
    """Forward pre-hooks that keep every Conv2d / Linear layer's input columns per group.

    Use as a context manager around ANY forward (a no-grad one, or DFMU's scoring forward, whose
    activations it then reuses): ``rec.groups`` must be set to a bool tensor (True = forget) for the
    batch before the forward. Grouped convs are skipped.
    """

    def __init__(self, model: nn.Module, max_columns: int = 20000, seed: int = 0):
        self.model = model
        self.max_columns = int(max_columns)
        self.gen = torch.Generator().manual_seed(seed)
        self.names = {m: n for n, m in model.named_modules()}
        self.forget: dict[str, torch.Tensor] = {}
        self.retain: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.groups: torch.Tensor | None = None
        self._handles = []

    def _hook(self, module, inputs):
        if not inputs or not isinstance(inputs[0], torch.Tensor) or self.groups is None:
            return
        name = self.names[module]
        if name in self.modules:
            return  # called twice per forward (shared layer): keep the first call
        x = inputs[0]
        g = self.groups.to(x.device)
        self.modules[name] = module
        self.forget[name] = layer_columns(module, x[g], self.max_columns, self.gen)
        self.retain[name] = layer_columns(module, x[~g], self.max_columns, self.gen)

    def __enter__(self) -> "InputRecorder":
        for m in self.model.modules():
            if isinstance(m, PROJECTABLE) and not (isinstance(m, nn.Conv2d) and m.groups != 1):
                self._handles.append(m.register_forward_pre_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def scaled_projection(cols: torch.Tensor, alpha: float) -> torch.Tensor:
    r""":math:`U \operatorname{diag}(\tilde\lambda) U^\top` of the columns (see the module docstring),
    through the eigendecomposition of the (d, d) Gram matrix (float64)."""
    c = cols.double()
    gram = c @ c.t()
    evals, evecs = torch.linalg.eigh(gram)
    evals = evals.clamp_min(0).flip(0)
    evecs = evecs.flip(1)
    total = float(evals.sum())
    if total <= 0:
        return torch.zeros_like(gram)
    lam = evals / total
    scale = alpha * lam / ((alpha - 1.0) * lam + 1.0)
    return (evecs * scale) @ evecs.t()



def _selected_layers(names: list[str], spec: str) -> list[str]:
    if spec == "all":
        return names
    if spec.startswith("last:"):
        k = int(spec.split(":", 1)[1])
        return names[-k:] if k > 0 else []
    raise ValueError(f"layers must be 'all' or 'last:k', got {spec!r}")


def discriminatory_projections(rec: InputRecorder, alpha_r: float, alpha_f: float, layers: str = "all"
                               ) -> dict[str, torch.Tensor]:
    """Layer name -> (d, d) :math:`P_{dis} = P_f (I - P_r)` from the recorded columns."""
    names = [n for n in rec.modules if rec.forget[n].shape[1] > 0 and rec.retain[n].shape[1] > 0]
    out = {}
    for n in _selected_layers(names, layers):
        p_r = scaled_projection(rec.retain[n], alpha_r)
        p_f = scaled_projection(rec.forget[n], alpha_f)
        out[n] = p_f - p_f @ p_r
    return out


@torch.no_grad()
def project_weights_(modules: dict[str, nn.Module], projections: dict[str, torch.Tensor]) -> None:
    r""":math:`W \leftarrow W (I - P_{dis})` for each layer's weight, viewed as (out, d)."""
    for name, p in projections.items():
        w = modules[name].weight
        q = (torch.eye(p.shape[0], dtype=torch.float64) - p).to(device=w.device, dtype=w.dtype)
        w.copy_((w.reshape(w.shape[0], -1) @ q).reshape(w.shape))


@register("DeepUnlearning", budgeted=True, trains=False)
def deep_unlearning(model: nn.Module, train_set: Dataset, forget_classes=None, retain_fraction: float = 0.13, *,
                    forget_indices=None, retain_samples: int = 1000, forget_samples: int = 500,
                    alpha_r: float = 30.0, alpha_f: float = 3.0, head: bool = False, max_columns: int = 20000,
                    layers: str = "all", device=None, seed: int = 0, progress: bool = False) -> UnlearnResult:
    """Deep Unlearning (SVD projection, gradient-free) under the baselines' calling convention.

    Reads ``retain_samples`` random samples of the stratified ``retain_fraction`` slice of the retain
    data (the same slice DFMU uses for the seed) and ``forget_samples`` random forget samples; one
    eval-mode, no-grad forward over them records every layer's inputs; the update of the module
    docstring is applied to every Conv2d / Linear weight. ``head=True`` also masks the classifier's
    forget rows (whole classes only). Modifies ``model`` in place. Defaults: ``alpha_f=3`` as the
    paper; ``alpha_r=30`` (the paper's 100 left 93% of a Fashion-MNIST class recognised; 30 trades
    1 point of RA for 42% forgetting without the head mask — benchmarks/RESULTS.md).
    """
    if head and forget_classes is None:
        raise ValueError("head=True masks whole classes' rows: not applicable to sample forgetting")
    setup = Setup(model, train_set, forget_classes, retain_fraction, device, seed, forget_indices)
    dev = setup.device
    gen = torch.Generator().manual_seed(setup.seed + 104729)
    budget = setup.budget
    r_idx = torch.randperm(len(budget), generator=gen)[:retain_samples].tolist()
    f_idx = torch.randperm(len(setup.forget_set), generator=gen)[:forget_samples].tolist()
    xr, _ = take_batch(budget, r_idx)
    xf, _ = take_batch(setup.forget_set, f_idx)
    x = torch.cat([xf, xr]).to(dev)
    groups = torch.zeros(x.shape[0], dtype=torch.bool)
    groups[:len(f_idx)] = True
    with seeded(setup.seed, dev):
        t0 = time.perf_counter()
        with eval_mode(model), InputRecorder(model, max_columns, setup.seed) as rec, torch.no_grad():
            rec.groups = groups
            model(x)
        t1 = time.perf_counter()
        proj = discriminatory_projections(rec, alpha_r, alpha_f, layers)
        project_weights_(rec.modules, proj)
        masks = {}
        if head:
            mask = head_mask_for(setup.head, setup.classes)
            build_mask_plan([], {}, setup.head, mask).apply()
            suppress_head(setup.head, setup.classes)
            masks[setup.head_name] = mask
        t2 = time.perf_counter()
    info = {"alpha_r": alpha_r, "alpha_f": alpha_f, "layers": layers, "max_columns": max_columns, "head": head,
            "projected_layers": list(proj)}
    return make_result(setup, model, "DeepUnlearning", len(r_idx), len(f_idx), info,
                       {"activations": t1 - t0, "projection": t2 - t1}, masks=masks)
