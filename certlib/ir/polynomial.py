"""A polynomial of one skew-symmetric operator, bounded as one block
(proofs/polynomial_blocks.md).

A ParallelNode in Horner form ``q(A) x = a0 x + A(a1 x + A(... A(aK x)))`` (as
certlib.onnx.ops.polynomial emits it) of ONE LinearNode A is recognised from
the IR itself (no tag is trusted).  When A is exactly skew-symmetric on the
stored numbers -- a Dense with W = -W^T, or a stride-1 'same' zero-padded Conv2d
(C_in = C_out, groups 1, symmetric padding with 2 pad = dilation (k - 1) per
axis) whose kernel satisfies K = -flip(K)^T, i.e.
``K[o, i, a, b] = -K[i, o, kh-1-a, kw-1-b]`` -- then A^T = -A, A is normal with
spectrum in i[-rho, rho] (rho >= ||A||, a proven bound) and

    ||q(A)|| = max over the spectrum |q(lambda)| <= sup_{0 <= theta <= rho} |q(i theta)|.

The sup is bounded with exact rationals: s(u) = |q(i sqrt u)|^2 = R(u)^2 +
u J(u)^2 is a polynomial in u with Fraction coefficients, bounded on [0, rho^2]
by adaptive subdivision (:func:`sup_bound`).  The stored coefficients' own
error (AffineNode.const_err, relative to the exact ones) adds
sum_i e_i/(1-e_i) |a_i| rho^i.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from certlib.bounds import up, up_sqrt
from certlib.ir.graph import AffineNode, LinearNode, ParallelNode
from certlib.verifiers.operators import Conv2d, Dense

#: stop refining when the largest piece bound is within this of the best sample
REL_TOL = Fraction(1, 10 ** 12)
#: at most this many piece evaluations per block (the bound stays sound, only looser)
MAX_PIECES = 4000
MAX_DEGREE = 64
#: results above this are left to the composition rule (no overflow in rounding up)
HUGE = Fraction(2) ** 1000


def same_op(p, q) -> bool:
    """The same operator: kind, stored numbers and geometry."""
    if type(p) is not type(q):
        return False
    if isinstance(p, Dense):
        return p.weight.shape == q.weight.shape and np.array_equal(p.weight, q.weight)
    return (p.kernel.shape == q.kernel.shape and np.array_equal(p.kernel, q.kernel)
            and tuple(p.input_shape) == tuple(q.input_shape) and p.stride == q.stride
            and p.padding == q.padding and p.dilation == q.dilation and p.groups == q.groups)


def _parse(nodes: list, found: list) -> list | None:
    """Terms (degree, stored coefficient, const_err) of a node list that is
    [first] + [A, A, ...]: first an AffineNode scalar, a Horner ParallelNode, A
    itself or nothing; every LinearNode the same operator (kept in ``found``)."""
    terms: list = [(0, 1.0, 0.0)]
    rest = nodes
    if nodes and isinstance(nodes[0], AffineNode):
        a = nodes[0]
        s = np.asarray(a.scale, dtype=np.float64)
        if (s.size != 1 or np.any(np.asarray(a.shift) != 0) or np.any(a.shift_abs_err)
                or not 0 <= a.const_err < 0.25 or not np.isfinite(s).all()):
            return None
        terms, rest = [(0, float(s.ravel()[0]), float(a.const_err))], nodes[1:]
    elif nodes and isinstance(nodes[0], ParallelNode):
        terms, rest = _parse_block(nodes[0], found), nodes[1:]
        if terms is None:
            return None
    for n in rest:
        if type(n) is not LinearNode:
            return None
        if not found:
            found.append(n)
        elif not same_op(found[0].op, n.op) or n.transposed != found[0].transposed:
            return None
        if n.bias is not None or n.weight_rel_err or n.transposed:
            return None
        terms = [(d + 1, c, e) for d, c, e in terms]
    if any(d > MAX_DEGREE for d, _, _ in terms):
        return None
    return terms


def _parse_block(node: ParallelNode, found: list) -> list | None:
    if type(node) is not ParallelNode or node.merge != "add" or len(node.signs) != len(node.branches):
        return None
    if tuple(node.in_shape) != tuple(node.out_shape) or any(s not in (1.0, -1.0) for s in node.signs):
        return None
    terms = []
    for br, s in zip(node.branches, node.signs):
        t = _parse(br, found)
        if t is None:
            return None
        terms += [(d, s * c, e) for d, c, e in t]
    return terms


def is_skew(lin: LinearNode) -> bool:
    """A^T = -A exactly, from the stored numbers and the geometry."""
    if type(lin) is not LinearNode or lin.transposed or lin.bias is not None or lin.weight_rel_err:
        return False
    op = lin.op
    if isinstance(op, Dense):
        W = op.weight
        return W.ndim == 2 and W.shape[0] == W.shape[1] and np.array_equal(W, -W.T)
    if not isinstance(op, Conv2d):
        return False
    K = op.kernel
    co, ci, kh, kw = K.shape
    pt, pl, pb, pr = op.padding
    dh, dw = op.dilation
    shape = tuple(op.input_shape)
    return (co == ci == shape[0] and op.groups == 1 and op.stride == (1, 1) and pt == pb and pl == pr
            and 2 * pt == dh * (kh - 1) and 2 * pl == dw * (kw - 1) and tuple(op.output_shape) == shape
            and tuple(lin.in_shape) == shape and tuple(lin.out_shape) == shape
            and np.array_equal(K, -K.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1]))


def polynomial(node: ParallelNode):
    """(the skew LinearNode A, terms [(degree, stored coefficient, const_err)])
    when node is a polynomial of one exactly skew-symmetric A, else None."""
    found: list = []
    terms = _parse_block(node, found)
    if terms is None or not found or not is_skew(found[0]):
        return None
    if tuple(found[0].in_shape) != tuple(node.in_shape):
        return None
    return found[0], terms


def _square_poly(q: list) -> list:
    """Coefficients of s(u) = |q(i sqrt u)|^2 = R(u)^2 + u J(u)^2 (Fractions)."""
    R = [q[k] * (-1) ** (k // 2) for k in range(0, len(q), 2)]
    J = [q[k] * (-1) ** (k // 2) for k in range(1, len(q), 2)]

    def mul(a, b):
        out = [Fraction(0)] * (len(a) + len(b) - 1) if a and b else []
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                out[i + j] += x * y
        return out

    s = [Fraction(0)] * (len(q) + 1)
    for k, c in enumerate(mul(R, R)):
        s[k] += c
    for k, c in enumerate(mul(J, J)):
        s[k + 1] += c
    while len(s) > 1 and s[-1] == 0:
        s.pop()
    return s


def _ev(c: list, u: Fraction) -> Fraction:
    v = Fraction(0)
    for x in reversed(c):
        v = v * u + x
    return v


def _piece(s: list, d1: list, d2abs: list, lo: Fraction, hi: Fraction) -> Fraction:
    """An upper bound of s on [lo, hi] (0 <= lo): the smaller of the monotone
    split sum_{c>0} c hi^k + sum_{c<0} c lo^k and the Taylor bound at the
    midpoint s(m) + |s'(m)| h/2 + max|s''| (h/2)^2 / 2, max|s''| <= sum |c''_k| hi^k."""
    mono = sum((c * (hi ** k if c > 0 else lo ** k) for k, c in enumerate(s)), Fraction(0))
    m, r = (lo + hi) / 2, (hi - lo) / 2
    taylor = _ev(s, m) + abs(_ev(d1, m)) * r + _ev(d2abs, hi) * r * r / 2
    return min(mono, taylor)


