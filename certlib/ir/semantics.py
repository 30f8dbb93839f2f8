"""Certificates for the precision that is deployed (proofs/float_semantics.md).

Under ``exact`` semantics (the default) a certificate speaks of the IR in exact
real arithmetic.  Under ``float32``, ``bfloat16`` or ``float16`` it speaks of
the model EXECUTED in that precision by any executor meeting the error model
of :class:`Semantics` (stated in words by :meth:`Semantics.describe`):

    F~(x') = F(x') + E(x'),   ||E(x')||_2 <= e_ball(x)   for every x' in B(x, eps)

``e_ball`` is bounded node by node: the executed input of node k at any x' of
the ball has norm <= N_k = ||h_k(x)|| + P_k eps + E_{k-1} (the exact norm at x,
bounded from the sound float64 evaluation; P_k the product of the proven
per-node Lipschitz bounds before k; E_{k-1} the execution error so far); the
node's own rounding error r_k follows from N_k (rules below, the float32 rules
of :mod:`certlib.ir.fast` with the unit roundoff and the storage / accumulation
split as parameters); E_k = L_k E_{k-1} + r_k.  A sample is certified when
every margin at x minus sqrt(2) (e64 + e_ball) exceeds eps K_yj; the radius is
capped at eps (e_ball grows with the radius).  Every pre-rounding value is
proven below the format's largest finite number over the whole ball, else
e_ball is infinite (the sample is not certified).

Nodes whose execution the model does not cover (tanh/sigmoid: libm accuracy;
branches: not written yet; a constant that does not fit the format) are
refused with :class:`~certlib.errors.UnsupportedModelError`, never evaluated
under exact semantics instead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from certlib.bounds import up
from certlib.errors import Unsupported, UnsupportedModelError
from certlib.ir.fast import EXACT_ACTIVATIONS, SCALED_ACTIVATIONS, _broadcast_norm, abs_norm_bound, gamma32
from certlib.ir.graph import (U64, ActivationNode, AffineNode, Graph, IndexNode, LinearNode, ReshapeNode, _norms,
                              gamma)
from certlib.verifiers.operators import Dense

NAMES = ("exact", "float32", "bfloat16", "float16")
ACCUMULATIONS = ("float32", "storage")

F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Semantics:
    """The execution error model of one precision.  Every stored value (input,
    weight, bias, scale, activation) is rounded to the storage format: relative
    error <= ``u`` plus absolute ``tiny`` (which covers gradual underflow AND
    flush-to-zero / denormals-are-zero: ``tiny`` >= the smallest normal);
    dot products are accumulated in ``accumulate`` precision (``u_acc``,
    ``tiny_acc``), any summation order, FMA or not, then rounded to storage."""

    name: str
    u: float
    tiny: float
    maxval: float            # largest finite storage value
    u_acc: float
    tiny_acc: float
    accumulate: str          # "float32" or "storage"

    @property
    def exact(self) -> bool:
        return self.name == "exact"

    @property
    def torch_dtype(self):
        from certlib.ir.execute import DTYPES

        return DTYPES.get(self.name)

    @property
    def split(self) -> bool:
        """True when accumulation is wider than storage (one more rounding on output)."""
        return self.u_acc != self.u

    @property
    def ue(self) -> float:
        """Relative error of one elementwise operation, computed in the
        accumulation precision and stored (two roundings when they differ)."""
        return up((1 + self.u) * (1 + self.u_acc) - 1) if self.split else self.u

    @property
    def tiny_op(self) -> float:
        return self.tiny + self.tiny_acc if self.split else self.tiny

    def describe(self) -> str:
        if self.exact:
            return ("exact semantics: the model's function in exact real arithmetic (weights as stored); "
                    "the executed floating-point model is not covered")
        acc = ("" if self.name == "float32" else
               "dot products accumulated in float32 (as cuBLAS and oneDNN do), " if self.accumulate == "float32"
               else f"dot products accumulated in {self.name} itself (worst case), ")
        return (f"{self.name} semantics: the model executed in {self.name} -- input, weights and every "
                f"activation stored in {self.name}, {acc}any summation order, with or without FMA, "
                "GEMM-based or direct convolution (no Winograd/FFT"
                + (", no TF32" if self.name == "float32" else "")
                + "), underflow gradual or flushed to zero -- predicts the same class at every point of the ball")


def get(name: str | None, accumulate: str = "float32") -> Semantics:
    """The semantics called ``name`` (exact, float32, bfloat16, float16);
    ``accumulate``: "float32" (default for the 16-bit formats) or "storage"
    (the worst case: sums accumulated in the 16-bit format itself)."""
    from certlib.errors import UsageError

    name = (name or "exact").lower()
    if name not in NAMES:
        raise UsageError(f"--semantics must be one of {', '.join(NAMES)}, got {name!r}")
    if accumulate not in ACCUMULATIONS:
        raise UsageError(f"--accumulate must be float32 or storage, got {accumulate!r}")
    if name == "exact":
        return Semantics("exact", 0.0, 0.0, math.inf, 0.0, 0.0, "float32")
    u, tiny, mx = {"float32": (2.0 ** -24, 2.0 ** -125, F32_MAX),
                   # bfloat16: 8 significand bits; smallest normal 2^-126 (flush error < 2^-126)
                   "bfloat16": (2.0 ** -8, 2.0 ** -125, float(torch.finfo(torch.bfloat16).max)),
                   # float16: 11 significand bits; smallest normal 2^-14, charged whole (flush-to-zero)
                   "float16": (2.0 ** -11, 2.0 ** -14, 65504.0)}[name]
    if name == "float32" or accumulate == "storage":
        return Semantics(name, u, tiny, mx, u, tiny, "storage" if name != "float32" else "float32")
    return Semantics(name, u, tiny, mx, 2.0 ** -24, 2.0 ** -125, "float32")


def _ones_norm(w, conv: bool, groups: int) -> float:
    """|| pattern of W's entries ||_2 (entries 1): bounds the flushed-weight term."""
    return abs_norm_bound(np.ones_like(np.asarray(w, dtype=np.float64)), conv, groups)


