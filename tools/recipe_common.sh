# Shared by the recipes' run.sh (sourced after tools/parse_options.sh, from the recipe folder):
# finds the project's environment (PY), exports PYTHONPATH and thread settings, and defines
#   log MSG...                    timestamped line tagged with the recipe's name
#   record_time NAME SECONDS      stores a stage's seconds in ${exp}/stage_seconds.json
#   summary_seconds FILE          train_seconds of a run's train_summary.json
#   abspath PATH                  PATH made absolute against the caller's folder (caller_pwd, set
#                                 by run.sh before it changes to the recipe folder)
# Needs: recipe (name for the log) and exp (the experiment folder).
ROOT="$(cd ../.. && pwd)"
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
