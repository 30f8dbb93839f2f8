"""ONNX handlers for pointwise nonlinearities and pooling (registered into
:data:`certlib.onnx.ops.registry.HANDLERS` on import).  Lipschitz rules:
proofs/activations.md, proofs/maxpool.md.

* Abs, Tanh: 1.  Sigmoid: 1/4.  LeakyRelu(alpha): max(1, |alpha|).  PRelu with a
  constant slope: max(1, max|slope|).  Clip with constant bounds: 1.
* MaxPool / GlobalMaxPool: sqrt(c), c = the largest number of windows that share
  one real input entry, counted exactly per axis and multiplied (1 for
  disjoint windows).
* AveragePool / GlobalAveragePool: a depthwise all-ones convolution (a linear
  node, bounded as one operator) followed by the division as an elementwise
  scale; the rounding of a scale 1/D that is not a power of two is charged.

Geometry follows onnxruntime where the ONNX spec agrees with it; cases where
they disagree (ceil_mode with auto_pad=VALID; before opset 22, a ceil_mode
window that starts in the right padding) are refused, as is any window that
holds only padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from certlib.bounds import up_sqrt
from certlib.ir.graph import U64, ActivationNode, AffineNode, LinearNode
from certlib.onnx.ops.registry import (Ctx, Skip, _attrs, _dynamic_input, _emit, _finite, _per_sample, attr_str, handler,
                                       same_split)
from certlib.verifiers.operators import Conv2d


# ------------------------------------------------------------ pointwise
def _data_only(node, ctx: Ctx) -> None:
    _dynamic_input(node, ctx)
    extra = [t for t in node.input[1:] if t]
    if extra:
        raise Skip(f"expects one input, got extra inputs {extra}")


def _act(node, ctx: Ctx, key: str, lipschitz: float, params: dict | None = None, shape=None) -> None:
    out = ctx.shape if shape is None else tuple(shape)
    _emit(ctx, node, ActivationNode(node.name, node.op_type, ctx.shape, out, activation=key,
                                    lipschitz=float(lipschitz), params=dict(params or {})), out)


@handler("Abs")
def _abs(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _act(node, ctx, "abs", 1.0)  # ||a| - |b|| <= |a - b|


@handler("Tanh")
def _tanh(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _act(node, ctx, "tanh", 1.0)  # sup |tanh'| = tanh'(0) = 1


@handler("Sigmoid")
def _sigmoid(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _act(node, ctx, "sigmoid", 0.25)  # sup |s'| = s(0)(1 - s(0)) = 1/4 (exact in binary)


@handler("LeakyRelu")
def _leaky_relu(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    alpha = float(_attrs(node).get("alpha", 0.01))
    if not math.isfinite(alpha):
        raise Skip(f"alpha={alpha} is not finite")
    _act(node, ctx, "leaky_relu", max(1.0, abs(alpha)), {"alpha": alpha})


@handler("PRelu")
def _prelu(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if len(node.input) != 2 or not node.input[1]:
        raise Skip("PRelu needs exactly the inputs X and slope")
    if c[0] is not None or c[1] is None:
        raise Skip("only PRelu(x, slope) with a constant slope is supported")
    if ctx.opset < 7:
        raise Skip("PRelu before opset 7 defines no broadcasting of the slope")
    slope = _per_sample(_finite(c[1], node, "slope"), ctx.shape, node)
    L = max(1.0, float(np.max(np.abs(slope)))) if slope.size else 1.0
    _act(node, ctx, "prelu", L, {"slope": np.ascontiguousarray(slope)})


def _type_max(ctx: Ctx) -> float:
    """numeric_limits<T>::max() of the model's data type (Clip's default
    bounds): float32's for a float32 input, +inf (no clamp) for float64."""
    inits = {i.name for i in ctx.model.graph.initializer}
    ins = [i for i in ctx.model.graph.input if i.name not in inits]
    et = ins[0].type.tensor_type.elem_type if ins else onnx.TensorProto.FLOAT
    return math.inf if et == onnx.TensorProto.DOUBLE else float(np.finfo(np.float32).max)


