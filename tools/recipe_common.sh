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
#                                 training run, e.g. train_extra=(data.num_frames=8)), the launch
#                                 options of tools/launch_options.sh (model/teacher dtype,
#                                 train.resume, DeepSpeed and its ZeRO JSON), backend.name=deepspeed
#                                 when backend=deepspeed, LoRA adapters when lora=true, then the
#                                 call's own overrides (these win). --ngpu/--num_nodes run it under
#                                 torchrun, --hostfile under the DeepSpeed launcher. With
#                                 --resume auto an output_dir= holding a finished run (its final/)
#                                 is removed first (the stage starts over) and an interrupted one is
#                                 continued; with --resume never it is always removed.
#                                 LAUNCH_DRY_RUN=1 prints the command instead of running it.
#   launch_prefix                 the command train() runs core.bin.train with (an array, LAUNCH)
#   prep_args                     (--skip_bad) when skip_bad=true, else empty: for the prep scripts
#   fresh DIR...                  removes DIRs (non-training outputs a stage rewrites)
#   budget_args NAME SECONDS      the train overrides that bound compared method NAME: with an empty
#                                 ${budget}, its fixed step count (ReST: rounds) from conf/budget.yaml
#                                 (x ${budget_scale}, smoke runs; tools/step_budget.py), else SECONDS
#                                 of wall-clock
#   budget_over NAME SECONDS      budget_args into b (text, for the log) and bo (an array: "${bo[@]}")
#   set_gen_len MODEL FIELD MANIFEST...
#                                 once per run (later calls do nothing): gen_len=$(gen_length ...),
#                                 logged, and rollout.max_new_tokens=${gen_len} added to the recipe's
#                                 paths array (the overrides its stages share)
#   run_seeds FIRST_STAGE METRIC SHARED...
#                                 with --seeds N > 1: this run.sh again for stages max(stage,
#                                 FIRST_STAGE)..stop_stage once per training seed (seed, seed+1 ...)
#                                 into ${exp}/seed<s>/, each linking the SHARED outputs of ${exp}
#                                 (the warm-up), then their results.json combined into
#                                 ${exp}/results.json (tools/aggregate_seeds.py: mean, std, per seed;
#                                 a METRIC table in ${exp}/RESULTS.md). Needs orig_args (run.sh's
#                                 arguments). Returns 1 (nothing done) when seeds is 1.
#   gen_length MODEL FIELD MANIFEST...
#                                 the decoding / rollout length (prints it): ${max_new_tokens} when
#                                 a number; with auto, the longest FIELD of the MANIFESTs in MODEL's
#                                 tokens x 1.25 + 8 (tools/gen_length.py). Records the choice in
#                                 ${exp}/gen_length.json (results.json reports it).
#   eval_model_ok                 --eval_only's checks of --model (given, a model folder) and
#                                 --corpus_dir when CORPUS_DIR_NEEDED=1; exits 1 with the reason
#   readme_args                   (--readme README.md) when update_readme=true, else empty: what
#                                 the last stage passes to local/make_results.py. Runs write their
#                                 table to ${exp}/RESULTS.md; only --update_readme true also
#                                 rewrites the README's results section (for maintainers).
# Needs: recipe (name for the log), exp (the experiment folder) and seed; reads backend, lora,
# update_readme, train_extra and the options of tools/launch_options.sh when run.sh has them.
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

check_launch_options() {  # every launch option's value, before anything runs (exit status 2, a reason)
  local n=${ngpu:-1} nodes=${num_nodes:-1}
  [[ "${n}" =~ ^[1-9][0-9]*$ ]] || { echo "--ngpu must be a positive integer, got '${n}'" >&2; return 2; }
  [[ "${nodes}" =~ ^[1-9][0-9]*$ ]] || { echo "--num_nodes must be a positive integer, got '${nodes}'" >&2; return 2; }
  if [ -n "${hostfile:-}" ]; then
    [ -f "${hostfile}" ] || { echo "--hostfile ${hostfile}: no such file" >&2; return 2; }
  elif [ "${nodes}" -gt 1 ]; then
    [[ "${node_rank:-0}" =~ ^[0-9]+$ ]] && [ "${node_rank:-0}" -lt "${nodes}" ] || {
      echo "--node_rank must be 0 .. $((nodes - 1)), got '${node_rank:-}'" >&2; return 2; }
    [ -n "${master_addr:-}" ] || { echo "--num_nodes ${nodes} (torchrun) needs --master_addr, node 0's address" >&2; return 2; }
  fi
  case "${dtype:-float32}" in float32|bfloat16|float16) ;;
    *) echo "--dtype must be float32, bfloat16 or float16, got '${dtype}'" >&2; return 2 ;; esac
  case "${resume:-auto}" in auto|never) ;; *) echo "--resume must be auto or never, got '${resume}'" >&2; return 2 ;; esac
  case "${zero:-0}" in 0|2|3) ;; *) echo "--zero must be 2 or 3 (or 0: as --backend says), got '${zero}'" >&2; return 2 ;; esac
  case "${backend:-torch}" in torch|deepspeed) ;;
    *) echo "--backend must be torch or deepspeed, got '${backend}'" >&2; return 2 ;; esac
}

