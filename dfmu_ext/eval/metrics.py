"""Evaluation of an unlearned classifier: UA/RA/TA accuracies, SVC membership inference, linear probe.

The protocol is the field's standard one (SalUn / l1-sparse), described in docs/method.md
"Evaluation protocol". Notation used in the docstrings below:

* ``f(x)`` — the model's logits, ``p(x) = softmax(f(x))``; ``ŷ(x) = argmax_k f(x)_k``
  (ties go to the lowest class index, as ``torch.argmax``).
* ``F`` — the forget classes; ``D_f`` / ``D_r`` — the training samples whose label is / is not in
  ``F``; ``T_f`` / ``T_r`` — the same split of the test set.
* ``acc(S) = |{(x, y) ∈ S : ŷ(x) = y}| / |S|``.

:func:`evaluate` returns ``forget_acc = acc(D_f)`` (UA = 1 − forget_acc), ``forget_test_acc =
acc(T_f)``, ``retain_acc = acc(D_r)`` (RA), ``test_acc = acc(T_r)`` (TA), ``mia_efficacy`` and
``probe_forget_acc`` (:func:`dfmu_ext.eval.evaluate.evaluate` computes them all at once); see :func:`svc_mia_from_probs` and :func:`linear_probe_accuracy` for the last
two. Each piece is a separate function that a test can call alone.

Nothing here changes the model: every forward runs under ``torch.no_grad()`` with the model in eval
mode (so BatchNorm statistics are not updated), and each module's train/eval flag is restored
afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .._common import normalise_classes, resolve_device
from ..blocks import classifier_of
from ..model_io import model_entry
from .predict import check_batch_size, forward_collect

__all__ = [
    "true_label_probs",
    "penultimate_features",
    "last_linear",
    "mia_efficacy",
    "svc_mia_from_probs",
    "linear_probe_accuracy",
    "MIA_MAX_PER_SIDE",
    "Metric",
    "METRICS",
    "METRIC_KEYS",
]

#: Cap on each side ("in" / "out") of the MIA shadow training set. An RBF SVC costs O(n²) or more
#: in the number of training points; 5000 + 5000 one-dimensional points fit in a few seconds.
MIA_MAX_PER_SIDE = 5000

#: Iteration budget of the probe's lbfgs solver. On standardised features it converged in ~150
#: iterations on a small Fashion-MNIST CNN's 128-d features; the budget leaves ample room.
PROBE_MAX_ITER = 2000



@dataclass(frozen=True)
class Metric:
    """How one metric is reported, declared once beside it and read by every table and plot.

    ``key``: its name in a metrics dict; ``header``: its table column; ``label``: its longer name on a
    plot axis (default the header); a value ``v`` is shown as ``scale * v`` (``scale * (1 - v)`` when
    ``invert``: UA = 1 - forget accuracy) with the format ``fmt`` (a ``+`` in it signs the mean, never
    the spread); ``table``: whether tables show it (some keys are kept in the data only).
    """

    key: str
    header: str
    scale: float = 100.0
    fmt: str = ".1f"
    invert: bool = False
    label: str = ""
    table: bool = True

    def shown(self, value: float) -> float:
        """The value as the table shows it before scaling: ``1 - value`` for an inverted metric."""
        return 1.0 - value if self.invert else value

    @property
    def axis(self) -> str:
        """The plot-axis name: the label (or header), with "(%)" for a metric shown in per cent."""
        return (self.label or self.header) + (" (%)" if self.scale == 100.0 else "")

    def cell(self, mean: float, std: float, n: int) -> str:
        """``scale*mean ± scale*std`` in ``fmt`` ("-" when no finite value; no spread for one value)."""
        if n == 0 or not math.isfinite(mean):
            return "-"
        text = format(self.scale * mean, self.fmt)
        return text + (f" ± {format(self.scale * std, self.fmt.lstrip('+'))}" if n > 1 else "")


#: The protocol's six metrics (:func:`dfmu_ext.eval.evaluate`), in the order it returns them.
METRICS = (Metric("forget_acc", "UA", invert=True),
           Metric("forget_test_acc", "forget-test"),
           Metric("retain_acc", "RA", label="retain accuracy RA"),
           Metric("test_acc", "TA"),
           Metric("mia_efficacy", "MIA-efficacy"),
           Metric("probe_forget_acc", "probe", label="forget-class linear probe"))
METRIC_KEYS = tuple(m.key for m in METRICS)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier (:func:`dfmu_ext.blocks.classifier_of`), whose input is the penultimate feature."""
    try:
        return classifier_of(model)[1]
    except ValueError:
        raise ValueError("the model has no nn.Linear module, so it has no penultimate features "
                         "for the linear probe (pass probe=False, or layer=...)") from None


