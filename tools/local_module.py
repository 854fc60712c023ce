"""Import a recipe's ``local/`` script as a module.

- ``load_sibling(__file__, "prompt")``: the script ``prompt.py`` beside the calling one, as the
  module ``<recipe>_local_prompt`` (``<recipe>``: the name of the folder above ``local/``);
- ``load_module(path, name)``: any file under a name of the caller's choosing
  (``core.utils.modules.load_module``, which also loads the user reward files of ``rewards.modules``).

Recipes' ``local/`` folders reuse file names (``score.py``, ``prompt.py``, ``make_synthetic.py``),
so a plain ``import prompt`` would hand one recipe's module to another when both are loaded in
one process (the test suite). Naming a module after its recipe folder keeps them apart, and a
copied recipe gets its own names without an edit. A module loaded once is reused. What recipes
share lives in ``tools/`` and is imported as ``tools.<module>``; a recipe never loads another
recipe's ``local/`` scripts. Left out: packaging ``local/`` folders.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

from core.utils.modules import load_module

__all__ = ["load_module", "load_sibling"]


def load_sibling(caller: str | Path, name: str) -> ModuleType:
    """The script ``<name>.py`` in the folder of ``caller`` (pass ``__file__``), loaded as
    ``<recipe>_local_<name>``; ImportError naming the path when there is no such file."""
    here = Path(caller).resolve().parent
    path = here / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"{path}: no such file (a sibling of {Path(caller).name})")
    return load_module(path, f"{here.parent.name}_{here.name}_{name}")
