"""The Lipschitz IR: a chain of typed nodes, each with exact float64 semantics.

An imported model becomes a :class:`Graph`: one input of fixed per-sample shape
and a list of nodes in execution order, each reading the previous node's output.
Node kinds:

* :class:`LinearNode`  -- a linear operator (Dense / Conv2d from
  ``certlib.verifiers.operators``) plus an optional bias;
* :class:`AffineNode`  -- elementwise ``scale * x + shift`` (Sub/Add/Mul/Div by
  constants, BatchNormalization, input normalisation);
* :class:`ReshapeNode` -- Flatten/Reshape/Identity: an isometry;
* :class:`ActivationNode` -- ReLU (1-Lipschitz) or MinMax (1-Lipschitz: it
  sorts each channel pair (a_k, b_k), which is 1-Lipschitz pair by pair).

:meth:`Graph.forward` evaluates the chain in float64 and returns, next to the
output, a rigorous upper bound on the l2 distance between the computed output and
the exact-arithmetic output (see proofs/margin_slack.md), given per-node
Lipschitz bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from certlib.verifiers.operators import Conv2d, Dense

U64 = 2.0 ** -53  # unit roundoff of IEEE double, round to nearest


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), rounded up generously."""
    nu = n * U64
    if nu >= 0.5:
        raise ValueError("dot product too long for the error model")
    return (nu / (1.0 - nu)) * (1.0 + 4 * U64)


@dataclass
class Node:
    name: str
    onnx_op: str
    in_shape: tuple
    out_shape: tuple

    @property
    def kind(self) -> str:
        return type(self).__name__.replace("Node", "").lower()


@dataclass
class LinearNode(Node):
    op: Dense | Conv2d = None
    bias: np.ndarray | None = None

    def terms(self) -> int:
        """Number of products in each output's dot product (+1 for the bias)."""
        if isinstance(self.op, Dense):
            n = self.op.weight.shape[1]
        else:
            n = int(np.prod(self.op.kernel.shape[1:]))
        return n + (1 if self.bias is not None else 0)


@dataclass
class AffineNode(Node):
    scale: np.ndarray = None  # broadcastable to in_shape
    shift: np.ndarray = None
    #: relative error of the stored float64 scale/shift against the model's
    #: exact constants (e.g. fl(1/k) for Div, fl(gamma/sqrt(var+eps)) for BN);
    #: 0 when they are copied exactly
    const_err: float = 0.0

    def lipschitz(self) -> float:
        """Upper bound on max|exact scale|."""
        m = float(np.max(np.abs(self.scale))) if np.size(self.scale) else 1.0
        return math.nextafter(m * (1.0 + self.const_err), math.inf) if self.const_err else m


@dataclass
class ReshapeNode(Node):
    pass


@dataclass
class ActivationNode(Node):
    activation: str = "relu"  # relu | minmax
    lipschitz: float = 1.0


@dataclass
class Graph:
    input_name: str
    input_shape: tuple  # per sample, e.g. (C, H, W)
    output_name: str
    nodes: list = field(default_factory=list)
    num_classes: int = 0

    def linear_nodes(self) -> list:
        return [n for n in self.nodes if isinstance(n, LinearNode)]

    # ----------------------------------------------------------- evaluation
    def forward(self, x: np.ndarray, node_lipschitz: list | None = None):
        """Evaluate in float64.  Returns (logits, err) where err[b] bounds the
        l2 distance between the computed and the exact-arithmetic output for
        sample b (needs ``node_lipschitz``: a proven upper bound per node, in
        node order; when None, err is None)."""
        with torch.no_grad():
            h = torch.as_tensor(np.asarray(x, dtype=np.float64))
            track = node_lipschitz is not None
            err = torch.zeros(h.shape[0], dtype=torch.float64) if track else None
            for i, node in enumerate(self.nodes):
                h, rnd = _apply(node, h, track)
                if track:
                    L = float(node_lipschitz[i])
                    err = (err * L + rnd) * (1 + 4 * U64)  # upward-safe accumulation
            return h.numpy(), (err.numpy() if track else None)


    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable float64 evaluation (for attacks and tests)."""
        h = x.to(torch.float64)
        for node in self.nodes:
            h, _ = _apply(node, h, False)
        return h


def _norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample l2 norms, inflated to upper-bound their rounding."""
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    return torch.linalg.vector_norm(flat, dim=1) * (1 + gamma(n + 2))


