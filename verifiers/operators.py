"""Linear operator definitions shared by every verifier (the only shared code).

Each operator maps a real tensor of ``input_shape`` to one of ``output_shape``
and knows ``matvec`` (the operator), ``rmatvec`` (its exact adjoint) and
``to_dense()`` (the explicit matrix, for small sizes: the ground truth in
tests).  Arithmetic is float64.  Batched calls take arrays of shape
``(B, *input_shape)``.

Convolution follows ONNX/PyTorch semantics (cross-correlation):
``y[o, i, j] = sum_{c, a, b} K[o, c, a, b] * xpad[g(o)*cg + c, s_h*i + d_h*a, s_w*j + d_w*b]``
with ``xpad`` the zero-padded input (pads = top, left, bottom, right).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dense", "Conv2d", "LinearOperator"]


class LinearOperator:
    input_shape: tuple
    output_shape: tuple

    @property
    def in_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def out_dim(self) -> int:
        return int(np.prod(self.output_shape))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        single = x.shape == tuple(self.input_shape)
        xb = x[None] if single else x
        y = self._apply(torch.from_numpy(np.ascontiguousarray(xb))).numpy()
        return y[0] if single else y

    def rmatvec(self, y: np.ndarray) -> np.ndarray:
        """The adjoint A^T y, computed as the exact vector-Jacobian product."""
        y = np.asarray(y, dtype=np.float64)
        single = y.shape == tuple(self.output_shape)
        yb = torch.from_numpy(np.ascontiguousarray(y[None] if single else y))
        x = torch.zeros((yb.shape[0], *self.input_shape), dtype=torch.float64, requires_grad=True)
        out = self._apply(x)
        (g,) = torch.autograd.grad(out, x, grad_outputs=yb)
        g = g.numpy()
        return g[0] if single else g

    def to_dense(self, max_dim: int = 20000) -> np.ndarray:
        """The explicit (out_dim, in_dim) matrix: the operator applied to basis vectors."""
        if self.in_dim > max_dim or self.out_dim > max_dim:
            raise ValueError(f"operator too large to materialise ({self.out_dim}x{self.in_dim})")
        eye = np.eye(self.in_dim).reshape((self.in_dim, *self.input_shape))
        cols = self.matvec(eye).reshape(self.in_dim, self.out_dim)
        return np.ascontiguousarray(cols.T)


@dataclass(frozen=True, eq=False)
class Dense(LinearOperator):
    """y = W x with W of shape (m, n)."""

    weight: np.ndarray

    def __post_init__(self) -> None:
        w = np.asarray(self.weight, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"Dense weight must be 2-D, got shape {w.shape}")
        object.__setattr__(self, "weight", w)

    @property
    def input_shape(self) -> tuple:
        return (self.weight.shape[1],)

    @property
    def output_shape(self) -> tuple:
        return (self.weight.shape[0],)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.from_numpy(self.weight).T

    def to_dense(self, max_dim: int = 20000) -> np.ndarray:
        return self.weight.copy()


def _pair(v, n: int = 2) -> tuple:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * n
    t = tuple(int(a) for a in v)
    if len(t) != n:
        raise ValueError(f"expected {n} integers, got {v!r}")
    return t


@dataclass(frozen=True, eq=False)
class Conv2d(LinearOperator):
    """2-D convolution (no bias) on a fixed input size.

    kernel: (c_out, c_in // groups, kh, kw); input_shape: (c_in, h, w);
    stride (sh, sw); padding (top, left, bottom, right) of zeros;
    dilation (dh, dw); groups g (c_in and c_out divisible by g).
    """

    kernel: np.ndarray
    input_shape: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        k = np.asarray(self.kernel, dtype=np.float64)
        if k.ndim != 4:
            raise ValueError(f"Conv2d kernel must be 4-D, got shape {k.shape}")
        set_ = lambda n, v: object.__setattr__(self, n, v)  # noqa: E731
        set_("kernel", k)
        set_("input_shape", _pair(self.input_shape, 3))
        set_("stride", _pair(self.stride))
        p = self.padding
        if isinstance(p, (int, np.integer)):
            p = (p,) * 4
        elif len(p) == 2:
            p = (p[0], p[1], p[0], p[1])
        set_("padding", _pair(p, 4))
        set_("dilation", _pair(self.dilation))
        set_("groups", int(self.groups))
        c_in, h, w = self.input_shape
        g = self.groups
        if g < 1 or c_in % g or k.shape[0] % g or k.shape[1] * g != c_in:
            raise ValueError(
                f"kernel {k.shape} with groups={g} does not match {c_in} input channels")
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError("stride and dilation must be >= 1, padding >= 0")
        oh, ow = self.output_shape[1:]
        if oh < 1 or ow < 1:
            raise ValueError(f"convolution produces an empty output for input {self.input_shape}")

    @property
    def effective_kernel_size(self) -> tuple:
        kh, kw = self.kernel.shape[2:]
        dh, dw = self.dilation
        return (dh * (kh - 1) + 1, dw * (kw - 1) + 1)

    @property
    def output_shape(self) -> tuple:
        c_in, h, w = self.input_shape
        pt, pl, pb, pr = self.padding
        keh, kew = self.effective_kernel_size
        sh, sw = self.stride
        return (self.kernel.shape[0], (h + pt + pb - keh) // sh + 1, (w + pl + pr - kew) // sw + 1)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        pt, pl, pb, pr = self.padding
        if any(self.padding):
            x = F.pad(x, (pl, pr, pt, pb))
        return F.conv2d(x, torch.from_numpy(self.kernel), stride=self.stride,
                        dilation=self.dilation, groups=self.groups)
