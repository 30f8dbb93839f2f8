"""LiResNet models (installs as :mod:`certlib.models`)."""

from .layers import (
    LinearResidualConv,
    LLNLinear,
    MinMax,
    conv2d_adjoint,
    power_iteration,
    register_power_buffer,
)
from .liresnet import PAPER_VRA, PRESETS, LinearStage, LiResNet, LiResNetConfig, build

__all__ = [
    "MinMax",
    "LinearResidualConv",
    "LLNLinear",
    "power_iteration",
    "register_power_buffer",
    "conv2d_adjoint",
    "LiResNetConfig",
    "LiResNet",
    "LinearStage",
    "PRESETS",
    "PAPER_VRA",
    "build",
]
