"""The constants of the fast path's a priori error bound (proofs/fast_forward.md):
proven norms of |W|, the dot-product coefficient, the float32 charge of
sub-normal weights, the chunked sums, the identity split of a residual
convolution, which linear nodes of a float32 forward run in float64, the
per-sample activation norms, the float64 path's share of each node's term
(theta), and the floating-point conditions the model needs (ieee_float32)."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch

from certlib.bounds import up
from certlib.ir.graph import U64, ActivationNode, AffineNode, IndexNode, LinearNode, ParallelNode, ReshapeNode, gamma
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


#: absolute error of one float32 operation in the subnormal range, also with
#: flush-to-zero (a result below 2^-126 replaced by 0); denormals-are-zero
#: (subnormal inputs read as 0) is turned off by ieee_float32
TINY32 = 2.0 ** -125


@dataclasses.dataclass
class _Lin:
    weight: torch.Tensor
    bias: torch.Tensor | None
    A: float          # >= || |W| ||_2
    B: float          # >= || broadcast |b| ||_2 over the output
    coef: float       # per-entry relative error of the output against W x + b
    out_entries: int
    terms: int
    #: stored constants against the exact ones: weight_rel_err * A (per unit
    #: of input norm) and the norm of the broadcast bias error
    const_rel: float = 0.0
    const_abs: float = 0.0
    #: the kernel holds W - I (W = I + K' exactly): the node computes x + K'x
    #: (proofs/fast_forward.md, "Identity split")
    split: bool = False
    u: float = U32
    #: the input channels are summed in this many chunks (a grouped conv then a
    #: sum of the partials): the dot product bound is gamma_{n/J + J}, not
    #: gamma_n (proofs/fast_forward.md, "Chunked sums")
    chunks: int = 1
    #: stored weights below float32's normal range (|w| < 2^-126, not 0):
    #: fl32(w) is off by up to 2^-150 absolutely (2^-126 flushed), not v|w|;
    #: 2^-126 || |mask| ||_2 per unit of input norm
    sub: float = 0.0
    #: the dot-product coefficient without chunks (for choosing a plan only)
    coef1: float = 0.0
    #: >= || |W| || of the whole weight (A is || |K'| || after an identity split)
    A_full: float = math.inf


def _path_linear(node, p, rel: float = 0.0) -> float:
    """The float64 path's term of a linear node per unit of |W||x~| + |b|
    (graph.LinearNode.apply, then _norms), its computed |W||x~| up to
    1/(1 - g) above the exact one; ``rel``: the stored weight's relative error."""
    g = gamma(node.terms())
    return ((g / (1 - g)) * (1 + g) + rel * (1 + 2 * g)) / (1 - g) * (1 + gamma(p.out_entries + 2))


def _path_affine(node, p) -> float:
    """The float64 path's term of an affine node per unit of |s x~| + |t|
    (graph.AffineNode.apply: (|s x|(1 + u) + |t|)(2u + c)(1 + 4u), then _norms)."""
    return (2 * U64 + float(node.const_err)) * (1 + U64) * (1 + 8 * U64) * (1 + gamma(p[6] + 2))


def theta(node, p, dt) -> float:
    """An upper bound on (the float64 path's rounding term of ``node``) / (this
    forward's term), at equal input norms (proofs/fast_forward.md, "Identical
    decisions"): the ratio of the dot-product coefficients (u = 2^-53 against
    v = 2^-24 with chunks), times || |W| || / || |K'| || for an identity
    split; 1 for a node run in float64 and for terms that do not shrink with
    the precision (stored-constant errors, activations; merged blocks are
    compared node by node instead: fast._parallel with D)."""
    if dt != torch.float32:
        return 1.0
    if isinstance(node, LinearNode) and isinstance(p, _Lin):
        if p.const_rel or p.const_abs:
            return 1.0
        ratio = max(1.0, up(p.A_full / p.A)) if p.split else 1.0
        return min(1.0, up(_path_linear(node, p) * ratio / p.coef * (1 + 16 * U64)))
    if isinstance(node, AffineNode) and isinstance(p, tuple) and p[0] == "affine" and not p[7]:
        return min(1.0, up(_path_affine(node, p) / p[5] * (1 + 16 * U64)))
    return 1.0


