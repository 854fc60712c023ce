#!/usr/bin/env bash
# When does on-policy distillation win? OPD against sequence-level KD, KD then OPD, and more SFT,
# at equal compute, over teacher quality, student size and output length.
#
#   bash local/study.sh                       # from recipes/asr: every stage, every setting, 3 seeds
#   bash local/study.sh --stage 3             # only the table and the plot, from what is finished
#   bash local/study.sh --settings "commands_strong_small sentences_strong_small" --seeds 1
#   bash local/study.sh --measure true        # maintainers: measure each task and student's seconds
#                                             # per step and rewrite conf/study/budget_*.yaml first
#   bash local/study.sh --update_readme true  # maintainers: also write the table into README.md
#
# A setting is TASK_TEACHER_STUDENT:
#   TASK     commands: the recipe's default data (2-6 words a clip, 3 s audio chunk);
#            sentences: two or three commands joined by "and" / "then" (5-18 words, 6 s chunk),
#            outputs long enough for a student's own mistakes to compound
#   TEACHER  strong: the recipe's teacher SFT (900 steps; on sentences --sentences_steps); weak: the
#            same SFT over fewer steps (--weak_steps, its own cosine schedule), a clearly imperfect
#            teacher
#   STUDENT  small: the recipe's student (hidden 48, 2 + 2 layers); tiny: hidden 32, 1 + 1 layers
# Every setting's models share its task's tokenizer; the two students of a task learn from the
# same teacher.
#
# Stage 0: data (commands: run.sh's stage 0 into data/; sentences: data_sentences/).
# Stage 1: per task, tokenizer and models, the teachers' SFT, the students' SFT (shared warm-ups).
# Stage 2: per setting and seed, run.sh's stages 2-3 from that warm-up: OPD, more SFT, sequence-
#          level KD, KD then OPD at equal compute (conf/study/budget_<task>_<student>.yaml, the step
#          counts that give each method --target_seconds at the seconds per step measured for
#          that task and student), then greedy decoding of the test set, WER, paired intervals.
# Stage 3: exp/study/STUDY.md (the table), study.json, study.png (the plot); with
#          --update_readme true also the README's study section.
#
# Resumable: a finished teacher, student or seed (its results.json) is kept and skipped when the
# script runs again, so the study can run in pieces; an interrupted training continues from its
# last checkpoint (run.sh's --resume auto).
set -euo pipefail
readonly caller_pwd=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."

stage=0
stop_stage=3
settings="commands_strong_small commands_strong_tiny commands_weak_small commands_weak_tiny sentences_strong_small"
seeds=3                 # training seeds per setting (0 .. N-1), after one shared warm-up
weak_steps=500          # the weak teacher's SFT steps (the strong one: conf/teacher_sft.yaml's 900); dev
                        # reward 1 - WER per clip: 150 steps 0.16, 400 steps 0.65, 500 0.80, 900 steps 0.97
sentences_steps=2400    # the sentences task's strong teacher's SFT steps: its outputs are three times
                        # as long, and 900 steps left it at a dev reward of 0.63
measure=false           # true: first measure seconds per step (--target_seconds of wall-clock per method)
target_seconds=45       # --measure: each compared method's seconds on this machine
budget_dir=conf/study   # budget_<task>_<student>.yaml: the step counts (--measure writes them here)
exp=exp/study
data=data               # the commands task's data (run.sh's stage 0 writes it when missing)
data_sentences=data_sentences   # the sentences task's data
smoke=false             # tiny corpora, few steps, one seed: for tests
update_readme=false     # true: also write the study's table into README.md
help_message="Usage: bash local/study.sh [--stage 0..3] [--stop_stage 0..3] [--settings \"TASK_TEACHER_STUDENT ...\"]
       [--seeds N] [--weak_steps N] [--sentences_steps N] [--measure true [--target_seconds S]] [--budget_dir DIR] [--exp DIR] [--data DIR] [--data_sentences DIR]
       [--smoke true] [--update_readme true]"
. ../../tools/parse_options.sh
recipe=asr_study
seed=0
. ../../tools/recipe_common.sh   # PY, log, train, abspath
[ "${exp}" = exp/study ] || exp=$(abspath "${exp}")
[ "${budget_dir}" = conf/study ] || budget_dir=$(abspath "${budget_dir}")
[ "${data}" = data ] || data=$(abspath "${data}")
[ "${data_sentences}" = data_sentences ] || data_sentences=$(abspath "${data_sentences}")
[[ "${seeds}" =~ ^[1-9][0-9]*$ ]] || { echo "--seeds must be a positive integer, got '${seeds}'" >&2; exit 2; }
for x in weak_steps sentences_steps; do
  [[ "${!x}" =~ ^[1-9][0-9]*$ ]] || { echo "--${x} must be a positive integer, got '${!x}'" >&2; exit 2; }