def _fits(v, sem: Semantics) -> bool:
    """Every value of v is exactly representable in the storage format."""
    a = np.asarray(v, dtype=np.float64)
    t = torch.as_tensor(a).to(sem.torch_dtype).double().numpy()
    return bool(np.all(t == a))


@dataclasses.dataclass
class Rule:
    """One node's execution-error rule: ``r = rel * N + absolute`` for an
    executed input of norm <= N; ``mag = mrel * N + mabs`` bounds the norm of
    every pre-rounding value (for the overflow check)."""

    rel: float = 0.0
    absolute: float = 0.0
    mrel: float = 0.0
    mabs: float = 0.0
    checks: bool = False     # values computed here must be proven finite


def _rule(node, sem: Semantics) -> Rule | str:
    """The rule for one node, or why it is not covered."""
    u, tiny = sem.u, sem.tiny
    if isinstance(node, LinearNode):
        op = node.op
        conv = not isinstance(op, Dense)
        w = op.weight if not conv else op.kernel
        groups = getattr(op, "groups", 1)
        if np.max(np.abs(w), initial=0.0) * (1 + u) > sem.maxval:
            return f"a weight does not fit {sem.name}"
        n = node.terms()
        m = int(np.prod(node.out_shape))
        try:
            g = gamma32(n, sem.u_acc)
        except ValueError:
            return (f"dot products of {n} terms: n u >= 1/4 for accumulation in {sem.name} (use float32 "
                    "accumulation)")
        A = abs_norm_bound(w, conv, groups)
        A1 = _ones_norm(w, conv, groups)
        # stored weights W_p = W (1 + d) + e, |d| <= u, |e| <= tiny (flush to zero included)
        Aw = up(((1 + u) * A + tiny * A1) * (1 + 4 * U64))
        Ad = up((u * A + tiny * A1) * (1 + 4 * U64))
        if node.bias is None:
            B = 0.0
            k = 1 if sem.split else 0
        else:
            if np.max(np.abs(node.bias), initial=0.0) * (1 + u) > sem.maxval:
                return f"a bias does not fit {sem.name}"
            B = _broadcast_norm(node.bias, m)
            k = 2 if sem.split else 0   # MatMul and Add may be two nodes: two roundings to storage
        sq = math.sqrt(m) * (1 + U64)
        Bw = up(((1 + u) * B + tiny * sq) * (1 + 4 * U64)) if node.bias is not None else 0.0
        Bd = up((u * B + tiny * sq) * (1 + 4 * U64)) if node.bias is not None else 0.0
        uo = sem.u if sem.split else 0.0
        grow = (1 + uo) ** k * (1 + 8 * U64)
        c1 = up((1 + g) * grow - 1 + 8 * U64)
        rel = float(node.weight_rel_err)
        const_rel = up(A * rel * (1 + 4 * U64)) if rel else 0.0
        const_abs = _broadcast_norm(node.bias_abs_err, m)
        acc_tiny = sq * n * sem.tiny_acc
        return Rule(rel=up((c1 * Aw + Ad + const_rel) * (1 + 4 * U64)),
                    absolute=up((c1 * Bw + Bd + const_abs + acc_tiny * grow + sq * k * tiny) * (1 + 4 * U64)),
                    mrel=up((1 + g) * Aw * grow), mabs=up(((1 + g) * Bw + acc_tiny) * grow), checks=True)
    if isinstance(node, AffineNode):
        scale = np.asarray(node.scale, dtype=np.float64)
        shift = np.asarray(node.shift, dtype=np.float64)
        if max(np.max(np.abs(scale), initial=0.0), np.max(np.abs(shift), initial=0.0)) * (1 + u) > sem.maxval:
            return f"a constant does not fit {sem.name}"
        m = int(np.prod(node.in_shape))
        c = float(node.const_err)
        ue = sem.ue
        smax = float(np.max(np.abs(scale))) if scale.size else 1.0
        tn = _broadcast_norm(shift, m) if np.size(shift) else 0.0
        # s_p = s(1+c)(1+d)+e (or x / k_p: (1+u)/(1-u)); fl(s_p x) and fl(. + t_p): two operations
        k = up((1 + c) * (1 + u) / (1 - u) * (1 + ue) ** 2 * (1 + 8 * U64) - 1 + 8 * U64)
        sq = math.sqrt(m) * (1 + U64)
        sh = _broadcast_norm(node.shift_abs_err, m)
        return Rule(rel=up((k * smax + tiny * (1 + ue) ** 2) * (1 + 4 * U64)),
                    absolute=up((k * tn + sq * (tiny * (1 + ue) + 2 * sem.tiny_op) + sh) * (1 + 4 * U64)),
                    mrel=up((1 + k) * smax + 2 * tiny), mabs=up((1 + k) * tn + 3 * sq * sem.tiny_op + sh), checks=True)
    if isinstance(node, (ReshapeNode, IndexNode)):
        return Rule()
    if isinstance(node, ActivationNode):
        if node.activation in EXACT_ACTIVATIONS:
            p = node.params
            if node.activation == "clip" and not all(_fits(p[k], sem) for k in ("min", "max") if p.get(k) is not None):
                return f"clip bounds not representable in {sem.name}"
            return Rule()
        if node.activation in SCALED_ACTIVATIONS:
            key = "alpha" if node.activation == "leaky_relu" else "slope"
            a = np.abs(np.asarray(node.params[key], dtype=np.float64))
            if not _fits(node.params[key], sem):
                return f"{key} not representable in {sem.name}"
            amax = max(1.0, float(np.max(a, initial=0.0)))
            m = int(np.prod(node.out_shape))
            ue = sem.ue
            return Rule(rel=up(ue * amax * (1 + 4 * U64)), absolute=up(math.sqrt(m) * sem.tiny_op * 1.01),
                        mrel=up(amax * (1 + 2 * ue)), mabs=up(math.sqrt(m) * sem.tiny_op * 1.01), checks=True)
        return (f"{node.activation}: the accuracy of its {sem.name} implementation is not proven "
                "(only exact semantics covers it)")
    return f"{type(node).__name__} ({node.onnx_op}): execution in {sem.name} is not covered yet"


