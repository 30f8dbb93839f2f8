"""The constants of the fast path's a priori error bound (proofs/fast_forward.md):
proven norms of |W|, the dot-product coefficient, the float32 charge of
sub-normal weights, the chunked sums, the identity split of a residual
convolution, and which linear nodes of a float32 forward run in float64."""

from __future__ import annotations

import math

import numpy as np

from certlib.bounds import up
from certlib.ir.graph import U64, LinearNode, ParallelNode, gamma
from certlib.verifiers.operators import Dense

U32 = 2.0 ** -24        # unit roundoff of IEEE binary32, round to nearest

def gamma32(n: int, u: float = U32) -> float:
    """gamma_n = n u / (1 - n u) for unit roundoff u (default float32's),
    rounded up generously."""
    nu = n * u
    if nu >= 0.25:
        raise ValueError("dot product too long for the float32 error model")
    return up((nu / (1.0 - nu)) * (1.0 + 8 * U64))


def abs_norm_bound(w: np.ndarray, conv: bool, groups: int = 1) -> float:
    """A proven upper bound on || |W| ||_2 for the operator with entries |W|:
    min(sqrt(max row sum * max column sum), sqrt(taps) ||W||_F)  (Schur's test;
    proofs/fast_forward.md).  For a conv kernel (c_out, c_in/g, kh, kw) a row
    (one output entry) holds at most the taps of one output channel, and a
    column (one input entry) meets each output channel of its group through
    each tap at most once, whatever the padding, stride or dilation; the
    adjoint (ConvTranspose) swaps rows and columns, which the product ignores."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    if conv:
        c_out, cg = a.shape[:2]
        rows = a.reshape(c_out, -1).sum(axis=1).max()
        per_oc = a.sum(axis=(2, 3)).reshape(groups, c_out // groups, cg)
        cols = per_oc.sum(axis=1).max()
        taps = a.shape[2] * a.shape[3]
    else:
        rows, cols, taps = a.sum(axis=1).max(), a.sum(axis=0).max(), 1
    fac = 1.0 + gamma(a.size + 4)
    schur = up(math.sqrt(up(float(rows) * fac * float(cols) * fac)) * (1 + 4 * U64))
    fro = up(float(np.linalg.norm(a.ravel())) * fac * math.sqrt(taps) * (1 + 4 * U64))
    return min(schur, fro)


NORMAL32 = 2.0 ** -126


def _subnormal_charge(w: np.ndarray, conv: bool, groups: int = 1) -> float:
    """Per unit of input norm, a bound on || |W - fl32(W)| |x| || / ||x|| beyond
    v|W|: the entries of W below the float32 normal range convert with an
    absolute error up to 2^-150 (up to 2^-126 when flushed to zero)."""
    a = np.abs(np.asarray(w, dtype=np.float64))
    mask = ((a > 0) & (a < NORMAL32)).astype(np.float64)
    if not mask.any():
        return 0.0
    return up(abs_norm_bound(mask, conv, groups) * NORMAL32 * (1 + 4 * U64))


def _broadcast_norm(err, entries: int) -> float:
    """Upper bound on the l2 norm of an elementwise error bound broadcast over
    ``entries`` output entries (channel-wise or scalar): ||e|| sqrt(entries / size)."""
    e = np.abs(np.asarray(err, dtype=np.float64))
    if not np.any(e):
        return 0.0
    per = entries / e.size
    return up(float(np.linalg.norm(e.ravel())) * (1 + gamma(e.size + 2)) * math.sqrt(per) * (1 + 4 * U64))


#: chunks of the input channels for a float32 convolution with long dot
#: products (>= CHUNK_MIN_TERMS): about 1.5x the convolution's time on a CPU,
#: an 8x smaller a priori bound
CHUNKS = 8
CHUNK_MIN_TERMS = 1024


def _chunks(node) -> int:
    op = node.op
    if isinstance(op, Dense) or node.transposed or op.groups != 1:
        return 1
    c_in = op.kernel.shape[1]
    return CHUNKS if c_in % CHUNKS == 0 and node.terms() >= CHUNK_MIN_TERMS else 1


def identity_rest(node) -> np.ndarray | None:
    """K' = W - I when the convolution node W is the identity plus a kernel
    (a fused residual block x + Conv(x)): square, groups 1, odd kernel, stride
    1, padding that keeps the centre tap on the output position, same output
    size, and every centre-tap diagonal entry in [1/2, 2] so that subtracting
    1 is exact in float64 (Sterbenz).  None otherwise."""
    op = getattr(node, "op", None)
    if not isinstance(node, LinearNode) or isinstance(op, Dense) or node.transposed or any(node.output_padding):
        return None
    k = op.kernel
    c_out, c_in, kh, kw = k.shape
    dh, dw = op.dilation
    ph, pw = dh * (kh // 2), dw * (kw // 2)
    if (c_out != c_in or op.groups != 1 or kh % 2 == 0 or kw % 2 == 0 or tuple(op.stride) != (1, 1)
            or tuple(op.padding) != (ph, pw, ph, pw) or tuple(op.output_shape) != tuple(op.input_shape)):
        return None
    idx = np.arange(c_out)
    centre = k[idx, idx, kh // 2, kw // 2]
    if not np.all((centre >= 0.5) & (centre <= 2.0)):
        return None
    rest = np.array(k, dtype=np.float64)
    rest[idx, idx, kh // 2, kw // 2] = centre - 1.0
    return rest


#: in a float32 forward, a linear node with at most this share of the graph's
#: multiply-adds runs in float64: its a priori error is then negligible at a
#: small cost.  Stems, necks and heads are cheap and often ill-conditioned
#: (|| |W| || >> ||W||), and would otherwise dominate the float32 bound.
CHEAP_SHARE = 0.05


def _cheap_nodes(nodes) -> set:
    """Indices of the linear nodes run in float64: the cheapest first, while
    together they hold at most CHEAP_SHARE of the multiply-adds (so the most
    expensive node always stays float32)."""
    lin = sorted((_macs(n), k) for k, n in enumerate(nodes) if isinstance(n, LinearNode))
    total = sum(m for m, _ in lin) + sum(_macs(n) for n in nodes if isinstance(n, ParallelNode))
    out, acc = set(), 0
    for m, k in lin:
        acc += m
        if acc > CHEAP_SHARE * total:
            break
        out.add(k)
    return out


def _macs(node) -> int:
    if isinstance(node, LinearNode):
        return node.terms() * int(np.prod(node.out_shape))
    if isinstance(node, ParallelNode):
        return sum(_macs(m) for br in node.branches for m in br)
    return 0
