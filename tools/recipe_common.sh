# Shared by the recipes' run.sh (sourced after ../../tools/parse_options.sh, from the recipe
# folder): finds the project's environment (PY), exports PYTHONPATH (the repository root, so that
# local/ scripts import core and tools) and thread settings, and defines
#   log MSG...                    timestamped line tagged with the recipe's name
#   record_time NAME SECONDS      stores a stage's seconds in ${exp}/stage_seconds.json
#   summary_seconds FILE          train_seconds of a run's train_summary.json
#   abspath PATH                  PATH made absolute against the caller's folder (caller_pwd, set
#                                 by run.sh before it changes to the recipe folder)
#   train CONF [key=value...]     python -m core.bin.train --config CONF train.seed=${seed}, then
#                                 ${train_extra[@]} (per-recipe overrides run.sh sets for every
#                                 training run, e.g. train_extra=(train.resume=never)),
#                                 backend.name=deepspeed when backend=deepspeed, LoRA adapters when
#                                 lora=true, then the call's own overrides (these win)
#   fresh DIR...                  removes DIRs: a stage that runs again starts from nothing (no
#                                 stale rounds, curves or models)
#   readme_args                   (--readme README.md) when update_readme=true, else empty: what
#                                 the last stage passes to local/make_results.py. Runs write their
#                                 table to ${exp}/RESULTS.md; only --update_readme true also
#                                 rewrites the README's results section (for maintainers).
# Needs: recipe (name for the log), exp (the experiment folder) and seed; reads backend, lora,
# update_readme and train_extra when run.sh has them.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "${ROOT}/.venv/bin/python" ]; then
  PY="${ROOT}/.venv/bin/python"
else
  echo "The project's environment is missing: run 'bash run.sh setup' in ${ROOT} first." >&2
  exit 1
fi
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

log() { echo "$(date '+%Y-%m-%d %H:%M:%S') [${recipe}] $*"; }
record_time() {
  mkdir -p "${exp}"
  "${PY}" - "${exp}/stage_seconds.json" "$1" "$2" <<'PY'
import json, sys, os
p, k, v = sys.argv[1], sys.argv[2], float(sys.argv[3])
d = json.load(open(p)) if os.path.exists(p) else {}
d[k] = round(v, 1)
json.dump(d, open(p, "w"), indent=2)
PY
}
abspath() { case "$1" in ""|/*) echo "$1" ;; *) echo "${caller_pwd:-$PWD}/$1" ;; esac; }
summary_seconds() { "${PY}" -c "import json,sys;print(json.load(open(sys.argv[1]))['train_seconds'])" "$1"; }

train() {  # CONF [key=value...]
  [ $# -ge 1 ] || { echo "train: needs a config file" >&2; return 2; }
  local conf=$1; shift
  [ -f "${conf}" ] || { echo "train: no config file ${conf} (in $(pwd))" >&2; return 2; }
  local extra=(${train_extra[@]+"${train_extra[@]}"})
  case "${backend:-torch}" in
    torch) ;;
    deepspeed) extra+=(backend.name=deepspeed) ;;
    *) echo "--backend must be torch or deepspeed, got '${backend}'" >&2; return 2 ;;
  esac
  if [ "${lora:-false}" = "true" ]; then extra+=("model.lora={r: 16, lora_alpha: 32, lora_dropout: 0.0}"); fi
  "${PY}" -m core.bin.train --config "${conf}" train.seed=${seed} ${extra[@]+"${extra[@]}"} "$@"
}
fresh() {  # DIR...
  local d
  for d in "$@"; do
    case "${d}" in ""|/|.|..) echo "fresh: refusing to remove '${d}'" >&2; return 2 ;; esac
    rm -rf -- "${d}"
  done
}
readme_args=()
if [ "${update_readme:-false}" = "true" ]; then readme_args=(--readme README.md); fi
