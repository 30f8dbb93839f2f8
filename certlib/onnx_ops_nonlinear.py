"""ONNX handlers for pointwise nonlinearities and pooling (registered into
:data:`certlib.onnx_ops.HANDLERS` on import).  Lipschitz rules: SOUNDNESS.md
rule 3, proofs/activations.md, proofs/maxpool.md."""

from __future__ import annotations
