"""Nonlinear residual blocks bounded as one block (proofs/residual_blocks.md).

A ParallelNode ``x + sign * c_after * A diag(c_before) s(B x + b)`` whose
second branch is

    B (Conv or Dense) -> [bias] -> s -> [per-channel scales] -> A -> [scalar scales]

with ``s`` slope-restricted in [0, 1] (ReLU, LeakyReLU with 0 <= alpha <= 1)
and ``A = B^T`` exactly (a ConvTranspose with B's kernel and geometry, or a
Dense with B's weight transposed) is ``h(x) = x - B^T Lambda s(B x + b)`` with
``Lambda = -sign * c_after * c_before`` diagonal.  When ``Lambda >= 0`` the block
is ``max(1, ||Lambda^(1/2) B||^2 - 1)``-Lipschitz: 1 when the spectral-norm
condition ``||Lambda^(1/2) B||^2 <= 2`` holds, as it does for SLL
(``x - 2 W T^-1 s(W^T x + b)``) and CPL (``x - 2/||W||^2 W s(W^T x + b)``).
"""

from __future__ import annotations

import math

import numpy as np

from certlib.bounds import up, up_add, up_mul, up_sqrt
from certlib.ir.graph import U64, ActivationNode, AffineNode, LinearNode, ParallelNode
from certlib.verifiers.operators import Conv2d, Dense


def _slope01(n) -> bool:
    if type(n) is not ActivationNode:
        return False
    if n.activation == "relu":
        return True
    return n.activation == "leaky_relu" and 0.0 <= float(n.params.get("alpha", -1)) <= 1.0


def _vector(a: AffineNode, length: int):
    s = np.asarray(a.scale, dtype=np.float64)
    if s.size == 1:
        return np.full(length, float(s.ravel()[0]))
    shape = tuple(a.in_shape)
    if s.ndim < len(shape):
        s = s.reshape((1,) * (len(shape) - s.ndim) + s.shape)
    if s.ndim != len(shape) or s.shape[0] not in (1, length) or any(d != 1 for d in s.shape[1:]):
        return None
    return np.broadcast_to(s.reshape(-1), (length,)).astype(np.float64)


def _is_adjoint(a: LinearNode, b: LinearNode) -> bool:
    """A's exact map is B^T (same stored numbers)."""
    if isinstance(b.op, Dense):
        return (not a.transposed and isinstance(a.op, Dense) and a.op.weight.shape == b.op.weight.T.shape
                and np.array_equal(a.op.weight, b.op.weight.T))
    p, q = a.op, b.op
    return (a.transposed and isinstance(p, Conv2d) and tuple(a.output_padding) == (0, 0)
            and p.kernel.shape == q.kernel.shape and np.array_equal(p.kernel, q.kernel)
            and tuple(p.input_shape) == tuple(q.input_shape) and p.stride == q.stride
            and p.padding == q.padding and p.dilation == q.dilation and p.groups == q.groups
            and tuple(a.out_shape) == tuple(q.input_shape))


def slope_residual(node: ParallelNode):
    """(B's operator, an upper bound on Lambda per output channel of B) when
    node is ``x - B^T Lambda s(B x + b)`` with Lambda >= 0, else None."""
    if node.merge != "add" or len(node.branches) != 2:
        return None
    empty = [k for k, br in enumerate(node.branches) if not br]
    if len(empty) != 1 or node.signs[empty[0]] != 1:
        return None
    k = 1 - empty[0]
    br, sign = node.branches[k], float(node.signs[k])
    if len(br) < 3 or not isinstance(br[0], LinearNode) or br[0].transposed:
        return None
    B = br[0]
    cout = B.op.weight.shape[0] if isinstance(B.op, Dense) else B.op.kernel.shape[0]
    i = 1
    while i < len(br) and isinstance(br[i], AffineNode) and np.all(np.asarray(br[i].scale) == 1.0):
        i += 1     # a bias: no effect on differences
    if i >= len(br) or not _slope01(br[i]):
        return None
    before, after, A = [], [], None
    for n in br[i + 1:]:
        if isinstance(n, LinearNode):
            if A is not None or not _is_adjoint(n, B):
                return None
            A = n
        elif isinstance(n, AffineNode) and 0 <= n.const_err < 0.5 and np.all(np.asarray(n.shift) == 0.0):
            v = _vector(n, cout if A is None else 1)
            if v is None or (A is not None and np.asarray(n.scale).size != 1):
                return None
            (before if A is None else after).append((v, float(n.const_err)))
        else:
            return None
    if A is None:
        return None
    # Lambda = -sign * prod(after) * prod(before): its exact sign, then an upper bound of |Lambda|
    neg, zero = np.full(cout, sign < 0), np.zeros(cout, dtype=bool)
    mag = np.ones(cout)
    for v, err in before + [(np.full(cout, float(s[0])), e) for s, e in after]:
        neg ^= v < 0         # the exact constant is within a factor 1 +- err < 1.5 of v: same sign
        zero |= v == 0
        grow = up(1.0 + err) if err else 1.0
        mag = np.array([up_mul(up_mul(m, abs(x)), grow) for m, x in zip(mag, v)])
    mag[zero] = 0.0
    if np.any(~neg & ~zero) or not np.all(np.isfinite(mag)):
        return None     # some Lambda_i < 0 (or overflow): not this rule
    return B.op, mag


