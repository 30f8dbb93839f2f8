"""Training LiResNets with Lipschitz-margin losses (EMMA by default).

``train(TrainConfig(...))`` or ``certlib train``; data parallel under
``torchrun`` (``batch_size`` is the global batch); resumable (``resume``).
"""

from certlib.train.config import RECIPES, ConfigError, TrainConfig, eps_at, lr_at, preset_config
from certlib.train.loop import train

__all__ = ["TrainConfig", "train", "preset_config", "RECIPES", "ConfigError", "eps_at", "lr_at"]


from certlib._callable import make_callable as _make_callable

# certlib.train(config) runs train(config) (docs/api.md)
_make_callable(__name__, "certlib.train.loop:train", "certlib.train(config): run the trainer")
