"""LiResNet (Hu et al., NeurIPS 2023) and its named presets.

``x in [0,1] -> x - 0.5 -> stem conv -> MinMax -> depth x [fused residual conv ->
MinMax] -> neck conv (k=4, s=4) -> MinMax -> flatten -> dense -> MinMax ->
LLN head -> logits``.

Lipschitz numbers computed here (:meth:`LiResNet.lipschitz_estimate`) are
power-iteration ESTIMATES from below, for training only.  Sound bounds come
from exporting to ONNX (:func:`certlib.onnx.export.export_onnx`) and running
the verifiers.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import (
    POWER_BUFFER,
    LinearResidualConv,
    LLNLinear,
    MinMax,
    conv2d_adjoint,
    power_iteration,
    register_power_buffer,
)

INITS = ("default", "orthogonal")

__all__ = ["LiResNetConfig", "LiResNet", "LinearStage", "PRESETS", "PAPER_VRA", "build"]


@dataclass(kw_only=True)
class LiResNetConfig:
    """Architecture of a LiResNet (all fields JSON-safe ints / str).

    ``input_size`` is the (square) side of the input image.  The neck conv has
    kernel ``neck_kernel`` and stride ``neck_stride`` with no padding.
    """

    name: str = "custom"
    in_channels: int
    input_size: int
    num_classes: int
    width: int
    depth: int
    stem_kernel: int
    stem_stride: int
    stem_padding: int
    dense_dim: int
    neck_kernel: int = 4
    neck_stride: int = 4
    #: "default" (torch's initialisers) or "orthogonal": the stem and neck
    #: convs start as (semi-)orthogonal matrices, as in the NeurIPS'23 code
    #: snapshot (docs/presets.md)
    init: str = "default"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "init"):
                if not isinstance(v, str):
                    raise ValueError(f"{f.name} must be a str, got {v!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{f.name} must be an int, got {v!r}")
            if v < 0 or (v == 0 and f.name != "stem_padding"):
                raise ValueError(f"{f.name} must be positive, got {v}")
        if self.width % 2 or self.dense_dim % 2:
            raise ValueError(f"width and dense_dim must be even (MinMax), got {self.width}, {self.dense_dim}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.stem_output_size < self.neck_kernel:
            raise ValueError(
                f"stem output {self.stem_output_size}px is smaller than the neck kernel {self.neck_kernel}"
            )

    @property
    def stem_output_size(self) -> int:
        """Spatial side after the stem conv (= backbone resolution)."""
        return (self.input_size + 2 * self.stem_padding - self.stem_kernel) // self.stem_stride + 1

    @property
    def neck_output_size(self) -> int:
        """Spatial side after the neck conv."""
        return (self.stem_output_size - self.neck_kernel) // self.neck_stride + 1

    @property
    def dense_in_features(self) -> int:
        return 2 * self.width * self.neck_output_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LiResNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LiResNetConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**d)


class LinearStage(NamedTuple):
    """One linear operator of the body: ``forward`` is the bias-free map on a
    batch of shape ``(B, *input_shape)``, ``adjoint`` its exact transpose."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    forward: Callable[[torch.Tensor], torch.Tensor]
    adjoint: Callable[[torch.Tensor], torch.Tensor]


