#!/usr/bin/env bash
# Audio question answering (MMAU-style multiple choice): GRPO, ReST and on-policy distillation,
# wenet-style stages.
#
#   bash run.sh                                   # stages 0-6 on the embedded default (synthetic)
#   bash run.sh --stage 2 --stop_stage 2          # only GRPO
#   bash run.sh --corpus mmau --train_json /data/avqa_mmau_format.json \
#               --test_json /data/mmau/mmau-test-mini.json   # real data (MMAU layout)
#   bash run.sh --corpus mmsu --train_json ... --mmsu_dir /data/MMSU    # MMSU test, its own rule
#   bash run.sh --lora true                       # every training stage through peft LoRA
#   bash run.sh --teacher_url http://gpu-box:8000 --teacher_model Qwen2-Audio-7B-Instruct
#                                                 # OPD from a teacher served elsewhere (ours; vLLM)
#   bash run.sh --eval_only true --model /models/Qwen2-Audio-7B-Instruct --corpus mmau \
#               --test_json /data/mmau/mmau-test-mini.json   # score a checkpoint, no training data
#   bash run.sh --update_readme true              # maintainers: also refresh README.md's results table
#
# Stage 0: data. Stage 1: tokenizer + models; SFT warm-up of the base policy and of the bigger
# teacher. Stage 2: GRPO of the base policy and of the teacher. Stage 3: ReST from the base.
# Stage 4: OPD of the base from the GRPO-trained teacher. Stage 5: the fair baseline, plain SFT
# on the answers; every method of stages 2-5 at equal compute (conf/budget.yaml). Stage 6: greedy decoding of the test set, accuracy by
# category / task / difficulty, MMAU-format predictions, results.json, exp/RESULTS.md (the table;
# the README's with --update_readme true), plots.
set -euo pipefail
readonly caller_pwd=$PWD
orig_args=("$@")
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=6
corpus=synthetic      # synthetic | mmau | mmsu
train_json=""         # real training questions in MMAU's JSON layout (mmau | mmsu)
test_json=""          # MMAU test JSON (corpus mmau)
mmsu_dir=""           # local copy of the MMSU dataset (corpus mmsu)
audio_dir=""          # folder MMAU's audio_id paths are relative to (default: the JSON's folder)
eval_only=false       # true: only score --model on the test set (--corpus mmau|mmsu), no training
model=""              # --eval_only: the model folder to score (a released checkpoint or any final/)
prompt_style=""       # ours (think/answer tags, what the recipe trains) | plain (the answer alone); default: ours, plain with --eval_only
max_new_tokens=32     # decoding and rollout length of every stage; auto: longest training target in tokens x 1.25 + 8
teacher_url=""        # a teacher served elsewhere (our server; vLLM): OPD distils from it, its row is decoded through it
teacher_model=""      # --teacher_url: the model name the server expects (empty: the first it lists)
teacher_top_k=20      # --teacher_url: top-k log-probs OPD distils on (the server's --max-logprobs)
data=data             # manifests
exp=exp               # models, logs, results
budget=""             # empty: the step counts of conf/budget.yaml (GRPO, OPD, SFT baseline: steps; ReST: rounds;
                      # equal compute, the same numbers on every run); S: S seconds of wall-clock for each
teacher_budget=200    # with --budget: seconds of GRPO for the teacher (else conf/budget.yaml's teacher_grpo)
seeds=1               # N > 1: stages 2-6 once per seed (seed, seed+1 ...) from the shared warm-up, combined
baselines=true        # also train the fair baseline (sft_answers)
lora=false            # true: LoRA (peft) adapters for every training stage, merged at export
backend=torch         # torch | deepspeed (conf/ds_zero2.json; --zero 3 for conf/ds_zero3.json)
smoke=false           # tiny corpus and few steps, for tests
update_readme=false   # true: also write the results table into README.md (maintainers; always in ${exp}/RESULTS.md)
seed=0
help_message="Usage: bash run.sh [--stage N] [--stop_stage N] [--corpus synthetic|mmau|mmsu] [--train_json F] [--test_json F] [--mmsu_dir D] [--budget S] [--seeds N] [--lora true] [--backend torch|deepspeed] [--smoke true] [--update_readme true]
       [--teacher_url URL [--teacher_model NAME] [--teacher_top_k K]] [--max_new_tokens auto|N]
       bash run.sh --eval_only true --model DIR --corpus mmau --test_json F [--audio_dir D]   (or --corpus mmsu --mmsu_dir D)
       [--ngpu N] [--num_nodes N --node_rank R --master_addr HOST] [--hostfile F] [--dtype bfloat16] [--zero 2|3]
       [--resume auto|never] [--skip_bad true]   (launch options: tools/launch_options.sh)"
