r"""Selective pruning for causal LMs (Pochinkov & Schoots 2024): remove the MLP neurons most active on
the forget sequences relative to the retain budget; no gradient, no training."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .._common import eval_mode, seeded, synchronize
from ..lm.task import batches, forward_logits, take
from ..result import UnlearnResult
from ._plumbing import LMSetup
from .registry import register

__all__ = ["selective_pruning", "POSITIONS"]

POSITIONS = ("tokens", "scored")


@torch.no_grad()
def _mean_abs_activation(model: nn.Module, dataset, layers, batch_size: int, device: torch.device,
                         positions: str) -> dict[str, torch.Tensor]:
    """Per neuron layer, ``(units,)`` float64 mean |activation| of its neurons (the down projection's
    input) over the chosen positions of ``dataset``: every non-pad token (``"tokens"``, the paper's)
    or the positions that predict a scored label (``"scored"``)."""
    sums = {l.name: torch.zeros(l.units, dtype=torch.float64, device=device) for l in layers}
    count = torch.zeros((), dtype=torch.float64, device=device)
    weight: list[torch.Tensor] = []

    def capture(name):
        def hook(_module, args):
            h = args[0]
            w = weight[0]
            if h.dim() != 3 or h.shape[:2] != w.shape:
                raise ValueError(f"{name}: expected (N, T, units) inputs for a (N, T) batch, got {tuple(h.shape)}")
            sums[name] += (h.detach().abs().double() * w.to(h.device, torch.float64).unsqueeze(-1)).sum((0, 1))
        return hook

    handles = [l.layer.register_forward_pre_hook(capture(l.name)) for l in layers]
    try:
        with eval_mode(model):
            for x, y in batches(dataset, batch_size, device=device):
                if positions == "tokens":
                    mask = x.get("attention_mask")
                    w = mask.clone() if mask is not None else torch.ones_like(x["input_ids"])
                else:
                    w = torch.zeros_like(y)
                    w[:, :-1] = (y[:, 1:] != -100)
                weight[:] = [w]
                count += w.double().sum()
                forward_logits(model, x)
    finally:
        for h in handles:
            h.remove()
    if float(count) == 0:
        raise ValueError("no position to measure the neurons on (every token is padding or unscored)")
    return {k: v / count for k, v in sums.items()}


@register("SelectivePruning", "causal-lm", budgeted=True, trains=False)
def selective_pruning(model: nn.Module, train_set, forget_classes=None, retain_fraction: float = 0.13, *,
                      forget_indices=None, ffn_frac: float = 0.05, rounds: int = 5, eps: float = 1e-8,
                      positions: str = "tokens", batch_size: int = 32, device=None, seed: int = 0,
                      progress: bool = False) -> UnlearnResult:
    r"""Selective pruning (Pochinkov & Schoots 2024, "Dissecting language models: machine unlearning
    via selective pruning"), on the MLP neurons.

    Per round: for each MLP neuron :math:`c` (an input feature of a down projection,
    :func:`dfmu_ext.lm.neurons.mlp_neuron_layers`), its importance on a data set is the mean absolute
    activation over its positions (the paper's "abs"; ``positions="tokens"``: every non-pad token,
    ``"scored"``: the positions predicting a scored label), on the forget set (:math:`I_f`) and on the
    retain budget (:math:`I_r`); score :math:`s_c = I_{f,c} / (I_{r,c} + \epsilon)`; the ``ffn_frac``
    fraction of *all* MLP neurons (one global ranking over the layers) with the highest score among
    those not yet pruned is removed (the down projection's column zeroed,
    :func:`dfmu_ext.lm.neurons.neuron_mask_plan`). ``rounds`` rounds, importances re-measured after each
    (a pruned neuron's activation is unchanged but it is never picked again). Defaults: 2% per round as
    in the paper, 5 rounds (10% of the neurons). No gradient and no training: the only cost is
    forwards.
    """
    from ..lm.neurons import mlp_neuron_layers, neuron_mask_plan

    if not 0.0 < float(ffn_frac) <= 1.0:
        raise ValueError(f"ffn_frac must be in (0, 1], got {ffn_frac}")
    if int(rounds) < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    setup = LMSetup(model, train_set, forget_classes, retain_fraction, forget_indices, device, seed)
    dev = setup.device
    t0 = time.perf_counter()
    x0, _ = take(setup.forget_set, [0])
    layers = mlp_neuron_layers(model, x0.to(dev))
    masks = {l.name: torch.ones(l.units, device=dev) for l in layers}
    total_units = sum(l.units for l in layers)
    per_round = max(1, int(round(float(ffn_frac) * total_units)))
    scoring = pruning = 0.0
    history = []
    bar = tqdm(total=int(rounds), desc="selective pruning", leave=False, unit="round", disable=not progress)
    with seeded(setup.seed, dev):
        for _ in range(int(rounds)):
            ta = time.perf_counter()
            i_f = _mean_abs_activation(model, setup.forget_set, layers, batch_size, dev, positions)
            i_r = _mean_abs_activation(model, setup.budget, layers, batch_size, dev, positions)
            synchronize(dev)
            tb = time.perf_counter()
            score = torch.cat([i_f[l.name] / (i_r[l.name] + eps) for l in layers])
            alive = torch.cat([masks[l.name] > 0 for l in layers])
            score = torch.where(alive, score, torch.full_like(score, -math.inf))
            k = min(per_round, int(alive.sum()))
            if k == 0:
                break
            order = torch.sort(score, descending=True, stable=True).indices[:k]
            flat = torch.cat([masks[l.name] for l in layers])
            flat[order] = 0.0
            offset = 0
            for l in layers:
                masks[l.name] = flat[offset:offset + l.units].clone()
                offset += l.units
            neuron_mask_plan(layers, masks).apply()
            synchronize(dev)
            tc = time.perf_counter()
            scoring += tb - ta
            pruning += tc - tb
            history.append({"pruned": k, "min_score_pruned": float(score[order[-1]])})
            bar.update(1)
    bar.close()
    info = {"ffn_frac": float(ffn_frac), "rounds": int(rounds), "eps": eps, "positions": positions,
            "rounds_run": len(history), "per_round": history, "neuron_layers": [l.name for l in layers],
            "unlearn_seconds": time.perf_counter() - t0}
    masks = {k: v.cpu() for k, v in masks.items()}
    return setup.result(model, "SelectivePruning", len(setup.budget), len(setup.forget_set), info,
                        {"scoring": scoring, "pruning": pruning}, masks=masks,
                        pruned_units={k: int((m < 1).sum()) for k, m in masks.items()},
                        total_units={l.name: l.units for l in layers})