def prepare(g: Graph, sem: Semantics) -> list:
    """One :class:`Rule` per node; every node outside the model refused at once."""
    rules, bad = [], []
    for node in g.nodes:
        r = _rule(node, sem)
        if isinstance(r, str):
            bad.append(Unsupported(node.name, node.onnx_op, 0, f"under {sem.name} semantics: {r}"))
        rules.append(r)
    if bad:
        raise UnsupportedModelError(bad)
    return rules


def _nan_inf(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, math.inf), t)


def ball_forward(g: Graph, rules: list, sem: Semantics, x: np.ndarray, node_bounds: list, eps: float):
    """Float64 logits, their float64 error bound e64 (exactly as
    :meth:`Graph.forward` computes them), the execution-error bound e_ball over
    B(x, eps) and the per-node upper bounds on the exact input norms at x
    (``norms``, shape (N, nodes)): the numbers a certificate records."""
    with torch.no_grad():
        h = torch.as_tensor(np.asarray(x, dtype=np.float64))
        B = h.shape[0]
        e64 = torch.zeros(B, dtype=torch.float64)
        n0 = _norms(h)
        # the input stored in the format: ||x'|| <= ||x|| + eps
        N = (n0 + eps) * (1 + 4 * U64)
        E = (N * sem.ue + math.sqrt(h[0].numel()) * sem.tiny) * (1 + 4 * U64)
        ok = N <= sem.maxval
        P = 1.0
        norms = []
        for node, rule, nb in zip(g.nodes, rules, node_bounds):
            hn = (_norms(h) + 2 * e64) * (1 + 4 * U64)   # 2 e64: room for the checker's own error bound
            norms.append(hn)
            L = float(nb)
            Pe = P * eps if P * eps == P * eps else math.inf   # inf * 0
            N = (hn + Pe + E) * (1 + 4 * U64)
            r = (N * rule.rel + rule.absolute) * (1 + 4 * U64)
            if rule.checks:
                ok &= (N * rule.mrel + rule.mabs) * (1 + 4 * U64) <= sem.maxval
            h, rnd = node.apply(h, True, nb)
            e64 = (e64 * L + rnd) * (1 + 4 * U64)
            E = _nan_inf((E * L + r) * (1 + 4 * U64))
            P = up(P * L) if math.isfinite(P * L) else math.inf
        E = torch.where(ok, E, torch.full_like(E, math.inf))
        norms_t = torch.stack(norms, dim=1) if norms else torch.zeros((B, 0), dtype=torch.float64)
    return h.numpy(), e64.numpy(), E.numpy(), norms_t.numpy()


__all__ = ["NAMES", "Semantics", "get", "prepare", "ball_forward", "Rule"]
