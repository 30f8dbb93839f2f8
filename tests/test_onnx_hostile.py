"""Hostile and broken ONNX input (issue 5): every case is refused with a clear
message and exit code 2 (UsageError) or 3 (UnsupportedModelError), never a
traceback, never a certificate.  Each case is checked twice: on
certlib.onnx.load's functions, and through ``certlib verify``."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from certlib.onnx import load as onnx_load
from certlib.errors import UnsupportedModelError, UsageError
from certlib.onnx.load import input_signature, read_model
from hostile_builders import (absurd_initializer, data_npz, dense_net, edit_external, hostile_external,
                              outside_copy, save_external, set_init, with_extra_io, with_input_dims, write)
from onnx_builders import plain_net, unsupported_net

# Cases the importer only catches once certlib.onnx.importer.load goes through
# certlib.onnx.load (read_model + input_signature): expected to XPASS after.


@pytest.fixture
def cli(tmp_path, cli_main):
    """Run ``certlib verify MODEL --data npz:... --eps 0.01`` in-process through
    cli.main (the entry point that maps errors); returns (exit code, text)."""
    data = {(1, 4, 4): data_npz(tmp_path / "d144.npz", (1, 4, 4)),
            (2, 6, 6): data_npz(tmp_path / "d266.npz", (2, 6, 6))}

    def run(model_path, *extra, shape=(1, 4, 4)):
        r = cli_main("verify", model_path, "--data", f"npz:{data[shape]}", "--eps", "0.01", *extra)
        code = r.returncode
        text = " ".join((r.stdout + r.stderr).split())  # undo rich's line wrapping
        assert "Traceback" not in text and "internal error" not in text, text
        return code, text
    return run


def expect(cli, path, code, *phrases, **kw):
    got, text = cli(path, **kw)
    assert got == code, text
    for p in phrases:
        assert p in text, (p, text)


# ------------------------------------------------------------ the file itself
def test_missing_file(tmp_path, cli):
    with pytest.raises(UsageError, match="not found"):
        read_model(tmp_path / "nope.onnx")
    expect(cli, tmp_path / "nope.onnx", 2, "not found")


def test_directory_is_not_a_model(tmp_path, cli):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        read_model(tmp_path / "dir.onnx")
    expect(cli, tmp_path / "dir.onnx", 2)


def test_oversized_file_is_refused_unread(tmp_path, cli):
    p = tmp_path / "huge.onnx"
    with open(p, "wb") as f:  # sparse: no disk used, never read
        f.truncate(onnx_load.MAX_MODEL_BYTES + 1)
    with pytest.raises(UsageError, match="larger than"):
        read_model(p)
    expect(cli, p, 2, "larger than")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_malformed_protobuf(tmp_path, cli, kind):
    blob = dense_net().SerializeToString()
    data = {"garbage": b"\x08\x01garbage\xff\xff" * 10, "truncated": blob[: len(blob) // 2], "empty": b""}[kind]
    p = write(tmp_path / "bad.onnx", data)
    with pytest.raises(UsageError, match="not a readable ONNX model|checker rejects"):
        read_model(p)
    expect(cli, p, 2)


def test_checker_rejects(tmp_path, cli):
    m = dense_net()
    m.graph.node[1].input[0] = "undefined_tensor"
    p = write(tmp_path / "m.onnx", m)
    with pytest.raises(UsageError, match="checker rejects.*undefined_tensor"):
        read_model(p)
    expect(cli, p, 2, "checker rejects")


# -------------------------------------------------------------- external data
def test_valid_external_data_loads(tmp_path, cli):
    p = save_external(dense_net(), tmp_path / "m")
    m = read_model(p)
    ref = {t.name: numpy_helper.to_array(t) for t in dense_net().graph.initializer}
    for t in m.graph.initializer:
        assert t.data_location == TensorProto.DEFAULT and not t.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(t), ref[t.name])
    expect(cli, p, 0)


def test_symlink_inside_the_folder_is_followed(tmp_path):
    p = save_external(dense_net(), tmp_path / "m", location="real.bin")
    os.symlink("real.bin", tmp_path / "m" / "link.bin")
    for t in ("W1", "b1", "W2", "b2"):
        edit_external(p, t, location="link.bin")
    assert len(read_model(p).graph.initializer) == 4


@pytest.mark.parametrize("case,phrase", [
    ("absolute", "is an absolute path"),
    ("dotdot", "outside the model's folder"),
    ("symlink_out", "outside the model's folder"),
    ("dev_zero", "outside the model's folder"),
    ("missing", "does not exist"),
    ("offset_past_end", "lies outside"),
    ("length_mismatch", "need 384"),
    ("bad_offset", "must be integers"),
    ("directory", "not a regular file"),
    ("fifo", "not a regular file"),
    ("no_location", "has no location"),
])
def test_hostile_external_data(tmp_path, cli, case, phrase):
    if case == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    p = hostile_external(case, tmp_path)
    with pytest.raises(UsageError) as ei:
        read_model(p)
    msg = str(ei.value)
    assert phrase in msg and "'W1'" in msg, msg
    expect(cli, p, 2)


def test_every_reference_is_checked_before_any_byte_is_read(tmp_path, monkeypatch):
    p = save_external(dense_net(), tmp_path / "m")
    outside_copy(tmp_path)
    edit_external(p, "W2", location="../outside/w.bin")  # W1, b1 come first and are fine

    def no_read(*a, **k):
        raise AssertionError("external data read before every reference was checked")
    monkeypatch.setattr(onnx_load, "load_external", no_read)
    with pytest.raises(UsageError, match="'W2'.*outside the model's folder"):
        read_model(p)


# ------------------------------------------------------------- absurd sizes
def test_absurd_initializer_dims(tmp_path, cli):
    p = write(tmp_path / "m.onnx", absurd_initializer(dense_net()))
    with pytest.raises(UsageError, match=r"initializer 'W1'.*absurd tensor size"):
        read_model(p)
    expect(cli, p, 2, "W1")  # today the ONNX checker's message, after the switch ours


def test_absurd_external_tensor_is_refused_before_reading(tmp_path):
    p = save_external(dense_net(), tmp_path / "m")
    m = onnx.load(str(p), load_external_data=False)
    w = next(t for t in m.graph.initializer if t.name == "W1")
    w.dims[:] = [2 ** 40, 2 ** 20]
    write(p, m)
    with pytest.raises(UsageError, match="absurd tensor size"):
        read_model(p)


def test_negative_dim(tmp_path, cli):
    p = write(tmp_path / "m.onnx", absurd_initializer(dense_net(), dims=(-6, -16)))
    with pytest.raises(UsageError, match="'W1': negative dimension"):
        read_model(p)
    expect(cli, p, 2, "W1")


def test_raw_data_does_not_match_dims(tmp_path, cli):
    p = write(tmp_path / "m.onnx", absurd_initializer(dense_net(), dims=(6, 15)))
    with pytest.raises(UsageError, match=r"'W1': raw_data has 384 bytes .* need 360"):
        read_model(p)


def test_raw_data_does_not_match_dims_cli(tmp_path, cli):
    p = write(tmp_path / "m.onnx", absurd_initializer(dense_net(), dims=(6, 15)))
    expect(cli, p, 2, "raw_data has 384 bytes")


def _typed_mismatch(tmp_path):
    m = dense_net()
    t = next(t for t in m.graph.initializer if t.name == "b2")
    t.CopyFrom(helper.make_tensor("b2", TensorProto.FLOAT, [3], [0.0, 1.0, 2.0]))
    t.float_data.append(3.0)  # four values for dims [3]
    return write(tmp_path / "m.onnx", m)


def test_typed_data_does_not_match_dims(tmp_path):
    with pytest.raises(UsageError, match="'b2': float_data has 4 values"):
        read_model(_typed_mismatch(tmp_path))


def test_typed_data_does_not_match_dims_cli(tmp_path, cli):
    expect(cli, _typed_mismatch(tmp_path), 2, "float_data has 4 values")


def test_absurd_constant_node(tmp_path, cli):
    m = dense_net()
    big = helper.make_tensor("big", TensorProto.FLOAT, [1], [1.0])
    big.dims[:] = [2 ** 21, 2 ** 21]
    m.graph.node.insert(0, helper.make_node("Constant", [], ["k"], name="evil_const", value=big))
    p = write(tmp_path / "m.onnx", m)
    with pytest.raises(UsageError, match="Constant node 'evil_const'.*absurd tensor size"):
        read_model(p)
    expect(cli, p, 2, "evil_const")


def test_absurd_tensor_inside_a_subgraph(tmp_path):
    big = helper.make_tensor("big", TensorProto.FLOAT, [1], [1.0])
    big.dims[:] = [2 ** 40]
    branch = helper.make_graph([helper.make_node("Constant", [], ["k"], name="deep", value=big)], "b", [],
                               [helper.make_tensor_value_info("k", TensorProto.FLOAT, None)])
    m = dense_net()
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.insert(0, helper.make_node("If", ["cond"], ["unused"], name="if", then_branch=branch,
                                            else_branch=branch))
    with pytest.raises(UsageError, match="If node 'if' subgraph 'else_branch': Constant node 'deep'.*absurd"):
        read_model(write(tmp_path / "m.onnx", m))


def test_in_memory_model_with_external_data_is_refused(tmp_path):
    m = onnx.load(str(save_external(dense_net(), tmp_path / "m")), load_external_data=False)
    with pytest.raises(UsageError, match="in-memory model"):
        onnx_load.check_tensors(m)


def test_absurd_input_dims(tmp_path, cli):
    m = with_input_dims(dense_net(), ["N", 1, 2 ** 20, 2 ** 20])
    with pytest.raises(UsageError, match="absurd input size"):
        input_signature(m)
    expect(cli, write(tmp_path / "m.onnx", m), 2, "absurd input size")


# ------------------------------------------------------------ input signature
@pytest.mark.parametrize("io", ["inputs", "outputs"])
def test_several_inputs_or_outputs(tmp_path, cli, io):
    m = with_extra_io(dense_net(), extra_input=io == "inputs", extra_output=io == "outputs")
    with pytest.raises(UsageError, match=f"exactly one {io[:-1]}"):
        input_signature(m)
    expect(cli, write(tmp_path / "m.onnx", m), 2, f"exactly one {io[:-1]}")


def test_dynamic_shape_asks_for_input_shape(tmp_path, cli):
    m = with_input_dims(dense_net(), ["N", "C", "H", "W"])
    with pytest.raises(UsageError, match="--input-shape"):
        input_signature(m)
    assert input_signature(m, (1, 4, 4)) == ("x", (1, 4, 4))
    p = write(tmp_path / "m.onnx", m)
    expect(cli, p, 2, "--input-shape")
    code, text = cli(p, "--input-shape", "1,4,4")
    assert code == 0, text


def test_missing_shape_asks_for_input_shape():
    m = dense_net()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(UsageError, match="--input-shape"):
        input_signature(m)
    assert input_signature(m, [1, 4, 4]) == ("x", (1, 4, 4))


@pytest.mark.parametrize("override,phrase", [
    ((4, 4), "has 2 dimensions"), ((1, 4, 0), "must be positive"), ((1, -4, 4), "must be positive"),
    ((1.5, 4, 4), "positive integers"), ((True, 4, 4), "positive integers"), ((), "positive integers"),
    (("1", 4, 4), "positive integers"), ((1, 4, 5), "conflicts"), ((2, 4, 4), "conflicts"), (7, "list of dimensions"),
])
def test_bad_input_shape_override(override, phrase):
    m = with_input_dims(dense_net(), ["N", 1, "H", 4])
    with pytest.raises(UsageError, match=phrase):
        input_signature(m, override)
    assert input_signature(m, (np.int64(1), 4, 4)) == ("x", (1, 4, 4))


def test_override_of_wrong_rank_via_cli(tmp_path, cli):
    p = write(tmp_path / "m.onnx", with_input_dims(dense_net(), ["N", "C", "H", "W"]))
    code, text = cli(p, "--input-shape", "4,4")
    assert code == 2 and "--input-shape (4, 4) has 2 dimensions" in text, text


@pytest.mark.parametrize("elem", [TensorProto.INT64, TensorProto.FLOAT16, TensorProto.UNDEFINED])
def test_non_float_input(tmp_path, cli, elem):
    m = with_input_dims(dense_net(), ["N", 1, 4, 4], elem_type=elem)
    with pytest.raises(UsageError, match="float32 or float64"):
        input_signature(m)
    expect(cli, write(tmp_path / "m.onnx", m), 2)


def test_input_without_batch_dimension():
    with pytest.raises(UsageError, match="batch dimension"):
        input_signature(with_input_dims(dense_net(), [16]))
    with pytest.raises(UsageError, match="non-positive"):
        input_signature(with_input_dims(dense_net(), ["N", 1, 0, 4]))


def test_non_tensor_input():
    m = dense_net()
    m.graph.input[0].type.CopyFrom(helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None)))
    with pytest.raises(UsageError, match="must be a tensor"):
        input_signature(m)


# --------------------------------------------- weights: refused per node (3)
@pytest.mark.parametrize("base,init,node,value,phrase", [
    ("dense", "W1", "fc1", "nan", "contains NaN or Inf"),
    ("dense", "b2", "head", "inf", "contains NaN or Inf"),
    ("plain", "w", "conv", "inf", "contains NaN or Inf"),
    ("plain", "var", "bn", "nan", "contains NaN or Inf"),
    ("dense", "W2", "head", "int", "non-float dtype"),
    ("plain", "W2", "fc2", "int", "non-float dtype"),
])
def test_nan_inf_and_integer_weights(tmp_path, cli, base, init, node, value, phrase):
    m = dense_net() if base == "dense" else plain_net()
    arr = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == init)).copy()
    if value == "int":
        arr = np.round(arr * 4).astype(np.int32)
    else:
        arr.reshape(-1)[0] = np.nan if value == "nan" else np.inf
    p = write(tmp_path / "m.onnx", set_init(m, init, arr))
    from certlib.onnx.importer import import_model

    with pytest.raises(UnsupportedModelError) as ei:
        import_model(read_model(p))
    assert ei.value.exit_code == 3
    assert any(it.name == node and phrase in it.why for it in ei.value.items), ei.value
    expect(cli, p, 3, node, phrase, shape=(1, 4, 4) if base == "dense" else (2, 6, 6))


def test_unsupported_nodes_all_listed_by_verify(tmp_path, cli):
    expect(cli, write(tmp_path / "m.onnx", unsupported_net()), 3, "bad_erf", "bad_sin", "2 problem(s)")


def test_markup_in_node_names_is_printed_verbatim(tmp_path):
    m = unsupported_net()
    m.graph.node[1].name = "[/evil]"
    m.graph.node[2].name = "[bold]loud"
    r = _subprocess_verify(write(tmp_path / "m.onnx", m), tmp_path)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "[/evil]" in r.stderr and "[bold]loud" in r.stderr, r.stderr


# -------------------------------------------- the real entry point, end to end
def _subprocess_verify(p, tmp_path, shape=(1, 4, 4)):
    d = data_npz(tmp_path / "sub.npz", shape)
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "certlib.cli", "verify", str(p), "--data", f"npz:{d}",
                           "--eps", "0.01"], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("case,code", [("garbage", 2), ("outside", 2), ("two_inputs", 2), ("nan", 3)])
def test_cli_subprocess_exit_codes(tmp_path, case, code):
    if case == "garbage":
        p = write(tmp_path / "m.onnx", b"\x0a\xff\xff\xff\xff\x0f" * 7)
    elif case == "outside":
        p = save_external(dense_net(), tmp_path / "m")
        edit_external(p, "W1", location="../../../../../../etc/hostname")
    elif case == "two_inputs":
        p = write(tmp_path / "m.onnx", with_extra_io(dense_net(), extra_input=True))
    else:
        m = dense_net()
        w = numpy_helper.to_array(m.graph.initializer[0]).copy()
        w[0, 0] = np.nan
        p = write(tmp_path / "m.onnx", set_init(m, "W1", w))
    r = _subprocess_verify(p, tmp_path)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr + r.stdout and "error:" in r.stderr
    assert r.stdout.strip() == ""  # no report, no certificate
