"""The Lipschitz IR: typed nodes with exact float64 semantics, in a
series-parallel structure.

An imported model becomes a :class:`Graph`: one input of fixed per-sample shape
and a list of nodes in execution order, each reading the previous node's output.
Node kinds:

* :class:`LinearNode`  -- a linear operator (Dense / Conv2d from
  ``certlib.verifiers.operators``) plus an optional bias; ``transposed`` applies
  the adjoint of the Conv2d (ONNX ConvTranspose; same norm);
* :class:`AffineNode`  -- elementwise ``scale * x + shift`` (Sub/Add/Mul/Div by
  constants, BatchNormalization, input normalisation);
* :class:`ReshapeNode` -- Flatten/Reshape/Squeeze/Unsqueeze/Identity: an isometry;
* :class:`IndexNode`   -- a coordinate map that moves, drops or zero-pads
  entries (Transpose, Pad, Slice, SpaceToDepth, DepthToSpace): Lipschitz <= 1;
* :class:`ActivationNode` -- a pointwise or pooling nonlinearity with a proven
  Lipschitz constant (table :data:`ACTIVATIONS`; proofs/activations.md);
* :class:`ParallelNode` -- branches of one input merged by add/sub, concat,
  max or min (nonlinear residuals x + g(x), inception-style blocks).

Every node knows its float64 evaluation and the rounding error of that
evaluation (:meth:`Node.apply`).  :meth:`Graph.forward` returns, next to the
output, a rigorous upper bound on the l2 distance between the computed output
and the exact-arithmetic output (proofs/margin_slack.md), given per-node
Lipschitz bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from certlib.ir.evaluate import ACTIVATIONS, LIBM_REL, U64, _index  # noqa: F401  (re-exported)
from certlib.verifiers.operators import Conv2d, Dense



def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u), rounded up generously."""
    nu = n * U64
    if nu >= 0.5:
        raise ValueError("dot product too long for the error model")
    return (nu / (1.0 - nu)) * (1.0 + 4 * U64)


def compose_rel(a: float, b: float) -> float:
    """Relative error of a product of two factors carrying relative errors a
    and b: (1 + a)(1 + b) - 1 = a + b + ab, rounded up (proofs/margin_slack.md,
    "Folds").  Every fold of several stored constants composes with this."""
    return math.nextafter((a + b + a * b) * (1 + 4 * U64), math.inf)


#: The rounding-error model of the IR, one entry per node kind (the forward
#: recursion charges these in :meth:`Node.apply`; a fold of several affine maps
#: into a linear op composes their stored-constant errors with compose_rel and
#: adds one rounding u per multiplication; proofs/margin_slack.md):
#:
#: * LinearNode:  gamma_n (|W||x| + |b|)  +  weight_rel_err |W||x|  +  bias_abs_err
#: * AffineNode:  (2u + const_err)(|s x| (1+u) + |t|)  +  shift_abs_err
#: * ActivationNode: rel |f(x)| (table ACTIVATIONS); Reshape/Index: 0 (exact)
#: * ParallelNode: branch errors plus gamma_{k-1} of the k-term sum
ROUNDING_MODEL = "proofs/margin_slack.md"


def _zero(h: torch.Tensor, track: bool):
    return torch.zeros(h.shape[0], dtype=h.dtype) if track else None


def _norms(t: torch.Tensor, terms: int = 2) -> torch.Tensor:
    """Per-sample l2 norms of a relative-error magnitude, inflated to
    upper-bound their own rounding, plus an absolute allowance for underflow:
    each of the <= ``terms`` roundings per entry may lose up to 2^-1074 in the
    subnormal range (which the relative error models do not cover)."""
    flat = t.reshape(t.shape[0], -1)
    n = flat.shape[1]
    tiny = math.ldexp((math.isqrt(n) + 1) * (terms + 1), -1073)  # exact: an integer times 2^-1073
    return torch.linalg.vector_norm(flat, dim=1) * (1 + gamma(n + 2)) + tiny


