"""All prediction and every metric: the field's standard protocol (UA, RA, TA, MIA-efficacy, linear
probe) in :mod:`.metrics`, the forward passes they share in :mod:`.predict`."""
from .metrics import (METRIC_KEYS, MIA_MAX_PER_SIDE, evaluate, last_linear, linear_probe_accuracy, mia_efficacy,
                      penultimate_features, svc_mia_from_probs, true_label_probs)
from .predict import accuracy, forward_collect, per_class_accuracy, predict_logits

__all__ = ["evaluate", "METRIC_KEYS", "MIA_MAX_PER_SIDE", "last_linear", "linear_probe_accuracy", "mia_efficacy",
           "penultimate_features", "svc_mia_from_probs", "true_label_probs", "accuracy", "forward_collect",
           "per_class_accuracy", "predict_logits"]
