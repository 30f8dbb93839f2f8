"""A ``torch.nn.Module`` as a certifiable model: exported in-process with the
dynamo exporter (no file written), imported like any ONNX model, and then
checked against the module itself on the data being certified.

The certificate is about the exported ONNX function.  It speaks for the
module only where the two agree, so :func:`check_module` refuses (an error,
never a silent certificate) when the module's logits differ from the IR's by
more than float32 rounding can explain, or when the module predicts another
class than the IR on any sample.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np

from certlib.errors import CertlibError, UnsupportedModelError

#: largest relative logit difference (max |f_module - f_IR| / max(1, max |f_IR|))
#: accepted between the module and the IR: float32 rounding of a small network
MODULE_RTOL = 1e-4


class ModelMismatchError(CertlibError):
    """The exported model does not compute what the torch module computes (exit code 3)."""

    exit_code = 3


def export_module(module, input_shape: tuple):
    """The module as an ``onnx.ModelProto`` (dynamo exporter, dynamic batch), in memory."""
    import torch

    m = module
    try:
        dev = next(iter(module.parameters())).device
    except StopIteration:
        dev = torch.device("cpu")
    if dev.type != "cpu":
        m = copy.deepcopy(module).to("cpu")
    was_training = m.training
    m.eval()
    x = torch.zeros(2, *input_shape)
    import logging

    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)   # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(m, (x,), dynamo=True, input_names=["x"], output_names=["logits"],
                                     dynamic_shapes=({0: torch.export.Dim("N")},), external_data=False,
                                     verbose=False)
        proto = prog.model_proto
    except Exception as e:
        raise UnsupportedModelError(f"torch.onnx.export (dynamo) failed: {type(e).__name__}: {e}") from None
    finally:
        m.train(was_training)
        log.setLevel(level)
    return proto


def module_logits(module, x: np.ndarray, device: str | None = None, batch_size: int = 256) -> np.ndarray:
    """The module's logits on x (eval mode, no grad), as float64."""
    import torch

    try:
        p = next(iter(module.parameters()))
        dev, dtype = torch.device(device) if device else p.device, p.dtype
    except StopIteration:
        dev, dtype = torch.device(device or "cpu"), torch.float32
    was_training = module.training
    module.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = torch.as_tensor(x[i:i + batch_size], dtype=dtype, device=dev)
                out.append(module(xb).detach().to("cpu", torch.float64).numpy())
    finally:
        module.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0))


def check_module(module, logits_ir: np.ndarray, x: np.ndarray, device: str | None = None) -> float:
    """Compare the module with the IR's float64 logits on x; raise ModelMismatchError
    on a difference beyond MODULE_RTOL or on any differing prediction.  Returns the
    relative difference."""
    ref = module_logits(module, x, device)
    if ref.shape != logits_ir.shape:
        raise ModelMismatchError(f"the module outputs shape {ref.shape} but the exported model {logits_ir.shape}")
    if not np.all(np.isfinite(ref)):
        raise ModelMismatchError("the module's logits contain NaN or Inf on the data")
    scale = max(1.0, float(np.max(np.abs(logits_ir), initial=0.0)))
    diff = float(np.max(np.abs(ref - logits_ir), initial=0.0)) / scale
    if not diff <= MODULE_RTOL:
        raise ModelMismatchError(
            f"the exported ONNX model does not reproduce the torch module on the data (relative logit "
            f"difference {diff:.3g} > {MODULE_RTOL:g}); nothing was certified")
    differ = np.flatnonzero(np.argmax(ref, axis=1) != np.argmax(logits_ir, axis=1))
    if differ.size:
        raise ModelMismatchError(
            f"the torch module and the exported model predict different classes on {differ.size} sample(s) "
            f"(first: {differ[:5].tolist()}); nothing was certified")
    return diff
