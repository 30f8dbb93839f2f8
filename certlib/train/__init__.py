"""Training LiResNets with Lipschitz-margin losses (EMMA by default)."""

from certlib.train.config import RECIPES, TrainConfig, preset_config
from certlib.train.loop import train

__all__ = ["TrainConfig", "train", "preset_config", "RECIPES"]
