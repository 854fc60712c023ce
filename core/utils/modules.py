"""Import a Python file as a module under a name of the caller's choosing.

``load_module(path, name)`` runs the file once per process and registers it in ``sys.modules``
under ``name`` (a second call with the same name returns the same module); a file whose code
raises leaves nothing registered. Used for user code named in a config (``rewards.modules``) and
for recipes' ``local/`` scripts (``tools.local_module``). Left out: packages, reloading.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_module(path: str | Path, name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before running it: dataclasses look their module up while it loads
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod
