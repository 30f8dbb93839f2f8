"""ONNX -> Lipschitz IR (:mod:`certlib.ir.graph`).

Steps: load and check the protobuf; fold constant subgraphs with onnxscript's
optimizer (weight parametrisations left in the graph become constants); walk
the graph from its input (:mod:`certlib.onnx.walk`: chains, forks and merges
become the series-parallel IR) through a registry of small per-op handlers
(:mod:`certlib.onnx.ops.core`, :mod:`certlib.onnx.ops.nonlinear`,
:mod:`certlib.onnx.ops.shape`); collect EVERY unsupported node before failing
(one error lists them all); finally check the IR's float64 forward pass against
onnxruntime on random inputs.  The supported operators and their Lipschitz
rules are listed in docs/ops.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from certlib.errors import Unsupported, UnsupportedModelError
from certlib.ir.graph import Graph
from certlib.onnx.walk import walk
from certlib.onnx.const_eval import computed_constants
from certlib.onnx.load import MAX_MODEL_BYTES, check_tensors, input_signature, read_model  # noqa: F401
from certlib.onnx.ops import HANDLERS, Ctx, Skip


# ------------------------------------------------------------------- load
def _fold(model: onnx.ModelProto, shape_inference: bool = False) -> onnx.ModelProto:
    """Constant folding only (onnxscript's folder; no rewrite rules, so node
    names and operator forms stay as exported).  ``shape_inference`` first
    propagates static shapes, so that Shape -> Gather -> Concat chains fold."""
    import onnx_ir as ir
    import onnxscript.optimizer

    try:
        if shape_inference:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        m = ir.serde.deserialize_model(model)
        # ConstantOfShape is not folded by default (it can make large tensors);
        # legacy exports build Pad's pads with it, so fold it within the size limits
        onnxscript.optimizer.fold_constants(m, input_size_limit=1 << 26, output_size_limit=1 << 28,
                                            onnx_shape_inference=shape_inference,
                                            should_fold=lambda n: True if n.op_type == "ConstantOfShape" else None)
        onnxscript.optimizer.remove_unused_nodes(m)
        return ir.serde.serialize_model(m)
    except Exception as e:  # folding failed: refuse rather than guess
        raise UnsupportedModelError(f"constant folding failed: {type(e).__name__}: {e}") from None


def _inferred_shapes(model: onnx.ModelProto) -> dict:
    """Per-sample shapes from ONNX shape inference (used only to keep walking
    after an unsupported node, so that every problem is reported)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 1 and all(d.HasField("dim_value") for d in dims[1:]):
            out[vi.name] = tuple(int(d.dim_value) for d in dims[1:])
    return out


#: largest fixed batch size (and batch x per-sample entries) accepted: the
#: runtime check evaluates the model on one full batch
MAX_FIXED_BATCH = 4096
MAX_FIXED_BATCH_ELEMENTS = 1 << 26


def _batch_dim(model: onnx.ModelProto, in_name: str) -> int:
    """The input's static batch size, or 0 when it is dynamic."""
    for i in model.graph.input:
        if i.name == in_name:
            dims = i.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return 0