@dataclass
class Node:
    name: str
    onnx_op: str
    in_shape: tuple
    out_shape: tuple

    @property
    def kind(self) -> str:
        return type(self).__name__.replace("Node", "").lower()

    def apply(self, h: torch.Tensor, track: bool, bound=None):
        """Evaluate on a batch in float64; return (output, per-sample bound on
        this node's own rounding error, or None when not ``track``).  ``bound``
        is this node's entry of ``Analysis.node_bounds`` (used by nodes with
        internal structure)."""
        raise NotImplementedError  # pragma: no cover


@dataclass
class LinearNode(Node):
    op: Dense | Conv2d = None
    bias: np.ndarray | None = None
    #: apply the adjoint of ``op`` (a Conv2d): ONNX ConvTranspose.  The norm is
    #: the same; the output has ``op.input_shape``.
    transposed: bool = False
    output_padding: tuple = (0, 0)
    #: elementwise relative error of the stored weight against the model's
    #: exact weight (a weight computed inside the graph; 0 when copied)
    weight_rel_err: float = 0.0
    #: elementwise absolute error bound of the stored bias (0 when copied)
    bias_abs_err: np.ndarray | float = 0.0

    def terms(self) -> int:
        """Number of products in each output's dot product (+1 for the bias)."""
        if isinstance(self.op, Dense):
            n = self.op.weight.shape[1]
        elif self.transposed:
            k = self.op.kernel
            n = k.shape[0] // self.op.groups * k.shape[2] * k.shape[3]
        else:
            n = int(np.prod(self.op.kernel.shape[1:]))
        return n + (1 if self.bias is not None else 0)

    def apply(self, h, track, bound=None):
        b = None if self.bias is None else torch.as_tensor(self.bias)
        out = _linear(self, h, b)
        if not track:
            return out, None
        # |fl(W x + b) - (W x + b)| <= gamma_n (|W||x| + |b|) elementwise (any
        # summation order); the magnitude itself is computed in floating point
        # from non-negative terms, so divide by (1 - gamma_n).
        g = gamma(self.terms())
        mag = _linear(self, h.abs(), None if b is None else b.abs(), absolute=True)
        rnd = mag * (g / (1 - g)) * (1 + g)
        if self.weight_rel_err or np.any(self.bias_abs_err):
            # stored weight/bias off the exact ones: |dW||x| + |db| (x exact here)
            wmag = _linear(self, h.abs(), None, absolute=True)
            rnd = rnd + wmag * (self.weight_rel_err * (1 + 2 * g))
            if np.any(self.bias_abs_err):
                be = torch.as_tensor(np.asarray(self.bias_abs_err, dtype=np.float64))
                rnd = rnd + (be.reshape(1, -1) if isinstance(self.op, Dense) else be.reshape(1, -1, 1, 1))
            rnd = rnd * (1 + 4 * U64)
        return out, _norms(rnd, 2 * self.terms())


@dataclass
class AffineNode(Node):
    scale: np.ndarray = None  # broadcastable to in_shape
    shift: np.ndarray = None
    #: relative error of the stored float64 scale/shift against the model's
    #: exact constants (e.g. fl(1/k) for Div, fl(gamma/sqrt(var+eps)) for BN);
    #: 0 when they are copied exactly
    const_err: float = 0.0
    #: elementwise absolute error bound of the stored shift against the exact
    #: one, charged on its own: a shift computed under cancellation (BN's
    #: beta - mean*s) is off by u(|beta| + |mean s|), not u|shift|
    shift_abs_err: np.ndarray | float = 0.0

    def lipschitz(self) -> float:
        """Upper bound on max|exact scale|."""
        m = float(np.max(np.abs(self.scale))) if np.size(self.scale) else 1.0
        return math.nextafter(m * (1.0 + self.const_err), math.inf) if self.const_err else m

    def apply(self, h, track, bound=None):
        s = torch.as_tensor(np.array(self.scale, dtype=np.float64))
        t = torch.as_tensor(np.array(self.shift, dtype=np.float64))
        out = h * s + t
        if not track:
            return out, None
        # fl(fl(s*x) + t): each op relative error <= u; plus the error of the
        # stored constants against the exact ones (const_err)
        mag = (h * s).abs() * (1 + U64) + t.abs()
        rnd = mag * ((2 * U64 + self.const_err) * (1 + 4 * U64))
        if np.any(self.shift_abs_err):
            rnd = (rnd + torch.as_tensor(np.array(self.shift_abs_err, dtype=np.float64))) * (1 + 2 * U64)
        return out, _norms(rnd)