def scaled_op(op, lam_up: np.ndarray):
    """diag(s) B with s_i >= sqrt(Lambda_i) (rounded up); the caller adds the
    rounding margin of the stored product (fold margin, proofs/normalisation.md)."""
    s = np.array([up_sqrt(v) if v > 0 else 0.0 for v in lam_up])
    if isinstance(op, Dense):
        return Dense(op.weight * s[:, None])
    return Conv2d(op.kernel * s[:, None, None, None], op.input_shape, op.stride, op.padding, op.dilation,
                  op.groups)


def block_bound(c_norm: float) -> float:
    """max(1, c^2 - 1), rounded up, from an upper bound c on ||Lambda^(1/2) B||."""
    sq = up_mul(c_norm, c_norm)
    return 1.0 if sq <= 2.0 else up(up_add(sq, -1.0))


def block_rule(node: ParallelNode, op_bound) -> tuple[float, str] | None:
    """The tightest block rule that applies to an add block, or None:
    x - B^T Lambda s(Bx + b) by the spectral-norm condition (``op_bound`` proves
    ||Lambda^1/2 B||), else a dense x + A s(Bx + b) by the one-layer LMI
    (certlib.ir.residual_lmi; cvxpy, re-proven by Rump)."""
    res = slope_residual(node)
    if res is not None:
        c, _ = op_bound(scaled_op(*res), 0.0)
        return block_bound(c), "slope-restricted residual block (proofs/residual_blocks.md)"
    from certlib.ir.residual_lmi import dense_lmi_bound

    blk = dense_block(node)
    if blk is not None:
        b = dense_lmi_bound(*blk)
        if b is not None:
            return b, "residual block LMI (cvxpy, re-proven by Rump; proofs/residual_blocks.md)"
    return None


def dense_block(node):
    """(A^, B, a_err) for a ParallelNode x + sign * A_chain s(B x + b) with B, A
    Dense and only scale affines (shift 0) around A, else None."""
    if node.merge != "add" or len(node.branches) != 2:
        return None
    empty = [k for k, br in enumerate(node.branches) if not br]
    if len(empty) != 1 or node.signs[empty[0]] != 1:
        return None
    br = node.branches[1 - empty[0]]
    if len(br) < 3 or not isinstance(br[0], LinearNode) or not isinstance(br[0].op, Dense):
        return None
    B = br[0].op.weight
    i = 1
    while i < len(br) and isinstance(br[i], AffineNode) and np.all(np.asarray(br[i].scale) == 1.0):
        i += 1
    if i >= len(br) or not _slope01(br[i]):
        return None
    A, err, k = None, 0.0, 0
    col = np.full(B.shape[0], float(node.signs[1 - empty[0]]))
    row = None
    for n in br[i + 1:]:
        if isinstance(n, LinearNode) and isinstance(n.op, Dense) and A is None and not n.transposed:
            A = n.op.weight
        elif isinstance(n, AffineNode) and np.all(np.asarray(n.shift) == 0.0) and n.const_err < 0.5:
            v = _vector(n, B.shape[0] if A is None else A.shape[0])
            if v is None:
                return None
            if A is None:
                col = col * v
            else:
                row = v if row is None else row * v
            err, k = err + float(n.const_err), k + 1
        else:
            return None
    if A is None or A.shape != (B.shape[1], B.shape[0]):
        return None
    Ah = A * col[None, :]
    if row is not None:
        Ah = Ah * row[:, None]
    if err > 1e-3:
        return None
    # <= 2k + 2 float products (each relative u) and constants within exp(sum const_err)
    a_err = up(((1 + U64) ** (2 * k + 2) * math.exp(err) - 1) * 1.01)
    return Ah, B, a_err
