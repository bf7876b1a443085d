r"""NPO (Negative Preference Optimization, Zhang et al. 2024) for causal LMs, on the shared recipe of
:mod:`._lm_recipe`."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .._common import eval_mode
from ..lm.task import batches, check_scored, forward_logits, lm_loss, sequence_nll, take
from ..result import UnlearnResult
from ..steps import StepEngine, StepOptions
from ._lm_recipe import UNLEARN_LR, check_recipe, forget_loop
from ._plumbing import LMSetup
from .registry import register

__all__ = ["npo", "npo_loss", "NPO_BETA"]

#: NPO's inverse temperature (Zhang et al. 2024; OpenUnlearning's TOFU default).
NPO_BETA = 0.1


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = NPO_BETA) -> torch.Tensor:
    r"""NPO's forget loss :math:`-\frac{2}{\beta}\,\overline{\log\sigma\big(-\beta(\log\pi_\theta(y|x) -
    \log\pi_{ref}(y|x))\big)}` over the sequences (``logp``, ``ref_logp``: (N,) summed answer
    log-probabilities). It equals :math:`\frac{2}{\beta}\log 2` at :math:`\theta = \theta_{ref}`, falls
    towards 0 as the forget answers become less likely than under the reference, and its gradient is
    GA's weighted by :math:`2\sigma(\beta\,\Delta)`, which vanishes once a sequence is unlikely
    enough (NPO's bounded, slower collapse)."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


@torch.no_grad()
def _reference_logps(model: nn.Module, dataset, batch_size: int, engine: StepEngine) -> torch.Tensor:
    """(N,) summed answer log-probabilities of ``dataset`` under ``model`` now, in eval mode."""
    out = []
    with eval_mode(model):
        for x, y in batches(dataset, batch_size, device=engine.device):
            with engine.autocast():
                out.append(-sequence_nll(forward_logits(model, x), y).float())
    return torch.cat(out)


@register("NPO", "causal-lm", budgeted=True, default_epochs=10)
def npo(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
        forget_indices=None, epochs: int = 10, lr: float = UNLEARN_LR, batch_size: int = 32, beta: float = NPO_BETA,
        alpha: float = 1.0, gamma: float = 1.0, weight_decay: float = 0.01, warmup_epochs: float = 1.0,
        device=None, seed: int = 0, progress: bool = False, steps: StepOptions | None = None) -> UnlearnResult:
    r"""NPO (Negative Preference Optimization, Zhang et al. 2024), OpenUnlearning's TOFU variant:
    minimise :math:`\gamma\,` :func:`npo_loss` :math:`+ \alpha L_r` (:math:`\beta = 0.1`,
    :math:`\gamma = \alpha = 1`; ``alpha=0`` is plain NPO, which still reads one retain batch per step).

    The reference :math:`\pi_{ref}` is the model before unlearning, frozen, in eval mode. Since it
    never changes, its log-probabilities of the forget sequences are computed once before the first
    step instead of keeping a second copy of the model: the same numbers, half the forwards and no
    copy in memory."""
    check_recipe(epochs, lr, batch_size, weight_decay, warmup_epochs)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed, steps)
    check_scored(take(setup.forget_set, range(len(setup.forget_set)))[1], "the forget sequences")
    t0 = time.perf_counter()
    ref = _reference_logps(model, setup.forget_set, batch_size, setup.engine)

    def objective(m, pos, xf, yf, retain):
        logp = -sequence_nll(forward_logits(m, xf), yf)
        forget_term = npo_loss(logp, ref[pos], beta)
        loss = gamma * forget_term
        if alpha:
            loss = loss + alpha * lm_loss(forward_logits(m, retain[0]), retain[1])
        return loss, -logp.detach().sum() / (yf[:, 1:] != -100).sum()

    use_retain = bool(alpha)
    info, retain_used = forget_loop(setup, model, "NPO", objective, epochs=epochs, lr=lr, batch_size=batch_size,
                                     weight_decay=weight_decay, warmup_epochs=warmup_epochs,
                                     use_retain=use_retain, progress=progress)
    info.update(beta=beta, alpha=alpha, gamma=gamma)
    return setup.result(model, "NPO", retain_used, len(setup.forget_set), info,
                        {"unlearn": time.perf_counter() - t0})
