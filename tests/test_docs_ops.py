"""docs/ops.md matches the code: every registered handler, merge op and
pattern has a row; the opset columns are the registry's; every cited test
exists."""

import ast
import re
from pathlib import Path

import certlib.onnx.importer  # noqa: F401  (registers every handler module)
from certlib.onnx.walk import MERGE_OPS
from certlib.onnx.ops import HANDLERS, OPSETS

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "ops.md").read_text()
ROW = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) \|", re.M)
CITE = re.compile(r"`(tests/test_\w+\.py)::(\w+)`")


def test_every_handler_has_a_row_with_its_opsets():
    rows = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in ROW.finditer(DOC)}
    assert set(HANDLERS) <= set(rows), f"missing from docs/ops.md: {sorted(set(HANDLERS) - set(rows))}"
    assert set(rows) <= set(HANDLERS), f"documented without a handler: {sorted(set(rows) - set(HANDLERS))}"
    for op, span in rows.items():
        assert span == OPSETS[op], f"{op}: docs say {span}, registry says {OPSETS[op]}"


def test_merges_and_output_ops_are_documented():
    for op in (*MERGE_OPS, "Split", "Softmax", "LogSoftmax"):
        assert f"| {op} |" in DOC, op


def test_every_cited_test_exists():
    cites = CITE.findall(DOC)
    assert len(cites) > 30
    for file, name in cites:
        funcs = {n.name for n in ast.walk(ast.parse((ROOT / file).read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in funcs, f"docs/ops.md cites missing {file}::{name}"