def true_label_probs(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """``p(x_i)_{y_i} = softmax(f(x_i))_{y_i}`` per sample, computed in float64, as a numpy array."""
    if logits.shape[0] == 0:
        return np.empty(0, dtype=np.float64)
    labels = labels.long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}) for logits of width "
                         f"{logits.shape[1]}")
    probs = torch.softmax(logits.double(), dim=1)
    return probs.gather(1, labels[:, None]).squeeze(1).numpy()


def _one_blas_thread():
    """Context limiting numpy/scipy BLAS to one thread while sklearn fits.

    The probe's and SVC's problems are small (thousands of rows); with two or more BLAS threads on
    a busy machine — or beside PyTorch's OpenMP threads still spin-waiting after the forward
    passes — lbfgs ran 30-40x slower (36 s instead of 0.8 s for 5000 x 128 features, 10 classes).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


# --------------------------------------------------------------------------------------------
# penultimate features
# --------------------------------------------------------------------------------------------

@model_entry
def penultimate_features(model: nn.Module, dataset: Dataset, *, layer: nn.Module | None = None,
                         batch_size: int = 512, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of ``dataset``: the penultimate representation ``h(x)`` of each sample.

    ``h(x)`` is the input of ``layer`` — by default the model's last ``nn.Linear`` in
    ``model.modules()`` order, i.e. ``f(x) = W h(x) + b`` for a usual classifier — captured with a
    forward pre-hook (removed afterwards, also on error), flattened to ``(N, D)`` float32 on the
    CPU. The model runs in eval mode under ``no_grad``; its train/eval flags are restored.
    """
    check_batch_size(batch_size)
    layer = last_linear(model) if layer is None else layer
    device = resolve_device(model, device)
    _, feats, labels = forward_collect(model, dataset, batch_size=batch_size, device=device,
                                        want_logits=False, layer=layer)
    return feats, labels


# --------------------------------------------------------------------------------------------
# membership inference (SVC on the true-label probability)
# --------------------------------------------------------------------------------------------

def svc_mia_from_probs(shadow_in: np.ndarray, shadow_out: np.ndarray, target: np.ndarray, *,
                       max_per_side: int = MIA_MAX_PER_SIDE, seed: int = 0) -> float:
    """MIA-efficacy from one-dimensional features (the true-label probabilities).

    A membership classifier ``g = SVC(C=3, gamma="auto", kernel="rbf")`` (``gamma="auto"`` is
    ``1 / n_features = 1``, so the kernel is ``exp(-(s - s')²)``) is fitted on

    * "in" (label 1): ``n`` samples of ``shadow_in`` (the retain training samples' ``p_y``),
    * "out" (label 0): ``n`` samples of ``shadow_out`` (the remaining-class test samples' ``p_y``),

    with ``n = min(len(shadow_in), len(shadow_out), max_per_side)``; each side is drawn uniformly
    without replacement (seeded by ``seed``) when it holds more than ``n``. The SalUn protocol uses
    as many retain samples as test samples; the cap only subsamples both sides equally for speed.

    Returns ``|{t ∈ target : g(t) = 0}| / |target|``: the fraction of the forget samples that the
    attacker calls non-members. Retraining from scratch is the reference value; higher means the
    forget samples look more like unseen data.
    """
    shadow_in = np.asarray(shadow_in, dtype=np.float64).reshape(-1)
    shadow_out = np.asarray(shadow_out, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    for name, arr in (("shadow_in", shadow_in), ("shadow_out", shadow_out), ("target", target)):
        if arr.size == 0:
            raise ValueError(f"svc_mia_from_probs: {name} is empty")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"svc_mia_from_probs: {name} holds non-finite values")
    if int(max_per_side) <= 0:
        raise ValueError(f"max_per_side must be positive, got {max_per_side}")
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)
    n = min(shadow_in.size, shadow_out.size, int(max_per_side))
    if shadow_in.size > n:
        shadow_in = shadow_in[rng.choice(shadow_in.size, size=n, replace=False)]
    if shadow_out.size > n:
        shadow_out = shadow_out[rng.choice(shadow_out.size, size=n, replace=False)]
    x = np.concatenate([shadow_in, shadow_out])[:, None]
    y = np.concatenate([np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)])
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    with _one_blas_thread():
        clf.fit(x, y)
        pred = clf.predict(target[:, None])
    return float(np.mean(pred == 0))


