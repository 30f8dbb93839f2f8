"""ONNX <-> certlib's Lipschitz IR.

``load`` is the hostile-input gate (file, external data, sizes, the input
signature); ``importer`` folds constants and runs the self-test against
onnxruntime; ``walk`` walks the DAG and asks the handlers in ``ops`` for IR
nodes; ``export`` writes a LiResNet as plain ONNX.  Imports run one way:
``importer -> walk -> ops -> ir``; nothing in ``ops`` imports the walker.
"""
