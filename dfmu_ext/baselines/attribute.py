r"""Attribute-erasure baselines on a classifier's penultimate features, each an affine map
:math:`h \mapsto W h + d` inserted before the classifier (so the probe, which reads the
classifier's input, sees erased features, and the classifier reads them too):

* **LEACE** (Belrose et al., 2023; the ``concept-erasure`` package): the least-squares edit
  :math:`h' = h - P (h - \mu)` with :math:`P = W^{+} P_{W\Sigma_{hz}} W` (``W`` the whitening), after
  which *no linear* classifier predicts the attribute better than a constant — nonlinear probes
  may still. Fitted on the budget's features with the attribute one-hot as :math:`z`.
* **INLP** (Ravfogel et al., 2020): iterative nullspace projection. For :math:`t = 1..T`, fit a
  linear classifier (logistic regression) of the attribute on the projected features
  :math:`P_{t-1} h`, add its weight rows to the removed subspace :math:`R`, and set
  :math:`P_t = I - Q Q^\top` with :math:`Q` an orthonormal basis of :math:`R`; stop early when the
  classifier is within ``stop_margin`` of the majority rate.

Both read ``retain_fraction`` of the training set (the same class-stratified slice DFMU's budget
uses for the seed) and no labels, and train nothing: the classifier keeps its weights.

Both register in the method registry (:mod:`.registry`) on the ``"attribute"`` task, which a call
selects by its ``forget_attribute=`` keyword (:func:`dfmu_ext.tasks.task_for`), so
``METHODS["LEACE"](model, train_set, forget_attribute=values)`` runs :func:`leace`, and a comparison
lists them with ``methods_for("attribute")``. Neither trains (``trains=False``); both read the budget
(``budgeted=True``). :data:`ATTRIBUTE_METHODS` keeps the plain functions by table name.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import model_device
from ..blocks import classifier_of
from ..eval.metrics import penultimate_features
from ..result import UnlearnResult
from ..splits import stratified_fraction
from ..tasks.attribute import check_values
from .registry import register

__all__ = ["leace", "inlp", "insert_before_classifier", "ATTRIBUTE_METHODS"]


def insert_before_classifier(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """Replace the classifier ``head`` by ``Sequential(Linear(weight, bias), head)`` in place; returns the new Linear."""
    name, head = classifier_of(model)
    d = head.in_features
    if tuple(weight.shape) != (d, d) or bias.numel() != d:
        raise ValueError(f"the eraser must be ({d}, {d}) with a bias of {d}, got {tuple(weight.shape)}")
    eraser = nn.Linear(d, d).to(head.weight.device, head.weight.dtype)
    with torch.no_grad():
        eraser.weight.copy_(weight)
        eraser.bias.copy_(bias.reshape(-1))
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Sequential(eraser, head))
    return eraser


def _budget_features(model, train_set, values, retain_fraction, seed):
    v = check_values(values, len(train_set))
    budget = stratified_fraction(train_set, retain_fraction, seed=seed)
    h, _ = penultimate_features(model, budget, layer=classifier_of(model)[1])
    return h.double(), v[torch.as_tensor(list(budget.indices), dtype=torch.long)], len(budget)


def _result(model, name, seconds, used, info) -> UnlearnResult:
    return UnlearnResult(model=model, timings={"total": seconds}, retain_samples_used=used, forget_samples_used=used,
                         method=name, info=info)


@register("LEACE", "attribute", budgeted=True, trains=False)
def leace(model: nn.Module, train_set: Dataset, forget_attribute=None, retain_fraction: float = 0.13, *,
          device=None, seed: int = 0, progress: bool = False) -> UnlearnResult:
    """LEACE on the penultimate features (module docs); the model gains the eraser before its classifier."""
    from concept_erasure import LeaceFitter

    if device is not None:
        model.to(device)
    start = time.perf_counter()
    h, a, used = _budget_features(model, train_set, forget_attribute, retain_fraction, seed)
    z = torch.nn.functional.one_hot(a, int(a.max()) + 1).double()
    eraser = LeaceFitter.fit(h, z).eraser
    p = eraser.proj_left @ eraser.proj_right           # h' = h - P (h - mu) = (I - P) h + P mu
    weight = torch.eye(h.shape[1], dtype=torch.float64) - p
    bias = p @ eraser.bias if eraser.bias is not None else torch.zeros(h.shape[1], dtype=torch.float64)
    insert_before_classifier(model, weight.float().to(model_device(model)), bias.float().to(model_device(model)))
    return _result(model, "LEACE", time.perf_counter() - start, used, {"rank": int(torch.linalg.matrix_rank(p))})


@register("INLP", "attribute", budgeted=True, trains=False)
def inlp(model: nn.Module, train_set: Dataset, forget_attribute=None, retain_fraction: float = 0.13, *,
         iterations: int = 20, stop_margin: float = 0.01, device=None, seed: int = 0,
         progress: bool = False) -> UnlearnResult:
    """INLP on the penultimate features (module docs): at most ``iterations`` nullspace projections,
    each classifier fitted on 80 % of the budget's features and judged on the other 20 %."""
    from sklearn.linear_model import LogisticRegression

    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if device is not None:
        model.to(device)
    start = time.perf_counter()
    h, a, used = _budget_features(model, train_set, forget_attribute, retain_fraction, seed)
    x, y = h.numpy(), a.numpy()
    mu = x.mean(0)
    order = np.random.default_rng(seed).permutation(x.shape[0])
    cut = int(0.8 * x.shape[0])
    fit_rows, dev_rows = order[:cut], order[cut:]
    majority = float(np.mean(y[dev_rows] == np.bincount(y[fit_rows]).argmax()))
    d = x.shape[1]
    removed = np.zeros((0, d))
    proj = np.eye(d)
    accs = []
    for _ in range(iterations):
        xp = (x - mu) @ proj
        clf = LogisticRegression(max_iter=1000).fit(xp[fit_rows], y[fit_rows])
        accs.append(float(clf.score(xp[dev_rows], y[dev_rows])))
        if accs[-1] <= majority + stop_margin:
            break
        removed = np.vstack([removed, clf.coef_])
        q, _ = np.linalg.qr(removed.T)            # orthonormal basis of the removed rowspace
        proj = np.eye(d) - q @ q.T
    # h' = P (h - mu) + mu: the nullspace projection about the features' mean (P symmetric)
    weight = torch.as_tensor(proj, dtype=torch.float32)
    bias = torch.as_tensor(mu - proj @ mu, dtype=torch.float32)
    insert_before_classifier(model, weight.to(model_device(model)), bias.to(model_device(model)))
    return _result(model, "INLP", time.perf_counter() - start, used,
                   {"directions": int(removed.shape[0]), "classifier_accuracy": accs})


#: The attribute-erasure methods by table name, as plain functions (the registry holds them too: ``METHODS``).
ATTRIBUTE_METHODS = {"LEACE": leace, "INLP": inlp}