class LiResNet(nn.Module):
    """LiResNet on inputs in [0, 1] (shape ``(N, C, H, W)``); returns logits.

    Modules: ``stem`` (Conv2d), ``blocks`` (ModuleList of
    :class:`LinearResidualConv`), ``neck_conv`` (Conv2d), ``neck_dense``
    (Linear), ``head`` (:class:`LLNLinear`).  Each linear stage carries a
    persistent float32 power-iteration buffer ``power_u`` (in ``state_dict``).
    """

    def __init__(self, config: LiResNetConfig):
        super().__init__()
        self.config = c = config
        self.minmax = MinMax()
        self.stem = nn.Conv2d(c.in_channels, c.width, c.stem_kernel, c.stem_stride, c.stem_padding, bias=True)
        self.blocks = nn.ModuleList(LinearResidualConv(c.width, c.depth) for _ in range(c.depth))
        self.neck_conv = nn.Conv2d(c.width, 2 * c.width, c.neck_kernel, c.neck_stride, 0, bias=True)
        self.neck_dense = nn.Linear(c.dense_in_features, c.dense_dim, bias=True)
        self.head = LLNLinear(c.dense_dim, c.num_classes)
        if c.init == "orthogonal":
            for conv in (self.stem, self.neck_conv):  # (out, in*k*k) with orthonormal rows or columns
                nn.init.orthogonal_(conv.weight)
        for stage_name, module in self._stage_modules().items():
            register_power_buffer(module, self.stage_shapes()[stage_name])

    # ---------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body: everything before the head, shape ``(N, dense_dim)``."""
        x = x - 0.5
        x = self.minmax(self.stem(x))
        for block in self.blocks:
            x = self.minmax(block(x))
        x = self.minmax(self.neck_conv(x))
        x = torch.flatten(x, 1)
        return self.minmax(self.neck_dense(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # ------------------------------------------------------------ structure
    def _stage_modules(self) -> "OrderedDict[str, nn.Module]":
        mods: OrderedDict[str, nn.Module] = OrderedDict([("stem.conv", self.stem)])
        for i, block in enumerate(self.blocks):
            mods[f"block{i}.conv"] = block
        mods["neck.conv"] = self.neck_conv
        mods["neck.dense"] = self.neck_dense
        return mods

    def stage_shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        """Input shape (no batch dim) of each linear body stage, in order:
        ``stem.conv``, ``block0.conv`` ... ``block{depth-1}.conv``, ``neck.conv``,
        ``neck.dense`` (the same names as the ONNX export's nodes)."""
        c = self.config
        s = c.stem_output_size
        shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        shapes["stem.conv"] = (c.in_channels, c.input_size, c.input_size)
        for i in range(c.depth):
            shapes[f"block{i}.conv"] = (c.width, s, s)
        shapes["neck.conv"] = (c.width, s, s)
        shapes["neck.dense"] = (c.dense_in_features,)
        return shapes

    def linear_stages(self) -> list[LinearStage]:
        """The body's linear operators (bias-free), each with its exact adjoint."""
        shapes = self.stage_shapes()
        stages = []
        for name, module in self._stage_modules().items():
            shape = shapes[name]
            if isinstance(module, LinearResidualConv):
                fwd, adj = _block_ops(module, shape)
            elif isinstance(module, nn.Conv2d):
                fwd, adj = _conv_ops(module, shape)
            else:
                fwd, adj = _dense_ops(module)
            stages.append(LinearStage(name, module, shape, fwd, adj))
        return stages

    # ----------------------------------------------------------- Lipschitz
    def stage_estimates(self, n_iter: int = 10) -> "OrderedDict[str, torch.Tensor]":
        """Per-stage power-iteration ESTIMATES (lower bounds in exact
        arithmetic, not certificates); updates each stage's ``power_u`` buffer
        in place with ``n_iter`` iterations; differentiable in the weights."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for st in self.linear_stages():
            u = getattr(st.module, POWER_BUFFER)
            out[st.name] = power_iteration(u, st.forward, n_iter, st.adjoint)
        return out

    def lipschitz_estimate(self, n_iter: int = 10) -> torch.Tensor:
        """ESTIMATE of the body's l2 Lipschitz constant (input -> features):
        the product of per-stage power-iteration values (stem conv, each fused
        block conv, neck conv, neck dense; MinMax is 1-Lipschitz).

        This is what the published LiResNet code trains and certifies with:
        each factor is ``||A v||`` for a unit ``v``, a LOWER bound on that
        stage's norm, so the product can be below the true constant.  Use it
        for training losses only; certify with proven bounds.  Updates the
        persistent buffers (``n_iter`` iterations each) and is differentiable
        in the weights (a 0-dim tensor)."""
        est = self.stage_estimates(n_iter)
        return torch.stack(list(est.values())).prod()

    def head_weight(self) -> torch.Tensor:
        """The head's row-normalised weight (num_classes, dense_dim)."""
        return self.head.normalized_weight()

    def pairwise_head_norms(self) -> torch.Tensor:
        """``(classes, classes)`` matrix of ``||w_i - w_j||_2`` over the
        normalised head rows; differentiable (zero gradient on the diagonal).

        ``K_ij = L_body * pairwise_head_norms()[i, j]`` is GloRo's margin
        Lipschitz constant.  Computed in the weights' dtype by direct
        differences (``torch.cdist`` without the Gram-matrix shortcut); a
        training-time quantity, not a proven bound."""
        w = self.head_weight()
        return torch.cdist(w.unsqueeze(0), w.unsqueeze(0), p=2.0,
                           compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)


# Stage operators (bias-free) and their exact adjoints --------------------------


def _conv_ops(conv: nn.Conv2d, shape: tuple[int, ...]):
    hw = shape[1:]

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, conv.weight, None, conv.stride, conv.padding)

    def adj(y: torch.Tensor) -> torch.Tensor:
        return conv2d_adjoint(y, conv.weight, hw, conv.stride, conv.padding)

    return fwd, adj


def _block_ops(block: LinearResidualConv, shape: tuple[int, ...]):
    hw = shape[1:]

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, block.fused_kernel(), None, 1, block.padding)

    def adj(y: torch.Tensor) -> torch.Tensor:
        return conv2d_adjoint(y, block.fused_kernel(), hw, 1, block.padding)

    return fwd, adj