. ../../tools/launch_options.sh   # --ngpu, --num_nodes, --hostfile, --dtype, --zero, --resume, --skip_bad
. ../../tools/parse_options.sh
recipe=audio_qa
. ../../tools/recipe_common.sh   # PY, PYTHONPATH, log, train, fresh, readme_args, abspath ...
# paths given on the command line are relative to where run.sh was called from
train_json=$(abspath "${train_json}"); test_json=$(abspath "${test_json}"); mmsu_dir=$(abspath "${mmsu_dir}")
audio_dir=$(abspath "${audio_dir}"); model=$(abspath "${model}")
[ "${data}" = data ] || data=$(abspath "${data}"); [ "${exp}" = exp ] || exp=$(abspath "${exp}")
mkdir -p "${exp}"

synth_args=(); base_over=(); teacher_over=()
if [ "${smoke}" = "true" ]; then
  synth_args=(--smoke)
  base_over=(train.max_steps=15); teacher_over=(train.max_steps=15)
  budget_scale=0.01   # conf/budget.yaml's counts x 0.01 (GRPO 4 steps; ReST: 1 round)
  [ -n "${budget}" ] && { budget=5; teacher_budget=5; }
fi
quick=(); [ "${smoke}" = "true" ] && quick=(train.eval_every=0 data.dev_max_samples=8)
rule=mmau; letters=(); [ "${corpus}" = "mmsu" ] && { rule=mmsu; letters=(--letters); }   # MMSU's scorer reads a letter
[ -n "${prompt_style}" ] || { prompt_style=ours; [ "${eval_only}" = "true" ] && prompt_style=plain; }
mmau_audio=(); [ -n "${audio_dir}" ] && mmau_audio=(--audio_dir "${audio_dir}")

if [ "${eval_only}" = "true" ]; then
  # one checkpoint on a real test set: prep, prompts, greedy decoding, our and the official score
  eval_model_ok
  log "evaluation only: ${model} on ${corpus} (${prompt_style} prompts, ${rule} rule)"
  case "${corpus}" in
    mmau)
      [ -n "${test_json}" ] || { echo "--eval_only --corpus mmau needs --test_json" >&2; exit 1; }
      "${PY}" local/prepare_mmau.py --json "${test_json}" --out "${data}/test_raw.jsonl" "${mmau_audio[@]}" "${prep_args[@]}" ;;
    mmsu)
      [ -n "${mmsu_dir}" ] || { echo "--eval_only --corpus mmsu needs --mmsu_dir" >&2; exit 1; }
      "${PY}" local/prepare_mmsu.py --data "${mmsu_dir}" --out "${data}/test_raw.jsonl" "${prep_args[@]}" ;;
    *) echo "--eval_only scores a real test set: --corpus mmau or mmsu, got '${corpus}'" >&2; exit 1 ;;
  esac
  "${PY}" local/prompt.py "${data}/test_raw.jsonl" "${data}/test.jsonl" "${letters[@]}" --style "${prompt_style}"
  gen_len=$(gen_length "${model}" target "${data}/test.jsonl")
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --rule ${rule} --corpus ${corpus} \
    --max_new_tokens ${gen_len} --eval_model "${model}" --eval_name "${eval_name}"
  exit 0
