"""Every metric of one model at once: :func:`evaluate` (the protocol's six numbers, plus the
verification battery on request) and :func:`battery_metrics` (the battery as flat entries)."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import resolve_device, resolve_forget_set
from ..splits import dataset_labels
from .attacks import prototype_attack, relearn_attack
from .attribute import attribute_metrics
from .battery import collateral, probe_by_depth, tv_distance
from .metrics import (METRIC_KEYS, Metric, _accuracy, last_linear, linear_probe_accuracy, svc_mia_from_probs,
                      true_label_probs)
from ..model_io import model_entry
from .predict import check_batch_size, forward_collect

__all__ = ["evaluate", "battery_metrics", "BATTERY", "BATTERY_KEYS"]

# --------------------------------------------------------------------------------------------
# all of it, as flat metrics
# --------------------------------------------------------------------------------------------

#: The entries :func:`battery_metrics` adds to a metrics dict (probe-by-depth adds ``probe@<stage>`` too);
#: tables show those with ``table`` set, in this order.
BATTERY = (Metric("relearn_k5", "relearn", label="relearning attack, K=5"),
           Metric("relearn_k5_auc", "relearn AUC@30"),
           Metric("relearn_k20", "relearn K=20", table=False),
           Metric("prototype_forget_acc", "proto UA", table=False),  # ~1 for every model: tells nothing
           Metric("prototype_retain_acc", "proto RA"),
           Metric("tv_to_reference", "TV to Retrain"),
           Metric("collateral", "collateral"))
BATTERY_KEYS = tuple(m.key for m in BATTERY)


@model_entry
def battery_metrics(model: nn.Module, train_set: Dataset, test_set: Dataset, forget_classes, *, original=None,
                    reference=None, seed: int = 0, device=None, probe_samples: int = 5000) -> dict[str, float]:
    """The battery as flat ``{name: float}`` entries for a metrics table (nan where not applicable).

    * ``probe@<stage>`` — :func:`probe_by_depth` (the last stage, "penultimate", is the usual probe);
    * ``relearn_k5`` / ``relearn_k20`` — :func:`relearn_attack` final accuracy with K = 5 / 20, and
      ``relearn_k5_auc`` its area under the curve (30 steps: the graded read-out);
    * ``prototype_forget_acc`` / ``prototype_retain_acc`` — :func:`prototype_attack` (k = 5): the
      patched model's forget-class and remaining-class test accuracy. The first is ~1 for every model
      (the patched row captures many inputs); the second tells them apart: a model that still holds
      the class loses little on the remaining classes when its row comes back;
    * ``collateral`` — :func:`collateral` against ``original`` (largest per-class drop);
    * ``tv_to_reference`` — :func:`tv_distance` to ``reference`` (Retrain of the same seed).
    """
    out = {f"probe@{k}": v for k, v in probe_by_depth(model, train_set, test_set, forget_classes,
                                                       probe_samples=probe_samples, seed=seed,
                                                       device=device).items()}
    seeds = (seed, seed + 1, seed + 2)
    # One 30-step attack serves both read-outs: a 10-step attack is its exact prefix (same draws,
    # constant lr), so its final accuracy is the 30-step curve at step 10.
    k5_long = relearn_attack(model, train_set, test_set, forget_classes, k=5, steps=30, attack_seeds=seeds,
                             device=device)
    k20 = relearn_attack(model, train_set, test_set, forget_classes, k=20, attack_seeds=seeds, device=device)
    proto = prototype_attack(model, train_set, test_set, forget_classes, k=5, seed=seed, device=device, details=True)
    out.update(relearn_k5=k5_long["curve_mean"][10], relearn_k5_auc=k5_long["auc_mean"], relearn_k20=k20["acc_mean"],
               prototype_forget_acc=proto["forget_acc"], prototype_retain_acc=proto["remaining_acc"],
               collateral=float("nan"), tv_to_reference=float("nan"))
    if original is not None:
        out["collateral"] = collateral(model, original, test_set, forget_classes, device=device)["max_drop"]
    if reference is not None:
        out["tv_to_reference"] = tv_distance(model, reference, test_set, forget_classes, device=device)
    return out


@model_entry
def evaluate(model: nn.Module, train_set: Dataset, test_set: Dataset, forget_classes: Iterable[int] | None = None,
             *, forget_indices=None, test_forget_indices=None, device=None, batch_size: int = 512,
             probe_samples: int = 5000, seed: int = 0, mia: bool = True, probe: bool = True,
             battery: bool = False, original: nn.Module | None = None,
             reference: nn.Module | None = None, attribute=None) -> dict[str, float]:
    """All metrics of the evaluation protocol, as ``{name: float}`` with exactly six keys — plus,
    with ``battery=True`` (whole classes only; seconds more), the verification battery of
    :func:`battery_metrics` (``original`` for the collateral, ``reference`` = Retrain for the TV
    distance).

    The forget set is ``forget_classes`` (whole classes: ``T_f`` is their test samples) or
    ``forget_indices`` (samples of ``train_set``; ``T_f`` is ``test_forget_indices`` — e.g. the test
    samples of a forgotten sub-class — or empty, when the forget-test accuracy and the probe are nan).

    * ``forget_acc = acc(D_f)`` — UA = 1 − forget_acc.
    * ``forget_test_acc = acc(T_f)``.
    * ``retain_acc = acc(D_r)`` — RA.
    * ``test_acc = acc(T_r)`` — TA.
    * ``mia_efficacy`` — :func:`svc_mia_from_probs` with shadow "in" = ``p_y`` of ``D_r``, "out" =
      ``p_y`` of ``T_r``, target = ``p_y`` of ``D_f`` (at most :data:`MIA_MAX_PER_SIDE` per
      side, sampled with ``seed``). ``nan`` when ``mia=False``.
    * ``probe_forget_acc`` — :func:`linear_probe_accuracy` fitted on the penultimate features
      (:func:`penultimate_features`) of ``min(probe_samples, |train_set|)`` training samples drawn
      uniformly without replacement from all classes (seeded by ``seed``), scored on ``T_f``.
      ``nan`` when ``probe=False``.

    One eval-mode, ``no_grad`` pass over each of ``train_set`` and ``test_set`` serves every
    metric. The model must already be on ``device`` (default: the device of its first parameter
    or buffer, else CPU); it is not changed, and each module's train/eval flag is restored.

    Raises:
        ValueError: ``forget_classes`` is empty; ``train_set`` or ``test_set`` is empty; a forget
            class has no sample in ``train_set``; no class would remain (every training label is
            a forget class); ``test_set`` has no sample of the forget classes or none of the
            remaining classes; ``batch_size`` or ``probe_samples`` is not positive; ``probe=True``
            and the model has no ``nn.Linear``.
    """
    if attribute is not None:  # an attribute's probes beside the majority rate (dfmu_ext.eval.attribute)
        if forget_classes is not None or forget_indices is not None or battery:
            raise ValueError("attribute= is evaluated on its own: give no forget_classes, forget_indices or battery")
        return attribute_metrics(model, train_set, test_set, attribute, probe_samples=probe_samples, seed=seed,
                                 device=device, batch_size=batch_size)
    check_batch_size(batch_size)
    if probe and int(probe_samples) <= 0:
        raise ValueError(f"probe_samples must be positive, got {probe_samples}")
    if len(test_set) == 0:  # type: ignore[arg-type]
        raise ValueError("test_set is empty")
    forget = resolve_forget_set(train_set, forget_classes, forget_indices)
    train_labels = dataset_labels(train_set)
    test_labels = dataset_labels(test_set)
    train_forget = forget.is_forget
    if forget.by_classes:
        if test_forget_indices is not None:
            raise ValueError("test_forget_indices go with forget_indices; with forget_classes the test samples "
                             "of those classes are the forget-test set")
        classes = forget.classes
        test_forget = torch.isin(test_labels, torch.as_tensor(classes, dtype=torch.long))
        if not test_forget.any():
            raise ValueError(f"test_set has no sample of the forget classes {classes}")
    else:
        test_forget = torch.zeros(test_labels.numel(), dtype=torch.bool)
        if test_forget_indices is not None:
            idx = torch.as_tensor(np.asarray(test_forget_indices)).reshape(-1).long()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= test_labels.numel()):
                raise ValueError(f"test_forget_indices must lie in [0, {test_labels.numel()})")
            test_forget[idx] = True
        classes = sorted(set(test_labels[test_forget].tolist()))  # the labels the probe must recover
    if test_forget.all():
        raise ValueError("test_set has no sample of the remaining classes")
    probe = probe and bool(test_forget.any())

    device = resolve_device(model, device)
    layer = last_linear(model) if probe else None
    probe_rows = None
    if probe:
        gen = torch.Generator().manual_seed(int(seed))
        k = min(int(probe_samples), train_labels.numel())
        probe_rows = torch.zeros(train_labels.numel(), dtype=torch.bool)
        probe_rows[torch.randperm(train_labels.numel(), generator=gen)[:k]] = True

    # Pass over train: logits of all samples + features of the probe sample.
    tr_logits, tr_feats, tr_y = forward_collect(model, train_set, batch_size=batch_size,
                                                 device=device, layer=layer,
                                                 feature_rows=probe_rows)
    # Pass over test: logits of all samples + features of the forget-class test samples.
    te_logits, te_feats, te_y = forward_collect(model, test_set, batch_size=batch_size,
                                                 device=device, layer=layer,
                                                 feature_rows=test_forget if probe else None)
    # The loader's labels are the ground truth for what the model saw; they must match.
    if not (torch.equal(tr_y, train_labels) and torch.equal(te_y, test_labels)):
        raise RuntimeError("labels read through the DataLoader differ from dataset_labels()")
    if tr_logits.dim() != 2 or tr_logits.shape[0] != tr_y.numel():
        raise ValueError(f"the model must return (batch, classes) logits, got {tuple(tr_logits.shape)}")

    out = {
        "forget_acc": _accuracy(tr_logits[train_forget], tr_y[train_forget]),
        "forget_test_acc": _accuracy(te_logits[test_forget], te_y[test_forget]) if test_forget.any() else float("nan"),
        "retain_acc": _accuracy(tr_logits[~train_forget], tr_y[~train_forget]),
        "test_acc": _accuracy(te_logits[~test_forget], te_y[~test_forget]),
        "mia_efficacy": float("nan"),
        "probe_forget_acc": float("nan"),
    }
    if mia:
        p_train = true_label_probs(tr_logits, tr_y)
        p_test = true_label_probs(te_logits, te_y)
        tf, sf = train_forget.numpy(), test_forget.numpy()
        out["mia_efficacy"] = svc_mia_from_probs(p_train[~tf], p_test[~sf], p_train[tf],
                                                 seed=seed)
    if probe:
        out["probe_forget_acc"] = linear_probe_accuracy(
            tr_feats, tr_y[probe_rows], te_feats, te_y[test_forget], classes, seed=seed)
    result = {k: float(out[k]) for k in METRIC_KEYS}
    if battery:
        if not forget.by_classes:
            raise ValueError("the battery attacks the forget classes' rows: it needs forget_classes")
        result.update(battery_metrics(model, train_set, test_set, forget.classes, original=original,
                                      reference=reference, seed=seed, device=device,
                                      probe_samples=probe_samples))
    return result