def kappa(node, p) -> float:
    """Per unit of input norm, >= the float64 path's rounding and stored-constant
    term of ``node`` (graph.py, ``Node.apply`` then ``_norms``): how much that
    term grows when the path's input is farther from this forward's
    (proofs/fast_forward.md, "Identical decisions"); inf for a node it does not know."""
    if isinstance(node, (ReshapeNode, IndexNode)):
        return 0.0
    if isinstance(node, LinearNode) and isinstance(p, _Lin):
        return up(p.A_full * _path_linear(node, p, float(node.weight_rel_err)) * (1 + 16 * U64))
    if isinstance(node, AffineNode) and isinstance(p, tuple) and p[0] == "affine":
        return up(p[3] * _path_affine(node, p) * (1 + 16 * U64))
    if isinstance(node, ActivationNode):
        from certlib.ir.evaluate import ACTIVATIONS
        rel = ACTIVATIONS[node.activation][1]
        n = int(np.prod(node.out_shape))
        return up(rel * (1 + 2 * rel) * float(node.lipschitz) * (1 + gamma(n + 2)) * (1 + 16 * U64)) if rel else 0.0
    return math.inf


@contextlib.contextmanager
def ieee_float32():
    """The conditions the error model needs (proofs/fast_forward.md): no TF32
    or bf16 reduced-precision GEMM/conv, no NNPACK (Winograd / FFT
    convolution on CPU), cuDNN off (its algorithm choice includes Winograd and
    FFT), so every output entry is an ordinary dot product: oneDNN's direct
    convolution, im2col + GEMM, or a BLAS GEMM."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    torch.set_flush_denormal(False)   # no denormals-are-zero on the CPU (the error model's t covers FTZ only)
    try:
        with torch.backends.nnpack.flags(enabled=False), \
                torch.backends.cudnn.flags(enabled=False, benchmark=False, deterministic=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev[0], prev[1]
        torch.set_float32_matmul_precision(prev[2])


def _norm_up(h: torch.Tensor) -> torch.Tensor:
    """Per-sample upper bound (float64, on CPU) on the l2 norm of a batch
    (proofs/fast_forward.md, "Norms").  Float32: the squares and their sum in
    float32 over J chunks of the row (gamma_{n/J + J + 1} for any order, FMA or
    not), each square and addition losing at most 2^-125 below the normal
    range; float64: converted, squared and summed in float64 (gamma_{n+2})."""
    flat = h.reshape(h.shape[0], -1)
    n = flat.shape[1]
    if len(flat) == 0:
        return torch.zeros(0, dtype=torch.float64)
    J = _norm_chunks(n)
    if flat.dtype == torch.float32 and n >= 64 and (n // J + J + 1) * U32 < 0.25:   # (else: gamma32 undefined)
        s = (flat * flat).reshape(len(flat), J, n // J).sum(dim=2).sum(dim=1).double().cpu()
        g = gamma32(n // J + J + 1)
        # sum x^2 <= (s + 2 n t) / (1 - gamma): the float64 steps rounded up by (1 + 8 u64)
        return ((s + 2 * n * TINY32) / (1 - g)).sqrt() * (1 + 8 * U64)
    s = torch.cat([c.double().square().sum(dim=1) for c in flat.split(16)])
    # + an allowance for squares below the normal range (float64 inputs)
    return (s.sqrt() * (1 + 2 * gamma(n + 2)) + math.sqrt(n * (n + 2)) * 2.0 ** -537).cpu()


def _norm_chunks(n: int) -> int:
    """The largest divisor of n not above sqrt(n): the row sums in that many chunks."""
    for j in range(math.isqrt(n), 0, -1):
        if n % j == 0:
            return j
    return 1  # pragma: no cover

#: exact activations whose output norm is at most their input norm (a
#: permutation of the entries, their absolute values, or ReLU): the computed
#: input's norm bound also bounds the output's, so it is not recomputed
NORM_KEEPING = {"relu", "minmax", "minmax_rev", "minmax_pairs", "minmax_pairs_rev", "abs", "groupsort"}


def _keeps_norm(node, p) -> bool:
    if isinstance(node, ReshapeNode):
        return True
    if isinstance(node, IndexNode):
        return node.fn != "gather" and float(node.lipschitz) == 1.0
    return isinstance(node, ActivationNode) and p == ("exact",) and node.activation in NORM_KEEPING


def _void(err: torch.Tensor, hn: torch.Tensor) -> torch.Tensor:
    """inf where the computed value's norm is not finite: an overflow hidden
    later (ReLU(-inf) = 0, a max/min merge, a clip) must not keep a finite bound."""
    return torch.where(torch.isfinite(hn), err, torch.full_like(err, math.inf))
