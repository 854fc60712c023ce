"""Seconds per training step, our loop against TRL, on the same tiny text models on the CPU.

``BENCHMARKS``: ``opd_step``, ``grpo_step`` and their ``*_long_prompt`` variants, each
``fn(smoke=False) -> dict``.

- ``opd_step``: on-policy distillation, reverse KL over the full vocabulary, one completion per
  prompt. Ours: ``core.trainer.Trainer`` with ``method: opd`` (rollout -> teacher score ->
  ``distill_loss`` -> backward -> optimizer step), the step time it logs itself. TRL:
  ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1.0`` (always on-policy) and ``beta=1.0``
  (TRL's generalised JSD at beta=1 is ``KL(student || teacher)``, the reverse KL), and
  ``trl.DistillationTrainer`` (always on-policy) with ``beta=1.0``. The reference is the faster
  of the two.
- ``grpo_step``: GRPO with the registry's ``wer`` reward against the row's ``text``, ``n``
  completions per prompt, group-std advantages, clip 0.2, token-mean loss, no KL term, one
  optimisation pass per step. TRL: ``trl.GRPOTrainer`` (``loss_type="dapo"``, TRL's token-mean,
  ``scale_rewards="group"``, ``beta=0``, ``num_iterations=1``, one generation per step).

- ``*_long_prompt``: the same steps with every prompt opened by a passage of 160 random words
  (about 250 tokens; the short prompts are about 20), the shape of an audio prompt, whose
  hundreds of audio positions come before a short answer.

Both sides: the same ``Qwen2ForCausalLM`` student (and teacher) folders built from config with
one tokenizer trained here, the same chat-formatted prompts, batch size, ``max_new_tokens``,
temperature 1.0, top-k/top-p off, AdamW with a constant learning rate (the fused kernel on both
sides: ours ``optim.fused``, TRL ``optim="adamw_torch_fused"``), gradient clipping at 1.0,
float32, ``torch.set_num_threads(2)``, no gradient checkpointing. TRL step time: a
``TrainerCallback`` from ``on_step_begin`` to ``on_step_end`` (it excludes TRL's data loading,
which favours TRL slightly). Ours: ``step_seconds`` from the trainer's ``metrics.jsonl`` (batch
collation included). Each implementation runs once per round (the order reversed every other
round, fresh models each run), all in one process; a round's time is the median of its timed
steps after warm-up, and the reported time is the lowest round median (contention from other
processes only adds time); the median pooled over all rounds is reported beside it.

Each result: ``ours_s``, ``trl_*_s``, ``reference`` (the faster TRL trainer), ``ratio``
(reference / ours), ``goal``, ``met``, ``ours_experience_s`` (the rollout + scoring part of our
step), per-step and per-round times, completion lengths, losses and ``step_contents``.

On a GPU (``benchmarks.run --device cuda``, ``common.RUN``): the same steps on this process's GPU,
both sides in ``RUN.dtype`` (bf16) and, with ``RUN.zero`` (2 by default), under DeepSpeed with the
same ZeRO JSON (``common.ds_config``): ours ``backend.name: deepspeed`` with ``model.dtype`` and
``teacher.dtype``; TRL ``deepspeed=`` that JSON with ``bf16=True`` on float32-loaded models (DeepSpeed
casts them; both keep float32 master weights). Step timers wait for the GPU (``common.sync``).

What it leaves out: vLLM, memory measurements, and any timing assertion. Run
``python -m benchmarks.trl_compare [--smoke] [NAME ...]`` to print the JSON.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import common as B  # noqa: E402
from core.utils.dist import one_process_env  # noqa: E402

THREADS = 2
GOAL = 2.0  # ours at least this many times faster than the faster TRL trainer

SIZES = {
    False: dict(vocab=2048, hidden=256, layers=4, heads=4, prompts=8, max_new_tokens=32, group=4,
                grpo_prompts=4, warmup=2, steps=5, rounds=2, context_words=0),
    True: dict(vocab=300, hidden=32, layers=1, heads=4, prompts=2, max_new_tokens=8, group=2,
               grpo_prompts=2, warmup=1, steps=1, rounds=1, context_words=0),
}
# the ``*_long_prompt`` variants: each prompt starts with a passage of this many words (about 250
# tokens here), as an audio prompt holds hundreds of audio positions before a short answer
LONG_CONTEXT_WORDS = {False: 160, True: 24}
LR = 1e-5

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four five six seven "
         "eight nine ten red green blue yellow black white cat dog fish bird tree river stone cloud rain snow").split()


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    with _silenced():  # imports that print a banner on stdout (DeepSpeed's accelerator note)
        import core.trainer  # noqa: F401
        import trl  # noqa: F401
    for name in ("transformers", "trl", "accelerate", "core", "datasets", "torch", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover
        pass


@contextlib.contextmanager
def _silenced():
    """Swallow stdout/stderr chatter (progress bars, deprecation notes) of a run."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


