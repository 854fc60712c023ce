#!/usr/bin/env bash
# Audio captioning: on-policy distillation (OPD) of a student captioner from a teacher, in-process
# or served over HTTP, wenet-style stages.
#
#   bash run.sh                                  # stages 0-3 on the embedded default (synthetic clips)
#   bash run.sh --stage 2 --stop_stage 3         # only OPD + baselines, then scoring
#   bash run.sh --teacher remote                 # the same OPD against our teacher server, started here
#   bash run.sh --teacher_server vllm --models_conf my_models.yaml
#                                                # ... against a vLLM server started here (head size >= 32, 30 s chunk)
#   bash run.sh --teacher_url http://gpu-box:8000 --teacher_model Qwen/Qwen2-Audio-7B-Instruct
#                                                # a teacher already served elsewhere (ours or vLLM)
#   bash run.sh --corpus audiocaps --corpus_dir /data/audiocaps --audio_dir /data/audiocaps/audio
#   bash run.sh --corpus clotho --corpus_dir /data/clotho
#   bash run.sh --eval_only true --model /models/my-captioner --corpus clotho --corpus_dir /data/clotho
#                                                # score a checkpoint on the test split, no training
#   bash run.sh --update_readme true             # maintainers: also refresh README.md's results table
#
# Stage 0: data. Stage 1: tokenizer + teacher/student captioners; teacher SFT on its own captioned
# clips, student SFT on its small captioned set; the cascade's text model (stage 3's reader).
# Stage 2: the student distils on clips without captions (--teacher remote: from a teacher server
# that run.sh starts and always stops, ours or vLLM's); the fair baselines at equal compute,
# conf/budget.yaml's step counts (more SFT on the student's captions; SFT on the teacher's greedy captions).
# Stage 3: greedy captions of the test clips, BLEU / ROUGE-L / CIDEr, the cascaded evaluation
# (a text model answers multiple-choice questions about each clip from its caption),
# results.json, exp/RESULTS.md (the table; the README's with --update_readme true).
set -euo pipefail
readonly caller_pwd=$PWD
orig_args=("$@")
cd "$(dirname "${BASH_SOURCE[0]}")"

stage=0
stop_stage=3
corpus=synthetic      # synthetic | audiocaps | clotho
corpus_dir=""         # local copy of the corpus (audiocaps | clotho)
audio_dir=""          # audiocaps: folder of the clips (default: <corpus_dir>/audio)
data=data             # manifests
exp=exp               # models, logs, results
teacher=local         # local: in-process teacher | remote: OPD talks to a teacher server over HTTP
                      # (local is the default: an OPD step costs 0.47 s against 1.07 s through the server
                      # on 2 cores, conf/budget.yaml; the two give the same kind of training)
teacher_server=ours   # --teacher remote: the server run.sh starts: ours (core.bin.serve_teacher) | vllm (vLLM's
                      # OpenAI-compatible server, core.vllm_engine.server_command; implies --teacher remote)
teacher_url=""        # an already running teacher server (ours or vLLM; implies --teacher remote); empty with
                      # --teacher remote: run.sh starts one (--teacher_server)
teacher_model=""      # model name the remote server expects (vLLM: its served model name)
port=0                # port of the server run.sh starts (0: a free one)
vllm_max_logprobs=20  # --teacher_server vllm: the server's --max-logprobs (OPD's teacher.top_k_cap)
server_batch=1        # requests one forward of that server takes: 1 scores each alone, so the teacher's
                      # log-probs (and the run's numbers) do not depend on how requests met; 16: faster
budget=""             # empty: the step counts of conf/budget.yaml (equal compute, the same numbers on every
                      # run); S: S seconds of wall-clock for OPD, OPD's seconds for each baseline
