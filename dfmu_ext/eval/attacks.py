"""The battery's attacks: they try to bring a forget class back, from few samples (docs/method.md,
"Verifying forgetting: the battery"; the protocol choices are measured in benchmarks/RESULTS.md).

Notation as in :mod:`dfmu_ext.eval.battery`: ``f(x) = W h(x) + b`` the logits, ``h(x)`` the penultimate
features, ``F`` / ``R`` the forget / remaining classes, ``T_f`` the forget-class test samples.

* :func:`relearn_attack` — few-shot relearning from ``k`` samples per forget class.
* :func:`prototype_attack` — training-free: the forget row becomes a class prototype.

Both train or patch a deep copy (the model given is unchanged), draw from ``torch.Generator``s
seeded with the seed given (deterministic on the CPU), and share :mod:`.battery`'s input checks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from .._common import resolve_device
from ..blocks import classifier_of
from ..model_io import copy_model, model_entry
from ..splits import take_batch
from .battery import _check, _forget_acc, _logits, _other_rows, _positive_int, _subset
from .metrics import penultimate_features

__all__ = ["relearn_attack", "prototype_attack", "ROW_INITS"]

#: Forget-row initialisations of :func:`relearn_attack`.
ROW_INITS = ("mean", "random", "keep")


@torch.no_grad()
def _set_rows(head: nn.Linear, classes: list[int], rows: torch.Tensor) -> None:
    """``W[c] := rows[i]`` for the i-th forget class and ``b[c] := mean_{j ∈ R} b[j]``."""
    other = _other_rows(head, classes)
    head.weight[classes] = rows.to(head.weight)
    if head.bias is not None:
        head.bias[classes] = head.bias[other].mean()


def _draw(labels: torch.Tensor, cls_mask: torch.Tensor, k: int, gen: torch.Generator, what: str) -> torch.Tensor:
    idx = torch.nonzero(cls_mask).flatten()
    if idx.numel() < k:
        raise ValueError(f"k={k} but only {idx.numel()} {what} training samples exist")
    return idx[torch.randperm(idx.numel(), generator=gen)[:k]]


# --------------------------------------------------------------------------------------------
# few-shot relearning
# --------------------------------------------------------------------------------------------

@model_entry
def relearn_attack(model: nn.Module, train_set: Dataset, test_set: Dataset, forget_classes, *, k: int = 5,
                   steps: int = 10, lr: float = 0.003, momentum: float = 0.9, attack_seeds=(0, 1, 2),
                   head_only: bool = False, row_init: str = "mean", noise_std: float = 0.01,
                   batch_size: int = 1024, device=None) -> dict:
    """Few-shot relearning attack on a deep copy of ``model``; returns forget-class test accuracies.

    Per attack seed ``s`` (a ``torch.Generator`` seeded with ``s`` draws everything):

    1. data: ``k`` training samples of each forget class and ``k·|F|`` retain samples, uniformly
       without replacement;
    2. head: for each forget class ``c``, ``row_init="mean"``: ``W_c := mean_{j∈R} W_j + ε``,
       ``ε ~ N(0, noise_std² I)``; ``"random"``: ``W_c ~ U(-1/√d, 1/√d)`` (``nn.Linear``'s init);
       ``"keep"``: ``W_c`` unchanged. Except for ``"keep"``, ``b_c := mean_{j∈R} b_j``;
    3. ``steps`` full-batch SGD steps (``lr``, ``momentum``, no weight decay) on the mean
       cross-entropy of the ``2k·|F|`` samples, on every parameter (``head_only=False``) or on the
       classifier's only, with the model in eval mode (BatchNorm statistics frozen).

    ``a_t = acc(T_f)`` after step ``t`` (``a_0``: after the re-initialisation). Returns
    ``acc_mean`` / ``acc_per_seed`` = ``a_steps``; ``auc_mean`` / ``auc_per_seed`` =
    ``(1/steps) Σ_{t=1..steps} a_t`` (area under the relearning curve, in [0, 1]: how fast the class
    comes back); ``curve_mean`` = ``[a_0 .. a_steps]`` averaged over seeds. A class that is only hidden
    comes back faster than on a model that never learned it.

    The defaults are the protocol that separates hiding from forgetting (measured on Fashion-MNIST,
    SmallCNN, 3 classes x 3 seeds, benchmarks/RESULTS.md): K=5, mean-row init, whole model, lr 0.003,
    10 steps, final accuracy — the original (= head-mask, whose only change the reset erases) gets the
    class back to 0.965 ± 0.055, Retrain to 0.045 ± 0.025, disjoint for every class. With lr 0.01
    (DESIGN.md's first draft) the whole-model curves oscillate and Retrain relearns *faster* (0.985)
    than the original (0.906): that setting does not tell the two apart.
    """
    classes, _, labels = _check(model, {"train_set": train_set, "test_set": test_set}, forget_classes)
    k, steps = _positive_int("k", k), _positive_int("steps", steps)
    if not lr > 0 or not 0 <= momentum < 1 or not noise_std >= 0:
        raise ValueError(f"need lr > 0, 0 <= momentum < 1, noise_std >= 0; got {lr}, {momentum}, {noise_std}")
    if row_init not in ROW_INITS:
        raise ValueError(f"row_init must be one of {ROW_INITS}, got {row_init!r}")
    seeds = [attack_seeds] if isinstance(attack_seeds, int) else list(attack_seeds)
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"attack_seeds must be a non-empty sequence of ints, got {attack_seeds!r}")
    device = resolve_device(model, device)
    ytr, yte = labels["train_set"], labels["test_set"]
    cls_t = torch.tensor(classes)
    test_f = torch.isin(yte, cls_t)
    forget_test, yf = _subset(test_set, test_f), yte[test_f]
    head_name = classifier_of(model)[0]
    accs, aucs, curves = [], [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        idx = torch.cat([_draw(ytr, ytr == c, k, gen, f"class-{c}") for c in classes]
                        + [_draw(ytr, ~torch.isin(ytr, cls_t), k * len(classes), gen, "retain")])
        x, y = take_batch(train_set, idx.tolist())
        x, y = x.to(device), y.to(device)
        attacked = copy_model(model)
        head = dict(attacked.named_modules())[head_name]
        other = _other_rows(head, classes)
        d = head.in_features
        if row_init == "mean":
            noise = torch.randn(len(classes), d, generator=gen) * noise_std
            _set_rows(head, classes, head.weight.detach()[other].mean(0, keepdim=True).cpu() + noise)
        elif row_init == "random":
            _set_rows(head, classes, (torch.rand(len(classes), d, generator=gen) * 2 - 1) / d ** 0.5)
        params = list(head.parameters()) if head_only else list(attacked.parameters())
        for p in attacked.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
        attacked.eval()
        curve = [_forget_acc(attacked, forget_test, yf, batch_size, device)]
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(attacked(x), y).backward()
            opt.step()
            curve.append(_forget_acc(attacked, forget_test, yf, batch_size, device))
        curves.append(curve)
        accs.append(curve[-1])
        aucs.append(sum(curve[1:]) / steps)
    n = len(seeds)
    return {"acc_mean": sum(accs) / n, "acc_per_seed": accs, "auc_mean": sum(aucs) / n, "auc_per_seed": aucs,
            "curve_mean": [sum(c[t] for c in curves) / n for t in range(steps + 1)], "attack_seeds": seeds}


# --------------------------------------------------------------------------------------------
# prototype attack
# --------------------------------------------------------------------------------------------

@model_entry
def prototype_attack(model: nn.Module, train_set: Dataset, test_set: Dataset, forget_classes, *, k: int = 5,
                     seed: int = 0, batch_size: int = 512, device=None, details: bool = False):
    """Training-free prototype attack (Spotter): forget-class test accuracy of a patched copy.

    For each forget class ``c``, ``k`` of its training samples ``S_c`` (drawn with ``seed``) give the
    prototype ``μ_c = mean_{x∈S_c} h(x)``; the patched head has ``W_c := μ_c · m / ‖μ_c‖`` with
    ``m = mean_{j∈R} ‖W_j‖`` and ``b_c := mean_{j∈R} b_j``; every other row is unchanged. Returns
    ``acc(T_f)`` of the patched model. A model whose features still separate ``c`` gets it back.

    The read-out alone can mislead: a prototype row that wins on most inputs (non-negative ReLU
    features all point into one orthant) scores high on ``T_f`` without recognising ``c``. With
    ``details=True`` the return value is ``{"forget_acc": acc(T_f), "remaining_acc": acc(T_r),
    "captured": share of T_r predicted as a forget class}`` of the patched model, which exposes that.
    """
    classes, _, labels = _check(model, {"train_set": train_set, "test_set": test_set}, forget_classes)
    k = _positive_int("k", k)
    _positive_int("batch_size", batch_size)
    device = resolve_device(model, device)
    ytr, yte = labels["train_set"], labels["test_set"]
    gen = torch.Generator().manual_seed(int(seed))
    protos = []
    for c in classes:
        idx = _draw(ytr, ytr == c, k, gen, f"class-{c}")
        feats, _ = penultimate_features(model, Subset(train_set, idx.tolist()), batch_size=batch_size, device=device)
        protos.append(feats.double().mean(0))
    patched = copy_model(model)
    head = classifier_of(patched)[1]
    norm = head.weight.detach()[_other_rows(head, classes)].double().norm(dim=1).mean().cpu()
    rows = torch.stack([p * norm / p.norm().clamp_min(1e-12) for p in protos])
    _set_rows(head, classes, rows)
    test_f = torch.isin(yte, torch.tensor(classes))
    if not details:
        return _forget_acc(patched, _subset(test_set, test_f), yte[test_f], batch_size, device)
    pred = _logits(patched, test_set, batch_size, device).argmax(1)
    rest = ~test_f
    return {"forget_acc": (pred[test_f] == yte[test_f]).double().mean().item(),
            "remaining_acc": (pred[rest] == yte[rest]).double().mean().item() if bool(rest.any()) else float("nan"),
            "captured": torch.isin(pred[rest], torch.tensor(classes)).double().mean().item()
            if bool(rest.any()) else float("nan")}
