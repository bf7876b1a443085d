r"""One simulated relearning step: the forget term read where a relearning attack would take the model.

A relearning attack fine-tunes the unlearned model on a few of the forgotten sequences and reads what
comes back. Its first AdamW step moves every parameter by about its learning rate, along the sign of the
gradient of the language-model loss on them. :func:`relearning_step` moves given parameters
:math:`\theta` that way, by ``size`` per coordinate, for the duration of a block:

.. math::  \theta' = \theta - s\,\mathrm{sign}\big(\nabla_\theta\, \ell_{\mathrm{LM}}(\theta; x_f)\big),

with :math:`\ell_{\mathrm{LM}}` the mean next-token loss of the forget rows' own tokens at their scored
positions. A forget term whose gradient is taken at :math:`\theta'` and applied at :math:`\theta` (a
first-order step of :math:`\min_\theta L_f(\theta')`, as tamper-resistant training does with a whole
simulated fine-tune) asks that the forgetting still holds one attack step away, not only where it
stands. The parameters are put back bit for bit when the block ends (from a copy: :math:`\theta' + s\,
\mathrm{sign}` is not :math:`\theta` in floating point), also when it raises. Cost: one forward and
backward of the forget rows, and one copy of the moved parameters while the block runs.

The settings (``LMForgetTermConfig``, opt-in) and why:

- ``relearn_step`` :math:`s` = 1e-3 is a third of the most the battery's relearning attack (10 AdamW steps
  at 3e-4) moves a weight.
- ``relearn_moves``: which parameters move. The fine-tune trains a few MLPs; an attacker moves every
  weight, and on the people corpus the relearned facts came back more through the attention (which DFMU
  never trains) than through the MLPs. Moving the weights the fine-tune leaves ``"frozen"`` (the MLPs it
  trains stay at :math:`\theta` and take the gradient) asks that the trained weights hold the forgetting
  against an attack on the weights they cannot repair: held out, relearning 0.085 (Retrain 0.044) where
  moving the ``"trained"`` MLPs (the opt-in before 2026-12-07) gave 0.16, at the same cost
  (benchmarks/RESULTS.md).
- ``relearn_rest_share`` :math:`r` (default 0): the step alone forgets past Retrain. The forgotten
  answers' probability that the term holds at the targets one step away is below them at :math:`\theta`
  (held out, facts still answered 0.015 against Retrain's 0.08). So the forget side's term can be
  :math:`r\,L_f(\theta) + (1 - r)\,L_f(\theta')` on the same rows, at one more forward and backward
  of the forget rows. :math:`r` = 0.25 took the forgotten facts to Retrain's level on the development
  splits (0.049 → 0.067, Retrain 0.069; relearning 0.095 → 0.114, Retrain 0.057), but not held out
  (0.015 → 0.024, Retrain 0.083; relearning 0.085 → 0.119, forget quality ≥ 0.05 on 3 of 8 both ways)
  nor on the TOFU-shaped report (forget quality seeds the same, the AUC 0.02–0.05 further from
  Retrain's): a point on the frontier, not the default.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .task import IGNORE_INDEX, forward_logits, lm_loss

__all__ = ["moved_parameters", "own_token_labels", "relearning_step"]


def own_token_labels(input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Labels (``-100`` where not scored) asking for each sequence's own next token at its ``scored``
    positions: ``scored`` is ``(N, T - 1)``, position ``t`` predicting token ``t + 1``."""
    if scored.shape != (input_ids.shape[0], input_ids.shape[1] - 1):
        raise ValueError(f"scored mask {tuple(scored.shape)} does not fit input ids {tuple(input_ids.shape)}")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    at = scored.to(input_ids.device).bool()
    labels[:, 1:][at] = input_ids[:, 1:][at]
    return labels


def moved_parameters(model: nn.Module, trained: list[torch.Tensor], moves: str) -> list[torch.Tensor]:
    """The parameters the step moves: the fine-tune's ``trained`` ones (``"trained"``), or every other
    parameter of ``model`` (``"frozen"``: for a large model a copy and a gradient of most of its weights
    while the step holds, where ``"trained"`` costs those of the trained MLPs only)."""
    if moves == "trained":
        return list(trained)
    ids = {id(p) for p in trained}
    return [p for p in model.parameters() if id(p) not in ids]


@contextmanager
def relearning_step(model: nn.Module, params: list[torch.Tensor], inputs, scored: torch.Tensor, size: float):
    r"""Within the block, ``params`` (the moved parameters) are at :math:`\theta'` (module docstring):
    moved by ``size`` per coordinate against the sign of the gradient of ``model``'s mean next-token loss
    on ``inputs``' own tokens at the ``scored`` positions. A frozen parameter among them is given a gradient
    for this computation and frozen again; a parameter with no gradient stays. Restored exactly on exit.
    ``size`` 0 moves nothing and computes nothing."""
    if not size > 0:
        yield
        return
    labels = own_token_labels(inputs["input_ids"], scored)
    frozen = [p for p in params if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = lm_loss(forward_logits(model, inputs), labels)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(g.sign().to(p.dtype), alpha=size)
        del grads
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