seeds=1               # N > 1: stages 2-3 once per seed (seed, seed+1 ...) from the shared warm-up, combined
baselines=true        # also train the fair baselines (sft_more, seqkd)
models_conf=conf/models.yaml  # stage 1's model sizes, or existing checkpoints (teacher_dir / student_dir)
qa_model=""           # cascade: a local HF text LLM directory; empty: train the tiny one
backend=torch         # torch | deepspeed (conf/ds_zero2.json; --zero 3 for conf/ds_zero3.json)
smoke=false           # tiny corpus and few steps, for tests
update_readme=false   # true: also write the results table into README.md (maintainers; always in ${exp}/RESULTS.md)
eval_only=false       # true: only score --model on the test split of --corpus audiocaps|clotho, no training
model=""              # --eval_only: the model folder to score (a released checkpoint or any final/)
prompt="Describe the audio."  # --eval_only: the user turn after the audio
max_new_tokens=24     # caption length of every stage (OPD rollouts, the KD captions, scoring); auto: longest reference caption in tokens x 1.25 + 8
seed=0
help_message="Usage: bash run.sh [--stage N] [--stop_stage N] [--corpus synthetic|audiocaps|clotho] [--corpus_dir DIR] [--audio_dir DIR]
       bash run.sh --eval_only true --model DIR --corpus audiocaps|clotho --corpus_dir DIR [--audio_dir DIR] [--prompt TEXT]
       [--teacher remote|local] [--teacher_server ours|vllm [--vllm_max_logprobs K]] [--models_conf FILE]
       [--teacher_url URL] [--teacher_model NAME] [--server_batch N] [--budget SECONDS] [--seeds N] [--baselines true|false]
       [--qa_model DIR] [--backend torch|deepspeed] [--data DIR] [--exp DIR] [--smoke true] [--update_readme true] [--max_new_tokens auto|N]
       [--ngpu N] [--num_nodes N --node_rank R --master_addr HOST] [--hostfile F] [--dtype bfloat16] [--zero 2|3]
       [--resume auto|never] [--skip_bad true]   (launch options: tools/launch_options.sh)"
. ../../tools/launch_options.sh   # --ngpu, --num_nodes, --hostfile, --dtype, --zero, --resume, --skip_bad
. ../../tools/parse_options.sh
recipe=audio_caption
. ../../tools/recipe_common.sh   # PY, PYTHONPATH, log, train, fresh, readme_args, abspath ...
# paths given on the command line are relative to where run.sh was called from
corpus_dir=$(abspath "${corpus_dir}"); audio_dir=$(abspath "${audio_dir}"); qa_model=$(abspath "${qa_model}")
model=$(abspath "${model}")
[ "${models_conf}" = conf/models.yaml ] || models_conf=$(abspath "${models_conf}")
[ "${data}" = data ] || data=$(abspath "${data}"); [ "${exp}" = exp ] || exp=$(abspath "${exp}")
case "${teacher}" in remote|local) ;; *) echo "--teacher must be remote or local, got '${teacher}'" >&2; exit 1 ;; esac
[ -n "${teacher_url}" ] && teacher=remote   # a teacher served elsewhere has no local folder to load
case "${teacher_server}" in
  ours) ;;
  vllm) teacher=remote
        [ -z "${teacher_url}" ] || { echo "error: --teacher_server vllm starts a server here; --teacher_url names one" \
          "served elsewhere: give one of them" >&2; exit 2; } ;;
  *) echo "--teacher_server must be ours or vllm, got '${teacher_server}'" >&2; exit 1 ;;
