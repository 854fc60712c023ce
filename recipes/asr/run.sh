#!/usr/bin/env bash
# ASR on-policy distillation (OPD), wenet-style stages.
#
#   bash run.sh                                  # stages 0-3 on the embedded default (synthetic speech)
#   bash run.sh --stage 2 --stop_stage 3         # only OPD + baselines, then scoring
#   bash run.sh --corpus librispeech --corpus_dir /data/LibriSpeech
#   bash run.sh --corpus aishell --corpus_dir /data/aishell          # scored with CER
#   bash run.sh --eval_only true --model /models/Qwen2-Audio-7B-Instruct --corpus librispeech \
#               --corpus_dir /data/LibriSpeech            # score a checkpoint on test-clean, no training
#   bash run.sh --teacher_url http://gpu-box:8000 --teacher_model Qwen2-Audio-7B-Instruct
#                                                # a teacher served elsewhere (stage 1 trains no teacher)
#   bash run.sh --update_readme true             # maintainers: also refresh README.md's results table
#
# Stage 0: data. Stage 1: tokenizer + teacher/student models, teacher SFT on its own set,
# student SFT on its small labelled set. Stage 2: OPD on the student's unlabelled audio, and
# the fair baselines at the same wall-clock (more SFT, sequence-level KD, KD then OPD).
# Stage 3: greedy decoding of the test set, WER/CER, results.json, exp/RESULTS.md (the table; the
# README's with --update_readme true), plots.
set -euo pipefail
readonly caller_pwd=$PWD
orig_args=("$@")
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=3
corpus=synthetic      # synthetic | librispeech | aishell
corpus_dir=""         # local copy of the corpus (librispeech | aishell)
data=data             # manifests
exp=exp               # models, logs, results
budget=""             # empty: the step counts of conf/budget.yaml (equal compute, the same numbers on every run); S: S seconds of wall-clock for OPD, OPD's seconds for each baseline
baselines=true        # also train the fair baselines (sft_more, seqkd, td_opd)
budget_conf=conf/budget.yaml  # the compared methods' step counts (local/study.sh gives its own)
budget_scale=1        # those counts x this (local/study.sh: shorter runs, the same ratios; --smoke: 0.05)
seeds=1               # N > 1: stages 2-3 once per training seed (seed .. seed+N-1) into exp/seed<s>/ after the shared stages 0-1; exp/results.json: mean, std, per seed
backend=torch         # torch | deepspeed (conf/ds_zero2.json; --zero 3 for conf/ds_zero3.json)
teacher_url=""        # a teacher served elsewhere (our server; vLLM): every stage that needs the teacher asks it
teacher_model=""      # --teacher_url: the model name the server expects (empty: the first it lists)
teacher_top_k=20      # --teacher_url: top-k log-probs OPD and calibrate distil on (the server's --max-logprobs)
max_new_tokens=auto   # decoding / rollout length; auto: longest labelled transcript in tokens x 1.25 + 8 (tools/gen_length.py)
eval_only=false       # true: only score --model on the test set of --corpus librispeech|aishell, no training
model=""              # --eval_only: the model folder to score (a released checkpoint or any final/)
test_part=""          # --eval_only: librispeech part to score (default test-clean; test-other ...)
prompt="Transcribe the audio."  # the user turn after the audio (the training configs' data.prompt)
smoke=false           # tiny corpus and few steps, for tests
update_readme=false   # true: also write the results table into README.md (maintainers; always in ${exp}/RESULTS.md)
seed=0
help_message="Usage: bash run.sh [--stage N] [--stop_stage N] [--corpus synthetic|librispeech|aishell] [--corpus_dir DIR] [--budget SECONDS | --budget_conf F --budget_scale X] [--seeds N] [--smoke true] [--update_readme true]
       [--teacher_url URL [--teacher_model NAME] [--teacher_top_k K]] [--max_new_tokens auto|N]
       bash run.sh --eval_only true --model DIR --corpus librispeech|aishell --corpus_dir DIR [--test_part test-other]
       [--ngpu N] [--num_nodes N --node_rank R --master_addr HOST] [--hostfile F] [--dtype bfloat16] [--zero 2|3]
       [--resume auto|never] [--skip_bad true]   (launch options: tools/launch_options.sh)"
. ../../tools/launch_options.sh   # --ngpu, --num_nodes, --hostfile, --dtype, --zero, --resume, --skip_bad
. ../../tools/parse_options.sh
recipe=asr
. ../../tools/recipe_common.sh   # PY, PYTHONPATH, log, train, fresh, readme_args, abspath ...
# paths given on the command line are relative to where run.sh was called from
corpus_dir=$(abspath "${corpus_dir}"); model=$(abspath "${model}")
[ "${data}" = data ] || data=$(abspath "${data}"); [ "${exp}" = exp ] || exp=$(abspath "${exp}")
[ "${budget_conf}" = conf/budget.yaml ] || budget_conf=$(abspath "${budget_conf}")
mkdir -p "${exp}"

lang=en; lang_flag=""
[ "${corpus}" = "aishell" ] && lang=zh