done
mkdir -p "${exp}"

split_setting() { IFS=_ read -r task quality size <<< "$1"; }   # SETTING: sets task, quality, size
tasks=()
for s in ${settings}; do
  split_setting "${s}"
  case "${task}" in commands|sentences) ;; *) echo "--settings: '${s}': the task must be commands or sentences" >&2; exit 2 ;; esac
  case "${quality}" in strong|weak) ;; *) echo "--settings: '${s}': the teacher must be strong or weak" >&2; exit 2 ;; esac
  case "${size}" in small|tiny) ;; *) echo "--settings: '${s}': the student must be small or tiny" >&2; exit 2 ;; esac
  [[ " ${tasks[*]-} " == *" ${task} "* ]] || tasks+=("${task}")
done
[ ${#tasks[@]} -gt 0 ] || { echo "--settings is empty" >&2; exit 2; }

data_of() { case "$1" in commands) echo "${data}" ;; sentences) echo "${data_sentences}" ;; esac; }
smoke_args=(); teacher_over=(); student_over=(); scale=1
if [ "${smoke}" = "true" ]; then
  smoke_args=(--smoke true)
  teacher_over=(train.eval_every=0 train.save_every=0); student_over=(train.max_steps=10 train.eval_every=0 train.save_every=0)
  scale=0.05
  [ "${weak_steps}" -le 40 ] || weak_steps=40   # fewer: the smoke teacher writes nothing at all
fi
teacher_steps() {  # TASK QUALITY: the teacher's SFT steps
  case "$2" in
    weak) echo "${weak_steps}" ;;
    strong) if [ "${smoke}" = "true" ]; then echo 60; elif [ "$1" = sentences ]; then echo "${sentences_steps}"; else echo 900; fi ;;
  esac
}
done_model() { [ -f "$1/final/config.json" ]; }

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  for task in "${tasks[@]}"; do
    d=$(data_of "${task}")
    if [ -f "${d}/test.jsonl" ] && [ -f "${d}/stats.json" ]; then log "stage 0: ${d}/ is there"; continue; fi
    log "stage 0: data for ${task} (${d}/)"
    case "${task}" in
      commands) bash run.sh --stage 0 --stop_stage 0 --data "${d}" --exp "${exp}/commands" "${smoke_args[@]}" ;;
      sentences) "${PY}" local/make_synthetic.py --task sentences --max_seconds 6 --out_dir "${d}" \
                   $([ "${smoke}" = "true" ] && echo --smoke) ;;
    esac
  done
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  for s in ${settings}; do
    split_setting "${s}"
    d=$(data_of "${task}"); w="${exp}/${task}"
    # the task's tokenizer and models (conf/study/models_<task>_<student>.yaml); the same text and
    # seed give every student of the task the same tokenizer as its teacher, checked below
    b="${w}/build_${size}"
    if [ ! -f "${b}/models.json" ]; then
      log "stage 1: ${task}: tokenizer and models (${size} student)"
      "${PY}" -m tools.build_models --conf "conf/study/models_${task}_${size}.yaml" --text "${d}/text_corpus.txt" --exp "${b}"
    fi
    for other in "${w}"/build_*; do
      cmp -s "${other}/tokenizer/tokenizer.json" "${b}/tokenizer/tokenizer.json" || {
        echo "${other} and ${b}: the tokenizers differ; remove ${w} and run stage 1 again" >&2; exit 1; }
    done
    t="${w}/teacher_${quality}"; n=$(teacher_steps "${task}" "${quality}")
    if done_model "${t}"; then  # a teacher kept from an earlier run must be the one asked for now
      had=$("${PY}" -c "import json,sys;print(json.load(open(sys.argv[1]))['steps'])" "${t}/train_summary.json")
      [ "${had}" = "${n}" ] || { echo "${t}: trained ${had} steps, ${n} asked (--weak_steps, --sentences_steps?): remove it to train it again" >&2; exit 1; }
    else
      log "stage 1: ${task}: ${quality} teacher, SFT for ${n} steps"
      train conf/teacher_sft.yaml model.path="${b}/teacher_init" output_dir="${t}" \
        data.train="${d}/teacher_train.jsonl" data.dev="${d}/dev.jsonl" train.max_steps="${n}" "${teacher_over[@]}"
    fi
    st="${w}/student_${size}"
    if ! done_model "${st}"; then
      log "stage 1: ${task}: ${size} student, SFT on its small labelled set"
      train conf/student_sft.yaml model.path="${b}/student_init" output_dir="${st}" \
        data.train="${d}/student_labelled.jsonl" data.dev="${d}/dev.jsonl" "${student_over[@]}"
    fi
    # the setting's folder as run.sh's stage 2 expects it
    e="${exp}/${s}"; mkdir -p "${e}"
    ln -sfn "$(readlink -f "${t}")" "${e}/teacher"; ln -sfn "$(readlink -f "${st}")" "${e}/student_sft"
    ln -sfn "$(readlink -f "${b}/teacher_init")" "${e}/teacher_init"; ln -sfn "$(readlink -f "${b}/student_init")" "${e}/student_init"
    cp "${b}/models.json" "${e}/models.json"
    log "stage 1: ${s}: warm-up ready (${e})"
  done
