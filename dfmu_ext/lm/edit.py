r"""The knowledge-preserving edit: move the forget sequences towards their targets through the MLPs'
down projections, only in directions the retain data does not use.

For a down projection :math:`y = W h` (:math:`h` the neurons), the retain sequences' neuron
activations :math:`H_r` (every real token of the reference retain sequences, one row each) span the
subspace the retain knowledge is read through. With :math:`U_k` the top right-singular vectors of
:math:`H_r` that hold a share ``energy`` of its squared singular values, every update of :math:`W`
is projected as

.. math:: \Delta W \leftarrow \Delta W\,(I - U_k U_k^\top),

so that :math:`\Delta W\, h = 0` for every activation in that subspace: the retain sequences'
outputs of the layer do not move, and neither do those of retain sequences never read whose
activations lie in it (Gradient Projection Memory, Saha et al. 2021, applied to forgetting). The
update is projected after the optimizer's step, so it holds for Adam's per-coordinate steps too.
"""
from __future__ import annotations

import torch
from torch import nn

from .._common import eval_mode
from ..model_io import Inputs, adapted
from .neurons import NeuronLayer, neuron_inputs


@torch.no_grad()
def retain_projectors(model: nn.Module, layers: list[NeuronLayer], references: Inputs, energy: float = 0.99,
                      batch_size: int = 256, positions: torch.Tensor | None = None, extra=()
                      ) -> dict[str, torch.Tensor]:
    """``name -> (units, units)`` projector :math:`I - U_k U_k^\\top` per neuron layer (float32, on the
    layer's device), from the reference retain sequences' activations at their real tokens."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    rows: dict[str, list[torch.Tensor]] = {l.name: [] for l in layers + list(extra)}
    with adapted(model), eval_mode(model), neuron_inputs(layers + list(extra)) as seen:
        for start in range(0, references.shape[0], batch_size):
            part = references[start:start + batch_size]
            for values in seen.values():
                values.clear()
            model(part)
            real = part["attention_mask"].bool() if "attention_mask" in part else None
            if positions is not None:
                real = positions[start:start + batch_size].bool()
            for l in layers + list(extra):
                h = seen[l.name][0].float()
                rows[l.name].append((h[real.to(h.device)] if real is not None else h.reshape(-1, h.shape[-1])).cpu())
    out = {}
    for l in layers + list(extra):
        H = torch.cat(rows[l.name]).double()
        # the right-singular vectors of H are the eigenvectors of H^T H (units x units: far cheaper than
        # an SVD of the positions x units matrix), its eigenvalues the squared singular values
        energy_of, vectors = torch.linalg.eigh(H.T @ H)
        energy_of, vectors = energy_of.flip(0).clamp_min(0), vectors.flip(1)
        share = torch.cumsum(energy_of, 0) / energy_of.sum().clamp_min(1e-30)
        # (energy=1.0 keeps the rank of H: the cumulative share reaches 1 only up to rounding, so the
        # directions past the rank, with ~1e-16 of the energy, must not count as needed)
        k = int(torch.searchsorted(share, torch.tensor(energy - 1e-9, dtype=share.dtype)).item()) + 1
        U = vectors[:, :k]
        out[l.name] = (torch.eye(H.shape[1], dtype=torch.float64) - U @ U.T).float().to(l.weight.device)
    return out


class ProjectedUpdates:
    """Keeps every update of the given weights inside their retain-free input subspace: call
    :meth:`before` ahead of an optimizer step and :meth:`after` once it is done. ``entries`` are
    ``(weight, projector, input_dim)``: the weight's dim that meets the input (1 for an ``nn.Linear``,
    0 for GPT-2's ``Conv1D``)."""

    def __init__(self, entries: list[tuple[torch.Tensor, torch.Tensor, int]]):
        self.entries = entries
        self._saved: list[torch.Tensor] = []

    @torch.no_grad()
    def before(self) -> None:
        self._saved = [w.detach().clone() for w, _, _ in self.entries]

    @torch.no_grad()
    def after(self) -> None:
        for (w, P, dim), old in zip(self.entries, self._saved):
            delta = w - old
            P = P.to(delta.dtype)
            delta = delta @ P if dim == 1 else P @ delta
            w.copy_(old + delta)
        self._saved = []


from dataclasses import asdict, dataclass  # noqa: E402


@dataclass
class EditConfig:
    """The projected edit: ``steps`` AdamW steps (``lr``) on the MLPs' projections only (``scope``:
    every projection, or the down projections alone), each on ``batch_size`` forget sequences
    (cycled), towards their targets; ``energy`` sets the retain subspace kept fixed, measured on
    ``references`` retain sequences of the budget. ``steps=0`` turns it off. The defaults were chosen
    on development splits (benchmarks/RESULTS.md, "Entity unlearning in causal LMs")."""

    steps: int = 0
    lr: float = 3e-3
    batch_size: int = 32
    energy: float = 0.99
    references: int = 512
    positions: str = "tokens"   # the retain activations kept: every real "tokens", or the "scored" reads
    optimizer: str = "adam"     # "adam" or "sgd" (momentum 0.9)
    scope: str = "mlp"          # the weights moved: the "down" projections, or every "mlp" projection
    neighbours: bool = True     # the forget sequences' swapped neighbours (lm.neighbours) join the retain subspace

    def validate(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1 or self.references < 1:
            raise ValueError("edit: steps must be >= 0, lr > 0, batch_size and references >= 1")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"edit: energy must be in (0, 1], got {self.energy}")
        for name, allowed in (("positions", ("tokens", "scored")), ("optimizer", ("adam", "sgd")),
                              ("scope", ("down", "mlp"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"edit: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)
