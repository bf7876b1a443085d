"""All prediction and every metric: the forward passes (:mod:`.predict`), the field's standard
metrics (:mod:`.metrics`: UA, RA, TA, MIA-efficacy, linear probe), the verification battery
(:mod:`.battery`: probe by depth, distance to Retrain, collateral; :mod:`.attacks`: the relearning
and prototype attacks) and :func:`evaluate`, which computes them for one model (:mod:`.evaluate`)."""
from .attacks import prototype_attack, relearn_attack
from .battery import collateral, probe_by_depth, tv_distance
from .evaluate import BATTERY_KEYS, battery_metrics, evaluate
from .metrics import (METRIC_KEYS, MIA_MAX_PER_SIDE, last_linear, linear_probe_accuracy, mia_efficacy,
                      penultimate_features, svc_mia_from_probs, true_label_probs)
from .predict import accuracy, forward_collect, per_class_accuracy, predict_logits

__all__ = ["evaluate", "battery_metrics", "BATTERY_KEYS", "METRIC_KEYS", "MIA_MAX_PER_SIDE", "last_linear",
           "linear_probe_accuracy", "mia_efficacy", "penultimate_features", "svc_mia_from_probs", "true_label_probs",
           "accuracy", "forward_collect", "per_class_accuracy", "predict_logits", "probe_by_depth",
           "relearn_attack", "prototype_attack", "tv_distance", "collateral"]
from .field import *  # noqa: E402,F401,F403  the field's LM-unlearning metrics (TOFU, MUSE, OpenUnlearning)
__all__ += field.__all__  # noqa: F405