if [ "${eval_only}" = "true" ]; then
  # one checkpoint on a real test set: prep, greedy decoding, WER (CER for AISHELL)
  CORPUS_DIR_NEEDED=1 eval_model_ok
  case "${corpus}" in
    librispeech)
      part=${test_part:-test-clean}
      log "evaluation only: ${model} on LibriSpeech ${part}"
      "${PY}" local/prepare_librispeech.py --corpus_dir "${corpus_dir}" --out_dir "${data}" --parts "${part}" \
        --map "${part}=test" ;;
    aishell)
      log "evaluation only: ${model} on AISHELL-1 test (CER)"
      "${PY}" local/prepare_aishell.py --corpus_dir "${corpus_dir}" --out_dir "${data}" --splits test ;;
    *) echo "--eval_only scores a real test set: --corpus librispeech or aishell, got '${corpus}'" >&2; exit 1 ;;
  esac
  len=$(gen_length "${model}" text "${data}/test.jsonl")
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --lang ${lang} --corpus ${corpus} \
    --max_new_tokens ${len} --prompt "${prompt}" --eval_model "${model}" --eval_name "${eval_name}"
  exit 0
fi
teacher_over=(); student_over=(); synth_args=()
if [ "${smoke}" = "true" ]; then
  synth_args=(--smoke)
  teacher_over=(train.max_steps=40 train.eval_every=0 train.save_every=0)
  student_over=(train.max_steps=10 train.eval_every=0 train.save_every=0)
  budget_scale=0.05   # conf/budget.yaml's step counts x 0.05 (OPD: 19 steps)
fi
common=(train.eval_every=0)
[ "${smoke}" = "true" ] || common=()

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  t0=$(date +%s)
  log "stage 0: data (${corpus})"
  case "${corpus}" in
    synthetic)
      "${PY}" local/make_synthetic.py --out_dir "${data}" --seed ${seed} "${synth_args[@]}" ;;
    librispeech)
      [ -n "${corpus_dir}" ] || { echo "--corpus_dir is required for librispeech" >&2; exit 1; }
      "${PY}" local/prepare_librispeech.py --corpus_dir "${corpus_dir}" --out_dir "${data}/raw" \
        --parts train-clean-100 dev-clean test-clean --map train-clean-100=train dev-clean=dev test-clean=test
      "${PY}" local/split_train.py --train "${data}/raw/train.jsonl" --dev "${data}/raw/dev.jsonl" \
        --test "${data}/raw/test.jsonl" --out_dir "${data}" --seed ${seed} ;;
    aishell)
      [ -n "${corpus_dir}" ] || { echo "--corpus_dir is required for aishell" >&2; exit 1; }
      "${PY}" local/prepare_aishell.py --corpus_dir "${corpus_dir}" --out_dir "${data}/raw"
      "${PY}" local/split_train.py --train "${data}/raw/train.jsonl" --dev "${data}/raw/dev.jsonl" \
        --test "${data}/raw/test.jsonl" --out_dir "${data}" --seed ${seed} ;;
    *) echo "unknown corpus '${corpus}'" >&2; exit 1 ;;
  esac
  record_time data $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  t0=$(date +%s)
  log "stage 1: tokenizer and models"
  "${PY}" -m tools.build_models --conf conf/models.yaml --text "${data}/text_corpus.txt" --exp "${exp}" --seed ${seed}
  built_teacher=$("${PY}" -c "import json;print(json.load(open('${exp}/models.json'))['teacher']['built'])")
  built_student=$("${PY}" -c "import json;print(json.load(open('${exp}/models.json'))['student']['built'])")
  if [ -n "${teacher_url}" ]; then
    log "stage 1: the teacher is served at ${teacher_url}: no teacher SFT here"
  elif [ "${built_teacher}" = "True" ]; then
    log "stage 1: teacher SFT on its own labelled set"
    train conf/teacher_sft.yaml model.path=${exp}/teacher_init output_dir=${exp}/teacher \
      data.train=${data}/teacher_train.jsonl data.dev=${data}/dev.jsonl "${teacher_over[@]}"
  else
    rm -rf "${exp}/teacher"; mkdir -p "${exp}/teacher"; ln -sfn "$(readlink -f ${exp}/teacher_init)" "${exp}/teacher/final"
  fi
  if [ "${built_student}" = "True" ]; then
    log "stage 1: student SFT on its small labelled set"
    train conf/student_sft.yaml model.path=${exp}/student_init output_dir=${exp}/student_sft \
      data.train=${data}/student_labelled.jsonl data.dev=${data}/dev.jsonl "${student_over[@]}"
  else
    rm -rf "${exp}/student_sft"; mkdir -p "${exp}/student_sft"; ln -sfn "$(readlink -f ${exp}/student_init)" "${exp}/student_sft/final"
  fi
  record_time models $(( $(date +%s) - t0 ))
fi

opd_paths=(model.path=${exp}/student_sft/final teacher.path=${exp}/teacher/final output_dir=${exp}/opd
           data.train=${data}/unlabelled.jsonl data.dev=${data}/dev.jsonl)
