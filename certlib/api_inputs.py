"""What the public API accepts, turned into what the certification road needs.

* a model: an ONNX path, an ``onnx.ModelProto``, a ``torch.nn.Module`` (exported
  in-process with the dynamo exporter, then checked against the module on the
  data: :mod:`certlib.api_torch`) or a :class:`Model` made by :func:`load_model`;
* data: a ``--data`` spec, a :class:`certlib.data.Dataset`, a pair ``(x, y)`` of
  numpy arrays / torch tensors, or any iterable of ``(x, y)`` batches (a
  ``torch.utils.data.DataLoader``).

Heavy modules (torch, onnx) are imported inside the functions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certlib.errors import UsageError


@dataclass
class Model:
    """An imported model, ready to be certified many times (import once, verify often).

    ``graph`` is certlib's IR (already checked against onnxruntime on random
    inputs); ``module`` is the torch module it was exported from, if any: every
    :func:`certlib.verify` on this Model compares the IR with the module on the
    data before certifying anything."""

    graph: Any
    proto: Any
    name: str
    sha256: str
    path: str | None = None
    module: Any = None
    device: str | None = None
    _analyses: dict = field(default_factory=dict, repr=False)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.graph.input_shape)

    @property
    def num_classes(self) -> int:
        return int(self.graph.num_classes)

    def analysis(self, method: str = "exact"):
        """The proven per-stage bounds (cached per method; the graph never changes)."""
        from certlib.ir.compose import METHODS, analyze

        if method not in METHODS:
            raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method not in self._analyses:
            self._analyses[method] = analyze(self.graph, method=method)
        return self._analyses[method]


def _is_torch_module(obj) -> bool:
    mod = type(obj).__module__ or ""
    if not (mod.startswith("torch") or hasattr(obj, "parameters")):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, torch.nn.Module)


def load_model(model, input_shape: tuple | None = None, *, device: str | None = None) -> Model:
    """Import ``model`` (path, ModelProto, torch.nn.Module or Model) into certlib's IR.

    A torch module needs ``input_shape`` (per sample, e.g. ``(1, 8, 8)``) to be
    exported; :func:`certlib.verify` passes the data's sample shape."""
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, Path)):
        from certlib.onnx.importer import load
        from certlib.verify import file_sha256

        _, g = load(model, input_shape)
        return Model(g, None, str(model), file_sha256(model), path=str(model))
    if _is_torch_module(model):
        from certlib.api_torch import export_module

        if input_shape is None:
            raise UsageError("a torch module needs input_shape (C,H,W of one sample) to be exported")
        proto = export_module(model, tuple(input_shape))
        m = _from_proto(proto, None, name=f"torch:{type(model).__name__}")
        m.module, m.device = model, device
        return m
    try:
        import onnx
    except ImportError:  # pragma: no cover
        onnx = None
    if onnx is not None and isinstance(model, onnx.ModelProto):
        return _from_proto(model, input_shape, name=f"onnx:{model.graph.name or 'model'}")
    raise UsageError(f"model must be an ONNX path, an onnx.ModelProto, a torch.nn.Module or a certlib Model, "
                     f"got {type(model).__name__}")


def _from_proto(proto, input_shape, name: str) -> Model:
    from certlib.onnx.importer import import_model

    g = import_model(proto, input_shape)
    sha = hashlib.sha256(proto.SerializeToString()).hexdigest()
    return Model(g, proto, name, sha)


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().to("cpu").numpy()
    return np.asarray(a)


def load_data(data, limit: int | None = None, *, split: str = "test"):
    """A :class:`certlib.data.Dataset` from a spec, a Dataset, ``(x, y)`` or an iterable of batches."""
    from certlib.data import DataError, Dataset, load

    if limit is not None and limit < 1:
        raise UsageError("limit must be >= 1")
    if isinstance(data, str):
        try:
            return load(data, split).take(limit)
        except DataError as e:
            raise UsageError(str(e)) from None
    if isinstance(data, Dataset):
        return data.take(limit)
    if isinstance(data, tuple) and len(data) == 2:
        return _arrays(_to_numpy(data[0]), _to_numpy(data[1]), limit)
    if hasattr(data, "__iter__") and not isinstance(data, (bytes, np.ndarray)) and not hasattr(data, "detach"):
        xs, ys, n = [], [], 0
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise UsageError("each batch of the data must be an (x, y) pair")
            xs.append(_to_numpy(batch[0]))
            ys.append(_to_numpy(batch[1]))
            n += len(xs[-1])
            if limit is not None and n >= limit:
                break
        if not xs:
            raise UsageError("the data yielded no batches")
        return _arrays(np.concatenate(xs), np.concatenate(ys), limit)
    raise UsageError("data must be a --data spec (e.g. 'digits'), a Dataset, an (x, y) pair of arrays or "
                     f"tensors, or an iterable of (x, y) batches (a DataLoader); got {type(data).__name__}")


def _arrays(x: np.ndarray, y: np.ndarray, limit: int | None):
    from certlib.data import Dataset

    if y.ndim != 1 or x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise UsageError(f"x must be (N, ...) and y (N,) with the same N; got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"x must hold floats, got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise UsageError("y must hold integer labels >= 0")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise UsageError("x contains NaN or Inf")
    ds = Dataset(x, y.astype(np.int64), "arrays", int(y.max(initial=-1)) + 1)
    return ds.take(limit)
