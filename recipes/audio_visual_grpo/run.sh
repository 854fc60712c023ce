#!/usr/bin/env bash
# Audio-visual question answering: GRPO of a Qwen2.5-Omni thinker on video + audio multiple-choice
# questions, wenet-style stages.
#
#   bash run.sh                                   # stages 0-4 on the embedded default (synthetic videos)
#   bash run.sh --stage 2 --stop_stage 2          # only GRPO
#   bash run.sh --corpus real --train_json /data/IntentTrain.json --train_video_root /data/intent \
#               --dailyomni_dir /data/Daily-Omni          # real data: IntentTrain for training,
#   bash run.sh --corpus real ... --intentbench_json /data/IntentBench.json --intentbench_video_root /data/ib
#   bash run.sh --eval_only true --model /models/Qwen2.5-Omni-7B --dailyomni_dir /data/Daily-Omni
#                                                 # score a checkpoint, no training data
#   bash run.sh --update_readme true              # maintainers: also refresh README.md's results table
#
# Stage 0: data. Stage 1: tokenizer + tiny Omni thinker (or a real one), SFT warm-up in two passes
# (describe clips + labelled questions, then the questions alone). Stage 2: GRPO on clips the
# warm-up never saw (rewards format 0.1 + exact_alnum 0.9). Stage 3: the fair baseline, plain SFT
# on the answers at GRPO's compute (conf/budget.yaml's step counts). Stage 4: greedy decoding of the test set, accuracy overall,
# by question type and by duration (Daily-Omni rule; IntentBench rules by problem type),
# results.json, exp/RESULTS.md (the table; the README's with --update_readme true), reward curves.
set -euo pipefail
readonly caller_pwd=$PWD
orig_args=("$@")
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=4
corpus=synthetic          # synthetic | real
train_json=""             # real: training questions (IntentTrain layout)
train_video_root=""       # real: folder the training records' video paths are relative to
dailyomni_dir=""          # real: a local Daily-Omni (qa.json + Videos/), scored as a test set
intentbench_json=""       # real: IntentBench records, scored as a test set
intentbench_video_root="" # real: folder IntentBench's video paths are relative to
eval_only=false           # true: only score --model on --dailyomni_dir and/or --intentbench_json, no training
model=""                  # --eval_only: the model folder to score (a released checkpoint or any final/)
prompt_style=""           # ours (think/answer tags) | plain (Daily-Omni: the letter alone); default ours, plain with --eval_only
max_new_tokens=40         # decoding and rollout length of stages 2-4; auto: longest training target in tokens x 1.25 + 8
data=data                 # manifests
exp=exp                   # models, logs, results
budget=""                 # empty: the step counts of conf/budget.yaml (equal compute, the same numbers on
                          # every run); S: S seconds of wall-clock for GRPO, GRPO's seconds for the baseline
seeds=1                   # N > 1: stages 2-4 once per seed (seed, seed+1 ...) from the shared warm-up, combined
baselines=true            # also train the fair baseline (sft_answers)
num_frames=8              # frames per video (uniformly sampled)
missing_audio=error       # error | silence: a video without a sound track
backend=torch             # torch | deepspeed (conf/ds_zero2.json; --zero 3 for conf/ds_zero3.json)
smoke=false               # tiny corpus and few steps, for tests
update_readme=false       # true: also write the results table into README.md (maintainers; always in ${exp}/RESULTS.md)
seed=0
help_message="Usage: bash run.sh [--stage N] [--stop_stage N] [--corpus synthetic|real] [--train_json F --train_video_root D]
       [--dailyomni_dir D] [--intentbench_json F --intentbench_video_root D] [--budget S] [--seeds N] [--num_frames N]
       [--missing_audio error|silence] [--backend torch|deepspeed] [--data DIR] [--exp DIR] [--smoke true] [--update_readme true]
       [--max_new_tokens auto|N] [--ngpu N] [--num_nodes N --node_rank R --master_addr HOST] [--hostfile F] [--dtype bfloat16] [--zero 2|3]
       [--resume auto|never] [--skip_bad true]   (launch options: tools/launch_options.sh)
       bash run.sh --eval_only true --model DIR [--dailyomni_dir D] [--intentbench_json F --intentbench_video_root D]"
