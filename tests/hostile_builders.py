"""Hostile and broken ONNX models for the loader's tests and the fuzz test.

Every builder returns a ModelProto (or writes files) WITHOUT running the ONNX
checker, since most of them are meant to fail it or something after it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_builders import make_model, plain_net


# ------------------------------------------------------------- small models
def dense_net(seed: int = 0, in_shape=(1, 4, 4), hidden: int = 6, classes: int = 3):
    """Flatten -> Gemm -> Relu -> Gemm: the smallest certifiable model."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(in_shape))
    inits = {"W1": rng.normal(size=(hidden, n)) / np.sqrt(n), "b1": rng.normal(size=hidden) * 0.1,
             "W2": rng.normal(size=(classes, hidden)), "b2": rng.normal(size=classes) * 0.1}
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="head", transB=1)]
    return make_model(nodes, inits, in_shape, classes)


def minmax_net(seed: int = 0):
    """Conv -> MinMax (Split + Max + Min + Concat) -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.normal(size=(4, 1, 3, 3)) / 3, "b": rng.normal(size=4) * 0.1,
             "W": rng.normal(size=(3, 64)) / 8}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Split", ["c"], ["s1", "s2"], name="split", axis=1, num_outputs=2),
             helper.make_node("Max", ["s1", "s2"], ["mx"], name="max"),
             helper.make_node("Min", ["s1", "s2"], ["mn"], name="min"),
             helper.make_node("Concat", ["mx", "mn"], ["mm"], name="concat", axis=1),
             helper.make_node("Flatten", ["mm"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "W"], ["y"], name="head", transB=1)]
    return make_model(nodes, inits, (1, 4, 4), 3)


BASES = {"dense": dense_net, "plain": plain_net, "minmax": minmax_net}
INPUT_SHAPES = {"dense": (1, 4, 4), "plain": (2, 6, 6), "minmax": (1, 4, 4)}


def data_npz(path: Path, shape, n: int = 4, classes: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.random((n, *shape)).astype(np.float32), y=rng.integers(0, classes, n))
    return path


# -------------------------------------------------------- hostile rewrites
def set_init(model, name: str, arr: np.ndarray) -> onnx.ModelProto:
    """Replace initializer ``name`` by ``arr`` (its dtype and shape as given)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return m
    raise KeyError(name)


def absurd_initializer(model, name: str = "W1", dims=(2 ** 20, 2 ** 20)) -> onnx.ModelProto:
    """Declared dims with 2**40 elements over a few real bytes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == name)
    del t.dims[:]
    t.dims.extend(dims)
    return m


def with_extra_io(model, extra_input: bool = False, extra_output: bool = False):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if extra_input:
        m.graph.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3]))
    if extra_output:
        out = m.graph.node[0].output[0]
        m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 16]))
    return m


def with_input_dims(model, dims, elem_type=TensorProto.FLOAT):
    """Rewrite the graph input's dims (ints fixed, str symbolic, None unknown)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = m.graph.input[0].type.tensor_type
    t.elem_type = elem_type
    del t.shape.dim[:]
    for d in dims:
        dim = t.shape.dim.add()
        if isinstance(d, int):
            dim.dim_value = d
        elif isinstance(d, str):
            dim.dim_param = d
    return m


def save_external(model, folder: Path, location: str = "w.bin") -> Path:
    """Save ``model`` into ``folder`` with every initializer in ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "model.onnx"
    onnx.save(model, p, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return p


def edit_external(path: Path, tensor: str, **entries) -> Path:
    """Overwrite external_data keys (location/offset/length) of one tensor in
    the saved model at ``path`` without touching the data files."""
    m = onnx.load(str(path), load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == tensor)
    info = {e.key: e.value for e in t.external_data}
    info.update({k: str(v) for k, v in entries.items() if v is not None})
    for k, v in entries.items():
        if v is None:
            info.pop(k, None)
    del t.external_data[:]
    for k, v in info.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    path.write_bytes(m.SerializeToString())
    return path


def outside_copy(tmp: Path) -> None:
    """tmp/outside/w.bin: a copy of tmp/m/w.bin outside the model's folder."""
    (tmp / "outside").mkdir(exist_ok=True)
    (tmp / "outside" / "w.bin").write_bytes((tmp / "m" / "w.bin").read_bytes())