def _apply(node: Node, h: torch.Tensor, track: bool):
    """One node in float64; returns (output, per-sample rounding-error bound)."""
    zero = None
    if isinstance(node, ReshapeNode):
        return h.reshape((h.shape[0], *node.out_shape)), (torch.zeros(h.shape[0], dtype=h.dtype) if track else zero)
    if isinstance(node, ActivationNode):
        if node.activation == "relu":
            out = torch.relu(h)
        elif node.activation in ("minmax", "minmax_rev"):
            a, b = h.chunk(2, dim=1)
            hi, lo = torch.maximum(a, b), torch.minimum(a, b)
            out = torch.cat([hi, lo] if node.activation == "minmax" else [lo, hi], dim=1)
        else:  # pragma: no cover - importer only creates the two above
            raise ValueError(node.activation)
        # max, min and relu are exact in floating point
        return out, (torch.zeros(h.shape[0], dtype=h.dtype) if track else zero)
    if isinstance(node, AffineNode):
        s = torch.as_tensor(np.array(node.scale, dtype=np.float64))
        t = torch.as_tensor(np.array(node.shift, dtype=np.float64))
        out = h * s + t
        rnd = None
        if track:
            # fl(fl(s*x) + t): each op relative error <= u; plus the error of
            # the stored constants against the exact ones (const_err)
            mag = (h * s).abs() * (1 + U64) + t.abs()
            rnd = _norms(mag * ((2 * U64 + node.const_err) * (1 + 4 * U64)))
        return out, rnd
    if isinstance(node, LinearNode):
        op = node.op
        b = None if node.bias is None else torch.as_tensor(node.bias)
        out = _linear(op, h, b)
        rnd = None
        if track:
            # |fl(W x + b) - (W x + b)| <= gamma_{n} (|W||x| + |b|) elementwise
            # (any summation order); the magnitude itself is computed in floating
            # point from non-negative terms, so divide by (1 - gamma_n).
            n = node.terms()
            babs = None if b is None else b.abs()
            mag = _linear(op, h.abs(), babs, absolute=True)
            g = gamma(n)
            rnd = _norms(mag * (g / (1 - g)) * (1 + g))
        return out, rnd
    raise TypeError(f"unknown node {node!r}")  # pragma: no cover


def _linear(op, h: torch.Tensor, b, absolute: bool = False) -> torch.Tensor:
    if isinstance(op, Dense):
        w = torch.from_numpy(op.weight)
        if absolute:
            w = w.abs()
        y = h @ w.T
        if b is not None:
            y = y + b
        return y
    k = torch.from_numpy(op.kernel)
    if absolute:
        k = k.abs()
    pt, pl, pb, pr = op.padding
    if any(op.padding):
        h = F.pad(h, (pl, pr, pt, pb))
    return F.conv2d(h, k, b, stride=op.stride, dilation=op.dilation, groups=op.groups)


def describe(node: Node) -> str:
    if isinstance(node, LinearNode):
        if isinstance(node.op, Dense):
            m, n = node.op.weight.shape
            return f"Dense {n}->{m}"
        o = node.op
        return (f"Conv {o.kernel.shape[1] * o.groups}->{o.kernel.shape[0]} k{o.kernel.shape[2]}x{o.kernel.shape[3]}"
                f" s{o.stride[0]} p{o.padding[0]} on {o.input_shape[1]}x{o.input_shape[2]}"
                + (f" g{o.groups}" if o.groups > 1 else "") + (f" d{o.dilation[0]}" if max(o.dilation) > 1 else ""))
    if isinstance(node, ActivationNode):
        return node.activation
    if isinstance(node, AffineNode):
        return "affine"
    return "reshape"


__all__ = ["Graph", "Node", "LinearNode", "AffineNode", "ReshapeNode", "ActivationNode",
           "gamma", "U64", "describe"]