esac
[ -f "${models_conf}" ] || { echo "--models_conf ${models_conf}: no such file" >&2; exit 1; }
# --teacher_server vllm: whether vLLM can serve the teacher, before anything runs: stage 1's teacher
# (the models conf) when stage 1 runs, else ${exp}/teacher/final
if [ "${teacher_server}" = vllm ] && [ "${eval_only}" != true ] && [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  why=$("${PY}" - "${models_conf}" "${exp}/teacher/final" $(( stage <= 1 )) <<'PY'
import sys
from pathlib import Path
import yaml
from core.vllm_engine import serving_problem
from tools.build_models import planned_teacher
conf, folder, from_conf = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
why = serving_problem()
if why:  # vLLM missing: nothing to say about the teacher
    print(why)
    sys.exit(0)
t = planned_teacher(yaml.safe_load(open(conf)) or {}) if from_conf else {"dir": folder}
if "dir" in t:
    where = f"the teacher {t['dir']}"
    why = serving_problem(t["dir"]) if (Path(t["dir"]) / "config.json").is_file() else None
else:
    where = f"the teacher {conf} builds"
    why = serving_problem(head=t["head_size"], frames=t["mel_frames"])
if why:
    print(f"{where}: {why}; give a teacher with head size >= 32 and a 30 s audio chunk (a real checkpoint as "
          "teacher_dir in --models_conf, or sizes built so, e.g. teacher hidden 64, heads 2, chunk_seconds 30)")
PY
) || exit 1
  [ -z "${why}" ] || { echo "error: --teacher_server vllm: ${why}" >&2; exit 2; }
fi
mkdir -p "${exp}"

if [ "${eval_only}" = "true" ]; then
  # one checkpoint on a real test split: prep, greedy captions, caption metrics
  CORPUS_DIR_NEEDED=1 eval_model_ok
  case "${corpus}" in
    audiocaps)
      "${PY}" local/prepare_audiocaps.py --corpus_dir "${corpus_dir}" --audio_dir "${audio_dir:-${corpus_dir}/audio}" \
        --out_dir "${data}" --splits test "${prep_args[@]}" ;;
    clotho)
      "${PY}" local/prepare_clotho.py --corpus_dir "${corpus_dir}" --out_dir "${data}" --splits evaluation "${prep_args[@]}" ;;
    *) echo "--eval_only scores a real test split: --corpus audiocaps or clotho, got '${corpus}'" >&2; exit 1 ;;
  esac
  log "evaluation only: ${model} on the ${corpus} test split"
  qa=(); [ -n "${qa_model}" ] && qa=(--qa_model "${qa_model}")
  gen_len=$(gen_length "${model}" text "${data}/test.jsonl")
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --corpus ${corpus} --prompt "${prompt}" \
    --max_new_tokens ${gen_len} --eval_model "${model}" --eval_name "${eval_name}" "${qa[@]}"
  exit 0
fi

teacher_over=(); student_over=(); cascade_over=(); synth_args=(); quick=()
if [ "${smoke}" = "true" ]; then
  synth_args=(--smoke)
  teacher_over=(train.max_steps=40 train.save_every=0)
  student_over=(train.max_steps=10 train.save_every=0)
  quick=(train.eval_every=0 data.dev_max_samples=4 train.batch_size=8)
  budget_scale=0.05   # conf/budget.yaml's step counts x 0.05 (OPD: 7 steps)
  [ -n "${budget}" ] && budget=6
  cascade_over=(train.max_steps=30 train.save_every=0 train.eval_every=0)
fi

if [ ${stage} -le 0 ] && [ ${stop_stage} -ge 0 ]; then
  t0=$(date +%s)
  log "stage 0: data (${corpus})"
  case "${corpus}" in
    synthetic)
      "${PY}" local/make_synthetic.py --out_dir "${data}" --seed ${seed} "${synth_args[@]}" ;;
    audiocaps)
      [ -n "${corpus_dir}" ] || { echo "--corpus_dir is required for audiocaps" >&2; exit 1; }
      "${PY}" local/prepare_audiocaps.py --corpus_dir "${corpus_dir}" --audio_dir "${audio_dir:-${corpus_dir}/audio}" \
        --out_dir "${data}/raw" "${prep_args[@]}"
      "${PY}" local/split_train.py --train "${data}/raw/train.jsonl" --dev "${data}/raw/dev.jsonl" \
        --test "${data}/raw/test.jsonl" --out_dir "${data}" --seed ${seed} ;;
    clotho)
      [ -n "${corpus_dir}" ] || { echo "--corpus_dir is required for clotho" >&2; exit 1; }
      "${PY}" local/prepare_clotho.py --corpus_dir "${corpus_dir}" --out_dir "${data}/raw" "${prep_args[@]}"
      "${PY}" local/split_train.py --train "${data}/raw/train.jsonl" --dev "${data}/raw/dev.jsonl" \
        --test "${data}/raw/test.jsonl" --out_dir "${data}" --seed ${seed} ;;
    *) echo "unknown corpus '${corpus}'" >&2; exit 1 ;;
  esac
  record_time data $(( $(date +%s) - t0 ))