fi

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  t0=$(date +%s)
  log "stage 0: data (${corpus})"
  case "${corpus}" in
    synthetic)
      "${PY}" local/make_synthetic.py --out_dir "${data}" --seed ${seed} "${synth_args[@]}" ;;
    mmau|mmsu)
      [ -n "${train_json}" ] || { echo "--train_json (training questions in MMAU's JSON layout) is required for ${corpus}" >&2; exit 1; }
      mkdir -p "${data}"; rm -f "${data}/stats.json"
      "${PY}" local/prepare_mmau.py --json "${train_json}" --out "${data}/train_all_raw.jsonl" "${prep_args[@]}"
      if [ "${corpus}" = "mmau" ]; then
        [ -n "${test_json}" ] || { echo "--test_json is required for corpus mmau" >&2; exit 1; }
        "${PY}" local/prepare_mmau.py --json "${test_json}" --out "${data}/test_raw.jsonl" "${mmau_audio[@]}" "${prep_args[@]}"
      else
        [ -n "${mmsu_dir}" ] || { echo "--mmsu_dir is required for corpus mmsu" >&2; exit 1; }
        "${PY}" local/prepare_mmsu.py --data "${mmsu_dir}" --out "${data}/test_raw.jsonl" "${prep_args[@]}"
      fi
      "${PY}" local/prompt.py "${data}/train_all_raw.jsonl" "${data}/train_all.jsonl" "${letters[@]}" --style "${prompt_style}"
      "${PY}" local/prompt.py "${data}/test_raw.jsonl" "${data}/test.jsonl" "${letters[@]}" --style "${prompt_style}"
      # dev: the last min(200, n/5) training questions; the base's labelled warm-up: the first 800
      "${PY}" - "${data}" "${train_json}" <<'PY'
import json, sys
data, src = sys.argv[1], sys.argv[2]
rows = [json.loads(line) for line in open(f"{data}/train_all.jsonl", encoding="utf-8") if line.strip()]
if any(not r.get("answer") for r in rows):
    sys.exit(f"{src}: training questions need answers ({sum(not r.get('answer') for r in rows)} have none)")