@model_entry
def mia_efficacy(model: nn.Module, retain_train: Dataset, forget_train: Dataset,
                 test_remaining: Dataset, *, batch_size: int = 512, device=None,
                 max_per_side: int = MIA_MAX_PER_SIDE, seed: int = 0) -> float:
    """MIA-efficacy of ``model`` on ``forget_train`` (SalUn / l1-sparse protocol).

    Each sample's feature is ``s(x, y) = softmax(f(x))_y``; shadow "in" = retain training
    samples, shadow "out" = the remaining-class test samples, target = the forget training
    samples. See :func:`svc_mia_from_probs` for the attacker and the returned fraction.
    """
    check_batch_size(batch_size)
    device = resolve_device(model, device)
    for name, ds in (("retain_train", retain_train), ("forget_train", forget_train),
                     ("test_remaining", test_remaining)):
        if len(ds) == 0:  # type: ignore[arg-type]
            raise ValueError(f"mia_efficacy: {name} is empty")
    probs = []
    for ds in (retain_train, forget_train, test_remaining):
        logits, _, labels = forward_collect(model, ds, batch_size=batch_size, device=device)
        probs.append(true_label_probs(logits, labels))
    return svc_mia_from_probs(probs[0], probs[2], probs[1], max_per_side=max_per_side, seed=seed)


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------

def linear_probe_accuracy(train_feats, train_labels, test_feats, test_labels,
                          forget_classes: Iterable[int], *, max_iter: int = PROBE_MAX_ITER,
                          seed: int = 0) -> float:
    """Forget-class accuracy of a linear probe fitted on frozen features.

    The probe is ``z ↦ argmax_k (W ((z − μ) / σ) + b)_k``: a ``StandardScaler`` (per-feature mean
    ``μ`` and standard deviation ``σ`` of ``train_feats``; constant features map to 0) followed by
    a multinomial logistic regression (softmax cross-entropy, L2 penalty C=1, lbfgs, ``max_iter``
    iterations) over the classes present in ``train_labels``. It is fitted on
    ``(train_feats, train_labels)`` — normally a random sample of all training classes, the forget
    classes included — and the returned score is its accuracy on the test samples whose label is
    in ``forget_classes``:

        ``|{i : y_i ∈ F, probe(z_i) = y_i}| / |{i : y_i ∈ F}|``.

    A model that only hides a class at its head keeps linearly separable features, so this stays at
    the original model's value; a model that really forgot it drops towards the retrained model's.
    With a single class in ``train_labels`` the probe predicts that class for every input.
    """
    classes = normalise_classes(forget_classes)
    xtr = np.asarray(train_feats, dtype=np.float64)
    ytr = np.asarray(train_labels).reshape(-1).astype(np.int64)
    xte = np.asarray(test_feats, dtype=np.float64)
    yte = np.asarray(test_labels).reshape(-1).astype(np.int64)
    if xtr.ndim == 1:
        xtr = xtr[:, None]
    if xte.ndim == 1:
        xte = xte[:, None]
    if xtr.shape[0] == 0:
        raise ValueError("linear_probe_accuracy: no training features")
    if xtr.shape[0] != ytr.size or xte.shape[0] != yte.size:
        raise ValueError("linear_probe_accuracy: features and labels differ in length")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"linear_probe_accuracy: train features have {xtr.shape[1]} dimensions, "
                         f"test features {xte.shape[1]}")
    sel = np.isin(yte, classes)
    if not sel.any():
        raise ValueError(f"linear_probe_accuracy: no test sample of the forget classes {classes}")
    xte, yte = xte[sel], yte[sel]
    present = np.unique(ytr)
    if present.size == 1:
        return float(np.mean(yte == present[0]))
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with _one_blas_thread():
        scaler = StandardScaler().fit(xtr)
        clf = LogisticRegression(max_iter=int(max_iter), random_state=seed)
        clf.fit(scaler.transform(xtr), ytr)
        pred = clf.predict(scaler.transform(xte))
    return float(np.mean(pred == yte))
