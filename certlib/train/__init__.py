"""Training LiResNets with Lipschitz-margin losses (EMMA by default).

``train(TrainConfig(...))`` or ``certlib train``; data parallel under
``torchrun`` (``batch_size`` is the global batch); resumable (``resume``).
"""

from certlib.train.config import RECIPES, ConfigError, TrainConfig, eps_at, lr_at, preset_config
from certlib.train.loop import train

__all__ = ["TrainConfig", "train", "preset_config", "RECIPES", "ConfigError", "eps_at", "lr_at"]


import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """``certlib.train(config)`` runs :func:`train`: the package is also the function
    users look for at the top of certlib (docs/api.md)."""

    def __call__(self, config, **kwargs):
        return train(config, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