def sup_bound(q: list, rho: float) -> tuple[Fraction, int]:
    """An upper bound (exact rational) of sup_{0 <= theta <= rho} |q(i theta)|^2
    for exact coefficients q (Fractions), and the number of pieces evaluated."""
    s = _square_poly([Fraction(a) for a in q])
    d1 = [k * c for k, c in enumerate(s)][1:]
    d2abs = [abs(k * (k - 1) * c) for k, c in enumerate(s)][2:]
    U = Fraction(rho) ** 2
    best = max(_ev(s, Fraction(0)), _ev(s, U))
    pieces = [(Fraction(0), U, _piece(s, d1, d2abs, Fraction(0), U))]
    evals, done = 1, Fraction(0)      # done: the largest bound of a piece dropped below the target
    while pieces:
        target = best * (1 + REL_TOL)
        keep = []
        for lo, hi, b in pieces:
            if b <= target:
                done = max(done, b)
            else:
                keep.append((lo, hi, b))
        pieces = keep
        if not pieces or evals + 2 * len(pieces) > MAX_PIECES:
            break
        nxt = []
        for lo, hi, _ in pieces:
            m = (lo + hi) / 2
            best = max(best, _ev(s, m))
            nxt += [(lo, m, _piece(s, d1, d2abs, lo, m)), (m, hi, _piece(s, d1, d2abs, m, hi))]
            evals += 2
        pieces = nxt
    top = max([done] + [b for _, _, b in pieces])
    return max(top, Fraction(0)), evals


def _up_float(v: Fraction) -> float:
    f = float(v)
    return f if Fraction(f) >= v else math.nextafter(f, math.inf)


def polynomial_bound(node: ParallelNode, op_bound) -> tuple[float, str] | None:
    """The bound of a polynomial block of one skew operator, or None when the
    rule does not apply.  ``op_bound(op, None)`` proves rho >= ||A||."""
    got = polynomial(node)
    if got is None:
        return None
    A, terms = got
    rho, _ = op_bound(A.op, None)
    if not math.isfinite(rho) or rho > 2.0 ** 60:
        return None
    deg = max(d for d, _, _ in terms)
    q = [Fraction(0)] * (deg + 1)
    charge = Fraction(0)
    R = Fraction(rho)
    for d, c, e in terms:
        q[d] += Fraction(c)
        if e:          # |exact - stored| <= e |exact| <= e/(1-e) |stored|
            charge += Fraction(e) / (1 - Fraction(e)) * abs(Fraction(c)) * R ** d
    sq, evals = sup_bound(q, rho)
    if sq > HUGE or charge > HUGE:      # not a finite double: the composition rule stands
        return None
    value = up_sqrt(_up_float(sq))
    if charge:
        value = up(value + _up_float(charge))
    how = (f"polynomial (degree {deg}) of a skew-symmetric operator, sup |q(i theta)| over |theta| <= {rho:.9g} "
           f"({evals} pieces; proofs/polynomial_blocks.md)")
    return value, how