@dataclass
class ReshapeNode(Node):
    def apply(self, h, track, bound=None):
        return h.reshape((h.shape[0], *self.out_shape)), _zero(h, track)


@dataclass
class IndexNode(Node):
    """transpose(perm) | pad(pads) | slice(slices) | space_to_depth(b) |
    depth_to_space(b, mode): every output entry is one input entry or 0, and no
    input entry is used twice, so the map is exact and 1-Lipschitz.
    gather(index): output entries copy input entries, an entry at most m times:
    exact, Lipschitz sqrt(m) (``lipschitz``)."""

    fn: str = "transpose"
    params: dict = field(default_factory=dict)
    #: 1 for maps that use every input entry at most once; sqrt(m) for
    #: "gather" maps that copy an entry up to m times (edge/reflect/wrap pads)
    lipschitz: float = 1.0

    def apply(self, h, track, bound=None):
        return _index(self.fn, self.params, h), _zero(h, track)


@dataclass
class ActivationNode(Node):
    activation: str = "relu"  # a key of ACTIVATIONS
    lipschitz: float = 1.0
    params: dict = field(default_factory=dict)

    def apply(self, h, track, bound=None):
        fn, rel = ACTIVATIONS[self.activation]
        out = fn(h, self.params)
        if not track:
            return out, None
        if rel == 0.0:
            return out, _zero(h, track)
        # relative error <= rel per entry (of the exact value, which is within
        # a factor 1 + rel of the computed one)
        return out, _norms(out.abs() * (rel * (1 + 2 * rel)))


@dataclass
class ParallelBound:
    """node_bounds entry of a ParallelNode: the whole block's bound and, per
    branch, the per-node bounds its own error recursion needs."""

    total: float
    branches: list

    def __float__(self) -> float:
        return float(self.total)


@dataclass
class ParallelNode(Node):
    """Branches of one input, merged.  merge: "add" (signs +-1: Add/Sub),
    "concat" (along per-sample ``axis``), "max" or "min" (elementwise).
    An empty branch is the identity."""

    branches: list = field(default_factory=list)
    merge: str = "add"
    signs: tuple = ()
    axis: int = 0

    def apply(self, h, track, bound=None):
        outs, errs = [], []
        for k, br in enumerate(self.branches):
            y = h
            e = _zero(h, track)
            inner = bound.branches[k] if (track and bound is not None) else None
            for j, node in enumerate(br):
                y, r = node.apply(y, track, None if inner is None else inner[j])
                if track:
                    # the branch starts from the computed input (error 0); the
                    # block's Lipschitz bound carries the input error
                    L = float(inner[j]) if (inner is not None and j > 0) else 1.0
                    e = (e * L + r) * (1 + 4 * U64) if j > 0 else r
            outs.append(y)
            errs.append(e)
        if self.merge == "add":
            out = sum(s * y if s != 1 else y for s, y in zip(self.signs, outs))
            rnd = None
            if track:
                # len-1 roundings of a running sum: each <= u |partial sum|
                mags = sum(y.abs() for y in outs)
                rnd = sum(errs) + _norms(mags * (gamma(max(1, len(outs) - 1)) * (1 + 4 * U64)))
            return out, rnd
        if self.merge == "concat":
            out = torch.cat(outs, dim=self.axis + 1)
        elif self.merge == "max":
            out = torch.stack(outs).amax(0)
        elif self.merge == "min":
            out = torch.stack(outs).amin(0)
        else:  # pragma: no cover - importer only creates the four above
            raise ValueError(self.merge)
        # concat/max/min are exact; ||(d_1..d_k)|| <= sum ||d_b||
        return out, (sum(errs) * (1 + 4 * U64) if track else None)


