"""Training recipes, below the methods: the classifier recipe (:mod:`.classifier`: ``TrainConfig``,
``train_model``), the causal-LM recipe (:mod:`.causal_lm`: ``LMTrainConfig``, ``train_causal_lm``) and
the model families that know a model's default recipe and initialisation (:mod:`.families`).

The originals are trained with these, and Retrain retrains with the same recipe on the retain data.
Nothing here imports the zoo, the methods, the experiments or the CLI.
"""
from .causal_lm import LMTrainConfig, train_causal_lm
from .classifier import TrainConfig, make_optimizer, make_scheduler, train_model
from .families import ModelFamily, family_named, family_of, register_family

__all__ = ["TrainConfig", "train_model", "make_optimizer", "make_scheduler", "LMTrainConfig", "train_causal_lm",
           "ModelFamily", "register_family", "family_of", "family_named"]