. ../../tools/launch_options.sh   # --ngpu, --num_nodes, --hostfile, --dtype, --zero, --resume, --skip_bad
. ../../tools/parse_options.sh
recipe=audio_visual_grpo
. ../../tools/recipe_common.sh   # PY, PYTHONPATH, log, train, fresh, readme_args, abspath ...
train_json=$(abspath "${train_json}"); train_video_root=$(abspath "${train_video_root}")
dailyomni_dir=$(abspath "${dailyomni_dir}"); intentbench_json=$(abspath "${intentbench_json}")
intentbench_video_root=$(abspath "${intentbench_video_root}"); model=$(abspath "${model}")
[ "${data}" = data ] || data=$(abspath "${data}"); [ "${exp}" = exp ] || exp=$(abspath "${exp}")
mkdir -p "${exp}"
# every training run reads the videos the same way
train_extra=(data.num_frames=${num_frames} data.missing_audio=${missing_audio})

[ -n "${prompt_style}" ] || { prompt_style=ours; [ "${eval_only}" = "true" ] && prompt_style=plain; }
prepare_tests() {  # the test sets given (Daily-Omni, IntentBench) as manifests; sets tests=(...)
  tests=()
  [ -n "${dailyomni_dir}" ] || [ -n "${intentbench_json}" ] || {
    echo "a test set is needed: --dailyomni_dir and/or --intentbench_json" >&2; exit 1; }
  if [ -n "${dailyomni_dir}" ]; then
    "${PY}" local/prepare_dailyomni.py --corpus_dir "${dailyomni_dir}" --out "${data}/test_dailyomni.jsonl" "${prep_args[@]}"
    tests+=("${data}/test_dailyomni.jsonl")
  fi
  if [ -n "${intentbench_json}" ]; then
    [ -n "${intentbench_video_root}" ] || { echo "--intentbench_video_root is required with --intentbench_json" >&2; exit 1; }
    "${PY}" local/prepare_intentbench.py --json "${intentbench_json}" --video_root "${intentbench_video_root}" \
      --out "${data}/test_intentbench.jsonl" "${prep_args[@]}"
    tests+=("${data}/test_intentbench.jsonl")
  fi
}

if [ "${eval_only}" = "true" ]; then
  # one checkpoint on real test sets: prep, prompts, greedy decoding, our and the official scores
  eval_model_ok
  log "evaluation only: ${model} (${prompt_style} prompts, ${num_frames} frames)"
  prepare_tests
  cat "${tests[@]}" > "${data}/test_raw.jsonl"
  "${PY}" local/prompt.py "${data}/test_raw.jsonl" "${data}/test.jsonl" --style "${prompt_style}"
  gen_len=$(gen_length "${model}" target "${data}/test.jsonl")
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --corpus real --num_frames ${num_frames} \
    --missing_audio ${missing_audio} --max_new_tokens ${gen_len} --eval_model "${model}" \
    --eval_name "${eval_name}"
  exit 0
fi

synth_args=(); sft_over=(); qa_over=(); quick=()
if [ "${smoke}" = "true" ]; then
  synth_args=(--smoke)
  sft_over=(train.max_steps=150 train.batch_size=8 train.save_every=0)
  qa_over=(train.max_steps=40 train.batch_size=8)
  quick=(train.eval_every=0 data.dev_max_samples=4)
fi
grpo_smoke=()
if [ "${smoke}" = "true" ]; then
  grpo_smoke=(train.batch_size=4 rollout.n=4)
  budget_scale=0.025  # conf/budget.yaml's step counts x 0.025
  [ -n "${budget}" ] && budget=5
fi

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  t0=$(date +%s)
  log "stage 0: data (${corpus})"
  case "${corpus}" in
    synthetic)
      "${PY}" local/make_synthetic.py --out_dir "${data}" --seed ${seed} "${synth_args[@]}" ;;
    real)
      [ -n "${train_json}" ] && [ -n "${train_video_root}" ] || {
        echo "--train_json and --train_video_root (IntentTrain layout) are required for corpus real" >&2; exit 1; }
      [ -n "${dailyomni_dir}" ] || [ -n "${intentbench_json}" ] || {
        echo "corpus real needs a test set: --dailyomni_dir and/or --intentbench_json" >&2; exit 1; }
      mkdir -p "${data}"; rm -f "${data}/stats.json"
      "${PY}" local/prepare_intentbench.py --json "${train_json}" --video_root "${train_video_root}" --out "${data}/train_all.jsonl" "${prep_args[@]}"
      prepare_tests
      # test: every test set given (scored by its own rule); dev: the last min(200, n/5) training
      # questions; the warm-up's labelled questions (sft = base_sft: no describe set for real
      # data): the first min(400, half) of the rest; GRPO's (train): the others, unseen by the warm-up
      "${PY}" - "${data}" "${train_json}" "${tests[@]}" <<'PY'
