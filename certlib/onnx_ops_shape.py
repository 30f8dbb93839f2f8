"""ONNX handlers for linear maps other than Conv/Gemm and for shape and index
operations (registered into :data:`certlib.onnx_ops.HANDLERS` on import), and
finders for multi-node MinMax forms (registered into
:data:`certlib.onnx_dag.PATTERNS`)."""

from __future__ import annotations
