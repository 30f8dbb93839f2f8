"""certlib: deterministic, sound l2 robustness certification (LiResNet / GloRo).

Certification is the product: every Lipschitz number the certifier accepts is a
:class:`certlib.bounds.Bound` (a proven upper bound), never an
:class:`certlib.bounds.Estimate`.

The library API (docs/api.md)::

    import certlib
    report = certlib.verify(model, "digits", 0.1)   # ONNX path, ModelProto or torch.nn.Module
    print(report.vra, report.lipschitz)

``import certlib`` stays cheap: torch and onnx are imported when an API
function first needs them.
"""

from certlib._version import __version__  # noqa: F401

_API = {
    "verify": "certlib.api", "lipschitz_bound": "certlib.api", "attack": "certlib.api", "check": "certlib.api",
    "load_model": "certlib.api", "load_data": "certlib.api", "Model": "certlib.api", "Report": "certlib.api",
    "NetworkBound": "certlib.api", "AttackResult": "certlib.api",
    "Bound": "certlib.bounds", "Estimate": "certlib.bounds", "UnsoundError": "certlib.bounds",
    "CertlibError": "certlib.errors", "UsageError": "certlib.errors",
    "UnsupportedModelError": "certlib.errors", "ProofCheckError": "certlib.errors",
    "ModelMismatchError": "certlib.api_torch",
    "train": "certlib.train", "TrainConfig": "certlib.train", "preset_config": "certlib.train",
    "RECIPES": "certlib.train",
}

_CALLABLE_MODULES = ("verify", "attack", "train")

__all__ = ["__version__", *_API]


def __getattr__(name):
    mod = _API.get(name)
    if mod is None:
        raise AttributeError(f"module 'certlib' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(mod)
    # verify/attack/train: a submodule of that name is the callable (certlib/_callable.py)
    value = importlib.import_module(f"certlib.{name}") if name in _CALLABLE_MODULES else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
