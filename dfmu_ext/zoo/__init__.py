"""The package's test bench: data sets (:mod:`.data`), models (:mod:`.models`), the training recipe
(:mod:`.training`), checkpoints and the cache of trained originals (:mod:`.checkpoints`)."""
from . import checkpoints, data, models, training

__all__ = ["checkpoints", "data", "models", "training"]