n_dev = min(200, len(rows) // 5)
if n_dev < 1 or len(rows) - n_dev < 1:
    sys.exit(f"{src}: {len(rows)} questions are too few to hold out a dev set")
splits = {"train": rows[:-n_dev], "dev": rows[-n_dev:], "base_sft": rows[:-n_dev][:800]}
for name, part in splits.items():
    with open(f"{data}/{name}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
with open(f"{data}/text_corpus.txt", "w", encoding="utf-8") as f:
    f.writelines(f"{r['prompt']}\n{r['target']}\n" for r in rows)
PY
      ;;
    *) echo "unknown corpus '${corpus}'" >&2; exit 1 ;;
  esac
  record_time data $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  t0=$(date +%s)
  log "stage 1: tokenizer and models"
  "${PY}" -m tools.build_models --conf conf/models.yaml --text "${data}/text_corpus.txt" --exp "${exp}" --seed ${seed}
  warm_len=$(gen_length "${exp}/student_init" target "${data}/base_sft.jsonl")
  gen=(rollout.max_new_tokens=${warm_len})
  log "stage 1: SFT warm-up of the base policy"
  train conf/base_sft.yaml model.path=${exp}/student_init output_dir=${exp}/base_sft \
    data.train=${data}/base_sft.jsonl data.dev=${data}/dev.jsonl "${base_over[@]}" "${quick[@]}" "${gen[@]}"
  if [ -n "${teacher_url}" ]; then
    log "stage 1: the teacher is served at ${teacher_url}: no teacher SFT here"
  else
    log "stage 1: SFT warm-up of the teacher"
    train conf/teacher_sft.yaml model.path=${exp}/teacher_init output_dir=${exp}/teacher_sft \
      data.train=${data}/base_sft.jsonl data.dev=${data}/dev.jsonl "${teacher_over[@]}" "${quick[@]}" "${gen[@]}"
  fi
  record_time models $(( $(date +%s) - t0 ))
fi

paths=(data.train=${data}/train.jsonl data.dev=${data}/dev.jsonl)
# the decoding / rollout length of stages 2-6 (set by the first of them that runs): --max_new_tokens,
# or auto from the training targets in the base policy's tokens
gen_args=("${exp}/base_sft/final" target "${data}/train.jsonl")
# OPD's teacher: the GRPO-trained teacher here, or the server at --teacher_url (its top-k log-probs)
opd_teacher=(teacher.path=${exp}/teacher_grpo/final); teacher_score=()
if [ -n "${teacher_url}" ]; then
  opd_teacher=(teacher.kind=remote teacher.url=${teacher_url} teacher.top_k_cap=${teacher_top_k}
               opd.support=teacher_topk opd.top_k=${teacher_top_k})
  [ -n "${teacher_model}" ] && opd_teacher+=(teacher.model=${teacher_model})
  teacher_score=(--teacher_url "${teacher_url}"); [ -n "${teacher_model}" ] && teacher_score+=(--teacher_model "${teacher_model}")
fi

# --seeds N: stages 2-6 again per seed from the warm-up above, combined into exp/results.json
rc=0; run_seeds 2 acc base_sft teacher_sft student_init teacher_init models.json || rc=$?
case ${rc} in 0) exit 0 ;; 1) ;; *) exit ${rc} ;; esac

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over grpo "${budget}"
  log "stage 2: GRPO of the base policy (${b})"
  train conf/grpo.yaml model.path=${exp}/base_sft/final output_dir=${exp}/grpo "${paths[@]}" "${bo[@]}" "${quick[@]}"
  record_time grpo $(( $(date +%s) - t0 ))
  if [ -z "${teacher_url}" ]; then
    t0=$(date +%s)
    budget_over teacher_grpo "${teacher_budget}"
    log "stage 2: GRPO of the teacher (${b})"
    train conf/grpo.yaml model.path=${exp}/teacher_sft/final output_dir=${exp}/teacher_grpo "${paths[@]}" \
      "${bo[@]}" "${quick[@]}"
    record_time teacher_grpo $(( $(date +%s) - t0 ))
  fi
fi

# with --budget S the other methods get the wall-clock GRPO actually trained for
spent=${budget}
[ -n "${budget}" ] && [ -f "${exp}/grpo/train_summary.json" ] && spent=$(summary_seconds "${exp}/grpo/train_summary.json")

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over rest "${spent}"
  log "stage 3: ReST from the base (${b}; sampling and training)"
  train conf/rest.yaml model.path=${exp}/base_sft/final output_dir=${exp}/rest "${paths[@]}" "${bo[@]}" "${quick[@]}"
  record_time rest $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 4 ] && [ ${stop_stage} -ge 4 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over opd "${spent}"
  log "stage 4: OPD of the base from ${teacher_url:-the GRPO-trained teacher} (${b})"
  train conf/opd.yaml model.path=${exp}/base_sft/final "${opd_teacher[@]}" \
    output_dir=${exp}/opd "${paths[@]}" "${bo[@]}" "${quick[@]}"
  record_time opd $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 5 ] && [ ${stop_stage} -ge 5 ] && [ "${baselines}" = "true" ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  budget_over sft_answers "${spent}"
  log "stage 5: baseline, plain SFT on the answers (${b})"
  train conf/sft_answers.yaml model.path=${exp}/base_sft/final output_dir=${exp}/sft_answers "${paths[@]}" \
    "${bo[@]}" "${quick[@]}"
  record_time sft_answers $(( $(date +%s) - t0 ))
fi

if [ ${stage} -le 6 ] && [ ${stop_stage} -ge 6 ]; then
  set_gen_len "${gen_args[@]}"
  t0=$(date +%s)
  log "stage 6: decode the test set and score (${rule} rule)"
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --rule ${rule} "${readme_args[@]}" \
    --corpus ${corpus} --budget "${spent}" --smoke ${smoke} --max_new_tokens ${gen_len} "${teacher_score[@]}"
  record_time decode_score $(( $(date +%s) - t0 ))
fi
