#!/usr/bin/env bash
# Top-level entry point.
#   bash run.sh          set everything up, then run the ASR recipe's default pipeline
#   bash run.sh setup    set up only (idempotent: a second call takes seconds)
#   bash run.sh test     set up, then run the whole test suite
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "${ROOT}"
VENV="${ROOT}/.venv"
STAMP="${VENV}/.setup_done"

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [run.sh] $*"; }

setup_system() {
  local missing=()
  command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
  command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
  command -v sox >/dev/null 2>&1 || missing+=(sox)
  ldconfig -p 2>/dev/null | grep -q libsndfile.so.1 || missing+=(libsndfile1)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)   # headless browser test of the teacher server page
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    local SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    ${SUDO} apt-get update -qq
    DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

setup_python() {
  local want
  want="$(cat pyproject.toml tools/install_vllm.py | sha256sum | cut -d' ' -f1)"
  if [ -f "${STAMP}" ] && [ "$(cat "${STAMP}")" = "${want}" ] && "${VENV}/bin/python" -c "import core, torch, transformers" 2>/dev/null; then
    return 0
  fi
  [ -x "${VENV}/bin/python" ] || { log "creating ${VENV}"; python3 -m venv "${VENV}"; }
  local PIP="${VENV}/bin/python -m pip"
  ${PIP} install -q --upgrade pip setuptools wheel
  if ! "${VENV}/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    log "installing torch==2.14.1 torchvision==0.29.1 (first, pinned)"
    ${PIP} install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  # every extra (pyproject.toml: deepspeed, video, caption, serve, bench, qlora, trackers, dev): the
  # recipes and the test suite use them all. The torch and torchvision already here are held by a
  # constraints file: a package that wants others makes pip fail instead of replacing them.
  local cons="${VENV}/torch-constraints.txt"
  "${VENV}/bin/python" - > "${cons}" <<'PY'
import torch, torchvision
for m in (torch, torchvision):
    print(f"{m.__name__}=={m.__version__.split('+')[0]}")
PY
  log "installing the project with all its extras (keeping $(tr '\n' ' ' < "${cons}"))"
  ${PIP} install -q -e ".[all]" -c "${cons}"
  # vLLM (the rollout engine and teacher server the tests run): its wheel pins another torch and
  # transformers, so it goes in without its dependencies and ours stay (tools/install_vllm.py)
  log "installing vLLM beside the project's pins"
  "${VENV}/bin/python" tools/install_vllm.py
  echo "${want}" > "${STAMP}"
}

setup() {
  setup_system
  setup_python
  log "setup done: ${VENV}"
}

cmd="${1:-default}"
case "${cmd}" in
  setup) setup ;;
  test)
    setup
    shift || true
    # test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay in one process, so
    # its module fixtures run once), in the order tests/conftest.py collects them (the files that run
    # whole recipes first; xdist would otherwise start the files with most tests first and leave
    # the longest for last); TEST_WORKERS=0 runs them all in this one
    workers=${TEST_WORKERS:-2}
    log "running the test suite (${workers} workers)"
    set +e
    if [ "${workers}" = 0 ]; then
      "${VENV}/bin/python" -m pytest --durations=15 "$@"
    else
      "${VENV}/bin/python" -m pytest -n "${workers}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
    fi
    rc=$?
    set -e
    if [ ${rc} -eq 5 ]; then log "pytest collected no tests: failing"; exit 1; fi
    exit ${rc}
    ;;
  default)
    setup
    bash recipes/asr/run.sh --stage 0 --stop_stage 3
    ;;
  -h|--help|help)
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *) echo "unknown command '${cmd}' (use: setup | test | no argument)" >&2; exit 2 ;;
esac