launch_prefix() {  # sets LAUNCH: how core.bin.train is started (one process, torchrun, DeepSpeed)
  check_launch_options || return
  local n=${ngpu:-1} nodes=${num_nodes:-1}
  if [ -n "${hostfile:-}" ]; then
    # every node runs the same folder (same path) with the environment's PYTHON* variables; DeepSpeed
    # finds node 0's address itself unless --master_addr says it
    LAUNCH=("${ROOT}/.venv/bin/deepspeed" --hostfile "${hostfile}" --num_nodes "${nodes}" --num_gpus "${n}"
            ${master_addr:+--master_addr "${master_addr}"} --master_port "${master_port:-29500}" --module)
  elif [ "${nodes}" -gt 1 ]; then
    LAUNCH=("${PY}" -m torch.distributed.run --nnodes "${nodes}" --node_rank "${node_rank:-0}"
            --nproc_per_node "${n}" --master_addr "${master_addr}" --master_port "${master_port:-29500}" -m)
  elif [ "${n}" -gt 1 ]; then
    LAUNCH=("${PY}" -m torch.distributed.run --standalone --nproc_per_node "${n}" -m)
  else
    LAUNCH=("${PY}" -m)
  fi
}

train() {  # CONF [key=value...]
  [ $# -ge 1 ] || { echo "train: needs a config file" >&2; return 2; }
  local conf=$1; shift
  [ -f "${conf}" ] || { echo "train: no config file ${conf} (in $(pwd))" >&2; return 2; }
  launch_prefix || return   # every option checked before an output folder is touched
  local extra=(${train_extra[@]+"${train_extra[@]}"}) a out=""
  extra+=(model.dtype=${dtype:-float32} teacher.dtype=${dtype:-float32} train.resume=${resume:-auto})
  case "${zero:-0}" in 2|3) backend=deepspeed; extra+=(backend.ds_config=conf/ds_zero${zero}.json) ;; esac
  [ "${backend:-torch}" = deepspeed ] && extra+=(backend.name=deepspeed)
  if [ "${lora:-false}" = "true" ]; then extra+=("model.lora={r: 16, lora_alpha: 32, lora_dropout: 0.0}"); fi
  for a in ${extra[@]+"${extra[@]}"} "$@"; do case "${a}" in output_dir=*) out=${a#output_dir=} ;; esac; done
  for a in "$@"; do case "${a}" in train.resume=*) out="" ;; esac; done  # the call decides itself
  if [ -n "${out}" ] && [ -d "${out}" ] && [ -z "${LAUNCH_DRY_RUN:-}" ]; then
    if [ "${resume:-auto}" = auto ] && [ ! -e "${out}/final" ] &&
       { compgen -G "${out}/checkpoints/step_*" > /dev/null || compgen -G "${out}/round_*" > /dev/null; }; then
      log "${out}: continuing its interrupted run (--resume never starts over)"
    else  # finished (final/), nothing to continue, or --resume never: the stage starts over
      fresh "${out}"
    fi
  fi
  if [ -n "${LAUNCH_DRY_RUN:-}" ]; then
    echo "${LAUNCH[*]} core.bin.train --config ${conf} train.seed=${seed} ${extra[*]} $*"
    return 0
  fi
  "${LAUNCH[@]}" core.bin.train --config "${conf}" train.seed=${seed} ${extra[@]+"${extra[@]}"} "$@"
}
eval_name_of() {  # MODEL_DIR: a name for its evaluation (".../opd/final" -> "opd")
  local b; b=$(basename "$1")
  [ "${b}" = final ] && b=$(basename "$(dirname "$1")")
  echo "${b}"
}
eval_model_ok() {  # [TAG]: --eval_only's checks; data/ and exp/ default to data/eval_TAG, exp/eval_<model>
  [ -n "${model:-}" ] || { echo "--eval_only needs --model DIR" >&2; exit 1; }
  [ -f "${model}/config.json" ] || { echo "--model ${model}: not a model folder (no config.json)" >&2; exit 1; }
  if [ "${CORPUS_DIR_NEEDED:-0}" = 1 ] && [ -z "${corpus_dir:-}" ]; then
    echo "--eval_only needs --corpus_dir (the corpus's local copy)" >&2; exit 1
  fi
  eval_name=$(eval_name_of "${model}")
  # a training run's data/ and exp/ are left alone unless --data / --exp name them
  [ "${data}" = data ] && data="data/eval_${1:-${corpus:-test}}"
  [ "${exp}" = exp ] && exp="exp/eval_${eval_name}"
  mkdir -p "${data}" "${exp}"
}
budget_args() {  # NAME SECONDS
  if [ -n "${budget:-}" ]; then
    [[ "${budget}" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "--budget must be a number of seconds, got '${budget}'" >&2; return 2; }
    [[ "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "${1}'s budget must be a number of seconds, got '$2'" >&2; return 2; }
    echo "train.max_seconds=$2"
  else
    "${PY}" -m tools.step_budget args --conf "${budget_conf:-conf/budget.yaml}" "$1" --scale "${budget_scale:-1}"
  fi
}
budget_over() {  # NAME SECONDS: b (the overrides, for the log) and bo (the same as an array, one word each, never globbed)
  b=$(budget_args "$@") || return
  read -ra bo <<< "${b}"
}
gen_len=""
set_gen_len() {  # MODEL FIELD MANIFEST...
  [ -z "${gen_len}" ] || return 0
  gen_len=$(gen_length "$@")
  log "generation length ${gen_len} tokens (${exp}/gen_length.json)"
  paths+=(rollout.max_new_tokens=${gen_len})
}
run_seeds() {  # FIRST_STAGE METRIC SHARED...
  local n=${seeds:-1} first=$1 metric=$2 k s sub d from files=() seed_list=()
  shift 2
  [[ "${n}" =~ ^[1-9][0-9]*$ ]] || { echo "--seeds must be a positive integer, got '${n}'" >&2; exit 2; }
  [ "${n}" -gt 1 ] && [ "${stop_stage}" -ge "${first}" ] || return 1
  from=$(( stage > first ? stage : first ))
  local data_abs exp_abs script
  data_abs=$(readlink -f "${data}"); exp_abs=$(readlink -f "${exp}"); script="$(pwd)/run.sh"
  for ((k = 0; k < n; k++)); do
    s=$(( seed + k )); sub="${exp_abs}/seed${s}"
    mkdir -p "${sub}"
    for d in "$@"; do
      if [ -e "${exp_abs}/${d}" ]; then ln -sfn "$(readlink -f "${exp_abs}/${d}")" "${sub}/${d}"; fi
    done
    log "seed ${s} ($(( k + 1 )) of ${n}): stages ${from}-${stop_stage} in ${sub}"
    (cd "${caller_pwd:-.}" && bash "${script}" "${orig_args[@]}" --stage "${from}" --stop_stage "${stop_stage}" \
       --seeds 1 --seed "${s}" --exp "${sub}" --data "${data_abs}" ${update_readme+--update_readme false}) || return 2
    files+=("${sub}/results.json"); seed_list+=("${s}")
  done
  [ -f "${files[0]}" ] || return 0   # stop_stage before scoring: nothing to combine
  local IFS=,
  "${PY}" -m tools.aggregate_seeds --out "${exp_abs}/results.json" --seeds "${seed_list[*]}" --metric "${metric}" \
    --report_exp "${exp_abs}" --smoke "${smoke:-false}" ${readme_args[@]+"${readme_args[@]}"} "${files[@]}"
}
gen_length() {  # MODEL FIELD MANIFEST...
  local n=${max_new_tokens:-auto}
  if [ "${n}" = auto ]; then
    "${PY}" -m tools.gen_length --model "$1" --field "$2" --manifest "${@:3}" --json > "${exp}/gen_length.json" || return $?
    "${PY}" -c "import json,sys;print(json.load(open(sys.argv[1]))['max_new_tokens'])" "${exp}/gen_length.json"
  else
    [[ "${n}" =~ ^[1-9][0-9]*$ ]] || { echo "--max_new_tokens must be auto or a positive integer, got '${n}'" >&2; return 2; }
    echo "{\"max_new_tokens\": ${n}, \"rule\": \"--max_new_tokens\"}" > "${exp}/gen_length.json"
    echo "${n}"
  fi
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
# the launch options: paths relative to where run.sh was called from, values checked up front
if [ -n "${ngpu+x}" ]; then
  hostfile=$(abspath "${hostfile:-}")
  check_launch_options || exit 2
fi
prep_args=()
if [ "${skip_bad:-false}" = "true" ]; then prep_args=(--skip_bad); fi
# a recipe with step budgets (an empty --budget): its conf/budget.yaml (or --budget_conf) must be readable before any stage runs
if [ -n "${budget+x}" ] && [ -z "${budget}" ] && [ "${eval_only:-false}" != "true" ]; then
  bc=${budget_conf:-conf/budget.yaml}; [ "${bc}" = conf/budget.yaml ] || bc=$(abspath "${bc}")
  "${PY}" -m tools.step_budget show --conf "${bc}" > /dev/null || {
    echo "(the compared methods' step counts; or run with --budget SECONDS for a wall-clock budget)" >&2; exit 2; }
fi
