"""IR nodes for two norm-based forms third-party libraries export
(proofs/thirdparty_forms.md):

* :class:`CenterNode` -- ``x - mean(x)`` over some per-sample axes
  (deel-torchlip's LayerCentering, batch centering in training mode): the
  orthogonal projection onto the zero-mean subspace of each group, exactly
  1-Lipschitz;
* :class:`L2PoolNode` -- ``sqrt(c * avgpool(x^2))`` over k x k windows with
  stride s, no padding (deel-torchlip's ScaledL2NormPool2d, LPPool2d(2)):
  ``sqrt(c / k^2) * ||x_window||``, Lipschitz ``sqrt(c / k^2) * sqrt(m)`` with
  m the largest number of windows that hold one input entry.

Both are :class:`ActivationNode` subclasses (the composer uses ``lipschitz``;
certificates refuse them: their activation names are not checked ones) with
their own rounding-error bound, since neither error is relative to the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certlib.ir.graph import ActivationNode, U64, _norms, _zero, gamma

#: absolute allowance per L2-pool output for underflow inside x^2 and the
#: window sum (sqrt turns an absolute error e of the sum into <= sqrt(e));
#: valid for windows of at most MAX_TAPS entries and scale factors c <= 2^40
L2POOL_TINY = 2.0 ** -480
MAX_TAPS = 2 ** 20


class _Norm(ActivationNode):
    @property
    def kind(self) -> str:
        return "activation"


@dataclass
class CenterNode(_Norm):
    """y = x - mean of x over the per-sample ``axes`` (params["axes"], 0-based
    per-sample dims), keeping the shape."""

    def __post_init__(self):
        self.activation = "center"

    def group_size(self) -> int:
        return math.prod(int(self.in_shape[a]) for a in self.params["axes"])

    def apply(self, h, track, bound=None):
        dims = tuple(int(a) + 1 for a in self.params["axes"])
        m = h.mean(dim=dims, keepdim=True)
        out = h - m
        if not track:
            return out, None
        # |fl(mean) - mean| <= gamma_{n+1} mean|x| (a sum of n terms, one
        # division); the subtraction adds u |x - fl(mean)| <= u (|x| + |fl mean|).
        # Twice gamma_{n+2} (|x| + mean|x|) covers both, and the rounding of
        # this magnitude itself (proofs/thirdparty_forms.md).
        n = self.group_size()
        mag = h.abs() + h.abs().mean(dim=dims, keepdim=True)
        return out, _norms(mag * (2 * gamma(n + 2)), n + 2)


@dataclass
class L2PoolNode(_Norm):
    """y = sqrt(c * avgpool_{k, s}(x^2)) per channel; params: kernel, strides, c."""

    def __post_init__(self):
        self.activation = "l2pool"

    def apply(self, h, track, bound=None):
        p = self.params
        out = torch.sqrt(F.avg_pool2d(h * h, p["kernel"], p["strides"]) * p["c"])
        if not track:
            return out, _zero(h, False)
        # the radicand is built from non-negative terms: relative error <=
        # gamma_{taps+3} (square, taps-term sum, division, * c); sqrt halves a
        # relative error and rounds once more: gamma_{taps+5} relative on y,
        # plus the underflow allowance (proofs/thirdparty_forms.md)
        taps = p["kernel"][0] * p["kernel"][1]
        rel = gamma(taps + 5)
        err = out.abs() * (rel * (1 + 4 * U64)) + L2POOL_TINY
        return out, _norms(err)
