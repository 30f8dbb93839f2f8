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
* MatMul / ReduceSum / ReduceSumSquare / ReduceL2: propagated terms plus
  gamma_n of the sum of absolute terms (Higham's bound, any summation order).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from certlib.errors import UnsupportedModelError
from certlib.ir.graph import gamma

U = 2.0 ** -53
ETA = 2.0 ** -1074
UP = 1 + 4 * U
_EXACT = {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Expand", "Neg",
          "Abs", "Cast", "CastLike"}
_FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def _attrs(n) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}


def _round(v, prop):
    """Error bound after one rounding of the exact result near v."""
    return (prop + U * np.abs(v) + ETA) * UP


class _Eval:
    def __init__(self, model: onnx.ModelProto, folded_consts: dict):
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.folded = folded_consts
        self.memo: dict = {}

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
        if not any(floats):
            if name in self.folded:  # integer arithmetic (shapes, indices): exact
                return self.folded[name], None
            raise self._refuse(n, "integer computation without a folded value")
        if op in _EXACT:
            return self._exact(n, op, a, ins)
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
        if op == "Reciprocal":
            (vb, eb), = x
            if not np.all(np.abs(vb) > eb):
                raise self._refuse(n, "a reciprocal of a value within its error bound of 0")
            v = 1.0 / vb
            return v, _round(v, np.abs(v) * (1 + 2 * U) * eb / ((np.abs(vb) - eb) * (1 - 2 * U)) * UP)
        if op == "Sqrt":
            (va, ea), = x
            if np.any(va < ea):
                raise self._refuse(n, "a square root of a value within its error bound of 0")
            v = np.sqrt(va)
            with np.errstate(divide="ignore", invalid="ignore"):
                prop = np.where(va > 0, ea / (v * (1 - 2 * U)), np.sqrt(ea) * UP)
            return v, _round(v, prop * UP)
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
        raise self._refuse(n, f"no rounding-error rule for {op} in a constant subgraph")

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
        if op == "ReduceL2":
            if np.any(v < e):
                raise self._refuse(n, "ReduceL2 of a value within its error bound of 0")
            r = np.sqrt(v)
            with np.errstate(divide="ignore", invalid="ignore"):
                prop2 = np.where(v > 0, e / (r * (1 - 2 * U)), np.sqrt(e) * UP)
            return r, _round(r, prop2 * UP)
        return v, e

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
                raise self._refuse(n, "a shape op without a folded result")
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
            unbounded[name] = str(ex).removeprefix("model not supported: ")
            continue
        out[name] = (np.asarray(v, dtype=np.float64), np.asarray(e, dtype=np.float64))
    return out, unbounded