def _scalar(v, what: str) -> float:
    a = np.asarray(v)
    if a.size != 1 or a.ndim > 1:
        raise Skip(f"Clip {what} must be a scalar, has shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise Skip(f"Clip {what} has non-float dtype {a.dtype}")
    x = float(a.reshape(-1)[0])
    if math.isnan(x):
        raise Skip(f"Clip {what} is NaN")
    return x


@handler("Clip")
def _clip(node, ctx: Ctx) -> None:
    c = _dynamic_input(node, ctx)
    if c[0] is not None:
        raise Skip("Clip of a constant with non-constant bounds is not supported")
    a = _attrs(node)
    top = _type_max(ctx)
    if ctx.opset < 11:  # min/max are attributes
        if any(node.input[1:]):
            raise Skip(f"Clip at opset {ctx.opset} takes min/max as attributes, not inputs")
        lo = float(a.get("min", -top))
        hi = float(a.get("max", top))
        if math.isnan(lo) or math.isnan(hi):
            raise Skip("Clip min/max is NaN")
    else:  # min/max are optional constant inputs
        if "min" in a or "max" in a:
            raise Skip(f"Clip at opset {ctx.opset} takes min/max as inputs, not attributes")
        if len(node.input) > 3:
            raise Skip("Clip has more than 3 inputs")
        bounds = []
        for k, what, default in ((1, "min", -top), (2, "max", top)):
            if len(node.input) > k and node.input[k]:
                if c[k] is None:
                    raise Skip(f"Clip {what} is not a constant")
                bounds.append(_scalar(c[k], what))
            else:
                bounds.append(default)
        lo, hi = bounds
    # ONNX: Min(max, Max(x, min)); with min > max every output is max, which is
    # clamp(x, max, max): the same function, written with min <= max
    lo = min(lo, hi)
    if hi == -math.inf or lo == math.inf:
        raise Skip(f"Clip to [{lo}, {hi}] makes every output infinite")
    _act(node, ctx, "clip", 1.0, {"min": lo, "max": hi})


# -------------------------------------------------------------- pooling
@dataclass
class _Axis:
    out: int       # output length
    begin: int     # padding before the input
    end: int       # padding after it, including any ceil_mode overhang
    real: np.ndarray   # per output: number of real (non-padding) taps
    padded: np.ndarray  # per output: taps inside [-pads_begin, n + pads_end) (count_include_pad)
    share: int     # largest number of windows holding one real input entry


def _ints(a: dict, key: str, default, n: int, lo: int) -> tuple:
    v = a.get(key, default)
    if v is None:
        raise Skip(f"missing attribute {key}")
    v = tuple(int(t) for t in v)
    if len(v) != n or min(v) < lo:
        raise Skip(f"{key}={list(v)}: expected {n} integers >= {lo} (only 2-D pooling is supported)")
    return v


def _need_2d(ctx: Ctx) -> None:
    if len(ctx.shape) != 3:
        raise Skip(f"only 2-D pooling on (C, H, W) tensors is supported, got per-sample shape {ctx.shape}")


def _geometry(node, ctx: Ctx, kernel: tuple, a: dict, dilations_since: int):
    """(strides, dilations, per-axis _Axis) of a 2-D MaxPool/AveragePool."""
    op = node.op_type
    strides = _ints(a, "strides", (1, 1), 2, 1)
    if "dilations" in a and ctx.opset < dilations_since:
        raise Skip(f"{op} has no dilations attribute before opset {dilations_since}")
    dil = _ints(a, "dilations", (1, 1), 2, 1)
    if "ceil_mode" in a and ctx.opset < 10:
        raise Skip(f"{op} has no ceil_mode attribute before opset 10")
    ceil = int(a.get("ceil_mode", 0))
    if ceil not in (0, 1):
        raise Skip(f"ceil_mode={ceil}")
    mode = attr_str(a.get("auto_pad"), "NOTSET")
    if mode == "NOTSET":
        pads = _ints(a, "pads", (0, 0, 0, 0), 4, 0)
    elif mode in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        if any(a.get("pads", ())):
            raise Skip(f"explicit pads together with auto_pad={mode}")
        pads = (0, 0, 0, 0)
    else:
        raise Skip(f"auto_pad={mode} not supported")
    axes = []
    for ax in range(2):
        n, k, s, d = ctx.shape[ax + 1], kernel[ax], strides[ax], dil[ax]
        ek = d * (k - 1) + 1  # effective window length
        if mode.startswith("SAME"):  # as Conv's auto_pad (onnx_ops._conv); ceil_mode changes nothing
            if d != 1:
                raise Skip(f"auto_pad={mode} with dilations {list(dil)}: onnxruntime ignores the dilation when "
                           "it computes the padding, the ONNX spec does not")
            out = -(-n // s)
            total = (out - 1) * s + ek - n
            if total < 0:
                raise Skip(f"auto_pad={mode} with a stride longer than the window: onnxruntime computes a "
                           "negative padding, the ONNX spec a zero one")
            pb, pe = same_split(total, mode)
        else:
            pb, pe = pads[ax], pads[ax + 2]
            span = n + pb + pe - ek
            if span < 0:
                raise Skip(f"window of length {ek} is longer than the padded input ({n + pb + pe}) on axis {ax}")
            out = span // s + 1
            if ceil and span % s:
                if mode == "VALID":
                    raise Skip("ceil_mode=1 with auto_pad=VALID: the ONNX spec and onnxruntime disagree on "
                               "the output size")
                out += 1
                if (out - 1) * s >= n + pb:
                    if ctx.opset < 22:
                        raise Skip(f"ceil_mode adds a window that starts in the right padding: onnxruntime drops "
                                   f"it, the ONNX spec before opset 22 keeps it (opset {ctx.opset})")
                    out -= 1  # opset >= 22: "windows that would start in the right padded region are ignored"
        taps = np.arange(out)[:, None] * s - pb + d * np.arange(k)[None, :]
        real = (taps >= 0) & (taps < n)
        if not real.any(axis=1).all():
            raise Skip(f"a pooling window on axis {ax} holds only padding")
        overhang = max(0, (out - 1) * s + ek - (n + pb + pe))  # ceil_mode: beyond the end padding
        share = int(np.bincount(taps[real], minlength=n).max())
        padded = ((taps >= -pb) & (taps < n + pe)).sum(axis=1)
        axes.append(_Axis(out, pb, pe + overhang, real.sum(axis=1), padded, share))
    return strides, dil, axes


def _check_out(node, ctx: Ctx, strides, dil, kernel, axes) -> None:
    """The padded floor-mode geometry the IR evaluates gives ONNX's output size."""
    for ax, g in enumerate(axes):
        n = ctx.shape[ax + 1] + g.begin + g.end
        if (n - dil[ax] * (kernel[ax] - 1) - 1) // strides[ax] + 1 != g.out:  # pragma: no cover - defensive
            raise Skip("internal pooling geometry mismatch")


@handler("MaxPool")
def _maxpool(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _need_2d(ctx)
    a = _attrs(node)
    if int(a.get("storage_order", 0)) != 0:
        raise Skip("storage_order != 0 is not supported")
    if len(node.output) > 1 and node.output[1]:
        t = node.output[1]
        if ctx.consumers.get(t) or t in {o.name for o in ctx.model.graph.output}:
            raise Skip("the Indices output is used (certlib bounds only the pooled values)")
    kernel = _ints(a, "kernel_shape", None, 2, 1)
    strides, dil, (gh, gw) = _geometry(node, ctx, kernel, a, dilations_since=10)
    _check_out(node, ctx, strides, dil, kernel, (gh, gw))
    c = gh.share * gw.share  # windows holding one input: product of the per-axis counts
    r = math.isqrt(c)
    L = float(r) if r * r == c else up_sqrt(c)
    params = {"kernel": kernel, "strides": strides, "dilations": dil, "ceil_mode": False,
              "pads": (gh.begin, gw.begin, gh.end, gw.end)}  # -inf padding, never the max of a window
    _act(node, ctx, "maxpool", L, params, (ctx.shape[0], gh.out, gw.out))


@handler("GlobalMaxPool")
def _global_maxpool(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _need_2d(ctx)
    c, h, w = ctx.shape
    params = {"kernel": (h, w), "strides": (1, 1), "dilations": (1, 1), "ceil_mode": False, "pads": (0, 0, 0, 0)}
    _act(node, ctx, "maxpool", 1.0, params, (c, 1, 1))  # one window per channel: disjoint


def _average(node, ctx: Ctx, kernel, strides, dil, pads, divisors: np.ndarray) -> None:
    """Emit sum over the window (depthwise all-ones conv) then * 1/divisor."""
    C = ctx.shape[0]
    try:
        op = Conv2d(np.ones((C, 1, *kernel)), ctx.shape, stride=strides, padding=pads, dilation=dil, groups=C)
    except ValueError as e:
        raise Skip(str(e)) from None
    if op.output_shape[1:] != divisors.shape:  # pragma: no cover - defensive
        raise Skip("internal pooling geometry mismatch")
    d = divisors.astype(np.int64)
    if np.all(d == d.flat[0]):
        scale = np.array(1.0 / float(d.flat[0]))  # a scalar: folded into the conv by lipschitz.py
    else:  # count_include_pad=0 at padded edges, ceil_mode overhang: per position
        scale = (1.0 / d.astype(np.float64))[None]
    exact = all(int(v) & (int(v) - 1) == 0 for v in np.unique(d))  # 1/2^j is exact
    ctx.nodes.append(LinearNode(node.name, node.op_type, ctx.shape, op.output_shape, op=op))
    ctx.shape = op.output_shape
    _emit(ctx, node, AffineNode(f"{node.name}/divide", node.op_type, op.output_shape, op.output_shape,
                                scale=scale, shift=np.zeros_like(scale), const_err=0.0 if exact else U64),
          op.output_shape)


@handler("AveragePool")
def _avgpool(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _need_2d(ctx)
    a = _attrs(node)
    if "count_include_pad" in a and ctx.opset < 7:
        raise Skip("AveragePool has no count_include_pad attribute before opset 7")
    cip = int(a.get("count_include_pad", 0))
    if cip not in (0, 1):
        raise Skip(f"count_include_pad={cip}")
    kernel = _ints(a, "kernel_shape", None, 2, 1)
    strides, dil, (gh, gw) = _geometry(node, ctx, kernel, a, dilations_since=19)
    _check_out(node, ctx, strides, dil, kernel, (gh, gw))
    div = np.outer(gh.padded, gw.padded) if cip else np.outer(gh.real, gw.real)
    _average(node, ctx, kernel, strides, dil, (gh.begin, gw.begin, gh.end, gw.end), div)


@handler("GlobalAveragePool")
def _global_avgpool(node, ctx: Ctx) -> None:
    _data_only(node, ctx)
    _need_2d(ctx)
    _, h, w = ctx.shape
    _average(node, ctx, (h, w), (1, 1), (1, 1), (0, 0, 0, 0), np.full((1, 1), h * w))