# --------------------------------------------------------------------------- shared setup
def _setup(root: Path, sz: dict, n_rows: int) -> dict:
    """Tokenizer trained on generated text, student + teacher folders, rows and a JSONL manifest."""
    from core.models import build_tiny_causal_lm, train_tokenizer

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    corpus += ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
               for _ in range(3000)]
    tok = train_tokenizer(corpus, vocab_size=sz["vocab"])
    kw = dict(hidden=sz["hidden"], layers=sz["layers"], heads=sz["heads"])
    build_tiny_causal_lm(tok, seed=0, out_dir=root / "student", **kw)
    build_tiny_causal_lm(tok, seed=1, out_dir=root / "teacher", **kw)
    rows = []
    for i in range(n_rows):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        context = " ".join(rng.choice(WORDS) for _ in range(sz.get("context_words", 0)))
        prompt = f"{context}\nRepeat: {words}" if context else f"Repeat: {words}"
        rows.append({"key": f"r{i}", "task": "qa", "prompt": prompt, "text": words})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": root / "student", "teacher": root / "teacher", "manifest": manifest, "rows": rows,
            "tokenizer": tok}


def _chat_prompt(tok, row: dict) -> str:
    """The exact string our ``TextPromptCollator`` builds for a row."""
    from core.data.collate import TextPromptCollator
    return TextPromptCollator(tok).render(row)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- ours
def _ours(env: dict, out: Path, method: str, sz: dict, **over) -> dict:
    from core import config as C
    from core.trainer import Trainer

    steps = sz["warmup"] + sz["steps"]
    cfg = {
        "method": method, "output_dir": str(out),
        "model": {"path": str(env["student"])},
        "data": {"train": str(env["manifest"]), "modality": "text"},
        "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": sz["max_new_tokens"]},
        "optim": {"lr": LR, "scheduler": "constant", "grad_clip": 1.0, "weight_decay": 0.0},
        "train": {"max_steps": steps, "resume": "never", "seed": 0, "log_every": 1},
    }
    if B.on_gpu() or B.RUN.dtype != "float32":
        ds = B.ds_config(out.parent / "ds")
        cfg["model"]["dtype"] = B.RUN.dtype
        cfg["teacher"] = {"dtype": B.RUN.dtype}  # used by OPD only
        cfg["backend"] = ({"name": "deepspeed", "ds_config": str(ds)} if ds else {"device": B.RUN.device})
    cfg = C.deep_merge(cfg, over)
    torch.set_num_threads(THREADS)
    with _silenced():
        trainer = Trainer(C.load_config(overrides=cfg))
        trainer.train()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = recs[sz["warmup"]:]
    return {"step_s": [r["step_seconds"] for r in timed],
            "experience_s": [r["experience_seconds"] for r in timed],
            "completion_len": _median([r.get("completion_len", float("nan")) for r in timed]),
            "loss": [r["loss"] for r in recs]}


# --------------------------------------------------------------------------- TRL helpers
def _timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.logs: list[dict] = []
            self._t0 = None

        def on_step_begin(self, args, state, control, **kw):
            B.sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self._t0 is not None:
                B.sync()
                self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))

    return StepTimer()


def _common_args(out: Path, steps: int) -> dict:
    ds = B.ds_config(out.parent / "ds")
    return dict(output_dir=str(out), max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1,
                logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
                disable_tqdm=True, use_cpu=not B.on_gpu(), bf16=bool(ds) and B.RUN.dtype == "bfloat16", fp16=False,
                gradient_checkpointing=False, dataloader_num_workers=0, seed=0, optim="adamw_torch_fused",
                **({"deepspeed": str(ds)} if ds else {}))