fi

run_stage2() {  # SETTING SUBDIR SEED STOP_STAGE [run.sh options...]: run.sh's stages 2-STOP_STAGE in ${exp}/SETTING/SUBDIR
  local s=$1 sub="${exp}/$1/$2" sd=$3 stop=$4 x; shift 4
  split_setting "${s}"
  mkdir -p "${sub}"
  for x in teacher student_sft teacher_init student_init models.json; do
    [ -e "${exp}/${s}/${x}" ] || { echo "${exp}/${s}/${x} is missing: run stage 1 first" >&2; return 1; }
    ln -sfn "$(readlink -f "${exp}/${s}/${x}")" "${sub}/${x}"
  done
  bash run.sh --stage 2 --stop_stage "${stop}" --seeds 1 --seed "${sd}" --exp "${sub}" --data "$(data_of "${task}")" "$@"
}

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  if [ "${measure}" = "true" ]; then
    mkdir -p "${budget_dir}"
    # seconds per step of each method, per task and student (the teacher's quality does not change
    # the cost), from one wall-clock run each: conf/study/budget_<task>_<student>.yaml
    measured=" "
    for s in ${settings}; do
      split_setting "${s}"
      [[ "${measured}" == *" ${task}_${size} "* ]] && continue
      measured+="${task}_${size} "
      log "stage 2: measuring ${task}_${size} (${target_seconds} s of wall-clock per method)"
      m="${exp}/${s}/measure"; rm -rf "${m}"
      run_stage2 "${s}" measure 0 2 --budget "${target_seconds}" "${smoke_args[@]}"
      half=$("${PY}" -c "print(${target_seconds} / 2)")
      "${PY}" -m tools.step_budget measure --conf "${budget_dir}/budget_${task}_${size}.yaml" --target_seconds "${target_seconds}" \
        --machine "2-core x86 CPU of this project's machine kind (OMP_NUM_THREADS=2)" \
        --note "bash local/study.sh --measure true (setting ${s}); seconds are those spent in training steps" \
        opd="${m}/opd" sft_more="${m}/sft_more" seqkd="${m}/seqkd" td_kd="${m}/td_kd@${half}" td_opd="${m}/td_opd@${half}"
    done
  fi
  n=${seeds}; [ "${smoke}" = "true" ] && n=1
  for s in ${settings}; do
    split_setting "${s}"
    conf="${budget_dir}/budget_${task}_${size}.yaml"
    [ -f "${conf}" ] || { echo "${conf} is missing: run with --measure true first" >&2; exit 1; }
    for ((sd = 0; sd < n; sd++)); do
      if [ -f "${exp}/${s}/seed${sd}/results.json" ]; then log "stage 2: ${s} seed ${sd}: done before"; continue; fi
      log "stage 2: ${s} seed ${sd}"
      run_stage2 "${s}" "seed${sd}" "${sd}" 3 --budget_conf "${conf}" --budget_scale "${scale}" "${smoke_args[@]}"
    done
  done
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
  log "stage 3: table and plot"
  readme=(); [ "${update_readme}" = "true" ] && readme=(--readme README.md)
  "${PY}" local/study_report.py --exp "${exp}" --settings ${settings} --smoke "${smoke}" "${readme[@]}"
fi
