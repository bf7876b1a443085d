r"""Does a model's representation still encode an attribute? Probes trained afresh on its
penultimate features, beside the majority rate (what a probe that learnt nothing scores).

* ``attr_probe_linear``: ``StandardScaler`` + multinomial logistic regression (L2, C=1, lbfgs);
* ``attr_probe_mlp``: ``StandardScaler`` + a 2-layer MLP (one hidden ReLU layer of 128 units, Adam,
  200 epochs, no early stop: a 10 % early-stop split left it at 95 % on a separable hand case) — it
  reads nonlinear structure a linear eraser leaves;
* ``attr_majority``: the test accuracy of always answering the training probe set's most frequent value,
  :math:`\max_k \frac{1}{|T|}|\{i \in T : a_i = \hat k\}|` with :math:`\hat k` the training mode;
* ``test_acc``: the model's label accuracy on the test set (what must be kept).

Both probes are fitted on ``probe_samples`` training samples (seeded, uniform) and scored on every
test sample. A model that forgot the attribute has both probes at the majority rate.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import resolve_device
from .metrics import PROBE_MAX_ITER, Metric, _accuracy, last_linear
from .predict import check_batch_size, forward_collect

__all__ = ["ATTRIBUTE_METRICS", "ATTRIBUTE_KEYS", "attribute_probes", "attribute_metrics", "attribute_values"]

#: The entries :func:`attribute_metrics` returns, declared once (tables and plots read them).
ATTRIBUTE_METRICS = (Metric("test_acc", "TA", label="task test accuracy"),
                     Metric("attr_probe_linear", "probe lin", label="linear probe on the attribute"),
                     Metric("attr_probe_mlp", "probe MLP", label="MLP probe on the attribute"),
                     Metric("attr_majority", "majority", label="majority rate"))
ATTRIBUTE_KEYS = tuple(m.key for m in ATTRIBUTE_METRICS)

#: Hidden units of the MLP probe.
MLP_HIDDEN = 128


def attribute_values(values, n: int, what: str) -> np.ndarray:
    """``values`` as a 1-D int64 array of length ``n``; a one-line ValueError otherwise."""
    v = np.asarray(values).reshape(-1)
    if v.size != n:
        raise ValueError(f"attribute: {v.size} {what} values for {n} {what} samples")
    if v.dtype.kind == "f" and not np.all(v == np.round(v)):
        raise ValueError(f"attribute: the {what} values must be integers")
    return v.astype(np.int64)


def attribute_probes(train_feats, train_values, test_feats, test_values, *, seed: int = 0,
                     max_iter: int = PROBE_MAX_ITER) -> dict[str, float]:
    """``{"attr_probe_linear", "attr_probe_mlp", "attr_majority"}``: the two probes fitted on
    ``(train_feats, train_values)`` and scored on ``(test_feats, test_values)``, and the majority rate.
    With a single value in ``train_values`` both probes answer it (= the majority rate)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    xtr = np.asarray(train_feats, dtype=np.float64).reshape(len(train_feats), -1)
    xte = np.asarray(test_feats, dtype=np.float64).reshape(len(test_feats), -1)
    ytr = attribute_values(train_values, xtr.shape[0], "train")
    yte = attribute_values(test_values, xte.shape[0], "test")
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise ValueError("attribute probes: no train or no test features")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"attribute probes: train features have {xtr.shape[1]} dimensions, test {xte.shape[1]}")
    present, counts = np.unique(ytr, return_counts=True)
    mode = present[np.argmax(counts)]  # ties: the smallest value
    majority = float(np.mean(yte == mode))
    if present.size == 1:
        return {"attr_probe_linear": majority, "attr_probe_mlp": majority, "attr_majority": majority}
    scaler = StandardScaler().fit(xtr)
    a, b = scaler.transform(xtr), scaler.transform(xte)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # convergence warnings: the iteration caps are the protocol's
        linear = LogisticRegression(C=1.0, max_iter=max_iter).fit(a, ytr)
        mlp = MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), max_iter=200,
                            random_state=int(seed)).fit(a, ytr)
    return {"attr_probe_linear": float(linear.score(b, yte)), "attr_probe_mlp": float(mlp.score(b, yte)),
            "attr_majority": majority}


def attribute_metrics(model: nn.Module, train_set: Dataset, test_set: Dataset, attribute, *,
                      probe_samples: int = 5000, seed: int = 0, device=None,
                      batch_size: int = 512) -> dict[str, float]:
    """:data:`ATTRIBUTE_KEYS` of ``model``: ``attribute = (train_values, test_values)``, one integer
    per sample of each set. One eval pass over each set; the probe's training rows are
    ``min(probe_samples, |train_set|)`` seeded uniform draws."""
    check_batch_size(batch_size)
    if not isinstance(attribute, (tuple, list)) or len(attribute) != 2:
        raise ValueError("attribute must be (train_values, test_values)")
    if int(probe_samples) <= 0:
        raise ValueError(f"probe_samples must be positive, got {probe_samples}")
    n_tr, n_te = len(train_set), len(test_set)  # type: ignore[arg-type]
    tr_v = attribute_values(attribute[0], n_tr, "train")
    te_v = attribute_values(attribute[1], n_te, "test")
    device = resolve_device(model, device)
    layer = last_linear(model)
    rows = torch.zeros(n_tr, dtype=torch.bool)
    rows[torch.randperm(n_tr, generator=torch.Generator().manual_seed(int(seed)))[:min(int(probe_samples), n_tr)]] = True
    _, tr_feats, _ = forward_collect(model, train_set, batch_size=batch_size, device=device, want_logits=False,
                                     layer=layer, feature_rows=rows)
    te_logits, te_feats, te_y = forward_collect(model, test_set, batch_size=batch_size, device=device, layer=layer)
    out = {"test_acc": _accuracy(te_logits, te_y)}
    out.update(attribute_probes(tr_feats, tr_v[rows.numpy()], te_feats, te_v, seed=seed))
    return {k: float(out[k]) for k in ATTRIBUTE_KEYS}
