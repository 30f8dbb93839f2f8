"""Constants computed inside the graph, re-evaluated with a rigorous error bound.

The constant folder (onnxscript) evaluates constant subgraphs in float32 and
stores the result; the certificate's claim is about the graph in EXACT
arithmetic, so a weight written as ``Div(w, 3)`` or ``w / ReduceL2(w)`` is not
its folded value.  Every float constant of the folded model that is not an
initializer (or Constant) of the original model with the same value is
re-evaluated here from the original model's constant subgraph in float64,
with an elementwise absolute bound ``err`` such that |value - exact| <= err
(proofs/normalisation.md, "Constants computed in the graph").  The importer
then uses these values and charges ``err`` (LinearNode.weight_rel_err /
bias_abs_err, AffineNode.const_err / shift_abs_err); a constant whose subgraph
holds an op without an error rule is refused, naming that node.

Rules (u = 2^-53, eta = 2^-1074 covers underflow; every bound is computed
from non-negative terms and multiplied by (1 + 4u) to cover its own rounding):

* exact ops (Identity, Reshape, Transpose, Squeeze, Unsqueeze, Flatten,
  Concat, Expand, Neg, Abs, Cast to a float type): the same op on err;
* Add/Sub: ea + eb + u|v| + eta;   Mul: |a|eb + |b|ea + ea eb + u|v| + eta;
* Div: (ea + |v|(1+2u) eb) / (|b| - eb) + u|v| + eta, refused unless |b| > eb;
* Sqrt: ea / sqrt(a) (or sqrt(ea) at a = 0) + u|v| + eta, refused if a < ea;
* Pow with a constant exponent 2, -1, 1/2, 1: Mul, Reciprocal, Sqrt, Identity;
* Sigmoid: ea / 4 + 2 LIBM_REL |v| + eta (libm's exp within LIBM_REL);
* Exp: |v| (expm1(ea) + LIBM_REL)(1 + 2 LIBM_REL) + eta;
* selections (Slice, Gather, Split, Tile, Pad, Where, ...) and shape ops
  whose output shape was not folded: the same op on err;
* Clip, Max, Min, Relu (no rounding; 1-Lipschitz in every argument in the
  max norm): max of the arguments' errors, broadcast;
* comparisons: kept only where |a - b| > ea + eb (or a = b exactly), else refused;
* Einsum (multilinear, m operands): E(|a| + e) - E(|a|) + 3 gamma_{n+m+2} (E(|a| + e) + E(|a|));
* MatMul / Conv / ReduceSum / ReduceSumSquare / ReduceL2: propagated terms
  B(|a|, eb) + B(ea, |b|) + B(ea, eb) plus gamma_n B(|a|, |b|) (Higham's bound,
  n products per output, any summation order).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from certlib.errors import UnsupportedModelError
from certlib.ir.evaluate import LIBM_REL
from certlib.ir.graph import gamma

U = 2.0 ** -53
ETA = 2.0 ** -1074
UP = 1 + 4 * U
_EXACT = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Expand", "Neg",
          "Abs", "Cast", "CastLike"}
#: ops whose every output entry is one input entry (or a constant input's):
#: applied to the error array they give its error (Pad's value is an input)
_SELECT = {"Slice", "Gather", "GatherElements", "Split", "Tile", "Pad", "DepthToSpace", "SpaceToDepth",
           "ReverseSequence", "Compress", "Where"}
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _attrs(n) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _einsum_terms(a: dict, arrays: list) -> int:
    """Products summed per output entry of an einsum (its contracted
    dimensions); refuses ellipses and malformed equations."""
    eq = a.get("equation", b"")
    eq = (eq.decode() if isinstance(eq, bytes) else str(eq)).replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise UnsupportedModelError(f"Einsum equation {eq!r} in a constant subgraph (explicit output needed)")
    lhs, out = eq.split("->")
    ops = lhs.split(",")
    if len(ops) != len(arrays) or any(len(o) != np.ndim(t) for o, t in zip(ops, arrays)):
        raise UnsupportedModelError(f"Einsum equation {eq!r} does not match its operands")
    dims = {}
    for o, t in zip(ops, arrays):
        dims.update(zip(o, np.shape(t)))
    return int(np.prod([dims[c] for c in dims if c not in out], dtype=np.int64)) if any(
        c not in out for c in dims) else 1


def _round(v, prop):
    """Error bound after one rounding of the exact result near v."""
    return (prop + U * np.abs(v) + ETA) * UP


class _Eval:
    def __init__(self, model: onnx.ModelProto, folded_consts: dict):
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.folded = folded_consts
        self.memo: dict = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)

    def value(self, name: str):
        """(value, err) of tensor ``name`` of the original model."""
        if name in self.memo:
            return self.memo[name]
        if name in self.folded and not np.issubdtype(np.asarray(self.folded[name]).dtype, np.floating):
            out = (self.folded[name], None)  # an integer (shape) tensor: folded exactly
        elif name in self.inits:
            v = self.inits[name]
            out = (v.astype(np.float64), np.zeros(v.shape)) if np.issubdtype(v.dtype, np.floating) else (v, None)
        elif name in self.producer:
            out = self._node(self.producer[name], name)
        else:
            raise UnsupportedModelError(f"constant {name!r} is computed from values certlib cannot trace; "
                                        "its folding error cannot be bounded")
        self.memo[name] = out
        return out

    def _node(self, n, name: str):
        op = n.op_type
        a = _attrs(n)
        if op == "Constant":
            if "value" not in a:
                raise self._refuse(n, "only Constant(value=tensor)")
            v = numpy_helper.to_array(a["value"])
            return (v.astype(np.float64), np.zeros(v.shape)) if np.issubdtype(v.dtype, np.floating) else (v, None)
        ins = [self.value(i) if i else (None, None) for i in n.input]
        floats = [e is not None for _, e in ins if _ is not None]
        if not any(floats) and op == "Cast":   # bool/int -> float or another integer type
            if a.get("to") in _FLOAT:
                return self._exact(n, op, a, ins)
            r = self._run(n, [ins[0][0]], name)
            if not np.array_equal(np.asarray(r, dtype=np.int64), np.asarray(ins[0][0], dtype=np.int64)):
                raise self._refuse(n, "an integer cast that changes a value")
            return r, None
        if not any(floats) and op in ("Not", "And", "Or", "Xor"):   # logic on robust comparisons: exact
            return self._run(n, [v for v, _ in ins], name), None
        if not any(floats):
            if name in self.folded:  # integer arithmetic (shapes, indices): exact
                return self.folded[name], None
            raise self._refuse(n, "integer computation without a folded value")
        if op in _EXACT:
            return self._exact(n, op, a, ins)
        if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual") and all(floats) and len(ins) == 2:
            # a comparison is kept only where every value within the error bounds gives the same answer
            (va, ea), (vb, eb) = [(np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64))
                                  for v, e in ins]
            gap = np.abs(va - vb) * (1 - 2 * U)
            robust = (gap > (ea + eb) * UP) | ((va == vb) & (ea == 0) & (eb == 0))
            if not np.all(robust):
                raise self._refuse(n, "a comparison of values within their error bounds of each other")
            return self._run(n, [va, vb], name), None
        if op in _SELECT:   # entries moved, copied or dropped: the same map on err
            return self._same_map(n, ins, name)
        if op in ("Clip", "Max", "Min", "Relu"):
            # a selection of one argument (or of a bound): |g(a + d) - g(a)| <= max_k |d_k| elementwise
            vals = [np.asarray(v, dtype=np.float64) if e is not None else v for v, e in ins]
            v = self._run(n, vals, name)
            err = np.zeros(np.shape(v))
            for _, e in ins:
                if e is not None:
                    err = np.maximum(err, np.asarray(e, dtype=np.float64))
            return v, err
        x = [(np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64)) for v, e in ins if v is not None]
        if op in ("Add", "Sub", "Mul", "Div") and len(x) == 2:
            (va, ea), (vb, eb) = x
            if op == "Add":
                v, prop = va + vb, ea + eb
            elif op == "Sub":
                v, prop = va - vb, ea + eb
            elif op == "Mul":
                v, prop = va * vb, np.abs(va) * eb + np.abs(vb) * ea + ea * eb
            else:
                if not np.all(np.abs(vb) > eb):
                    raise self._refuse(n, "a divisor within its error bound of 0")
                v = va / vb
                prop = (ea + np.abs(v) * (1 + 2 * U) * eb) / ((np.abs(vb) - eb) * (1 - 2 * U))
            return v, _round(v, prop * UP)
        if op == "Pow" and len(x) == 2 and not np.any(x[1][1]) and np.size(x[1][0]) == 1 \
                and float(x[1][0].reshape(-1)[0]) in (-1.0, 0.5, 1.0):
            p = float(x[1][0].reshape(-1)[0])   # a^-1, sqrt(a), a: the rules below
            op, x = {-1.0: "Reciprocal", 0.5: "Sqrt", 1.0: "Identity"}[p], x[:1]
            if op == "Identity":
                return x[0]
        if op == "Reciprocal":
            (vb, eb), = x
            if not np.all(np.abs(vb) > eb):
                raise self._refuse(n, "a reciprocal of a value within its error bound of 0")
            v = 1.0 / vb
            return v, _round(v, np.abs(v) * (1 + 2 * U) * eb / ((np.abs(vb) - eb) * (1 - 2 * U)) * UP)
        if op == "Sqrt":
            return self._sqrt(n, *x[0], "a square root")
        if op == "Sigmoid":
            # 1/(1 + exp(-a)): Lipschitz 1/4 in a; exp off by LIBM_REL (the libm
            # model of proofs/activations.md), then an add and a divide: relative
            # LIBM_REL/(1 - LIBM_REL) + 2u of the value (bounded by 2 LIBM_REL)
            (va, ea), = x
            v = 1.0 / (1.0 + np.exp(-va))
            return v, ((ea / 4 + 2 * LIBM_REL * np.abs(v)) + ETA) * UP
        if op == "Exp":
            # exp(a + d) - fl(exp(a)) <= exp(a)(expm1(ea) + LIBM_REL), exp(a) <= |v|/(1 - LIBM_REL)
            (va, ea), = x
            v = np.exp(va)
            if not np.all(np.isfinite(v)) or np.any(ea > 1):
                raise self._refuse(n, "an exponential out of range")
            return v, (np.abs(v) * (np.expm1(ea) * (1 + 2 * LIBM_REL) + LIBM_REL) * (1 + 2 * LIBM_REL) + ETA) * UP
        if op == "Pow" and len(x) == 2 and x[1][1].max(initial=0) == 0 and np.all(x[1][0] == 2.0):
            (va, ea), _ = x
            v = va * va
            return v, _round(v, (2 * np.abs(va) * ea + ea * ea) * UP)
        if op == "MatMul" and len(x) == 2 and x[0][0].ndim == 2 and x[1][0].ndim == 2:
            (va, ea), (vb, eb) = x
            g = gamma(va.shape[1] + 2)
            v = va @ vb
            mag = np.abs(va) @ np.abs(vb)
            prop = np.abs(va) @ eb + ea @ np.abs(vb) + ea @ eb
            return v, ((prop + g * mag) * (1 + g) + ETA * va.shape[1]) * UP
        if op in ("ReduceSum", "ReduceSumSquare", "ReduceL2"):
            return self._reduce(n, op, a, x, ins)
        if op == "Einsum" and len(x) == len(n.input) >= 1:
            # multilinear with non-negative structure: |E(a + d) - E(a)| <= E(|a| + e) - E(|a|);
            # each output sums `terms` products of m factors: computed P, M within gamma_{terms+m} of exact
            terms, m = _einsum_terms(a, [v for v, _ in x]), len(x)
            g = gamma(terms + m + 2)
            P = self._run(n, [np.abs(v) + e for v, e in x], name)
            M = self._run(n, [np.abs(v) for v, _ in x], name)
            v = self._run(n, [v for v, _ in x], name)
            return v, ((P - M) + 3 * g * (P + M) + ETA * terms * 4) * UP
        if op == "Conv" and len(x) == 2 and len(n.input) == 2:
            (va, ea), (vb, eb) = x
            terms = int(np.prod(vb.shape[1:]))
            run = lambda p, q: self._run(n, [p, q], name)  # noqa: E731
            g = gamma(terms + 2)
            v = run(va, vb)
            mag, prop = run(np.abs(va), np.abs(vb)), run(np.abs(va), eb) + run(ea, np.abs(vb)) + run(ea, eb)
            return v, ((prop + g * mag) * (1 + g) + ETA * terms) * UP
        raise self._refuse(n, f"no rounding-error rule for {op} in a constant subgraph")

    def _same_map(self, n, ins, name):
        """An op that moves, copies or drops entries: (op on the values, the same op on their errors);
        integer inputs (shapes, indices) are passed to both as they are."""
        vals = [np.asarray(v, dtype=np.float64) if e is not None else v for v, e in ins]
        errs = [np.asarray(e, dtype=np.float64) if e is not None else v for v, e in ins]
        return self._run(n, vals, name), self._run(n, errs, name)

    def _run(self, n, arrays, name):
        """Run node n alone (onnx's reference evaluator) on ``arrays``; the output ``name``."""
        from onnx.reference import ReferenceEvaluator

        feeds = {f"in{k}": np.asarray(t) for k, t in enumerate(arrays)}
        node = onnx.helper.make_node(n.op_type, [f"in{k}" if i else "" for k, i in enumerate(n.input)],
                                     list(n.output), domain=n.domain)
        node.attribute.extend(n.attribute)
        feeds = {k: v for k, v in feeds.items() if n.input[int(k[2:])]}
        ins = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
               for k, v in feeds.items()]
        outs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in n.output if o]
        g = onnx.helper.make_graph([node], "one", ins, outs)
        m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        res = ReferenceEvaluator(m).run(None, feeds)
        return np.asarray(res[[o for o in n.output if o].index(name)])

    def _reduce(self, n, op, a, x, ins):
        va, ea = x[0]
        axes = a.get("axes")
        if axes is None and len(ins) > 1 and ins[1][0] is not None:
            axes = [int(t) for t in np.asarray(ins[1][0]).reshape(-1)]
        if not axes and int(a.get("noop_with_empty_axes", 0)):
            return va, ea
        axes = tuple(range(va.ndim)) if not axes else tuple(int(t) % va.ndim for t in axes)
        keep = bool(a.get("keepdims", 1))
        cnt = int(np.prod([va.shape[t] for t in axes])) if axes else 1
        g = gamma(cnt + 2)
        if op == "ReduceSum":
            terms, prop = va, ea
        else:
            terms, prop = va * va, 2 * np.abs(va) * ea + ea * ea
        v = terms.sum(axis=axes, keepdims=keep)
        e = ((prop.sum(axis=axes, keepdims=keep) + g * np.abs(terms).sum(axis=axes, keepdims=keep)) * (1 + g)
             + ETA * (cnt + 1)) * UP
        return self._sqrt(n, v, e, "ReduceL2") if op == "ReduceL2" else (v, e)

    def _sqrt(self, n, va, ea, what: str):
        """sqrt(a) of a within ea: ea / sqrt(a) (sqrt(ea) at a = 0) + one rounding; refused if a < ea."""
        if np.any(va < ea):
            raise self._refuse(n, f"{what} of a value within its error bound of 0")
        v = np.sqrt(va)
        with np.errstate(divide="ignore", invalid="ignore"):
            prop = np.where(va > 0, ea / (v * (1 - 2 * U)), np.sqrt(ea) * UP)
        return v, _round(v, prop * UP)

    def _exact(self, n, op, a, ins):
        (v, e) = ins[0]
        if op in ("Cast", "CastLike"):
            to = a.get("to") if op == "Cast" else None
            if op == "Cast" and to not in _FLOAT:
                raise self._refuse(n, "a cast of a float to a non-float type")
            if e is None:  # integer -> float: exact below 2^53
                if np.any(np.abs(v) >= 2 ** 53):
                    raise self._refuse(n, "an integer too large for an exact cast")
                return np.asarray(v, dtype=np.float64), np.zeros(np.shape(v))
            return v, e   # the exact graph computes in reals: a float cast is the identity
        if op in ("Neg", "Abs", "Identity"):
            return (-v if op == "Neg" else np.abs(v) if op == "Abs" else v), e
        if op == "Transpose":
            perm = a.get("perm", list(range(np.ndim(v)))[::-1])
            return np.transpose(v, perm), np.transpose(e, perm)
        if op == "Concat":
            vs = [(np.asarray(t, dtype=np.float64), np.asarray(u, dtype=np.float64)) for t, u in ins]
            ax = int(a["axis"])
            return np.concatenate([t for t, _ in vs], ax), np.concatenate([u for _, u in vs], ax)
        if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand"):
            if n.output[0] not in self.folded and op != "Flatten":
                # the output shape from the op itself (integer inputs exact): the same map on err
                return self._same_map(n, ins, n.output[0])
            if op == "Flatten":
                ax = int(a.get("axis", 1)) % max(np.ndim(v), 1)
                shape = (int(np.prod(np.shape(v)[:ax])), -1)
                return np.reshape(v, shape), np.reshape(e, shape)
            shape = np.shape(self.folded[n.output[0]])
            return np.broadcast_to(v, shape).copy() if op == "Expand" else np.reshape(v, shape), \
                np.broadcast_to(e, shape).copy() if op == "Expand" else np.reshape(e, shape)
        raise self._refuse(n, f"no rule for {op}")  # pragma: no cover

    @staticmethod
    def _refuse(n, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"a constant is computed inside the graph by node {n.name or '?'} "
                                     f"({n.op_type}): {why}; certlib cannot bound its error in exact arithmetic")


def computed_constants(model: onnx.ModelProto, folded_consts: dict) -> tuple[dict, dict]:
    """(name -> (float64 value, absolute error bound), name -> why unbounded)
    for every float constant of the folded model that the original model
    computes (not a stored initializer or Constant of the same value)."""
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for at in n.attribute:
                if at.name == "value":
                    stored[n.output[0]] = numpy_helper.to_array(at.t)
    ev = _Eval(model, folded_consts)
    out, unbounded = {}, {}
    for name, val in folded_consts.items():
        val = np.asarray(val)
        if not np.issubdtype(val.dtype, np.floating):
            continue
        s = stored.get(name)
        if s is not None and s.shape == val.shape and s.dtype == val.dtype and np.array_equal(s, val):
            continue
        try:
            v, e = ev.value(name)
            if e is None or np.shape(v) != val.shape:
                raise UnsupportedModelError(f"constant {name!r}: the folded value does not match its subgraph")
        except UnsupportedModelError as ex:   # refused only if a handler reads it (registry._dynamic_input)
            unbounded[name] = "; ".join(getattr(i, "why", str(i)) for i in ex.items)
            continue
        out[name] = (np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64))
    return out, unbounded
