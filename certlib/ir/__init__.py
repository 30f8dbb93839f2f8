"""certlib's Lipschitz IR: the graph and its nodes (``graph``), their float64
evaluation with the rounding-error bound (``evaluate``), the block rules for
add/concat blocks (``blocks``), the per-operator verifier choice
(``op_bounds``) and the composition of stage bounds into an ``Analysis``
(``compose``).  It imports the verifiers and ``certlib.bounds``, never the ONNX
importer.
"""
