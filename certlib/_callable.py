"""Modules that are also the public function of the same name.

``certlib.verify``, ``certlib.attack`` and ``certlib.train`` are both
submodules (the certification road, the PGD attack, the trainer) and the
public API functions of docs/api.md.  Python sets a package attribute to the
submodule whenever the submodule is imported, so the name would stop being
the function; instead each of these modules is made callable, calling the API
function (``certlib.verify(model, data, eps)`` works whatever was imported first).
"""

from __future__ import annotations

import importlib
import sys
import types


class CallableModule(types.ModuleType):
    _target = ""   # "module:function"

    def __call__(self, *args, **kwargs):
        mod, _, fn = type(self)._target.partition(":")
        return getattr(importlib.import_module(mod), fn)(*args, **kwargs)


def make_callable(module_name: str, target: str, doc: str) -> None:
    """Turn sys.modules[module_name] into a module that calls ``target`` when called."""
    cls = type("CallableModule", (CallableModule,), {"_target": target, "__call__": CallableModule.__call__,
                                                     "__doc__": doc})
    sys.modules[module_name].__class__ = cls