fi

has_questions() {  # True when the test clips carry multiple-choice questions (the cascaded evaluation)
  "${PY}" -c "import json,sys;print(any(json.loads(l).get('questions') for l in open(sys.argv[1]) if l.strip()))" "${data}/test.jsonl"
}
train_cascade() {  # the cascade's text model (unless --qa_model), once per warm-up: every seed reads with the same one
  if [ -z "${qa_model}" ] && [ "$(has_questions)" = "True" ] && [ ! -f "${exp}/cascade/final/config.json" ]; then
    log "the cascade's text model, trained on reference captions and their questions"
    "${PY}" local/cascade.py make-train --manifest "${data}/teacher_train.jsonl" --manifest "${data}/student_labelled.jsonl" \
      --out "${exp}/cascade_data/qa_train.jsonl"
    "${PY}" local/cascade.py build --tokenizer "${exp}/student_init" --out "${exp}/cascade_init"
    train conf/cascade_sft.yaml model.path=${exp}/cascade_init data.train=${exp}/cascade_data/qa_train.jsonl \
      output_dir=${exp}/cascade "${cascade_over[@]}"
  fi
}

if [ ${stage} -le 1 ] && [ ${stop_stage} -ge 1 ]; then
  t0=$(date +%s)
  log "stage 1: tokenizer and models"
  "${PY}" -m tools.build_models --conf "${models_conf}" --text "${data}/text_corpus.txt" --exp "${exp}" --seed ${seed}
  built_teacher=$("${PY}" -c "import json;print(json.load(open('${exp}/models.json'))['teacher']['built'])")
  built_student=$("${PY}" -c "import json;print(json.load(open('${exp}/models.json'))['student']['built'])")
  if [ -n "${teacher_url}" ]; then
    log "stage 1: the teacher is served at ${teacher_url}: no teacher SFT here"
  elif [ "${built_teacher}" = "True" ]; then
    log "stage 1: teacher SFT on its own captioned clips"
    train conf/teacher_sft.yaml model.path=${exp}/teacher_init output_dir=${exp}/teacher \
      data.train=${data}/teacher_train.jsonl data.dev=${data}/dev.jsonl "${teacher_over[@]}" "${quick[@]}"
  else
    rm -rf "${exp}/teacher"; mkdir -p "${exp}/teacher"; ln -sfn "$(readlink -f ${exp}/teacher_init)" "${exp}/teacher/final"
  fi
  if [ "${built_student}" = "True" ]; then
    log "stage 1: student SFT on its small captioned set"
    train conf/student_sft.yaml model.path=${exp}/student_init output_dir=${exp}/student_sft \
      data.train=${data}/student_labelled.jsonl data.dev=${data}/dev.jsonl "${student_over[@]}" "${quick[@]}"
  else
    rm -rf "${exp}/student_sft"; mkdir -p "${exp}/student_sft"; ln -sfn "$(readlink -f ${exp}/student_init)" "${exp}/student_sft/final"
  fi
  rm -rf "${exp}/cascade"   # a new tokenizer: the cascade's text model is trained again
  record_time models $(( $(date +%s) - t0 ))
  t0=$(date +%s)
  train_cascade
  record_time cascade $(( $(date +%s) - t0 ))
fi

