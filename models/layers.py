"""LiResNet building blocks: MinMax, the fused linear residual conv, the LLN head,
and persistent power-iteration state for training-time Lipschitz ESTIMATES.

Nothing in this module proves a bound.  :func:`power_iteration` returns
``||A v||`` for a unit vector ``v``: in exact arithmetic a LOWER bound on the
spectral norm of ``A`` (an estimate from below).  It is what the published
LiResNet code trains (and certifies) with; certlib uses it only for training.
Certification goes through ONNX export and :mod:`certlib.verifiers`, which
return proven :class:`certlib.bounds.Bound` values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "MinMax",
    "LinearResidualConv",
    "LLNLinear",
    "register_power_buffer",
    "power_iteration",
    "conv2d_adjoint",
    "POWER_BUFFER",
]

#: Default name of the persistent power-iteration buffer on a stage's module.
POWER_BUFFER = "power_u"


class MinMax(nn.Module):
    """Split channels (dim 1) into halves ``a, b``; return ``cat(max(a,b), min(a,b))``.

    This is the PyTorch LiResNet ordering (halves, not adjacent pairs).  It is a
    permutation of its input on every point, hence 1-Lipschitz in l2 (exactly,
    in any arithmetic: it only moves values).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"MinMax needs a channel dimension (dim 1); got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c % 2:
            raise ValueError(f"MinMax needs an even number of channels on dim 1, got {c}")
        a, b = x.split(c // 2, dim=1)
        return torch.cat((torch.maximum(a, b), torch.minimum(a, b)), dim=1)


class LinearResidualConv(nn.Module):
    """``x + depth**-0.5 * conv(x, weight * scale)`` fused into ONE convolution.

    ``fused_kernel() = I_centre + depth**-0.5 * weight * scale[:, None, None, None]``
    where ``I_centre[o, c, k//2, k//2] = [o == c]``.  The layer's Lipschitz
    constant is the spectral norm of this fused operator (not ``1 + ||W||``).

    Parameters: ``weight`` (C, C, k, k) initialised ``randn / (C*k*k)``;
    ``scale`` (C,) ones (per output channel); ``bias`` (C,) zeros.
    """

    def __init__(self, channels: int, depth: int, kernel_size: int = 3):
        super().__init__()
        if channels <= 0 or depth <= 0:
            raise ValueError(f"channels and depth must be positive, got {channels}, {depth}")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        self.channels = int(channels)
        self.depth = int(depth)
        self.kernel_size = int(kernel_size)
        self.padding = self.kernel_size // 2
        k = self.kernel_size
        self.weight = nn.Parameter(torch.randn(channels, channels, k, k) / (channels * k * k))
        self.scale = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        eye = torch.zeros(channels, channels, k, k)
        idx = torch.arange(channels)
        eye[idx, idx, k // 2, k // 2] = 1.0
        # Not a checkpoint item: rebuilt from the shape, moved with .to().
        self.register_buffer("identity_kernel", eye, persistent=False)

    def fused_kernel(self) -> torch.Tensor:
        """The single conv kernel equal to identity + scaled residual conv."""
        w = self.weight * self.scale[:, None, None, None]
        return self.identity_kernel.to(w.dtype) + self.depth ** -0.5 * w

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part (no bias): the operator whose norm is the layer's constant."""
        return F.conv2d(x, self.fused_kernel(), None, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.fused_kernel(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, depth={self.depth}, kernel_size={self.kernel_size}"


class LLNLinear(nn.Module):
    """Last-layer-normalised dense head: ``y = x @ (W / ||W_row||_2)^T + b``.

    Rows of the weight are scaled to unit l2 norm; the bias is not normalised.
    The division uses ``||W_row||.clamp_min(tiny)`` (``tiny`` = smallest normal
    float of the dtype): the clamp changes nothing for any row whose norm is a
    normal float, so there is no epsilon that shrinks ordinary rows.  Only an
    all-zero (or subnormal-norm) row is affected; it maps to a row of norm < 1
    (zero for an all-zero row) instead of NaN.  Certification never assumes
    unit rows: it reads the exported (normalised) weights.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default

    def normalized_weight(self) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)
        return self.weight / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# --------------------------------------------------------------------------
# Power iteration (training-time ESTIMATES only)
# --------------------------------------------------------------------------


def register_power_buffer(
    module: nn.Module, input_shape: Sequence[int], name: str = POWER_BUFFER
) -> torch.Tensor:
    """Register a persistent float32 buffer ``name`` of shape ``(1, *input_shape)``
    on ``module`` holding a random unit vector (the power-iteration state).

    The buffer is saved in ``state_dict`` (it is part of checkpoints) and is
    moved by ``module.to(device)``.
    """
    u = torch.randn(1, *[int(s) for s in input_shape], dtype=torch.float32)
    u /= torch.linalg.vector_norm(u)
    module.register_buffer(name, u, persistent=True)
    return getattr(module, name)


def conv2d_adjoint(
    y: torch.Tensor,
    weight: torch.Tensor,
    input_hw: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Exact adjoint of ``x -> conv2d(x, weight, None, stride, padding)`` for
    inputs of spatial size ``input_hw``: a ``conv_transpose2d`` whose
    ``output_padding`` restores rows/columns the forward conv never reads
    (their adjoint value is 0)."""
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    kh, kw = weight.shape[-2:]
    oh, ow = y.shape[-2:]
    h, w = (int(s) for s in input_hw)
    op_h = h - ((oh - 1) * sh - 2 * ph + kh)
    op_w = w - ((ow - 1) * sw - 2 * pw + kw)
    return F.conv_transpose2d(y, weight, None, (sh, sw), (ph, pw), (op_h, op_w))


def power_iteration(
    u: torch.Tensor,
    forward: Callable[[torch.Tensor], torch.Tensor],
    n_iter: int = 10,
    adjoint: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Persistent power iteration for the linear map ``forward``; an ESTIMATE.

    ``u`` is the state buffer, shape ``(1, *input_shape)``.  Under
    ``torch.no_grad`` it is updated IN PLACE ``n_iter`` times with
    ``u <- A^T A u / ||A^T A u||`` (``A^T`` from ``adjoint`` if given, else an
    autograd vector-Jacobian product of ``forward``).  Then ``v = u.clone()``
    (as ``torch.nn.utils.parametrizations.spectral_norm`` does, so later
    in-place updates cannot corrupt a pending backward) and the return value
    is ``sigma = ||A v|| / ||v||`` (``||v|| = 1`` up to rounding), with gradients flowing to the parameters used by
    ``forward`` only (``v`` is a constant).

    Guarantee: in exact arithmetic ``sigma <= ||A||_2`` (a lower bound, never a
    certificate).  The iteration runs with autocast disabled, in ``u``'s dtype.
    If ``A^T A u`` is exactly zero the state is left unchanged.
    """
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    with torch.autocast(device_type=u.device.type, enabled=False):
        with torch.no_grad():
            for _ in range(int(n_iter)):
                if adjoint is not None:
                    x = adjoint(forward(u))
                else:
                    with torch.enable_grad():
                        v = u.detach().requires_grad_(True)
                        y = forward(v)
                        (x,) = torch.autograd.grad(y, v, grad_outputs=y.detach())
                norm = torch.linalg.vector_norm(x)
                tiny = torch.finfo(x.dtype).tiny
                u.copy_(torch.where(norm > 0, x / norm.clamp_min(tiny), u))
        v = u.detach().clone()
        v_norm = torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)
        return torch.linalg.vector_norm(forward(v)) / v_norm
