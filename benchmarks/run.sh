#!/usr/bin/env bash
# Run every benchmark side by side in one process; see benchmarks/run.py.
#   bash benchmarks/run.sh [--smoke] [--only NAME ...] [--out FILE]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"
VENV="${ROOT}/.venv"
if [ ! -x "${VENV}/bin/python" ] || ! "${VENV}/bin/python" -c "import core, torch, transformers" 2>/dev/null; then
  echo "$(date '+%Y-%m-%d %H:%M:%S') [benchmarks] no usable ${VENV}: running bash run.sh setup" >&2
  bash "${ROOT}/run.sh" setup
fi
export TOKENIZERS_PARALLELISM=false
exec "${VENV}/bin/python" -m benchmarks.run "$@"
