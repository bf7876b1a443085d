"""The package's test bench: data sets (:mod:`.data`), models and their default training recipes
(:mod:`.models`; the recipes themselves are :mod:`dfmu_ext.training`'s), checkpoints and the cache
of trained originals (:mod:`.checkpoints`)."""
from . import checkpoints, data, models

__all__ = ["checkpoints", "data", "models"]