@dataclass
class Graph:
    input_name: str
    input_shape: tuple  # per sample, e.g. (C, H, W)
    output_name: str
    nodes: list = field(default_factory=list)
    num_classes: int = 0
    #: "Softmax" / "LogSoftmax" when the model's final normalisation was
    #: dropped (the IR computes the logits before it; argmax is unchanged)
    dropped_output: str = ""
    #: 0, or the batch size the ONNX model is fixed to / was imported at (its
    #: shapes are computed at run time): the IR is then the model run on that
    #: many samples at a time, each sample on its own
    batch: int = 0
    #: the serialized ONNX model the IR was imported from (the runtime check on
    #: the verification data runs it); empty when built directly
    runtime_model: bytes = field(default=b"", repr=False)

    def linear_nodes(self) -> list:
        return [n for n in self.nodes if isinstance(n, LinearNode)]

    def is_chain(self) -> bool:
        """True when no node has branches (the structure certificates cover)."""
        return not any(isinstance(n, ParallelNode) for n in self.nodes)

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
                h, rnd = node.apply(h, track, node_lipschitz[i] if track else None)
                if track:
                    L = float(node_lipschitz[i])
                    err = (err * L + rnd) * (1 + 4 * U64)  # upward-safe accumulation
            return h.numpy(), (err.numpy() if track else None)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable float64 evaluation (for attacks and tests)."""
        h = x.to(torch.float64)
        for node in self.nodes:
            h, _ = node.apply(h, False)
        return h


# ------------------------------------------------------------ evaluation
def _linear(node: LinearNode, h: torch.Tensor, b, absolute: bool = False) -> torch.Tensor:
    op = node.op
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
    return apply_conv(op, node.transposed, h, k, b)


def describe(node: Node) -> str:
    if isinstance(node, LinearNode):
        if isinstance(node.op, Dense):
            m, n = node.op.weight.shape
            return f"Dense {n}->{m}"
        o = node.op
        cin, cout = o.kernel.shape[1] * o.groups, o.kernel.shape[0]
        if node.transposed:
            cin, cout = cout, cin
        return (f"Conv{'Transpose' if node.transposed else ''} {cin}->{cout} "
                f"k{o.kernel.shape[2]}x{o.kernel.shape[3]} s{o.stride[0]} p{o.padding[0]} on "
                f"{node.in_shape[1]}x{node.in_shape[2]}"
                + (f" g{o.groups}" if o.groups > 1 else "") + (f" d{o.dilation[0]}" if max(o.dilation) > 1 else ""))
    if isinstance(node, ActivationNode):
        return node.activation
    if isinstance(node, AffineNode):
        return "affine"
    if isinstance(node, IndexNode):
        return node.fn
    if isinstance(node, ParallelNode):
        return f"{node.merge}({', '.join(str(len(b)) + ' nodes' for b in node.branches)})"
    return "reshape"


__all__ = ["Graph", "Node", "LinearNode", "AffineNode", "ReshapeNode", "IndexNode", "ActivationNode",
           "ParallelNode", "ParallelBound", "ACTIVATIONS", "gamma", "compose_rel", "U64", "LIBM_REL", "describe"]


def apply_conv(op, transposed: bool, h, k, b, groups: int | None = None):
    """A convolution node of the IR on the batch ``h`` with kernel ``k`` and
    bias ``b`` (torch tensors of any dtype and device): zero padding
    (top, left, bottom, right), or for ``transposed`` the adjoint of the conv
    on ``op.input_shape`` (full transposed conv, then the padding cropped;
    output_padding rows/cols beyond the full size are zero).  ``groups``
    overrides ``op.groups`` (the fast path's chunked sums)."""
    g = op.groups if groups is None else groups
    pt, pl, pb, pr = op.padding
    if transposed:
        y = F.conv_transpose2d(h, k, None, stride=op.stride, dilation=op.dilation, groups=g)
        _, OH, OW = op.input_shape
        y = F.pad(y, (0, max(0, pl + OW - y.shape[3]), 0, max(0, pt + OH - y.shape[2])))
        y = y[:, :, pt:pt + OH, pl:pl + OW]
        return y if b is None else y + b.reshape(1, -1, 1, 1)
    if any(op.padding):
        h = F.pad(h, (pl, pr, pt, pb))
    return F.conv2d(h, k, b, stride=op.stride, dilation=op.dilation, groups=g)
