"""Small digits models built with third-party Lipschitz libraries that install
from the registry, for tests/test_thirdparty.py.

* deel-torchlip 1.0.5 (``deel.torchlip``): Spectral*/Frobenius* layers,
  GroupSort2 / FullSort / MaxMin, scaled pools, LipResidual; converted with the
  library's own ``vanilla_export`` / ``vanilla_model`` before export.
* orthogonium 0.0.4 (``orthogonium``): AdaptiveOrthoConv2d (FastBlock, RKO and
  BCOPxRKO kernels), AOLConv2D, OrthoLinear, UnitNormLinear, MaxMin, Abs,
  BatchCentering2D, ChannelShuffle, SLL residual blocks.  Orthogonium has no
  export helper, and its power-iteration parametrisation assigns to a
  parameter in ``forward`` (the TorchScript exporter stops at ``aten::set``,
  the dynamo exporter fails to decompose it), so its parametrisations are
  frozen with ``torch.nn.utils.parametrize.remove_parametrizations(...,
  leave_parametrized=True)`` first: the exported weights are the
  parametrised ones, with no parametrisation left in the graph (except the
  SLL dense block's rescaling vector t, which is computed in ``forward`` from
  its parameters and is exported as a constant subgraph for certlib to fold).

Each :class:`Case` says how to build and train the model (a few optimiser
steps on digits: the point is realistic, non-random weights, not accuracy),
how to export it, and what the library claims about it:

* ``layers``: per torch module path (the legacy exporter names its node
  ``/<path>/<Op>``), the library's claim for that layer's spectral norm:
  ``"orthogonal"`` (all singular values 1: a gradient-norm-preserving layer)
  or ``"le1"`` (1-Lipschitz, possibly < 1);
* ``claim``: the library's Lipschitz constant for the whole logit map, or
  None where the library claims it per logit only.

Library imports happen inside the builders, so this module imports without
the libraries (the tests skip with a message then).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

#: pip commands (torch untouched: --no-deps; both need only torch and numpy)
INSTALL = {
    "deel.torchlip": "pip install --no-deps deel-torchlip==1.0.5",
    "orthogonium": "pip install --no-deps orthogonium==0.0.4",
}

IN_SHAPE = (1, 8, 8)


@dataclass
class Case:
    name: str
    module: str                       # import name of the library
    build: Callable[[], nn.Module]    # untrained model with the library's layers
    export_model: Callable[[nn.Module], nn.Module]   # -> plain torch model to export
    exporter: str = "legacy"          # "legacy" (TorchScript, dynamo=False) or "dynamo"
    layers: dict = field(default_factory=dict)
    claim: float | None = 1.0
    #: expected ceiling of (certlib's sound bound / claim); None: not asserted
    #: (certlib's composition rules are known to be looser for this model)
    tight: float | None = None
    steps: int = 30
    lr: float = 0.01
    eps: float = 0.1                  # certification radius (digits: [0, 1]^64)


# ------------------------------------------------------------------ helpers
def digits_train(n: int = 512):
    from certlib.data import load

    d = load("digits", "train")
    return torch.as_tensor(d.x[:n]), torch.as_tensor(d.y[:n])


def train(model: nn.Module, steps: int, lr: float, seed: int = 0) -> nn.Module:
    """A few Adam steps of temperature-scaled cross-entropy (the usual loss
    for 1-Lipschitz classifiers): margins of a few tenths, so that some
    digits certify at small radii."""
    torch.manual_seed(seed)
    x, y = digits_train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]) * 8.0, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def freeze(model: nn.Module) -> nn.Module:
    """Replace every parametrised tensor by its current value (orthogonium)."""
    from torch.nn.utils import parametrize

    model.eval()
    model.zero_grad(set_to_none=True)   # a stale .grad of the raw parameter's shape breaks torch.export
    with torch.no_grad():
        for mod in list(model.modules()):
            if parametrize.is_parametrized(mod):
                for name in list(mod.parametrizations.keys()):
                    parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    return model


def torchlip_vanilla(model: nn.Module) -> nn.Module:
    import deel.torchlip as tl

    model.eval()
    model.zero_grad(set_to_none=True)
    if hasattr(model, "vanilla_export") and isinstance(model, nn.Sequential):
        return model.vanilla_export().eval()
    return tl.vanilla_model(model).eval()


def export(model: nn.Module, path, exporter: str) -> None:
    """Export with a dynamic batch dimension, as a model handed to an auditor
    usually is.  Both exporters run offline."""
    x = torch.zeros(2, *IN_SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
        elif exporter == "dynamo":
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("N")},), external_data=False,
                              verbose=False)
        else:  # pragma: no cover
            raise ValueError(exporter)


def layer_matrix(layer: nn.Module, in_shape: tuple) -> np.ndarray:
    """Explicit float64 matrix of a (bias-free copy of a) torch linear layer,
    by applying it to the basis vectors: the ground truth of its norm."""
    import copy

    lay = copy.deepcopy(layer).double().eval()
    if getattr(lay, "bias", None) is not None:
        lay.bias = None
    n = int(np.prod(in_shape))
    with torch.no_grad():
        out = lay(torch.eye(n, dtype=torch.float64).reshape(n, *in_shape))
    return out.reshape(n, -1).numpy().T


# ------------------------------------------------------------ deel-torchlip
def _tl_conv_relu():
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), nn.ReLU(),
        tl.SpectralConv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), tl.SpectralLinear(16 * 16, 32), nn.ReLU(),
        tl.SpectralLinear(32, 10))


def _tl_groupsort():
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), tl.GroupSort2(), tl.ScaledAvgPool2d(2),
        tl.SpectralConv2d(8, 16, 3, padding=1), tl.GroupSort2(),
        nn.Flatten(), tl.SpectralLinear(16 * 16, 32), tl.GroupSort2(),
        tl.SpectralLinear(32, 10))


def _tl_fullsort():
    import deel.torchlip as tl

    return tl.Sequential(nn.Flatten(), tl.SpectralLinear(64, 32), tl.FullSort(), tl.SpectralLinear(32, 10))


def _tl_maxmin_unshuffle():
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), tl.MaxMin(), tl.InvertibleDownSampling(2),
        tl.ScaledAdaptiveAvgPool2d((1, 1)), nn.Flatten(), tl.SpectralLinear(64, 10))


def _tl_l2pool():
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), nn.ReLU(), tl.ScaledL2NormPool2d(2),
        nn.Flatten(), tl.SpectralLinear(8 * 16, 10))


def _tl_lprelu_centering():
    import deel.torchlip as tl

    return tl.Sequential(
        tl.SpectralConv2d(1, 8, 3, padding=1), tl.LPReLU(8), tl.LayerCentering(8),
        nn.Flatten(), tl.SpectralLinear(8 * 64, 10))


class _TlResidual(nn.Module):
    """h = conv(x); out = alpha h + (1 - alpha) relu(conv2(h)) (deel-torchlip's
    LipResidual: a convex combination, 1-Lipschitz)."""

    def __init__(self):
        import deel.torchlip as tl

        super().__init__()
        self.stem = tl.SpectralConv2d(1, 8, 3, padding=1)
        self.conv = tl.SpectralConv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.res = tl.LipResidual()
        self.flat = nn.Flatten()
        self.head = tl.SpectralLinear(8 * 64, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.flat(self.res(h, self.act(self.conv(h)))))


TORCHLIP = [
    Case("torchlip_conv_relu", "deel.torchlip", _tl_conv_relu, torchlip_vanilla,
         layers={"0": "le1", "2": "le1", "5": "orthogonal"}, tight=1.02),
    Case("torchlip_groupsort_avgpool_dynamo", "deel.torchlip", _tl_groupsort, torchlip_vanilla,
         exporter="dynamo", tight=1.02),
    Case("torchlip_groupsort_avgpool_legacy", "deel.torchlip", _tl_groupsort, torchlip_vanilla,
         layers={"0": "le1", "3": "le1", "6": "orthogonal"}, tight=1.02),
    Case("torchlip_fullsort_dynamo", "deel.torchlip", _tl_fullsort, torchlip_vanilla,
         exporter="dynamo", tight=1.02),
    # MaxMin = concat(relu h, relu -h): the CReLU rule bounds it by exactly 1
    Case("torchlip_maxmin_unshuffle", "deel.torchlip", _tl_maxmin_unshuffle, torchlip_vanilla,
         layers={"0": "le1", "5": "orthogonal"}, steps=120, lr=0.03, eps=0.02),
    # LPPool2d(2) as Pow -> AveragePool -> Mul(Sign, Relu(Abs)) -> Mul(4) -> Pow(0.5):
    # one l2-norm pool, disjoint windows: exactly 1 (proofs/thirdparty_forms.md)
    Case("torchlip_l2normpool", "deel.torchlip", _tl_l2pool, torchlip_vanilla,
         layers={"0": "le1", "4": "orthogonal"}, tight=1.001),
    # LayerCentering as ReduceMean + Sub: an orthogonal projection, exactly 1
    Case("torchlip_lprelu_layercentering", "deel.torchlip", _tl_lprelu_centering, torchlip_vanilla,
         layers={"0": "le1", "4": "orthogonal"}, tight=1.001),
    Case("torchlip_lipresidual", "deel.torchlip", _TlResidual, torchlip_vanilla,
         layers={"stem": "le1", "conv": "le1", "head": "orthogonal"}, tight=1.02),
]


# -------------------------------------------------------------- orthogonium
def _og_aoc_zeros():
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    return nn.Sequential(
        AdaptiveOrthoConv2d(1, 8, 3, padding_mode="zeros"), MaxMin(),                 # FastBlockConv2d
        AdaptiveOrthoConv2d(8, 16, 2, stride=2, padding=0, padding_mode="zeros"), MaxMin(),  # RKOConv2d
        AdaptiveOrthoConv2d(16, 16, 3, stride=2, padding=1, padding_mode="zeros"), MaxMin(),  # BcopRkoConv2d
        nn.Flatten(), OrthoLinear(16 * 4, 32), MaxMin(), OrthoLinear(32, 10))


def _og_aoc_circular():
    from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

    return nn.Sequential(
        AdaptiveOrthoConv2d(1, 8, 3), MaxMin(),       # default: padding="same", padding_mode="circular"
        AdaptiveOrthoConv2d(8, 16, 2, stride=2, padding=0), MaxMin(),
        nn.Flatten(), OrthoLinear(16 * 16, 10))


def _og_aol():
    from orthogonium.layers import BatchCentering2D, MaxMin, OrthoLinear
    from orthogonium.layers.conv.AOL import AOLConv2D

    return nn.Sequential(
        AOLConv2D(1, 8, 3, padding=1), MaxMin(), AOLConv2D(8, 8, 3, padding=1), BatchCentering2D(8), MaxMin(),
        nn.Flatten(), OrthoLinear(8 * 64, 10))


def _og_abs_shuffle():
    from orthogonium.layers import Abs, AdaptiveOrthoConv2d, ChannelShuffle, UnitNormLinear

    return nn.Sequential(
        AdaptiveOrthoConv2d(1, 8, 3, padding_mode="zeros"), Abs(), ChannelShuffle(2, 4),
        AdaptiveOrthoConv2d(8, 8, 3, padding_mode="zeros"), Abs(),
        nn.Flatten(), UnitNormLinear(8 * 64, 10))


def _og_sll():
    from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear
    from orthogonium.layers.conv.SLL import SDPBasedLipschitzDense, SDPBasedLipschitzResBlock

    return nn.Sequential(
        AdaptiveOrthoConv2d(1, 8, 3, padding_mode="zeros"), SDPBasedLipschitzResBlock(8, 2, 3),
        nn.Flatten(), SDPBasedLipschitzDense(8 * 64, 8 * 64, 64), OrthoLinear(8 * 64, 10))


ORTHOGONIUM = [
    Case("orthogonium_aoc_zero_padding", "orthogonium", _og_aoc_zeros, freeze,
         layers={"0": "orthogonal", "2": "orthogonal", "4": "orthogonal",
                 "7": "orthogonal"}, tight=1.02),
    # circular padding exported as Slice + Concat on H then W (legacy) is
    # recognised as one wrap pad, and wrap pad + Conv as one circular
    # convolution (exactly 1), as the dynamo export's Pad(wrap) + Conv
    Case("orthogonium_aoc_circular_legacy", "orthogonium", _og_aoc_circular, freeze,
         layers={"0": "orthogonal", "2": "orthogonal"}, tight=1.001),
    Case("orthogonium_aoc_circular_dynamo", "orthogonium", _og_aoc_circular, freeze, exporter="dynamo",
         tight=1.02),
    Case("orthogonium_aol_batchcentering", "orthogonium", _og_aol, freeze,
         layers={"0": "le1", "2": "le1"}, tight=1.001),
    Case("orthogonium_abs_channelshuffle", "orthogonium", _og_abs_shuffle, freeze,
         layers={"0": "orthogonal", "3": "orthogonal"}, claim=None, eps=0.05),
    # SLL residuals x - 2 K^T T relu(K x + b): bounded as one block,
    # max(1, ||(2T)^1/2 K||^2 - 1) = 1 (proofs/residual_blocks.md; the
    # composition rule gave 1 + ||2 T|| ||K||^2 per block, ~16 in all)
    Case("orthogonium_sll_blocks", "orthogonium", _og_sll, freeze, layers={"0": "orthogonal"}, tight=1.001,
         eps=0.05),
]

def _zoo():
    """Architectures built from their papers' definitions (tests/zoo_models.py)."""
    import zoo_models as z

    return [Case("zoo_cpl_dense", "torch", z.cpl_dense, z.plain, tight=1.001, eps=0.05),
            Case("zoo_cpl_conv", "torch", z.cpl_conv, z.plain, tight=1.001, eps=0.05),
            Case("zoo_sll_dense", "torch", z.sll_dense, z.plain, tight=1.001, eps=0.05),
            Case("zoo_aol_dense", "torch", z.aol_dense, z.plain, layers={"1": "le1", "3": "le1"},
                 tight=1.001, eps=0.05),
            # exported truncated Taylor series of exp(L): not series-parallel; imported as
            # q(L) and bounded by the skew-polynomial rule (proofs/polynomial_blocks.md)
            Case("zoo_soc_taylor", "torch", z.soc, z.plain, tight=1.001, eps=0.05)]


CASES = TORCHLIP + ORTHOGONIUM + _zoo()
