"""Certified architectures built here from their published definitions (plain
torch; no library), for the third-party zoo of tests/test_thirdparty.py:

* CPL (Meunier et al. 2022, convex potential layers):
  ``x - 2 / ||W||^2 W relu(W^T x + b)``, dense and convolutional
  (``x - 2 / ||K||^2 K^T relu(K x + b)``, K a convolution, K^T its transpose);
* SLL (Araujo et al. 2023, SDP-based Lipschitz layers), dense:
  ``x - 2 W T^-1 relu(W^T x + b)``, ``T = diag(sum_j |W^T W|_ij q_j / q_i)``;
* AOL (Prach & Lampert 2022): ``W diag(d)``, ``d_i = (sum_j |W^T W|_ij)^-1/2``;
* SOC (Singla & Feizi 2021, skew orthogonal convolution): ``exp(L) x`` with L a
  skew-symmetric convolution (kernel ``K - flip(K)^T``, so conv_L^T = -conv_L
  with zero padding), scaled to ||L|| = 1/2, computed as the truncated Taylor
  series ``x + L x + L^2 x / 2! + ...`` (6 terms): exported as a chain of convs
  whose partial results are all summed.  Not exactly orthogonal: the truncation
  leaves ||op|| = 1 + O(||L||^7 / 7!).

Each is 1-Lipschitz by its paper's theorem; the norms the definitions need
(||W||, ||K||) are computed exactly in float64 in ``forward`` (the papers use
power iteration; an exact norm keeps the claim exactly 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_norm(K: torch.Tensor, shape: tuple, padding: int) -> torch.Tensor:
    """||conv_K|| on inputs of ``shape`` (explicit matrix, float64)."""
    n = int(torch.tensor(shape).prod())
    e = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    M = F.conv2d(e, K.double(), padding=padding).reshape(n, -1)
    return torch.linalg.matrix_norm(M, ord=2).to(K.dtype)


class CPLDense(nn.Module):
    def __init__(self, n: int, k: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n, k) / n ** 0.5)
        self.b = nn.Parameter(torch.zeros(k))

    def scale(self):
        return 2.0 / torch.linalg.matrix_norm(self.W.double(), ord=2).float() ** 2

    def forward(self, x):
        c = self.frozen if hasattr(self, "frozen") else self.scale()
        return x - c * (F.relu(x @ self.W + self.b) @ self.W.T)


class CPLConv(nn.Module):
    def __init__(self, c: int, k: int, shape: tuple):
        super().__init__()
        self.K = nn.Parameter(torch.randn(k, c, 3, 3) / (3 * c ** 0.5))
        self.b = nn.Parameter(torch.zeros(k))
        self.shape = shape

    def scale(self):
        return 2.0 / _conv_norm(self.K, self.shape, 1) ** 2

    def forward(self, x):
        c = self.frozen if hasattr(self, "frozen") else self.scale()
        h = F.relu(F.conv2d(x, self.K, self.b, padding=1))
        return x - c * F.conv_transpose2d(h, self.K, padding=1)


class SLLDense(nn.Module):
    def __init__(self, n: int, k: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(n, k) / n ** 0.5)
        self.b = nn.Parameter(torch.zeros(k))
        self.q = nn.Parameter(torch.zeros(k))

    def forward(self, x):
        q = torch.exp(self.q)
        t = (torch.abs(self.W.T @ self.W) * q[None, :] / q[:, None]).sum(1)   # T_ii
        return x - 2 * ((F.relu(x @ self.W + self.b) / t) @ self.W.T)


class AOLDense(nn.Module):
    def __init__(self, n: int, m: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(m, n) / n ** 0.5)
        self.bias = nn.Parameter(torch.zeros(m))

    def forward(self, x):
        d = torch.abs(self.W.T @ self.W).sum(0).rsqrt()
        return F.linear(x, self.W * d[None, :], self.bias)


class SOC(nn.Module):
    def __init__(self, c: int, shape: tuple, terms: int = 6):
        super().__init__()
        self.K = nn.Parameter(torch.randn(c, c, 3, 3) / (3 * c))
        self.terms, self.shape = terms, (c, *shape)

    def kernel(self):
        L = self.K - self.K.transpose(0, 1).flip(2, 3)      # skew-symmetric convolution
        return L * (0.5 / _conv_norm(L, self.shape, 1))

    def forward(self, x):
        L = self.frozen if hasattr(self, "frozen") else self.kernel()
        out = z = x
        for i in range(1, self.terms + 1):
            z = F.conv2d(z, L, padding=1) / i
            out = out + z
        return out


class _Head(nn.Module):
    """A head with orthonormal rows (QR, fixed): 1-Lipschitz."""

    def __init__(self, n: int, classes: int = 10):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(n, classes, dtype=torch.float64))
        self.register_buffer("H", q.T.float())

    def forward(self, x):
        return x @ self.H.T


def cpl_dense():
    return nn.Sequential(nn.Flatten(), CPLDense(64, 32), CPLDense(64, 32), _Head(64))


def cpl_conv():
    return nn.Sequential(CPLConv(1, 4, (1, 8, 8)), CPLConv(1, 4, (1, 8, 8)), nn.Flatten(), _Head(64))


def sll_dense():
    return nn.Sequential(nn.Flatten(), SLLDense(64, 48), SLLDense(64, 48), _Head(64))


def aol_dense():
    return nn.Sequential(nn.Flatten(), AOLDense(64, 64), nn.ReLU(), AOLDense(64, 32), nn.ReLU(), _Head(32))


def soc():
    return nn.Sequential(SOC(1, (8, 8)), nn.ReLU(), SOC(1, (8, 8)), nn.Flatten(), _Head(64))


def plain(model: nn.Module) -> nn.Module:
    """Freeze the exact norms (an SVD: not an ONNX op) as constants for export
    (SOC: its scaled skew kernel)."""
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (CPLDense, CPLConv)):
                m.register_buffer("frozen", m.scale().detach().clone())
            if isinstance(m, SOC):
                m.register_buffer("frozen", m.kernel().detach().clone())
    return model.eval()