def hostile_external(case: str, tmp: Path) -> Path:
    """dense_net saved as tmp/m/model.onnx + w.bin, with W1's external-data
    reference made hostile in the way ``case`` names."""
    p = save_external(dense_net(), tmp / "m")
    folder = tmp / "m"
    size = (folder / "w.bin").stat().st_size
    links = {"symlink_out": tmp / "outside" / "w.bin", "dev_zero": Path("/dev/zero")}
    if case in ("dotdot", "symlink_out"):
        outside_copy(tmp)
    if case in links:
        os.symlink(links[case], folder / "evil.bin")
    elif case == "directory":
        (folder / "sub").mkdir()
    elif case == "fifo":
        os.mkfifo(folder / "pipe.bin")
    entries = {"absolute": {"location": str(folder / "w.bin")}, "dotdot": {"location": "../outside/w.bin"},
               "symlink_out": {"location": "evil.bin"}, "dev_zero": {"location": "evil.bin"},
               "missing": {"location": "nope.bin"}, "offset_past_end": {"offset": size - 8},
               "length_mismatch": {"length": 16}, "bad_offset": {"offset": "0x10"},
               "directory": {"location": "sub"}, "fifo": {"location": "pipe.bin"},
               "no_location": {"location": None}}[case]
    return edit_external(p, "W1", **entries)


# ---------------------------------------------------------- fuzz mutations
OP_TYPES = ["Relu", "Sigmoid", "Tanh", "Abs", "Identity", "Flatten", "Conv", "Gemm", "MatMul", "Add", "Sub",
            "Mul", "Div", "Softmax", "MaxPool", "AveragePool", "Erf", "LeakyRelu", "Transpose", "Reshape",
            "BatchNormalization", "Split", "Concat", "Max", "Min", "Dropout", "Neg", "Exp"]
ATTRS = ["strides", "pads", "group", "axis", "dilations", "kernel_shape", "alpha", "beta", "transA",
         "transB", "epsilon", "auto_pad", "perm", "allowzero", "num_outputs"]
INT_VALUES = [-3, -1, 0, 1, 2, 3, 7, 2 ** 31, 2 ** 62]


def _attr_value(rng: random.Random, name: str):
    if name in ("alpha", "beta", "epsilon"):
        return rng.choice([0.0, -1.0, 1e-30, 0.5, 2.0, 1e30, float("nan"), float("inf")])
    if name == "auto_pad":
        return rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID", "NOTSET", "bogus"])
    if name in ("strides", "pads", "dilations", "kernel_shape", "perm"):
        return [rng.choice(INT_VALUES[:7]) for _ in range(rng.choice([0, 1, 2, 3, 4, 6]))]
    return rng.choice(INT_VALUES)


def _weight(rng: random.Random, arr: np.ndarray) -> np.ndarray:
    kind = rng.choice(["nan", "inf", "int", "huge", "tiny", "zeros", "shape", "empty", "double", "scalar"])
    a = np.array(arr, dtype=np.float32)
    if kind in ("nan", "inf") and a.size:
        a.reshape(-1)[rng.randrange(a.size)] = np.nan if kind == "nan" else -np.inf
    elif kind == "int":
        a = np.round(a * 3).astype(rng.choice([np.int32, np.int64, np.int8]))
    elif kind == "huge":
        with np.errstate(over="ignore"):
            a = a * np.float32(rng.choice([1e15, 1e30, 3e38]))
    elif kind == "tiny":
        a = a * np.float32(1e-30)
    elif kind == "zeros":
        a = np.zeros_like(a)
    elif kind == "shape":
        a = np.resize(a, tuple(max(1, s + rng.choice([-1, 1])) for s in a.shape) or (2,))
    elif kind == "empty":
        a = np.zeros((0,) + a.shape[1:], dtype=np.float32)
    elif kind == "double":
        a = a.astype(np.float64)
    elif kind == "scalar":
        a = np.float32(rng.uniform(-2, 2))
    return a


def _rename_everywhere(m, old: str, new: str, only_first: bool = False) -> None:
    for n in m.graph.node:
        for seq in (n.input, n.output):
            for i, v in enumerate(seq):
                if v == old:
                    seq[i] = new
                    if only_first:
                        return
    for seq in (m.graph.input, m.graph.output, m.graph.initializer):
        for v in seq:
            if v.name == old:
                v.name = new


