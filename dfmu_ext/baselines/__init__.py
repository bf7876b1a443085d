"""Baseline class-unlearning methods, one module per method family, written from the recipes in
docs/method.md ("Baselines").

Every method has the signature of :func:`dfmu_ext.unlearn`::

    method(model, train_set, forget_classes, retain_fraction, *, device=None, seed=0,
           progress=True, **method_specific_keywords) -> UnlearnResult

and modifies ``model`` in place (Retrain re-initialises it and trains it again). The data rules:

* a method that reads retain data reads ONLY the class-stratified ``retain_fraction`` of the retain
  set (``splits.stratified_fraction(retain_set, retain_fraction, seed)``, the same slice DFMU
  uses for the same seed); its epochs are passes over that budget;
* forget data is read in full by the methods that use it (GA, RL, SalUn, SSD, SCRUB);
* ``retain_samples_used`` / ``forget_samples_used`` count the distinct samples read.

A seed makes every method reproducible: shuffles come from generators seeded with ``seed`` and
the global RNG is re-seeded inside a forked RNG state (the caller's random stream is untouched).

Methods (``METHODS`` maps the table names to the functions; ``SPECS`` says what each reads):

=========== ==========================================================================================
Retrain     the original training recipe on the retain budget (default: all of it), fresh weights
FT          fine-tune on retain, CE, 10 epochs, SGD lr 0.01
GA          gradient ascent on the forget CE, 5 epochs, lr 5e-4 (reads no retain data)
RL          forget samples relabelled at random (a remaining class, redrawn per batch) + retain, CE
l1-sparse   FT with CE + alpha_t * ||theta||_1, alpha_t decaying linearly from alpha to 0
SalUn       weight saliency mask (top 50% |grad forget CE|, one global ranking), then RL with
            masked gradients (SGD momentum 0.9, wd 5e-4, 10 epochs)
SSD         selective synaptic dampening: theta *= min(lambda I_D / I_f, 1) where I_f > alpha I_D
SCRUB       teacher-student: max-steps (-KL) on forget for msteps epochs, min-steps on retain
            (0.99 CE + 0.001 KL, T=4), 3 epochs, SGD lr 5e-4
head-mask   zero the forget classes' classifier rows, pin their bias very low (reads no data)
DFMU        dfmu_ext.unlearn
DeepUnlearning  gradient-free removal of the forget-specific activation subspace from every layer
            (Kodge et al., TMLR 2024; SVD of a few retain + forget samples' layer inputs)
=========== ==========================================================================================

Optimisers are SGD with momentum 0.9 and weight decay 5e-4 at a constant learning rate unless a
recipe says otherwise. Batches of a single sample are skipped when training (BatchNorm).

Causal LMs (``forget_indices``, no classes): Retrain and GA have one function per task (the
registry calls the one of the data's task), GradDiff and NPO (:mod:`.lm_ascent`, :mod:`.lm_npo`, on
the recipe of :mod:`._lm_recipe`) and SelectivePruning (:mod:`.lm_pruning`) run on causal LMs only.
Attributes (``forget_attribute=``, one value per training sample): DFMU, and LEACE and INLP
(:mod:`.attribute`, erasers of the penultimate features) on the ``"attribute"`` task.
Each method module registers its own spec (:func:`.registry.register`); ``_plumbing`` holds what
methods of both tasks share.
"""
# Importing a method module registers its method(s) (registry.register); the classifier modules come
# first, so that a method of both tasks has the classifier's function first (its signature, its docs).
from .scratch import lm_retrain, reinitialize, retrain
from .finetuning import finetune, l1_sparse
from .ascent import gradient_ascent
from .relabel import random_label, saliency_mask, salun
from .dampening import squared_grad_importance, ssd
from .distill import scrub
from .headmask import head_mask
from .dfmu_method import dfmu
from .subspace import deep_unlearning
from .lm_ascent import lm_graddiff, lm_gradient_ascent
from .lm_npo import NPO_BETA, npo, npo_loss
from .lm_simnpo import simnpo, simnpo_loss
from .lm_rmu import rmu
from .lm_pruning import selective_pruning
from .attribute import inlp, leace
from ._lm_recipe import GRADDIFF_LR, UNLEARN_LR
from ._plumbing import lm_split
from .registry import (METHODS, SPECS, MethodSpec, methods_for, register, resolve_methods, set_table_order, task_of,
                       task_names)

#: The tables' column order (a method registered later, e.g. one of the user's, follows these).
set_table_order(["Retrain", "FT", "GA", "RL", "l1-sparse", "SalUn", "SSD", "SCRUB", "head-mask", "DFMU",
                 "DeepUnlearning", "GradDiff", "NPO", "SimNPO", "RMU", "SelectivePruning", "LEACE", "INLP"])

__all__ = ["METHODS", "SPECS", "MethodSpec", "methods_for", "resolve_methods", "register", "task_of", "retrain",
           "finetune", "gradient_ascent", "random_label", "l1_sparse", "salun", "ssd", "scrub", "head_mask", "dfmu",
           "reinitialize", "saliency_mask", "squared_grad_importance", "deep_unlearning", "lm_retrain",
           "lm_gradient_ascent", "lm_graddiff", "npo", "npo_loss", "selective_pruning", "lm_split", "UNLEARN_LR",
           "GRADDIFF_LR", "NPO_BETA", "simnpo", "simnpo_loss", "rmu", "leace", "inlp", "task_names"]
