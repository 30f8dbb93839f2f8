"""Exact-arithmetic oracle for small vector ONNX models: every stored
initializer (a float32, hence an exact rational) is evaluated with mpmath at
600 bits, far below any margin the tests compare against (2^-600 relative),
so the prediction is the exact one.  Ops: Flatten, Identity, Gemm, MatMul,
Add, Sub, Mul, Div, Neg, Relu, BatchNormalization (per-sample vectors)."""

import mpmath
import numpy as np
from onnx import numpy_helper

mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp


def _vec(a):
    return [mpmath.mpf(float(v)) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


def exact_logits(model, x_row) -> list:
    """The model's output for one sample, in (effectively) exact arithmetic."""
    with mpmath.workprec(600):
        consts = {i.name: np.asarray(numpy_helper.to_array(i), dtype=np.float64) for i in model.graph.initializer}
        h = {model.graph.input[0].name: _vec(x_row)}
        for n in model.graph.node:
            a = {at.name: at for at in n.attribute}
            ins = [h.get(i) if i in h else consts.get(i) for i in n.input]
            op = n.op_type
            if op in ("Flatten", "Identity", "Dropout"):
                out = ins[0]
            elif op in ("Gemm", "MatMul"):
                W = ins[1]
                if not isinstance(W, np.ndarray):   # a weight computed by a constant node (exactly, here)
                    W = np.array(W, dtype=object).reshape(tuple(consts.get(n.input[1] + "#shape", (len(W), 1))))
                else:
                    W = np.array([[mpmath.mpf(float(v)) for v in row] for row in W], dtype=object)
                if op == "Gemm" and a.get("transB") and a["transB"].i:
                    W = W.T
                alpha = a["alpha"].f if "alpha" in a else 1.0
                out = [sum((W[k, j] * ins[0][k] for k in range(W.shape[0])), mpmath.mpf(0))
                       * mpmath.mpf(alpha) for j in range(W.shape[1])]
                if op == "Gemm" and len(ins) > 2:
                    beta = a["beta"].f if "beta" in a else 1.0
                    b = _vec(np.broadcast_to(ins[2], (W.shape[1],)))
                    out = [o + bi * mpmath.mpf(beta) for o, bi in zip(out, b)]
            elif op in ("Add", "Sub", "Mul", "Div"):
                if not any(isinstance(v, list) for v in ins):
                    shp = np.broadcast_shapes(*(np.shape(v) for v in ins))
                    l, r = (_vec(np.broadcast_to(v, shp)) for v in ins)
                else:
                    size = len(next(v for v in ins if isinstance(v, list)))
                    l, r = [v if isinstance(v, list) else _vec(np.broadcast_to(v, (size,))) for v in ins]
                f = {"Add": lambda p, q: p + q, "Sub": lambda p, q: p - q, "Mul": lambda p, q: p * q,
                     "Div": lambda p, q: p / q}[op]
                out = [f(p, q) for p, q in zip(l, r)]
                if not any(isinstance(v, list) for v in ins):   # a constant subgraph: keep its shape
                    consts[n.output[0] + "#shape"] = np.broadcast_shapes(*(np.shape(v) for v in ins))
            elif op == "Neg":
                out = [-v for v in ins[0]]
            elif op == "Relu":
                out = [max(v, mpmath.mpf(0)) for v in ins[0]]
            elif op == "BatchNormalization":
                g, b, m, v = (_vec(t) for t in ins[1:5])
                eps = mpmath.mpf(a["epsilon"].f) if "epsilon" in a else mpmath.mpf(np.float32(1e-5).item())
                out = [gi * (xi - mi) / mpmath.sqrt(vi + eps) + bi for xi, gi, bi, mi, vi in zip(ins[0], g, b, m, v)]
            else:
                raise NotImplementedError(op)
            h[n.output[0]] = out
        return h[model.graph.output[0].name]


def exact_argmax(model, x_row):
    z = exact_logits(model, x_row)
    best = max(range(len(z)), key=lambda i: z[i])
    ties = sum(1 for v in z if v == z[best])
    return best if ties == 1 else -1