server_pid=""
server_group=false    # the server leads its own process group (vLLM: its engine runs in child processes)
stop_server() {
  if [ -n "${server_pid}" ] && kill -0 "${server_pid}" 2>/dev/null; then
    log "stopping the teacher server (pid ${server_pid})"
    kill "${server_pid}" 2>/dev/null || true
    wait "${server_pid}" 2>/dev/null || true
  fi
  # whatever of its process group outlived it (vLLM's engine and worker processes)
  [ -n "${server_pid}" ] && [ "${server_group}" = true ] && kill -KILL -- "-${server_pid}" 2>/dev/null || true
  server_pid=""
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM
wait_server() {  # URL SECONDS: until URL answers 200 (the server at server_pid), else its log and exit 1
  "${PY}" - "$1" "${server_pid}" "$2" <<'PY' || { tail -n 40 "${exp}/teacher_server.log" >&2; exit 1; }
import os, sys, time, httpx
url, pid, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
t0 = time.time()
while time.time() - t0 < limit:
    try:
        if httpx.get(url, timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"the teacher server exited before answering {url} (its log: the lines below)")
    time.sleep(0.2)
sys.exit(f"no answer from {url} after {limit:g} s")
PY
}
pick_port() {  # --port, or a free port of 127.0.0.1 when it is 0
  [ "${port}" != 0 ] || port=$("${PY}" -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
}
start_server() {  # model_dir: starts our teacher server on 127.0.0.1, waits for /health, sets teacher_url
  pick_port
  log "starting the teacher server on 127.0.0.1:${port} (log: ${exp}/teacher_server.log)"
  # one thread for the server, so that the student's training keeps the other core
  OMP_NUM_THREADS=1 "${PY}" -m core.bin.serve_teacher --model "$1" --host 127.0.0.1 --port "${port}" \
    --max-batch "${server_batch}" --log-level warning > "${exp}/teacher_server.log" 2>&1 &
  server_pid=$!
  wait_server "http://127.0.0.1:${port}/health" 120
  teacher_url="http://127.0.0.1:${port}"
}
start_vllm() {  # model_dir: starts vLLM's OpenAI-compatible server on 127.0.0.1 (core.vllm_engine.server_command
                # and server_env, one thread), waits for /v1/models, sets teacher_url and teacher_model
  pick_port
  log "starting the vLLM teacher server on 127.0.0.1:${port} (log: ${exp}/teacher_server.log)"
  # this Python process becomes the server (exec) with the command and environment core.vllm_engine
  # builds, leading its own process group, so that stop_server also ends its engine's processes
  "${PY}" - "$1" "${port}" "${vllm_max_logprobs}" > "${exp}/teacher_server.log" 2>&1 <<'PY' &
import os, shlex, sys
from core.vllm_engine import server_command, server_env
model, port, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cmd = server_command(model, port=port, max_logprobs=k)
print("+", shlex.join(cmd), flush=True)
try:
    os.setsid()
except OSError:  # already leads its process group
    pass
os.execve(cmd[0], cmd, server_env(threads=1))
PY
  server_pid=$!; server_group=true
  local t0=$(date +%s)
  wait_server "http://127.0.0.1:${port}/v1/models" 900
  log "the vLLM teacher server answers after $(( $(date +%s) - t0 )) s: $(sed -n 's/^+ //p' "${exp}/teacher_server.log" | head -n 1)"
  teacher_url="http://127.0.0.1:${port}"; teacher_model=teacher
}

# a teacher served elsewhere (--teacher_url) also writes the KD captions and its row of the results
external_teacher=${teacher_url}
teacher_decode=(--model "${exp}/teacher/final"); teacher_score=()
if [ -n "${external_teacher}" ]; then
  teacher_decode=(--url "${external_teacher}"); [ -n "${teacher_model}" ] && teacher_decode+=(--served_model "${teacher_model}")
  teacher_score=(--teacher_url "${external_teacher}"); [ -n "${teacher_model}" ] && teacher_score+=(--teacher_model "${teacher_model}")
fi
opd_paths=(model.path=${exp}/student_sft/final output_dir=${exp}/opd data.train=${data}/unlabelled.jsonl data.dev=${data}/dev.jsonl)
kd_paths=(model.path=${exp}/student_sft/final data.train=${exp}/seqkd_data/unlabelled_teacher.jsonl data.dev=${data}/dev.jsonl)
# the caption length of stages 2-3 (set by the first of them that runs; after stage 1 the student's tokenizer exists)
gen_args=("${exp}/student_sft/final" text "${data}/student_labelled.jsonl" "${data}/teacher_train.jsonl")

# --seeds N: stages 2-3 again per seed from the warm-up above, combined into exp/results.json
rc=0; run_seeds 2 CIDEr:1 teacher teacher_init student_init student_sft models.json cascade cascade_init cascade_data || rc=$?
case ${rc} in 0) exit 0 ;; 1) ;; *) exit ${rc} ;; esac

