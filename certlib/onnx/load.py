"""Load and validate an ONNX file before import: the hostile-input gate.

Everything here runs before a single weight is turned into a numpy array, so
a broken or hostile file fails with a :class:`~certlib.errors.UsageError`
(exit code 2) that names the problem, never with a traceback, a huge
allocation or a read outside the model's folder:

* missing, non-regular or oversized file; malformed protobuf; a model the ONNX
  checker rejects;
* tensors (initializers, ``Constant`` and other attribute tensors, in
  subgraphs and functions too) whose declared dims are negative or multiply to
  more than :data:`MAX_TENSOR_ELEMENTS`, or whose stored data does not match
  their dims and data type;
* external data whose location is absolute, escapes the model's folder (also
  through symlinks), is missing or not a regular file, or whose offset/length
  lie outside the file, or whose length does not match the dims; external
  data is read only after every reference has been checked, and the ONNX
  checker runs on the model with all its data in memory (so its own checks
  do not depend on the current directory);
* an input signature certlib cannot certify (:func:`input_signature`).

Weights that are integers, NaN or Inf are refused per node by the op handlers
(:mod:`certlib.onnx.ops.core`, exit code 3).
"""

from __future__ import annotations

import math
import numbers
import os
import stat
from pathlib import Path
from collections.abc import Iterator

import onnx
from onnx import TensorProto

from certlib.errors import UsageError

#: the largest model file read (protobuf itself cannot hold more than 2 GiB)
MAX_MODEL_BYTES = 2 * 1024 ** 3
#: the most elements one weight tensor may declare (2**31 float32 = 8 GiB)
MAX_TENSOR_ELEMENTS = 2 ** 31
#: the most elements one input sample may have (e.g. 3 x 2364 x 2364)
MAX_INPUT_ELEMENTS = 2 ** 24

# bits per element of the packed sub-byte types (absent in older onnx releases)
_PACKED_BITS = {getattr(TensorProto, n): b for n, b in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2),
                 ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6)) if hasattr(TensorProto, n)}
_PACKED_TYPED = {t for t, b in _PACKED_BITS.items() if b in (2, 4)}  # int32_data holds packed bytes
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}
_FLOAT_INPUTS = {TensorProto.FLOAT, TensorProto.DOUBLE}


