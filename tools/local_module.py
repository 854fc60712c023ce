"""Import a recipe's ``local/`` script as a module: ``load_module(path, name)``.

Recipes' ``local/`` folders reuse file names (``score.py``, ``prompt.py``), so a script that needs
a sibling, or another recipe's script, loads it from its path under a unique module name instead
of through ``sys.path``; a module loaded once is reused. Left out: packaging ``local/`` folders.
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
