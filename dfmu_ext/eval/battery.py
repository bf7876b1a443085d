"""The verification battery: tests that tell forgetting a class from hiding it (docs/method.md,
"Verifying forgetting: the battery"; the protocol choices are measured in benchmarks/RESULTS.md).

Notation as in :mod:`dfmu_ext.eval.metrics`: ``f(x) = W h(x) + b`` the logits, ``h(x)`` the penultimate
features (the input of the classifier, the last ``nn.Linear``), ``F`` the forget classes,
``R`` the remaining classes, ``D_f`` / ``D_r`` the training samples of ``F`` / ``R``, ``T_f`` / ``T_r``
the same split of the test set, ``acc(S)`` the top-1 accuracy on ``S``.

* :func:`probe_by_depth` — the linear probe of :func:`metrics.linear_probe_accuracy` on the globally
  average-pooled output of each stage, and on ``h``.
* :func:`~dfmu_ext.eval.attacks.relearn_attack`, :func:`~dfmu_ext.eval.attacks.prototype_attack` —
  the attacks, in :mod:`.attacks` (they share this module's input checks and forward passes).
* :func:`tv_distance` — distance to a reference's (Retrain's) remaining-class outputs on ``T_f``.
* :func:`collateral` — the largest per-class accuracy drop among the remaining classes.

Every function leaves the models it is given unchanged (forwards run in eval mode under
``no_grad`` and restore each module's train/eval flag; attacks train a deep copy), is deterministic
on the CPU for a given seed (draws come from ``torch.Generator``s seeded with it), and raises a
one-line ``ValueError`` / ``TypeError`` for bad inputs.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .._common import eval_mode, resolve_device
from ..blocks import classifier_of
from ..model_io import model_entry
from ..splits import dataset_labels, make_loader, take_batch
from .metrics import linear_probe_accuracy

__all__ = ["default_stages", "probe_by_depth", "tv_distance", "collateral"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)
_NONLINS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.PReLU,
            nn.Tanh, nn.Sigmoid)


# --------------------------------------------------------------------------------------------
# validation and plumbing
# --------------------------------------------------------------------------------------------

def _check(model: nn.Module, datasets: dict, forget_classes, *, need_rest: bool = True):
    """Validate inputs; return ``(sorted forget classes, head, {name: labels})``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    head = classifier_of(model)[1]
    if isinstance(forget_classes, (str, bytes, float)):
        raise TypeError(f"forget_classes must be an int or an iterable of ints, got {forget_classes!r}")
    if isinstance(forget_classes, (int, torch.Tensor)) and torch.as_tensor(forget_classes).dim() == 0:
        forget_classes = [int(forget_classes)]
    try:
        classes = sorted({int(c) for c in forget_classes})
    except TypeError:
        raise TypeError(f"forget_classes must be an int or an iterable of ints, got {forget_classes!r}") from None
    if not classes:
        raise ValueError("forget_classes is empty: name at least one class")
    if classes[0] < 0 or classes[-1] >= head.out_features:
        raise ValueError(f"forget classes {classes} outside the classifier's {head.out_features} outputs")
    if need_rest and len(classes) >= head.out_features:
        raise ValueError("every class is a forget class; no class would remain")
    labels = {}
    for name, ds in datasets.items():
        if not isinstance(ds, Dataset) and not hasattr(ds, "__getitem__"):
            raise TypeError(f"{name} must be a map-style dataset of (x, y), got {type(ds).__name__}")
        if len(ds) == 0:
            raise ValueError(f"{name} is empty")
        y = dataset_labels(ds)
        missing = [c for c in classes if not bool((y == c).any())]
        if missing:
            raise ValueError(f"{name} has no sample of the forget classes {missing}")
        labels[name] = y
    return classes, head, labels


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _subset(ds: Dataset, mask: torch.Tensor) -> Subset:
    return Subset(ds, torch.nonzero(mask).flatten().tolist())


@torch.no_grad()
def _logits(model: nn.Module, ds: Dataset, batch_size: int, device) -> torch.Tensor:
    with eval_mode(model):
        outs = [model(x.to(device)).float().cpu() for x, _ in make_loader(ds, batch_size=batch_size)]
    return torch.cat(outs)


def _forget_acc(model: nn.Module, ds: Dataset, y: torch.Tensor, batch_size: int, device) -> float:
    return (_logits(model, ds, batch_size, device).argmax(1) == y).double().mean().item()


def _other_rows(head: nn.Linear, classes: list[int]) -> torch.Tensor:
    keep = torch.ones(head.out_features, dtype=torch.bool)
    keep[classes] = False
    return keep.to(head.weight.device)


# --------------------------------------------------------------------------------------------
# probe by depth
# --------------------------------------------------------------------------------------------

@model_entry
def default_stages(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Module names whose output :func:`probe_by_depth` probes by default.

    * A model with children ``layer1 .. layer4`` (a ResNet): those four stages.
    * Otherwise: every nonlinearity module that directly follows a conv block, i.e. whose
      predecessor in execution order (leaf modules, one eval forward of ``example``) is a conv, or a
      norm that directly follows a conv. For :class:`models.SmallCNN` these are the ReLUs of its four
      conv-BN-ReLU blocks. A module called more than once per forward is skipped.
    * A model with no such stage (a transformer): the members of its longest ``nn.ModuleList`` (the
      encoder's layers), each called once per forward.
    """
    children = {n for n, _ in model.named_children()}
    if all(f"layer{i}" in children for i in range(1, 5)):
        return [f"layer{i}" for i in range(1, 5)]
    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not list(m.children())]
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]
    prefix, layers = max(lists, key=lambda nm: len(nm[1])) if lists else ("", nn.ModuleList())
    # one forward records the calls of the leaves (the conv rule) and of the longest list's members
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in {*leaves, *layers}]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    calls = {m: order.count(m) for m in order}
    leaf_set = set(leaves)
    order = [m for m in order if m in leaf_set]
    stages = []
    for i, m in enumerate(order):
        if not isinstance(m, _NONLINS) or calls[m] != 1 or i == 0:
            continue
        prev, prev2 = order[i - 1], order[i - 2] if i >= 2 else None
        if isinstance(prev, _CONVS) or (isinstance(prev, _NORMS) and isinstance(prev2, _CONVS)):
            stages.append(names[m])
    if not stages:
        stages = [f"{prefix}.{i}" for i, layer in enumerate(layers) if calls.get(layer) == 1]
    return stages


@torch.no_grad()
def _pooled_features(model, ds, modules: dict, batch_size: int, device) -> dict[str, torch.Tensor]:
    """One eval pass over ``ds``: ``{name: (N, C)}``, each module's output averaged over its
    positions, plus ``"penultimate"``, the classifier's input. Positions are dims ≥ 2 of a
    ``(N, C, *spatial)`` output; a 3-D output whose last dim is the classifier's width is a
    transformer's ``(N, T, C)`` and is averaged over ``T``. A tuple output (a transformers layer's)
    is read at its first element."""
    width = classifier_of(model)[1].in_features
    got: dict[str, list] = {n: [] for n in modules}
    got["penultimate"] = []
    per_batch: dict[str, int] = {}

    def out_hook(name):
        def hook(_m, _i, out):
            per_batch[name] = per_batch.get(name, 0) + 1
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.detach().float()
            if out.dim() == 3 and out.shape[-1] == width:
                pooled = out.mean(dim=1)
            elif out.dim() > 2:
                pooled = out.mean(dim=tuple(range(2, out.dim())))
            else:
                pooled = out.reshape(out.shape[0], -1)
            got[name].append(pooled.cpu())
        return hook

    def pre_hook(_m, inputs):
        per_batch["penultimate"] = per_batch.get("penultimate", 0) + 1
        got["penultimate"].append(inputs[0].detach().float().reshape(inputs[0].shape[0], -1).cpu())

    hooks = [m.register_forward_hook(out_hook(n)) for n, m in modules.items()]
    hooks.append(classifier_of(model)[1].register_forward_pre_hook(pre_hook))
    try:
        with eval_mode(model):
            for x, _ in make_loader(ds, batch_size=batch_size):
                per_batch.clear()
                model(x.to(device))
                bad = [n for n in got if per_batch.get(n, 0) != 1]
                if bad:
                    raise ValueError(f"stages {bad} did not run exactly once per forward")
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@model_entry
def probe_by_depth(model: nn.Module, train_set: Dataset, test_set: Dataset, forget_classes, *, stages=None,
                   probe_samples: int = 5000, batch_size: int = 512, device=None, seed: int = 0) -> dict[str, float]:
    """Forget-class linear-probe accuracy at each depth: ``{stage name: acc, ..., "penultimate": acc}``.

    For each stage ``s`` with output ``a_s(x)`` of shape ``(C, *spatial)`` the feature is the global
    average ``z_s(x) = mean_spatial a_s(x) ∈ R^C``; ``"penultimate"`` is ``h(x)``. The probe is
    :func:`metrics.linear_probe_accuracy` (standardise, multinomial logistic regression, C=1): fitted
    on ``z_s`` of ``min(probe_samples, |train_set|)`` training samples drawn uniformly without
    replacement, all classes (the same draw as :func:`metrics.evaluate` for the same ``seed``, so
    ``"penultimate"`` equals its ``probe_forget_acc``), scored as its accuracy on ``T_f``.

    ``stages`` are module names (``model.named_modules()``); default :func:`default_stages`. Forward
    hooks capture every stage in one eval pass over the probe sample and one over ``T_f``.
    """
    classes, _, labels = _check(model, {"train_set": train_set, "test_set": test_set}, forget_classes,
                                need_rest=False)
    probe_samples = _positive_int("probe_samples", probe_samples)
    _positive_int("batch_size", batch_size)
    device = resolve_device(model, device)
    named = dict(model.named_modules())
    if stages is None:
        stages = default_stages(model, take_batch(train_set, [0])[0].to(device))
    if isinstance(stages, str):
        raise TypeError("stages must be a list of module names, not a string")
    unknown = [s for s in stages if s not in named or s == "penultimate"]
    if unknown:
        raise ValueError(f"unknown stage names {unknown}")
    ytr, yte = labels["train_set"], labels["test_set"]
    gen = torch.Generator().manual_seed(int(seed))
    rows = torch.zeros(ytr.numel(), dtype=torch.bool)
    rows[torch.randperm(ytr.numel(), generator=gen)[:min(probe_samples, ytr.numel())]] = True
    test_rows = torch.isin(yte, torch.tensor(classes))
    modules = {s: named[s] for s in stages}
    ftr = _pooled_features(model, _subset(train_set, rows), modules, batch_size, device)
    fte = _pooled_features(model, _subset(test_set, test_rows), modules, batch_size, device)
    return {n: linear_probe_accuracy(ftr[n], ytr[rows], fte[n], yte[test_rows], classes, seed=seed)
            for n in list(stages) + ["penultimate"]}


# --------------------------------------------------------------------------------------------
# distance to a reference, collateral damage
# --------------------------------------------------------------------------------------------

@model_entry
def tv_distance(model: nn.Module, reference: nn.Module, test_set: Dataset, forget_classes, *,
                batch_size: int = 512, device=None) -> float:
    """Mean total-variation distance between the remaining-class distributions on ``T_f``.

    ``p(x) = softmax(f(x)_R)`` (the softmax restricted to the remaining classes, i.e. the full
    softmax renormalised over ``R``), ``q(x)`` the same for ``reference``;
    returns ``(1/|T_f|) Σ_{x∈T_f} ½ Σ_{j∈R} |p_j(x) − q_j(x)|`` ∈ [0, 1] (0 for identical models).
    """
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
    classes, head, labels = _check(model, {"test_set": test_set}, forget_classes)
    if classifier_of(reference)[1].out_features != head.out_features:
        raise ValueError("model and reference have classifiers of different widths")
    _positive_int("batch_size", batch_size)
    test_f = _subset(test_set, torch.isin(labels["test_set"], torch.tensor(classes)))
    keep = _other_rows(head, classes).cpu()
    p = torch.softmax(_logits(model, test_f, batch_size, resolve_device(model, device)).double()[:, keep], 1)
    q = torch.softmax(_logits(reference, test_f, batch_size, resolve_device(reference, device)).double()[:, keep], 1)
    return float(0.5 * (p - q).abs().sum(1).mean())


@model_entry
def collateral(model: nn.Module, original: nn.Module, test_set: Dataset, forget_classes, *,
               batch_size: int = 512, device=None) -> dict:
    """Collateral damage on the remaining classes: ``drop_j = acc_orig(T_j) − acc_model(T_j)``, ``j ∈ R``.

    Returns ``{"max_drop": max_j drop_j, "worst_class": argmax_j drop_j (lowest index on ties),
    "per_class_drop": {j: drop_j}}``; remaining classes without a test sample are skipped. A
    negative ``max_drop`` means every remaining class improved.
    """
    if not isinstance(original, nn.Module):
        raise TypeError(f"original must be an nn.Module, got {type(original).__name__}")
    classes, head, labels = _check(model, {"test_set": test_set}, forget_classes)
    if classifier_of(original)[1].out_features != head.out_features:
        raise ValueError("model and original have classifiers of different widths")
    _positive_int("batch_size", batch_size)
    y = labels["test_set"]
    pm = _logits(model, test_set, batch_size, resolve_device(model, device)).argmax(1)
    po = _logits(original, test_set, batch_size, resolve_device(original, device)).argmax(1)
    drops = {}
    for j in range(head.out_features):
        sel = y == j
        if j in classes or not bool(sel.any()):
            continue
        drops[j] = (po[sel] == j).double().mean().item() - (pm[sel] == j).double().mean().item()
    if not drops:
        raise ValueError("test_set has no sample of a remaining class")
    worst = max(drops, key=lambda j: (drops[j], -j))
    return {"max_drop": drops[worst], "worst_class": worst, "per_class_drop": drops}
