"""ONNX op handlers, one module per family, in one explicit registry.

Importing this package registers every family into the tables of
:mod:`certlib.onnx.ops.registry`: ``core`` (linear and affine ops, Relu, trivial
reshapes), ``shape`` (index maps, padding, ConvTranspose), ``nonlinear``
(activations and pooling), ``patterns`` (multi-node MinMax / GroupSort
forms), ``polynomial`` (linear polynomial regions of one conv: SOC) and ``thirdparty`` (wrap-padding Concat, centering, l2-norm pooling).  To support a new op, add a ``@handler("OpType")`` function to the
family it belongs to (docs/architecture.md says how, and which tests prove it).
"""

from certlib.onnx.ops import core, nonlinear, patterns, polynomial, shape, thirdparty  # noqa: F401  (registration)
from certlib.onnx.ops.registry import (HANDLED_OPSET, HANDLERS, OPSETS, PATTERNS, Ctx, Skip, _attrs,  # noqa: F401
                                       _dynamic_input, check_opset)
