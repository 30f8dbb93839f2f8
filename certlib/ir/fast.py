"""Fast sound logits: the IR evaluated in float32 (torch, CPU or CUDA) with an
a priori bound on its rounding error (proofs/fast_forward.md).

For every node the float32 evaluation's own rounding error is bounded from
the l2 norm of the node's computed input and constants precomputed once per
model (a proven bound A >= || |W| ||_2 for a linear node, the norm of its
broadcast bias), valid for any summation order, with or without FMA.  The
per-sample bound is propagated through the following nodes' proven Lipschitz
bounds (``Analysis.node_bounds``) exactly as the float64 path does it
(proofs/margin_slack.md), and bounds the distance between the float32 logits
and the exact-arithmetic logits of the IR.

Only node types and fields listed here are evaluated in float32; any other
(a field added to a node later, tanh/sigmoid, whose float32 libm error is not
proven) makes :func:`prepare` return None and the caller uses the float64 path.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from certlib.bounds import up
from certlib.ir.evaluate import ACTIVATIONS
from certlib.ir.graph import (U64, ActivationNode, AffineNode, Graph, IndexNode, LinearNode, ParallelNode, apply_conv,
                              ReshapeNode, gamma)
from certlib.verifiers.operators import Dense
from certlib.ir.fast_rules import (CHEAP_SHARE, CHUNK_MIN_TERMS, CHUNKS, NORM_KEEPING, NORMAL32,  # noqa: F401
                                   TINY32, U32, _broadcast_norm, _cheap_nodes, _chunks, _keeps_norm, _Lin, _macs,
                                   _norm_chunks, _norm_up, _subnormal_charge, _void, abs_norm_bound, gamma32,
                                   identity_rest, ieee_float32, kappa, theta)

#: activations exact in float32 as in float64 (they return, move, compare or
#: negate their inputs); "clip" also needs its bounds representable in float32
EXACT_ACTIVATIONS = {"relu", "minmax", "minmax_rev", "minmax_pairs", "minmax_pairs_rev", "abs", "clip",
                     "maxpool", "groupsort"}
#: alpha*x rounds once (<= u32); alpha itself must be a float32
SCALED_ACTIVATIONS = {"leaky_relu", "prelu"}

#: the fields of each node type whose meaning this module knows; a node with
#: any other field (e.g. a rounding term added to the float64 path later) is
#: not evaluated here
KNOWN_FIELDS = {
    LinearNode: {"name", "onnx_op", "in_shape", "out_shape", "op", "bias", "transposed", "output_padding",
                 "weight_rel_err", "bias_abs_err"},
    AffineNode: {"name", "onnx_op", "in_shape", "out_shape", "scale", "shift", "const_err", "shift_abs_err"},
    ReshapeNode: {"name", "onnx_op", "in_shape", "out_shape"},
    IndexNode: {"name", "onnx_op", "in_shape", "out_shape", "fn", "params", "lipschitz"},
    ActivationNode: {"name", "onnx_op", "in_shape", "out_shape", "activation", "lipschitz", "params"},
    ParallelNode: {"name", "onnx_op", "in_shape", "out_shape", "branches", "merge", "signs", "axis"},
}


def _check_fields(node) -> bool:
    known = KNOWN_FIELDS.get(type(node))
    return known is not None and {f.name for f in dataclasses.fields(node)} == known


def _f32_exact(v) -> bool:
    a = np.asarray(v, dtype=np.float64)
    return bool(np.all((a.astype(np.float32).astype(np.float64) == a) | np.isinf(a)))


def _dot_coef(n: int, u: float) -> float:
    """Per entry of |W||x| + |b|: the rounding of a dot product of n terms
    with unit roundoff u, any order, plus the output's own rounding."""
    return up((gamma32(n, u) * (1 + u) + u) * (1 + 8 * U64))