def _dense_ops(dense: nn.Linear):
    def fwd(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dense.weight)

    def adj(y: torch.Tensor) -> torch.Tensor:
        return y @ dense.weight

    return fwd, adj


# Presets ---------------------------------------------------------------------
# One preset per published run; the source of every number (architecture,
# recipe, loss, target VRA) is in docs/presets.md.  Recipes: certlib.train.config.

_PAPER = dict(in_channels=3, dense_dim=512, init="orthogonal")
_CIFAR = dict(_PAPER, input_size=32, stem_kernel=5, stem_stride=2, stem_padding=2)
_IMAGENET = dict(_PAPER, input_size=224, num_classes=1000, width=588, depth=18, stem_kernel=14, stem_stride=14,
                 stem_padding=0, dense_dim=2048)

PRESETS: dict[str, LiResNetConfig] = {
    # Embedded 8x8 digits (scikit-learn): 8 -> 8 (stem) -> 2 (neck); trains in
    # about 2.5 minutes on one CPU core.  Not from the paper (torch's default init).
    "digits": LiResNetConfig(name="digits", in_channels=1, input_size=8, num_classes=10, width=32, depth=4,
                             stem_kernel=3, stem_stride=1, stem_padding=1, dense_dim=128),
    # CIFAR-10, the paper text's model L12 W512 (stem 5x5 s2: 32 -> 16, neck -> 4x4, D=512): paper 65.1% @36/255.
    "cifar10": LiResNetConfig(name="cifar10", num_classes=10, width=512, depth=12, **_CIFAR),
    # CIFAR-10, the code's L18 W256: code README 70.1% @36/255.
    "cifar10-l18w256": LiResNetConfig(name="cifar10-l18w256", num_classes=10, width=256, depth=18, **_CIFAR),
    # CIFAR-100, L12 W512: paper 36.3% @36/255.
    "cifar100": LiResNetConfig(name="cifar100", num_classes=100, width=512, depth=12, **_CIFAR),
    # CIFAR-100, L18 W256: code README 41.5% @36/255.
    "cifar100-l18w256": LiResNetConfig(name="cifar100-l18w256", num_classes=100, width=256, depth=18, **_CIFAR),
    # Tiny-ImageNet (64 px, 200 classes): stem 7x7 s4 p3 (64 -> 16), L18 W256: code README 33.6%
    # @36/255 (paper 29.2%).
    "tinyimagenet": LiResNetConfig(name="tinyimagenet", input_size=64, num_classes=200, width=256, depth=18,
                                   stem_kernel=7, stem_stride=4, stem_padding=3, **_PAPER),
    # ImageNet (224 px, 1000 classes): patchify stem kernel = stride = 14
    # (= round(sqrt(588/3))), no padding (224 -> 16), L18 W588, D=2048.
    # Trained and tested at 36/255: code README 35.0%.
    "imagenet": LiResNetConfig(name="imagenet", **_IMAGENET),
    # The same network trained and tested at eps = 1.0: paper / code README 14.2%.
    "imagenet-eps1": LiResNetConfig(name="imagenet-eps1", **_IMAGENET),
}

#: Published verified robust accuracies (l2, percent) each preset targets:
#: {preset: {eps: {"paper": value or None, "code_readme": value or None}}}.
#: Only the run the preset reproduces (architecture, training eps, test eps)
#: is listed; sources in docs/presets.md.
PAPER_VRA: dict[str, dict[str, dict[str, float | None]]] = {
    "cifar10": {"36/255": {"paper": 65.1, "code_readme": None}},
    "cifar10-l18w256": {"36/255": {"paper": None, "code_readme": 70.1}},
    "cifar100": {"36/255": {"paper": 36.3, "code_readme": None}},
    "cifar100-l18w256": {"36/255": {"paper": None, "code_readme": 41.5}},
    "tinyimagenet": {"36/255": {"paper": 29.2, "code_readme": 33.6}},
    "imagenet": {"36/255": {"paper": None, "code_readme": 35.0}},
    "imagenet-eps1": {"1.0": {"paper": 14.2, "code_readme": 14.2}},
}


def build(name: str, **overrides: Any) -> LiResNet:
    """A freshly initialised LiResNet from preset ``name``; ``overrides``
    replace config fields (e.g. ``build("cifar10", depth=6)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown LiResNet preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
    fields = {f.name for f in dataclasses.fields(LiResNetConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown LiResNetConfig fields {bad}; valid: {sorted(fields)}")
    return LiResNet(dataclasses.replace(PRESETS[name], **overrides))