def _load(path: Path):
    """A model folder and its tokenizer: float32 (under DeepSpeed, which casts to bf16 itself) or
    ``RUN.dtype`` without it, on the run's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.float32 if B.RUN.zero else getattr(torch, B.RUN.dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if B.on_gpu() and not B.RUN.zero:
        model.to(B.RUN.device)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    return model, tok


def _run_trl(trainer, timer, sz: dict) -> dict:
    torch.set_num_threads(THREADS)
    with _silenced():
        trainer.train()
    logs = [x for x in timer.logs if "loss" in x]
    lens = [x["completions/mean_length"] for x in timer.logs if "completions/mean_length" in x]
    return {"step_s": timer.times[sz["warmup"]:], "loss": [float(x["loss"]) for x in logs],
            "completion_len": _median(lens[sz["warmup"]:]) if lens else None}


def _trl_gkd(env: dict, out: Path, sz: dict) -> dict:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    student, tok = _load(env["student"])
    teacher, _ = _load(env["teacher"])
    n = sz["prompts"] * (sz["warmup"] + sz["steps"])
    rows = env["rows"][:n]
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["text"]}]} for r in rows])
    args = GKDConfig(**_common_args(out, sz["warmup"] + sz["steps"]), per_device_train_batch_size=sz["prompts"],
                     lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=sz["max_new_tokens"], seq_kd=False,
                     disable_dropout=True, max_length=1024)
    timer = _timer_callback()
    with _silenced():
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                             processing_class=tok, callbacks=[timer])
    # same generation settings as ours: plain sampling, no top-k/top-p, our EOS
    trainer.generation_config.eos_token_id = tok.eos_token_id
    return _run_trl(trainer, timer, sz)


def _trl_distillation(env: dict, out: Path, sz: dict) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    student, tok = _load(env["student"])
    teacher, _ = _load(env["teacher"])
    n = sz["prompts"] * (sz["warmup"] + sz["steps"])
    ds = Dataset.from_list([{"prompt": _chat_prompt(tok, r)} for r in env["rows"][:n]])
    args = DistillationConfig(**_common_args(out, sz["warmup"] + sz["steps"]),
                              per_device_train_batch_size=sz["prompts"], beta=1.0, temperature=1.0,
                              top_p=1.0, top_k=0, max_completion_length=sz["max_new_tokens"],
                              disable_dropout=True, shuffle_dataset=False)
    timer = _timer_callback()
    with _silenced():
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds,
                                      processing_class=tok, callbacks=[timer])
    return _run_trl(trainer, timer, sz)


def _trl_grpo(env: dict, out: Path, sz: dict) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from core.rewards import get_reward

    wer_fn = get_reward("wer")

    def wer(completions, **kwargs):  # the registry's reward, TRL's calling convention
        return wer_fn(completions, **{k: v for k, v in kwargs.items() if k == "text"})

    student, tok = _load(env["student"])
    n = sz["grpo_prompts"] * (sz["warmup"] + sz["steps"])
    ds = Dataset.from_list([{"prompt": _chat_prompt(tok, r), "text": r["text"]} for r in env["rows"][:n]])
    G = sz["group"]
    args = GRPOConfig(**_common_args(out, sz["warmup"] + sz["steps"]),
                      per_device_train_batch_size=sz["grpo_prompts"] * G, num_generations=G,
                      steps_per_generation=1, num_iterations=1, max_completion_length=sz["max_new_tokens"],
                      temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo",
                      scale_rewards="group", disable_dropout=True, shuffle_dataset=False, log_completions=False)
    timer = _timer_callback()
    with _silenced():
        trainer = GRPOTrainer(model=student, reward_funcs=[wer], args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[timer])
    return _run_trl(trainer, timer, sz)


# --------------------------------------------------------------------------- benchmarks
def _rounds(runs: dict, root: Path, sz: dict) -> dict:
    """Run every implementation ``sz['rounds']`` times, the order reversed every other round, each
    run with fresh models; pool the timed steps (a burst of load from elsewhere on a shared machine
    then hits both sides alike rather than one). Losses and lengths are kept from the first round."""
    names = list(runs)
    res: dict = {}
    for r in range(sz["rounds"]):
        for name in (names if r % 2 == 0 else names[::-1]):
            out = runs[name](root / f"{name}_{r}")
            if name not in res:
                res[name] = dict(out, step_s_rounds=[])
            else:
                for k in ("step_s", "experience_s"):
                    if k in out:
                        res[name][k] = res[name][k] + out[k]
            res[name]["step_s_rounds"].append(round(_median(out["step_s"]), 4))
    return res


def _best(res: dict) -> float:
    """Seconds per step of one implementation: the lowest of its per-round medians. Load from
    elsewhere on a shared machine only ever slows a run down (a 2-thread step stalls 10-100x while
    another process holds a core), so the quietest round is the best estimate of the step's cost;
    the pooled median is reported beside it."""
    return min(res["step_s_rounds"]) if res.get("step_s_rounds") else _median(res["step_s"])


def _report(name: str, ours: dict, refs: dict, sz: dict, contents: dict, prompt_tokens: float) -> dict:
    ours_s = _best(ours)
    ref_name = min(refs, key=lambda k: _best(refs[k]))
    ref_s = _best(refs[ref_name])
    ratio = ref_s / ours_s if ours_s > 0 else float("nan")
    out = {"benchmark": name, "ours_s": round(ours_s, 4),
           "ours_experience_s": round(_median(ours["experience_s"]), 4)}
    for k, v in refs.items():
        out[f"{k}_s"] = round(_best(v), 4)
    out["pooled_median_s"] = {"ours": round(_median(ours["step_s"]), 4),
                              **{k: round(_median(v["step_s"]), 4) for k, v in refs.items()}}
    out.update({"reference": ref_name, "reference_s": round(ref_s, 4), "ratio": round(ratio, 3),
                "goal": f"ours >= {GOAL:g}x faster than the faster TRL trainer (ratio >= {GOAL:g})",
                "met": bool(ratio >= GOAL), "timed_steps": sz["steps"] * sz["rounds"], "warmup_steps": sz["warmup"],
                "rounds": sz["rounds"],
                "round_medians_s": {"ours": ours["step_s_rounds"], **{k: v["step_s_rounds"] for k, v in refs.items()}},
                "threads": THREADS, "device": B.RUN.device, "dtype": B.RUN.dtype, "zero": B.RUN.zero,
                "model": {k: sz[k] for k in ("vocab", "hidden", "layers", "heads")},
                "prompt_tokens_median": prompt_tokens, "context_words": sz["context_words"],
                "step_s_all": {"ours": [round(x, 4) for x in ours["step_s"]],
                               **{k: [round(x, 4) for x in v["step_s"]] for k, v in refs.items()}},
                "completion_len": {"ours": ours.get("completion_len"),
                                   **{k: v.get("completion_len") for k, v in refs.items()}},
                "losses": {"ours": ours["loss"], **{k: v["loss"] for k, v in refs.items()}},
                "step_contents": contents})
    return out


def _sizes(smoke: bool, long_prompt: bool) -> dict:
    sz = dict(SIZES[bool(smoke)])
    if long_prompt:
        sz["context_words"] = LONG_CONTEXT_WORDS[bool(smoke)]
    return sz


def _prompt_tokens(env: dict) -> float:
    tok = env["tokenizer"]
    return _median([len(tok(_chat_prompt(tok, r), add_special_tokens=False)["input_ids"]) for r in env["rows"]])


def opd_step(smoke: bool = False, long_prompt: bool = False) -> dict:
    _quiet()
    if B.RUN.zero:
        one_process_env()  # ours and TRL's DeepSpeed join one group
    sz = _sizes(smoke, long_prompt)
    P, T = sz["prompts"], sz["max_new_tokens"]
    with tempfile.TemporaryDirectory(prefix="trl_compare_opd_") as d:
        root = Path(d)
        env = _setup(root, sz, P * (sz["warmup"] + sz["steps"]))
        prompt_tokens = _prompt_tokens(env)
        res = _rounds({
            "ours": lambda out: _ours(env, out, "opd", sz, teacher={"path": str(env["teacher"])},
                                      rollout={"n": 1}, train={"batch_size": P},
                                      opd={"form": "distribution", "divergence": "reverse_kl", "support": "full",
                                           "temperature": 1.0}),
            "trl_gkd": lambda out: _trl_gkd(env, out, sz),
            "trl_distillation": lambda out: _trl_distillation(env, out, sz)}, root, sz)
        ours = res.pop("ours")
        refs = res
    gen = (f"{P} prompts -> {P} completions (1 per prompt), up to {T} tokens each (up to {P * T} sampled tokens; "
           f"random-init models rarely stop early): KV-cached sampling, 1 prefill + up to {T - 1} decode forwards "
           f"of the student over {P} rows")
    contents = {
        "ours": f"{gen} (our sampling loop over the model's forward, sampled-token logprobs from each step's "
                f"logits); teacher: 1 no-grad forward over prompt+completion keeping the {T}+1 completion logits "
                "(full vocabulary); student: 1 forward with grad keeping only the completion logits; reverse KL "
                "over the full vocabulary (chunked), token-mean; 1 backward; grad-norm clip; 1 fused AdamW step",
        "trl_gkd": f"{gen}; student: 1 forward with grad over the whole sequence (logits at every position); "
                   "teacher: 1 no-grad forward over the whole sequence; generalised JSD with beta=1 (reverse KL, "
                   "full vocabulary) on the completion positions; 1 backward; grad-norm clip; 1 fused AdamW step "
                   "(adamw_torch_fused)",
        "trl_distillation": f"{gen}; student: 1 backbone forward with grad (hidden states of the completion "
                            "positions); teacher: 1 no-grad backbone forward; both LM heads projected chunk by "
                            "chunk inside the chunked beta=1 (reverse KL) loss; 1 backward; grad-norm clip; "
                            "1 fused AdamW step (adamw_torch_fused)",
    }
    return _report("opd_step_long_prompt" if long_prompt else "opd_step", ours, refs, sz, contents, prompt_tokens)


def grpo_step(smoke: bool = False, long_prompt: bool = False) -> dict:
    _quiet()
    if B.RUN.zero:
        one_process_env()  # ours and TRL's DeepSpeed join one group
    sz = _sizes(smoke, long_prompt)
    P, G, T = sz["grpo_prompts"], sz["group"], sz["max_new_tokens"]
    import core.rewards  # noqa: F401  (registers wer)
    with tempfile.TemporaryDirectory(prefix="trl_compare_grpo_") as d:
        root = Path(d)
        env = _setup(root, sz, P * (sz["warmup"] + sz["steps"]))
        prompt_tokens = _prompt_tokens(env)
        res = _rounds({
            "ours": lambda out: _ours(env, out, "grpo", sz, rollout={"n": G}, train={"batch_size": P},
                                      grpo={"rewards": {"wer": 1.0}, "scale": "std", "clip_low": 0.2,
                                            "clip_high": 0.2, "kl_beta": 0.0, "agg": "token-mean", "epochs": 1,
                                            "minibatches": 1}),
            "trl_grpo": lambda out: _trl_grpo(env, out, sz)}, root, sz)
        ours = res.pop("ours")
        refs = res
    gen = (f"{P} prompts x {G} = {P * G} completions, up to {T} tokens each (up to {P * G * T} sampled tokens): "
           "KV-cached sampling")
    contents = {
        "ours": f"{gen}: our loop, 1 prefill of the {P} distinct prompts (cache copied to their {G} samples) + up "
                f"to {T - 1} decode forwards over {P * G} rows, sampled-token logprobs from each step's logits (no "
                f"extra old-policy forward); wer reward on {P * G} completions; group-std advantages; 1 policy "
                f"forward with grad in two calls: the {P} distinct prompts once (their KV cache, with grad, copied "
                f"to the {G} samples), then the {P * G} completions reading it (completion logits only); clipped "
                "loss token-mean; 1 backward; grad-norm clip; 1 fused AdamW step",
        "trl_grpo": f"{gen}: generate, 1 prefill of {P * G} rows + up to {T - 1} decode forwards over {P * G} "
                    f"rows; wer reward on {P * G} completions; group-std advantages (scale_rewards=group); "
                    "no old-policy forward (num_iterations=1, one generation per step: TRL uses the detached "
                    "current logprobs); no reference model (beta=0); 1 policy forward with grad (logits_to_keep); "
                    "clipped loss (dapo = token-mean); 1 backward; grad-norm clip; 1 fused AdamW step "
                    "(adamw_torch_fused)",
    }
    return _report("grpo_step_long_prompt" if long_prompt else "grpo_step", ours, refs, sz, contents, prompt_tokens)


def opd_step_long_prompt(smoke: bool = False) -> dict:
    return opd_step(smoke, long_prompt=True)


def grpo_step_long_prompt(smoke: bool = False) -> dict:
    return grpo_step(smoke, long_prompt=True)


BENCHMARKS = {"opd_step": opd_step, "grpo_step": grpo_step, "opd_step_long_prompt": opd_step_long_prompt,
              "grpo_step_long_prompt": grpo_step_long_prompt}


def main(argv: list[str] | None = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 timed step")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    res = {}
    with contextlib.redirect_stdout(sys.stderr):  # library banners go to stderr; stdout is the JSON
        for name in a.names or list(BENCHMARKS):
            res[name] = BENCHMARKS[name](smoke=a.smoke)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