def _with_batch(model: onnx.ModelProto, in_name: str, batch: int) -> onnx.ModelProto:
    """A copy of the model whose input (and output) batch size is ``batch``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in [i for i in m.graph.input if i.name == in_name] + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    del m.graph.value_info[:]
    return m


def import_model(model: onnx.ModelProto, input_shape: tuple | None = None,
                 check_runtime: bool = True) -> Graph:
    """Convert a loaded ONNX model into the IR, or raise UnsupportedModelError
    listing every unsupported node."""
    check_tensors(model)  # in-memory models skip read_model: refuse absurd / inconsistent tensors here too
    in_name, shape = input_signature(model, input_shape)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    folded = _fold(model)
    batch = _batch_dim(model, in_name)
    if batch > MAX_FIXED_BATCH or batch * int(np.prod(shape)) > MAX_FIXED_BATCH_ELEMENTS:
        raise UnsupportedModelError(
            f"the model's batch size is fixed to {batch}: certlib runs such a model on that many samples at a "
            f"time (limit {MAX_FIXED_BATCH} samples, {MAX_FIXED_BATCH_ELEMENTS} input entries); export it with "
            "a dynamic or smaller batch")
    source = model
    if any(n.op_type in ("Shape", "Size") for n in folded.graph.node):
        # shapes computed at run time (dynamic exports): import the model as it
        # runs on `batch` samples at a time (1 when dynamic), so that they fold
        batch = batch or 1
        runtime_model = _with_batch(model, in_name, batch)
        folded = _fold(runtime_model, shape_inference=True)
        source = runtime_model
    ctx = Ctx(folded, opset, batch=batch)
    for init in folded.graph.initializer:
        ctx.consts[init.name] = numpy_helper.to_array(init)
    nodes = list(folded.graph.node)
    for n in nodes:
        for i in n.input:
            ctx.consumers.setdefault(i, []).append(n.name)
    for n in nodes:  # constants the folder left as nodes
        if n.op_type == "Constant" and not n.input:
            try:
                HANDLERS["Constant"](n, ctx)
            except Skip as e:
                ctx.fail(n, str(e))
    # constants the folder computed (in float32): their exact-arithmetic values
    # are re-derived with an error bound, charged by the handlers that read them
    computed, ctx.unbounded = computed_constants(source, ctx.consts)
    for name, (v, e) in computed.items():
        ctx.consts[name] = v
        if np.any(e):
            ctx.const_err[name] = e
    out_name = folded.graph.output[0].name
    ir_nodes = walk(ctx, nodes, in_name, shape, out_name, _inferred_shapes(folded))
    if not ctx.problems and ctx.current != out_name:
        ctx.problems.append(Unsupported(out_name, "-", opset, "the graph output is not the end of the chain"))
    if ctx.problems:
        raise UnsupportedModelError(ctx.problems)
    g = Graph(in_name, shape, out_name, ir_nodes, dropped_output=ctx.dropped, batch=batch)
    out_shape = ctx.shape
    if len(out_shape) != 1:
        raise UnsupportedModelError(f"output must be a vector of logits per sample, got shape {out_shape}")
    g.num_classes = out_shape[0]
    if g.num_classes < 2:
        raise UnsupportedModelError(f"the model has {g.num_classes} output logits; certification needs >= 2 classes")
    if check_runtime:
        check_against_runtime(model, g)
        g.runtime_model = model.SerializeToString()
    return g


_SESSION: list = [None, None]   # (the model bytes object, its session): a streamed run vetoes every batch


def _session(model_bytes: bytes):
    import onnxruntime as ort

    if _SESSION[0] is not model_bytes:
        _SESSION[:] = [model_bytes, ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])]
    return _SESSION[1]


def _runtime_outputs(model_bytes: bytes, g: Graph, x: np.ndarray) -> np.ndarray:
    """onnxruntime's outputs on x (float32 samples), run in chunks of the
    model's fixed batch size (the last chunk padded) when it has one."""
    try:
        sess = _session(model_bytes)
        xin = x.astype(np.float64) if "double" in sess.get_inputs()[0].type else x.astype(np.float32)
        b = g.batch or 256
        outs = []
        for i in range(0, len(xin), b):
            chunk = xin[i:i + b]
            k = len(chunk)
            if g.batch and k < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - k, axis=0)])
            outs.append(np.asarray(sess.run(None, {g.input_name: chunk})[0]).reshape(len(chunk), -1)[:k])
    except Exception as e:
        raise UnsupportedModelError(f"onnxruntime cannot run this model: {e}") from None
    return np.concatenate(outs) if outs else np.zeros((0, g.num_classes))


def runtime_argmax(g: Graph, x: np.ndarray) -> np.ndarray | None:
    """onnxruntime's predicted class per sample (None when the graph carries
    no model).  A sample where it differs from certlib's prediction is never
    certified (certlib.verify), whatever the rounding bound says."""
    if not g.runtime_model:
        return None
    return np.argmax(_runtime_outputs(g.runtime_model, g, np.asarray(x)), axis=1)


def check_against_runtime(model: onnx.ModelProto, g: Graph, n: int = 4, seed: int = 0) -> float:
    """Run onnxruntime and the IR on the same random inputs in [0,1]; raise if
    they disagree (the IR must describe the model that runs).  Compared on
    DIFFERENCES of outputs between inputs (each output minus the batch mean),
    so that a large constant (a bias of 1e4) cannot hide a mismatch, with a
    tolerance relative to their spread plus float32 rounding of the largest
    output (onnxruntime runs in float32).  Returns the max relative difference."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    b = g.batch or n  # a model with a fixed batch size runs on exactly that many samples
    n = b * max(1, -(-n // b)) if b <= n else b
    x = rng.random((n, *g.input_shape)).astype(np.float32)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feed_type = sess.get_inputs()[0].type
        xin = x.astype(np.float64) if "double" in feed_type else x
        ref = np.concatenate([sess.run(None, {g.input_name: xin[i:i + b]})[0] for i in range(0, n, b)])
    except Exception as e:
        raise UnsupportedModelError(f"onnxruntime cannot run this model: {e}") from None
    ours, _ = g.forward(x)
    if g.dropped_output:  # compare like with like: the model outputs (log-)probabilities
        z = ours - ours.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
        ours = z - lse if g.dropped_output == "LogSoftmax" else np.exp(z - lse)
    ref = np.asarray(ref, dtype=np.float64).reshape(ours.shape) if ref.size == ours.size else ref
    if ref.shape != ours.shape:
        raise UnsupportedModelError(f"IR output shape {ours.shape} != onnxruntime's {ref.shape}")
    if ref.shape[0] < 2:  # pragma: no cover - n >= 4 above
        raise UnsupportedModelError("the runtime check needs two inputs")
    dr, do = ref - ref.mean(axis=0), ours - ours.mean(axis=0)
    spread = float(np.max(np.abs(dr)))
    f32_noise = 64 * 2.0 ** -24 * float(np.max(np.abs(ref)))  # rounding of onnxruntime's float32 run
    diff = float(np.max(np.abs(dr - do))) / max(spread, 1e-30)
    if not np.max(np.abs(dr - do)) <= 1e-3 * spread + f32_noise:
        raise UnsupportedModelError(
            f"the imported graph does not reproduce onnxruntime's output (relative difference {diff:.3g})")
    return diff


def load(path: str | Path, input_shape: tuple | None = None) -> tuple[onnx.ModelProto, Graph]:
    model = read_model(path)
    return model, import_model(model, input_shape)