def mutate(model: onnx.ModelProto, kind: str, rng: random.Random) -> onnx.ModelProto:
    """One random structural mutation of a copy of ``model``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = g.node
    if kind == "delete" and len(nodes) > 1:
        del nodes[rng.randrange(len(nodes))]
    elif kind == "bypass" and nodes:  # delete a node and wire its consumers to its first input
        i = rng.randrange(len(nodes))
        n = nodes[i]
        src, outs = (n.input[0] if n.input else ""), list(n.output)
        del nodes[i]
        for o in outs:
            _rename_everywhere(m, o, src)
    elif kind == "duplicate" and nodes:
        i = rng.randrange(len(nodes))
        dup = onnx.NodeProto()
        dup.CopyFrom(nodes[i])
        if rng.random() < 0.5:
            del dup.output[:]
            dup.output.extend([o + "_dup" for o in nodes[i].output])
        nodes.insert(i + 1, dup)
    elif kind == "swap_op" and nodes:
        nodes[rng.randrange(len(nodes))].op_type = rng.choice(OP_TYPES)
    elif kind == "attr" and nodes:
        n = nodes[rng.randrange(len(nodes))]
        name = rng.choice([a.name for a in n.attribute] + ATTRS) if n.attribute else rng.choice(ATTRS)
        keep = [a for a in n.attribute if a.name != name]
        del n.attribute[:]
        n.attribute.extend(keep)
        if rng.random() < 0.85:
            v = _attr_value(rng, name)
            kind = onnx.AttributeProto.INTS if isinstance(v, list) else None
            n.attribute.append(helper.make_attribute(name, v, attr_type=kind))
    elif kind == "weight" and g.initializer:
        t = g.initializer[rng.randrange(len(g.initializer))]
        t.CopyFrom(numpy_helper.from_array(_weight(rng, numpy_helper.to_array(t)), t.name))
    elif kind == "input_dims":
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            d = dims[rng.randrange(len(dims))]
            choice = rng.choice(["zero", "neg", "sym", "huge", "grow", "drop"])
            if choice == "sym":
                d.dim_param = "D"
            elif choice == "drop":
                del dims[rng.randrange(len(dims))]
            else:
                d.dim_value = {"zero": 0, "neg": -2, "huge": 2 ** 40,
                               "grow": max(1, d.dim_value) + rng.choice([-1, 1, 2])}[choice]
    elif kind == "rename":
        names = [o for n in nodes for o in n.output] + [g.input[0].name]
        if names:
            _rename_everywhere(m, rng.choice(names), "renamed_" + str(rng.randrange(9)),
                               only_first=rng.random() < 0.5)
    elif kind == "opset":
        m.opset_import[0].version = rng.choice([1, 6, 7, 9, 11, 13, 17, 18, 21, 99])
    elif kind == "input_type":
        g.input[0].type.tensor_type.elem_type = rng.choice(
            [TensorProto.DOUBLE, TensorProto.INT64, TensorProto.FLOAT16, TensorProto.UNDEFINED])
    elif kind == "constant" and nodes:  # a Constant node producing a weight, maybe absurd
        t = g.initializer[rng.randrange(len(g.initializer))] if g.initializer else None
        if t is not None:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            if rng.random() < 0.3:
                del c.dims[:]
                c.dims.extend([2 ** 21, 2 ** 21])
            g.initializer.remove(t)
            nodes.insert(0, helper.make_node("Constant", [], [t.name], name="const_" + t.name, value=c))
    return m


MUTATIONS = ["delete", "bypass", "duplicate", "swap_op", "attr", "weight", "input_dims", "rename", "opset",
             "input_type", "constant"]
BYTE_MUTATIONS = ["truncate", "flip", "insert", "zero_run"]


def mutate_bytes(blob: bytes, kind: str, rng: random.Random) -> bytes:
    b = bytearray(blob)
    if not b:
        return bytes(b)
    if kind == "truncate":
        return bytes(b[:rng.randrange(len(b))])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zero_run":
        i, k = rng.randrange(len(b)), rng.randint(1, 64)
        b[i:i + k] = bytes(len(b[i:i + k]))
    return bytes(b)


def write(path: Path, model_or_bytes) -> Path:
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else model_or_bytes.SerializeToString()
    Path(path).write_bytes(data)
    return Path(path)