def _prep_node(node, device, dtype=torch.float32, chunked: bool = True):
    u = U32 if dtype == torch.float32 else U64
    npdt = np.float32 if dtype == torch.float32 else np.float64
    if not _check_fields(node):
        return None
    if isinstance(node, LinearNode):
        op = node.op
        w = op.weight if isinstance(op, Dense) else op.kernel
        n = node.terms()
        out_entries = int(np.prod(node.out_shape))
        if node.bias is None:
            B = 0.0
            b = None
        else:
            per = out_entries // max(1, np.size(node.bias))
            B = up(float(np.linalg.norm(np.abs(node.bias))) * (1 + gamma(np.size(node.bias) + 2))
                   * math.sqrt(per) * (1 + 4 * U64))
            b = torch.as_tensor(np.asarray(node.bias, dtype=npdt), device=device)
        J = _chunks(node) if dtype == torch.float32 and chunked else 1
        # |fl32(W32 x + b32) - (W x + b)| <= (gamma_n (1 + u) + u)(|W||x| + |b|) + n TINY32
        coef = _dot_coef(n if J == 1 else (n - 1) // J + J, u)
        # the same without chunks (only for choosing a plan: verify._fast_with_probe)
        coef1 = coef if J == 1 else (_dot_coef(n, u) if n * u < 0.25 else math.inf)
        A = abs_norm_bound(w, not isinstance(op, Dense), getattr(op, 'groups', 1))
        # the stored weight/bias against the model's exact ones (a weight
        # computed inside the graph): |dW||x| + |db|, as the float64 path charges it
        rel = float(node.weight_rel_err)
        const_rel = up(A * rel * (1 + 4 * U64)) if rel else 0.0
        const_abs = _broadcast_norm(node.bias_abs_err, out_entries)
        A_full = A
        rest = identity_rest(node)
        split = False
        if rest is not None:
            A_rest = abs_norm_bound(rest, True, 1)
            if A_rest < 0.9 * A:
                w, A, split = rest, A_rest, True
        wt = np.asarray(w, dtype=npdt)
        if J > 1:   # (c_out, c_in, kh, kw) -> (J c_out, c_in / J, kh, kw): group j holds input chunk j
            c_out, c_in = wt.shape[:2]
            wt = np.ascontiguousarray(wt.reshape(c_out, J, c_in // J, *wt.shape[2:]).swapaxes(0, 1)
                                      .reshape(J * c_out, c_in // J, *wt.shape[2:]))
        sub = _subnormal_charge(w, not isinstance(op, Dense), getattr(op, 'groups', 1)) \
            if dtype == torch.float32 else 0.0
        return _Lin(torch.as_tensor(wt, device=device), b, A, B, coef, out_entries, n + J - 1,
                    const_rel, const_abs, split=split, u=u, chunks=J, sub=sub, coef1=coef1, A_full=A_full)
    if isinstance(node, AffineNode):
        scale = np.asarray(node.scale, dtype=np.float64)
        shift = np.asarray(node.shift, dtype=np.float64)
        entries = int(np.prod(node.in_shape))
        t_norm = float(np.linalg.norm(np.broadcast_to(np.abs(shift), node.in_shape).ravel())) \
            if np.size(shift) else 0.0
        c = float(node.const_err)
        # s32 = s(1+c)(1+d1), fl(s32 x) one more d, t32 = t(1+c)(1+d), + one add:
        # relative <= (1+c)(1+u)^3 - 1 <= (c + 3u)(1 + c + 3u) for small c
        k = up((c + 3 * u) * (1 + c + 3 * u) * (1 + 8 * U64))
        return ("affine", torch.as_tensor(scale.astype(npdt), device=device),
                torch.as_tensor(shift.astype(npdt), device=device),
                up(float(np.max(np.abs(scale))) * (1 + c) * (1 + 4 * U64)) if scale.size else 1.0,
                up(t_norm * (1 + gamma(entries + 2))), k, entries,
                # the stored shift against the exact one (BN's beta - mean s under cancellation)
                _broadcast_norm(node.shift_abs_err, entries),
                # a scale below float32's normal range converts with an absolute error <= 2^-126
                NORMAL32 if dtype == torch.float32 and np.any((np.abs(scale) > 0) & (np.abs(scale) < NORMAL32))
                else 0.0)
    if isinstance(node, ActivationNode):
        if node.activation in EXACT_ACTIVATIONS:
            p = node.params
            if node.activation == "clip" and not all(_f32_exact(p[k]) for k in ("min", "max") if p.get(k) is not None):
                return None
            return ("exact",)
        if node.activation in SCALED_ACTIVATIONS:
            key = "alpha" if node.activation == "leaky_relu" else "slope"
            if not _f32_exact(node.params[key]):
                return None
            params = dict(node.params)
            if key == "slope":
                params[key] = torch.as_tensor(np.asarray(params[key], dtype=npdt), device=device)
            return ("scaled", params, u)
        return None
    if isinstance(node, (ReshapeNode, IndexNode)):
        return ("exact",)
    if isinstance(node, ParallelNode):
        if node.merge not in ("add", "concat", "max", "min") or any(abs(s) != 1 for s in node.signs):
            return None
        inner = []
        for br in node.branches:
            p = [_prep_node(m, device, dtype, chunked) for m in br]
            if any(x is None for x in p):
                return None
            inner.append(p)
        return ("parallel", inner, u)
    return None


@dataclasses.dataclass
class FastGraph:
    graph: Graph
    prepared: list
    device: torch.device
    dtype: torch.dtype = torch.float32
    #: the dtype each node runs in (float64 for the cheap linear nodes of a
    #: float32 forward, see CHEAP_SHARE); None: all ``dtype``
    dtypes: list | None = None
    #: per node, theta >= the float64 path's rounding term over this forward's
    #: at equal input norms (:func:`theta`); None: 1 for every node
    thetas: list | None = None
    #: >= the factor by which the bound would grow without chunked sums (1:
    #: no node is chunked); a plan choice only (verify._fast_with_probe)
    unchunk_ratio: float = 1.0


def _lins(prepared):
    for p in prepared:
        if isinstance(p, _Lin):
            yield p
        elif isinstance(p, tuple) and p and p[0] == "parallel":
            for br in p[1]:
                yield from _lins(br)


def mixed(fg) -> bool:
    """Whether some node of a float32 forward runs in float64."""
    return fg.dtype == torch.float32 and any(d == torch.float64 for d in (fg.dtypes or []))


GRAPH_FIELDS = {"input_name", "input_shape", "output_name", "nodes", "num_classes", "dropped_output", "batch",
                "runtime_model"}  # the ONNX bytes for the onnxruntime veto; not read by the forward


def prepare(g: Graph, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            chunked: bool = True) -> FastGraph | None:
    """Float32 constants and error constants per node, or None when some node
    (or the graph) is outside the error model (then use the float64 path).
    ``chunked=False``: long convolutions run as one conv each (faster, a
    larger bound: proofs/fast_forward.md, "Chunked sums")."""
    device = torch.device(device)
    if not (type(g) is Graph and {f.name for f in dataclasses.fields(g)} == GRAPH_FIELDS):
        return None
    prepared, dtypes = [], []
    cheap = _cheap_nodes(g.nodes) if dtype == torch.float32 else set()
    cur = dtype
    for k, node in enumerate(g.nodes):
        if dtype == torch.float32 and isinstance(node, LinearNode):
            cur = torch.float64 if k in cheap else torch.float32
        p = _prep_node(node, device, cur, chunked)
        if p is None:
            return None
        prepared.append(p)
        dtypes.append(cur)
    ratio = max([up(p.coef1 / p.coef) for p in _lins(prepared) if p.chunks > 1], default=1.0)
    return FastGraph(g, prepared, device, dtype, dtypes, [theta(n, p, d) for n, p, d in zip(g.nodes, prepared, dtypes)],
                     ratio)


def _linear32(node: LinearNode, p: _Lin, h: torch.Tensor) -> torch.Tensor:
    op = node.op
    if isinstance(op, Dense):
        y = h @ p.weight.T
        return y if p.bias is None else y + p.bias
    if p.chunks > 1:
        # partial sums over the input-channel chunks, then their sum, then the bias
        y = apply_conv(op, False, h, p.weight, None, groups=p.chunks)
        y = y.reshape(y.shape[0], p.chunks, -1, *y.shape[2:]).sum(dim=1)
        return y if p.bias is None else y + p.bias.reshape(1, -1, 1, 1)
    return apply_conv(op, node.transposed, h, p.weight, p.bias)


def _apply(node, p, h: torch.Tensor, bound, hn: torch.Tensor):
    """(float32 output, per-sample bound on this node's own rounding error);
    ``hn`` bounds the per-sample norm of the computed input h."""
    y, rnd, _ = _apply_n(node, p, h, bound, hn)
    return y, rnd


def _apply_n(node, p, h: torch.Tensor, bound, hn: torch.Tensor):
    """:func:`_apply`, and a bound on the output's norm where the node already
    computed one (else None)."""
    if isinstance(node, LinearNode):
        y = _linear32(node, p, h)
        tiny = math.sqrt(p.out_entries) * p.terms * TINY32
        rnd = (hn * p.A + p.B) * p.coef + tiny
        yn = None
        if p.split:
            # y = fl(x + c), c = fl(K'x + b): |y - (x + c)| <= u/(1-u) (|y| + t) + t
            y = y + h
            yn = _norm_up(y)
            rnd = (rnd + yn * (p.u / (1 - p.u)) + math.sqrt(p.out_entries) * 3 * TINY32) * (1 + 4 * U64)
        if p.const_rel or p.const_abs or p.sub:
            rnd = (rnd + hn * (p.const_rel + p.sub) + p.const_abs) * (1 + 4 * U64)
        return y, rnd, yn
    if isinstance(node, AffineNode):
        _, s, t, smax, tn, k, entries, shift_err, sub = p
        y = h * s + t
        rnd = (hn * smax + tn) * k + math.sqrt(entries) * 2 * TINY32
        if sub:
            rnd = (rnd + hn * sub) * (1 + 4 * U64)
        return y, (rnd + shift_err) * (1 + 4 * U64) if shift_err else rnd, None
    if isinstance(node, (ReshapeNode, IndexNode)):
        return node.apply(h, False)[0], torch.zeros_like(hn), None
    if isinstance(node, ActivationNode):
        if p[0] == "exact":
            return ACTIVATIONS[node.activation][0](h, node.params), torch.zeros_like(hn), None
        prm = p[1]
        if node.activation == "prelu":
            y = torch.where(h >= 0, h, h * prm["slope"])
        else:
            y = torch.where(h >= 0, h, h * float(prm["alpha"]))
        # alpha*x rounds once: |err| <= u|exact| <= u/(1-u)|computed| (+ underflow)
        entries = int(np.prod(node.out_shape))
        yn = _norm_up(y)
        return y, yn * (p[2] * (1 + 2 * p[2])) + math.sqrt(entries) * TINY32, yn
    return (*_parallel(node, p[1], h, bound, hn, p[2]), None)


def _parallel(node: ParallelNode, inner_p, h, bound, hn, u, D=None):
    """(output, this block's rounding term); with ``D`` (per sample: a bound on
    the distance of the float64 path's block input from this forward's, plus
    ... see proofs/fast_forward.md, "Identical decisions") also T, a bound on
    the float64 path's term for the block: each inner node's path term is at
    most this forward's term plus kappa (its per-unit-norm path coefficient)
    times the distance of the two paths' inner inputs, P D + (this forward's
    internal error) + (the path's internal error, recursively)."""
    outs, errs, gs, far = [], [], [], []
    inner = bound.branches
    for k, br in enumerate(node.branches):
        y, yn = h, hn
        e = torch.zeros_like(hn)
        G = torch.zeros_like(hn)      # the float64 path's internal error so far
        P = 1.0                       # Lipschitz bound of the branch so far
        for j, m in enumerate(br):
            pm, bj = inner_p[k][j], inner[k][j]
            if D is not None:
                Dj = D * P + (e if j > 0 else 0.0) + G
            if D is not None and isinstance(m, ParallelNode):
                y, r, Tm = _parallel(m, pm[1], y, bj, yn, pm[2], Dj)
                on = None
            else:
                y, r, on = _apply_n(m, pm, y, bj, yn)
                if D is not None:
                    Tm = (r + Dj * kappa(m, pm)) * (1 + 4 * U64)
            yn = yn if _keeps_norm(m, pm) else (on if on is not None else _norm_up(y))
            L = float(bj) if j > 0 else 1.0
            e = _void((e * L + r) * (1 + 4 * U64) if j > 0 else r, yn)
            if D is not None:
                G = (G * L + Tm) * (1 + 4 * U64) if j > 0 else Tm
                P = up(P * float(bj))
        outs.append(y)
        errs.append(e)
        if D is not None:
            gs.append(G)
            far.append(D * P + e + G)     # the two paths' branch outputs differ by at most this
    T = None
    if node.merge == "add":
        out = outs[0] if node.signs[0] == 1 else -outs[0]
        for s, y in zip(node.signs[1:], outs[1:]):
            out = out + y if s == 1 else out - y
        mags = sum(_norm_up(y) for y in outs)
        entries = int(np.prod(node.out_shape))
        g = gamma32(max(1, len(outs) - 1), u)
        tiny = math.sqrt(entries) * len(outs) * TINY32
        rnd = sum(errs) + mags * g + tiny
        if D is not None:   # the same merge rounding at the float64 path's branch outputs
            T = (sum(gs) + (mags + sum(far)) * g + tiny) * (1 + 4 * U64)
        return (out, rnd * (1 + 4 * U64)) if D is None else (out, rnd * (1 + 4 * U64), T)
    if node.merge == "concat":
        out = torch.cat(outs, dim=node.axis + 1)
    elif node.merge == "max":
        out = torch.stack(outs).amax(0)
    else:
        out = torch.stack(outs).amin(0)
    if D is not None:
        return out, sum(errs) * (1 + 4 * U64), sum(gs) * (1 + 4 * U64)
    return out, sum(errs) * (1 + 4 * U64)


def forward32(fg: FastGraph, x: np.ndarray, node_bounds: list, other: bool = False):
    """Logits in ``fg.dtype`` (float32, or float64 for the a priori float64
    tier; returned as float64 numpy, exactly) and a per-sample bound on their
    l2 distance to the exact-arithmetic logits of the IR.  ``other``: also a
    per-sample upper bound on the error bound that the float64 path
    (``Graph.forward``) reports for the same samples (proofs/fast_forward.md,
    "Identical decisions"; inf where its conditions fail)."""
    with torch.no_grad(), ieee_float32():
        h = torch.as_tensor(np.asarray(x), device=fg.device).to(fg.dtype)
        # the input itself: float64 data rounded to float32 (relative u each), measured
        x64 = torch.as_tensor(np.asarray(x, dtype=np.float64))
        err = _norm_up(h.cpu().double() - x64) * (1 + 2 * U64)  # + the subtraction's rounding
        hn = _norm_up(h)
        err = _void(err, hn)
        # the float64 path's error so far: its input is exact (0)
        eo = torch.zeros_like(err)
        thetas = fg.thetas or [1.0] * len(fg.prepared)
        for node, p, nb, dt, th in zip(fg.graph.nodes, fg.prepared, node_bounds,
                                       fg.dtypes or [fg.dtype] * len(fg.prepared), thetas):
            if h.dtype != dt:
                if dt == torch.float32:
                    # float64 -> float32: |fl32(v) - v| <= u|v| + t per entry
                    err = (err + hn * U32 + math.sqrt(h[0].numel()) * TINY32) * (1 + 4 * U64)
                h = h.to(dt)
                hn = _norm_up(h)
                err = _void(err, hn)
            # the float64 path's input to this node has norm <= hn + err + eo <= 2 hn
            near = (err + eo) <= hn
            if isinstance(node, ParallelNode) and other:
                # inner nodes: their inputs in the two paths are compared node by node
                h, rnd, T = _parallel(node, p[1], h, nb, hn, p[2], err + eo)
                on, near, term = None, torch.ones_like(near), 2 * T
            else:
                h, rnd, on = _apply_n(node, p, h, nb, hn)
                term = rnd * (2 * th)
            hn = hn if _keeps_norm(node, p) else (on if on is not None else _norm_up(h))
            err = _void((err * float(nb) + rnd) * (1 + 4 * U64), hn)
            eo = torch.where(near, (eo * float(nb) + term) * (1 + 4 * U64), torch.full_like(eo, math.inf))
        out = h.double().cpu().numpy()
    err = err.numpy()
    fin = np.isfinite(err) & np.all(np.isfinite(out), axis=1)
    err = np.where(fin, err, np.inf)
    if other:
        return out, err, np.where(fin & np.isfinite(eo.numpy()), eo.numpy(), np.inf)
    return out, err


__all__ = ["FastGraph", "prepare", "forward32", "ieee_float32", "abs_norm_bound", "gamma32", "identity_rest", "mixed",
           "U32"]