if [ ${stage} -le 2 ] && [ ${stop_stage} -ge 2 ]; then
  t0=$(date +%s)
  set_gen_len "${gen_args[@]}"
  opd_paths+=(rollout.max_new_tokens=${gen_len})
  if [ "${teacher}" = "remote" ]; then
    teacher_args=()
    if [ -n "${teacher_url}" ]; then :
    elif [ "${teacher_server}" = vllm ]; then
      start_vllm "${exp}/teacher/final"
      # vLLM gives each position's top-k log-probs, at most its --max-logprobs
      teacher_args=(teacher.top_k_cap=${vllm_max_logprobs} opd.support=teacher_topk)
    else
      start_server "${exp}/teacher/final"
    fi
    teacher_args+=(teacher.kind=remote teacher.url=${teacher_url})
    [ -n "${teacher_model}" ] && teacher_args+=(teacher.model=${teacher_model})
  else
    teacher_args=(teacher.kind=local teacher.path=${exp}/teacher/final)
  fi
  budget_over opd "${budget}"
  log "stage 2: on-policy distillation from the ${teacher} teacher (${b})"
  train conf/opd.yaml "${opd_paths[@]}" "${teacher_args[@]}" "${bo[@]}" "${quick[@]}"
  stop_server
  record_time opd $(( $(date +%s) - t0 ))
  # with --budget S the baselines get the wall-clock OPD actually trained for
  spent=$(summary_seconds "${exp}/opd/train_summary.json")
  if [ "${baselines}" = "true" ]; then
    t1=$(date +%s)
    budget_over sft_more "${spent}"
    log "baseline sft_more: more SFT on the student's captioned set (${b})"
    train conf/sft_more.yaml model.path=${exp}/student_sft/final output_dir=${exp}/sft_more \
      data.train=${data}/student_labelled.jsonl data.dev=${data}/dev.jsonl "${bo[@]}" "${quick[@]}"
    record_time sft_more $(( $(date +%s) - t1 ))
    t1=$(date +%s)
    log "baseline seqkd: the teacher captions the unlabelled clips"
    "${PY}" -m core.bin.decode "${teacher_decode[@]}" --manifest ${data}/unlabelled.jsonl \
      --out ${exp}/seqkd_data/unlabelled_teacher.jsonl --as_manifest --prompt "Describe the audio." --max_new_tokens ${gen_len}
    record_time teacher_caption $(( $(date +%s) - t1 ))
    t1=$(date +%s)
    budget_over seqkd "${spent}"
    log "baseline seqkd: SFT on the teacher's captions (${b})"
    train conf/seqkd.yaml "${kd_paths[@]}" output_dir=${exp}/seqkd "${bo[@]}" "${quick[@]}"
    record_time seqkd $(( $(date +%s) - t1 ))
  fi
fi

if [ ${stage} -le 3 ] && [ ${stop_stage} -ge 3 ]; then
  t0=$(date +%s)
  set_gen_len "${gen_args[@]}"
  log "stage 3: caption the test clips, caption metrics, cascaded question answering"
  qa_args=(); [ -n "${qa_model}" ] && qa_args=(--qa_model "${qa_model}")
  train_cascade   # when stage 1 did not (an older exp/)
  [ "$(has_questions)" = "True" ] || log "stage 3: the test clips carry no questions: no cascaded evaluation"
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" "${readme_args[@]}" --corpus ${corpus} \
    --teacher ${teacher} --smoke ${smoke} --seed ${seed} --budget "${budget}" --max_new_tokens ${gen_len} "${qa_args[@]}" "${teacher_score[@]}"
  record_time eval $(( $(date +%s) - t0 ))
  "${PY}" local/make_results.py --data "${data}" --exp "${exp}" --only_times
fi