kd_paths=(model.path=${exp}/student_sft/final data.train=${exp}/seqkd_data/unlabelled_teacher.jsonl data.dev=${data}/dev.jsonl)

labelled=("${data}/student_labelled.jsonl" "${data}/teacher_train.jsonl")
# the teacher of every stage that needs one: the local folder, or the server at --teacher_url
# (top-k log-probs only: OPD distils on the teacher's top-k, calibrate measures the KL there)
teacher_decode=(--model "${exp}/teacher/final"); teacher_score=()
if [ -n "${teacher_url}" ]; then
  opd_paths+=(teacher.kind=remote teacher.url=${teacher_url} teacher.top_k_cap=${teacher_top_k}
              opd.support=teacher_topk opd.top_k=${teacher_top_k})
  [ -n "${teacher_model}" ] && opd_paths+=(teacher.model=${teacher_model})
  teacher_decode=(--url "${teacher_url}"); [ -n "${teacher_model}" ] && teacher_decode+=(--served_model "${teacher_model}")
  teacher_score=(--teacher_url "${teacher_url}"); [ -n "${teacher_model}" ] && teacher_score+=(--teacher_model "${teacher_model}")
fi
# --seeds N: stages 2-3 again per seed from the warm-up above, combined into exp/results.json
rc=0; run_seeds 2 wer teacher teacher_init student_init student_sft models.json || rc=$?
case ${rc} in 0) exit 0 ;; 1) ;; *) exit ${rc} ;; esac
if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  t0=$(date +%s)
  gen_len=$(gen_length "${exp}/student_sft/final" text "${labelled[@]}")
  log "stage 2: generation length ${gen_len} tokens (${exp}/gen_length.json)"
  opd_paths+=(rollout.max_new_tokens=${gen_len})
  log "stage 2: calibrate (student vs teacher KL on dev, before OPD)"
  train conf/opd.yaml "${opd_paths[@]}" method=calibrate output_dir=${exp}/calibrate_before
  budget_over opd "${budget}"
  log "stage 2: on-policy distillation (${b})"
  train conf/opd.yaml "${opd_paths[@]}" "${bo[@]}" "${common[@]}"
  record_time opd $(( $(date +%s) - t0 ))
  train conf/opd.yaml "${opd_paths[@]}" method=calibrate model.path=${exp}/opd/final output_dir=${exp}/calibrate_after
  # with --budget S the baselines get the wall-clock OPD actually trained for (td_opd: half each)
  spent=$(summary_seconds "${exp}/opd/train_summary.json")
  half=$("${PY}" -c "print(${spent} / 2)")
  if [ "${baselines}" = "true" ]; then
    t1=$(date +%s)
    budget_over sft_more "${spent}"
    log "baseline sft_more: more SFT on the labelled set (${b})"
    train conf/sft_more.yaml model.path=${exp}/student_sft/final output_dir=${exp}/sft_more data.train=${data}/student_labelled.jsonl \
      data.dev=${data}/dev.jsonl "${bo[@]}" "${common[@]}"
    record_time sft_more $(( $(date +%s) - t1 ))
    t1=$(date +%s)
    log "baseline seqkd: the teacher transcribes the unlabelled audio"
    "${PY}" -m core.bin.decode "${teacher_decode[@]}" --manifest ${data}/unlabelled.jsonl \
      --out ${exp}/seqkd_data/unlabelled_teacher.jsonl --as_manifest --prompt "${prompt}" --max_new_tokens ${gen_len}
    record_time teacher_transcribe $(( $(date +%s) - t1 ))
    t1=$(date +%s)
    budget_over seqkd "${spent}"
    log "baseline seqkd: SFT on the teacher's transcripts (${b})"
    train conf/seqkd.yaml "${kd_paths[@]}" output_dir=${exp}/seqkd "${bo[@]}" "${common[@]}"
    record_time seqkd $(( $(date +%s) - t1 ))
    t1=$(date +%s)
    budget_over td_kd "${half}"
    log "td_opd: sequence-level KD (${b}), then OPD"
    train conf/seqkd.yaml "${kd_paths[@]}" "${bo[@]}" output_dir=${exp}/td_kd "${common[@]}"
    budget_over td_opd "${half}"
    log "td_opd: OPD from the KD model (${b})"
    train conf/opd.yaml "${opd_paths[@]}" model.path=${exp}/td_kd/final "${bo[@]}" output_dir=${exp}/td_opd \
      "${common[@]}"
    record_time td_opd $(( $(date +%s) - t1 ))
  fi
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
  t0=$(date +%s)
  gen_len=$(gen_length "${exp}/student_sft/final" text "${labelled[@]}")
  log "stage 3: decode the test set and score (at most ${gen_len} new tokens)"
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --lang ${lang} "${readme_args[@]}" \
    --corpus ${corpus} --budget "${budget}" --budget_conf "${budget_conf}" --budget_scale "${budget_scale}" --smoke ${smoke} --max_new_tokens ${gen_len} --prompt "${prompt}" \
    "${teacher_score[@]}"
  record_time decode_score $(( $(date +%s) - t0 ))
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --lang ${lang} --only_times
fi