import json, sys
data, src, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [json.loads(line) for line in open(f"{data}/train_all.jsonl", encoding="utf-8") if line.strip()]
if any(not r.get("answer") for r in rows):
    sys.exit(f"{src}: training questions need answers ({sum(not r.get('answer') for r in rows)} have none)")
n_dev = min(200, len(rows) // 5)
if n_dev < 1 or len(rows) - n_dev < 1:
    sys.exit(f"{src}: {len(rows)} questions are too few to hold out a dev set")
rest = rows[:-n_dev]
n_sft = min(400, len(rest) // 2)
if n_sft < 1:
    sys.exit(f"{src}: {len(rows)} questions are too few for a warm-up set, a GRPO set and a dev set")
splits = {"train": rest[n_sft:], "dev": rows[-n_dev:], "base_sft": rest[:n_sft], "sft": rest[:n_sft]}
test = [json.loads(line) for t in tests for line in open(t, encoding="utf-8") if line.strip()]
for name, part in {**splits, "test": test}.items():
    with open(f"{data}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
with open(f"{data}/text_corpus.txt", "w", encoding="utf-8") as f:
    f.writelines(f"{r['prompt']}\n{r.get('target', '')}\n" for r in rows)
PY
      ;;
    *) echo "unknown corpus '${corpus}'" >&2; exit 1 ;;
  esac
  record_time data $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  t0=$(date +%s)
  log "stage 1: tokenizer and the Omni thinker"
  "${PY}" local/build_model.py --conf conf/models.yaml --text "${data}/text_corpus.txt" --exp "${exp}" --seed ${seed}
  log "stage 1: SFT warm-up, first pass: describe clips + labelled questions"
  train conf/sft.yaml model.path=${exp}/init output_dir=${exp}/sft data.train=${data}/base_sft.jsonl \
    data.dev=${data}/dev.jsonl "${sft_over[@]}" "${quick[@]}"
  log "stage 1: SFT warm-up, second pass: the labelled questions alone"
  train conf/sft_qa.yaml model.path=${exp}/sft/final output_dir=${exp}/sft_qa data.train=${data}/sft.jsonl \
    data.dev=${data}/dev.jsonl "${qa_over[@]}" "${quick[@]}"
  record_time models $(( $(date +%s) - t0 ))
fi

paths=(data.train=${data}/train.jsonl data.dev=${data}/dev.jsonl)
# the decoding / rollout length of stages 2-4 (set by the first of them that runs): --max_new_tokens,
# or auto from the training targets in the warmed-up model's tokens
gen_args=("${exp}/sft_qa/final" target "${data}/train.jsonl")

# --seeds N: stages 2-4 again per seed from the warm-up above, combined into exp/results.json
rc=0; run_seeds 2 acc init sft sft_qa model.json || rc=$?
case ${rc} in 0) exit 0 ;; 1) ;; *) exit ${rc} ;; esac

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over grpo "${budget}"
  log "stage 2: GRPO (${b})"
  train conf/grpo.yaml model.path=${exp}/sft_qa/final output_dir=${exp}/grpo "${paths[@]}" \
    "${bo[@]}" "${quick[@]}" "${grpo_smoke[@]}"
  record_time grpo $(( $(date +%s) - t0 ))
fi

# with --budget S the baseline gets the wall-clock GRPO actually trained for
spent=${budget}
[ -n "${budget}" ] && [ -f "${exp}/grpo/train_summary.json" ] && spent=$(summary_seconds "${exp}/grpo/train_summary.json")

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ] && [ "${baselines}" = "true" ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over sft_answers "${spent}"
  log "stage 3: baseline sft_answers, SFT on the answers (${b})"
  train conf/sft_answers.yaml model.path=${exp}/sft_qa/final output_dir=${exp}/sft_answers "${paths[@]}" \
    "${bo[@]}" "${quick[@]}"
  record_time sft_answers $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  log "stage 4: decode the test set and score"
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" "${readme_args[@]}" --corpus ${corpus} \
    --num_frames ${num_frames} --missing_audio ${missing_audio} --smoke ${smoke} --max_new_tokens ${gen_len} --budget "${budget}"
  record_time decode_score $(( $(date +%s) - t0 ))
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --only_times
fi