# ------------------------------------------------------------------ reading
def read_model(path: str | Path) -> onnx.ModelProto:
    """Read, validate and return the model at ``path`` with its external data
    loaded.  Raises UsageError (exit code 2) for every hostile or broken file
    described in the module docstring."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UsageError(f"model file not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot access model file {path}: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"model path {path} is not a regular file")
    if st.st_size > MAX_MODEL_BYTES:
        raise UsageError(f"{path}: {st.st_size} bytes, larger than {MAX_MODEL_BYTES} bytes")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, OSError, parse errors of every kind
        raise UsageError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"{path}: not a readable ONNX model")
    try:
        check_tensors(model, p.parent)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise UsageError(f"{path}: the ONNX checker rejects this model: {e}") from None
    return model


def check_tensors(model: onnx.ModelProto, base: Path | None = None) -> None:
    """:func:`check_tensor` on every tensor of ``model``; then, when ``base``
    (the model's folder) is given, check every external-data reference and
    only then read them all into the model.  Without ``base`` (a model built
    or loaded in memory) external data is refused.  UsageError otherwise."""
    external, total = [], model.ByteSize()
    for where, t in iter_tensors(model):
        check_tensor(t, where)
        if t.data_location == TensorProto.EXTERNAL:
            if base is None:
                raise UsageError(f"{where}: external data cannot be resolved for an in-memory model; "
                                 "load the file with read_model")
            ref = check_external(t, where, base)
            external.append((where, t, ref))
            total += ref[2]
    if total > MAX_MODEL_BYTES:
        raise UsageError(f"the model with its external data holds {total} bytes, more than "
                         f"{MAX_MODEL_BYTES}")
    # every reference is checked: only now read the bytes (from the resolved paths)
    for where, t, ref in external:
        load_external(t, where, *ref)
        check_tensor(t, where)


def iter_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every TensorProto of the model with a label saying where it sits:
    initializers, sparse initializers, node attributes (``Constant`` values
    included), recursively through subgraphs and local functions."""
    yield from _graph_tensors(model.graph, "")
    for f in model.functions:
        yield from _node_tensors(f.node, f"function {f.name!r}: ")


def _graph_tensors(g: onnx.GraphProto, prefix: str) -> Iterator[tuple[str, TensorProto]]:
    for t in g.initializer:
        yield f"{prefix}initializer {t.name!r}", t
    for s in g.sparse_initializer:
        yield f"{prefix}sparse initializer {s.values.name!r} (values)", s.values
        yield f"{prefix}sparse initializer {s.values.name!r} (indices)", s.indices
    yield from _node_tensors(g.node, prefix)


def _node_tensors(nodes, prefix: str) -> Iterator[tuple[str, TensorProto]]:
    for n in nodes:
        label = f"{prefix}{n.op_type} node {n.name or '<unnamed>'!r}"
        for a in n.attribute:
            if a.HasField("t"):
                yield f"{label} attribute {a.name!r}", a.t
            for t in a.tensors:
                yield f"{label} attribute {a.name!r}", t
            if a.HasField("sparse_tensor"):
                yield f"{label} attribute {a.name!r} (values)", a.sparse_tensor.values
                yield f"{label} attribute {a.name!r} (indices)", a.sparse_tensor.indices
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sg in subs:
                yield from _graph_tensors(sg, f"{label} subgraph {a.name!r}: ")


# ------------------------------------------------------------------ tensors
def num_elements(dims, where: str = "tensor") -> int:
    """Product of ``dims``; UsageError when one is negative or the product
    passes MAX_TENSOR_ELEMENTS (checked as it grows, no big integers)."""
    n = 1
    for d in dims:
        if d < 0:
            raise UsageError(f"{where}: negative dimension {d} in dims {list(dims)}")
        n *= d
        if n > MAX_TENSOR_ELEMENTS:
            raise UsageError(f"{where}: declared dims {list(dims)} hold more than "
                             f"{MAX_TENSOR_ELEMENTS} elements (absurd tensor size)")
    return n


def expected_bytes(t: TensorProto, n: int, where: str) -> int:
    """Bytes of ``n`` elements of t's data type stored as raw_data."""
    if t.data_type in _PACKED_BITS:
        return -(-n * _PACKED_BITS[t.data_type] // 8)
    if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        raise UsageError(f"{where}: data type {_dtype_name(t.data_type)} cannot be stored as raw bytes")
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except Exception:
        raise UsageError(f"{where}: unknown tensor data type {t.data_type}") from None
    return n * itemsize


def check_tensor(t: TensorProto, where: str) -> None:
    """Refuse a tensor with absurd dims or stored data that does not match its
    dims and data type, without materialising it."""
    where = where or f"tensor {t.name!r}"
    if t.data_type == TensorProto.UNDEFINED:
        raise UsageError(f"{where}: tensor has no data type")
    n = num_elements(t.dims, where)
    if t.HasField("segment"):
        raise UsageError(f"{where}: segmented tensors are not supported")
    if t.data_location == TensorProto.EXTERNAL:
        if t.HasField("raw_data"):
            raise UsageError(f"{where}: external tensor also carries raw_data")
        expected_bytes(t, n, where)  # the type must have a fixed size
        return
    if t.HasField("raw_data"):
        want = expected_bytes(t, n, where)
        got = len(t.raw_data)
        if got != want:
            raise UsageError(f"{where}: raw_data has {got} bytes but dims {list(t.dims)} of "
                             f"{_dtype_name(t.data_type)} need {want}")
        return
    try:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
    except Exception:
        raise UsageError(f"{where}: unknown tensor data type {t.data_type}") from None
    got = len(getattr(t, field))
    if t.data_type in _COMPLEX:
        want = 2 * n
    elif t.data_type in _PACKED_TYPED:
        want = -(-n * _PACKED_BITS[t.data_type] // 8)
    else:
        want = n
    if got != want:
        raise UsageError(f"{where}: {field} has {got} values but dims {list(t.dims)} of "
                         f"{_dtype_name(t.data_type)} need {want}")


def _dtype_name(dt: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(dt).replace("TensorProto.", "")
    except Exception:
        return f"data type {dt}"


def check_external(t: TensorProto, where: str, base: Path) -> tuple[Path, int, int]:
    """Check one external-data reference against the model's folder ``base``;
    returns ``(resolved data file, offset, length)``.  Location: a relative
    path that, with symlinks followed, stays inside ``base`` and names an
    existing regular file; offset and length: integers inside that file, the
    length equal to what the dims and data type need."""
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    if not loc:
        raise UsageError(f"{where}: external data has no location")
    shown = f"{where}: external data location {loc!r}"
    if "\0" in loc or os.path.isabs(loc) or Path(loc).is_absolute() or loc.startswith(("/", "\\")):
        raise UsageError(f"{shown} is an absolute path; it must be relative to the model's folder")
    root = base.resolve()
    try:
        target = (root / loc).resolve(strict=True)
    except FileNotFoundError:
        raise UsageError(f"{shown} does not exist (looked in {root})") from None
    except (OSError, RuntimeError) as e:  # symlink loops, permission errors
        raise UsageError(f"{shown} cannot be resolved: {e}") from None
    if not target.is_relative_to(root):
        raise UsageError(f"{shown} resolves to {target}, outside the model's folder {root}")
    try:
        st = target.stat()
    except OSError as e:
        raise UsageError(f"{shown} cannot be read: {e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{shown} is not a regular file")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise UsageError(f"{shown}: offset/length must be integers, got "
                         f"{info.get('offset')!r}/{info.get('length')!r}") from None
    want = expected_bytes(t, num_elements(t.dims, where), where)
    if offset < 0 or (length is not None and length < 0):
        raise UsageError(f"{shown}: negative offset or length ({offset}, {length})")
    if length is None:
        length = st.st_size - offset
    if offset + length > st.st_size or length < 0:
        raise UsageError(f"{shown}: offset {offset} + length {length} lies outside the "
                         f"{st.st_size}-byte file")
    if length != want:
        raise UsageError(f"{shown}: holds {length} bytes but dims {list(t.dims)} of "
                         f"{_dtype_name(t.data_type)} need {want}")
    return target, offset, length


def load_external(t: TensorProto, where: str, target: Path, offset: int, length: int) -> None:
    """Read a reference that :func:`check_external` accepted into ``t.raw_data``
    (as onnx.external_data_helper.load_external_data_for_tensor does, but from
    the already resolved and checked path: onnx's helper refuses every symlink,
    even one that stays inside the folder).  The final component is opened
    without following links and re-checked on the open descriptor, so a file
    swapped after the check is refused."""
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise UsageError(f"{where}: cannot open external data {target}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or offset + length > st.st_size:
            raise UsageError(f"{where}: external data {target} changed while it was being read")
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise UsageError(f"{where}: external data {target} ended after {len(data)} of {length} bytes")
    t.raw_data = data
    t.data_location = TensorProto.DEFAULT
    del t.external_data[:]


# ----------------------------------------------------------------- signature
def input_signature(model: onnx.ModelProto, override=None) -> tuple[str, tuple]:
    """``(input name, per-sample shape)`` of a model certlib can certify:
    exactly one graph input (initializers excluded), exactly one output, a
    float32/float64 tensor input with a leading batch dimension, and fixed
    per-sample dims or ``override`` (``--input-shape``; positive ints, of the
    right rank, agreeing with every fixed dim).  UsageError otherwise."""
    g = model.graph
    inits = {i.name for i in g.initializer} | {s.values.name for s in g.sparse_initializer}
    ins = [i for i in g.input if i.name not in inits]
    if len(ins) != 1:
        raise UsageError(f"model must have exactly one input, has {len(ins)}: {[i.name for i in ins]}")
    if len(g.output) != 1:
        raise UsageError(f"model must have exactly one output, has {len(g.output)}: "
                         f"{[o.name for o in g.output]}")
    inp = ins[0]
    if not inp.type.HasField("tensor_type"):
        raise UsageError(f"input {inp.name!r} must be a tensor, got {inp.type.WhichOneof('value')}")
    t = inp.type.tensor_type
    if t.elem_type not in _FLOAT_INPUTS:
        raise UsageError(f"model input {inp.name!r} must be float32 or float64, got {_dtype_name(t.elem_type)}")
    dims = None
    if t.HasField("shape"):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) < 2:
            raise UsageError(f"input {inp.name!r} has rank {len(dims)}: certlib needs a batch dimension "
                             "followed by the per-sample dimensions")
        if any(d is not None and d <= 0 for d in dims):
            raise UsageError(f"input {inp.name!r} declares non-positive dimensions {dims}")
    if override is not None:
        shape = _check_override(override, dims, inp.name)
    else:
        if dims is None or any(d is None for d in dims[1:]):
            raise UsageError(f"input {inp.name!r} has dynamic or missing per-sample dimensions "
                             f"{dims if dims is not None else '(no shape)'}; pass --input-shape C,H,W")
        shape = tuple(int(d) for d in dims[1:])
    size = math.prod(shape)
    if size > MAX_INPUT_ELEMENTS:
        raise UsageError(f"input {inp.name!r}: per-sample shape {shape} has {size} elements, more than "
                         f"{MAX_INPUT_ELEMENTS} (absurd input size)")
    return inp.name, shape


def _check_override(override, dims, name: str) -> tuple:
    try:
        vals = list(override)
    except TypeError:
        raise UsageError(f"--input-shape must be a list of dimensions, got {override!r}") from None
    if not vals or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in vals):
        raise UsageError(f"--input-shape must be positive integers like 3,32,32, got {override!r}")
    shape = tuple(int(v) for v in vals)
    if min(shape) <= 0:
        raise UsageError(f"--input-shape dimensions must be positive, got {shape}")
    if dims is not None:
        if len(shape) != len(dims) - 1:
            raise UsageError(f"--input-shape {shape} has {len(shape)} dimensions but input {name!r} has "
                             f"{len(dims) - 1} per-sample dimensions {dims[1:]}")
        for ax, (d, s) in enumerate(zip(dims[1:], shape), start=1):
            if d is not None and d != s:
                raise UsageError(f"--input-shape {shape} conflicts with input {name!r}'s fixed "
                                 f"dimension {d} at axis {ax}")
    return shape
