"""Training configuration: dataclasses with help text, loaded from YAML and validated.

Every key of a YAML file must be a field of these dataclasses; an unknown or mistyped key is an
error that names its dotted path (``optim.lrr``) and the valid keys. ``key=value`` overrides
(``optim.lr=1e-4``) are parsed as YAML scalars and validated the same way.

What it leaves out: recipe settings that are not training (data sizes, model sizes live in the
recipe's own YAML read by its ``local/`` scripts).
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    pass


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str = _f("", "local model directory (config.json + weights + processor)")
    dtype: str = _f("float32", "float32 | bfloat16 | float16")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the model directory")
    lora: dict = _f({}, "peft LoraConfig kwargs (r, lora_alpha, lora_dropout, target_modules, ...); empty = full "
                        "fine-tuning. Without target_modules: every linear layer of the language model's decoder "
                        "(attention q/k/v/o and MLP gate/up/down projections), never the audio/vision encoder, as a "
                        "regex built from the model's module names (e.g. 'model\\.language_model\\..*\\.(q_proj|...)'"
                        " for Qwen2-Audio, 'model\\..*\\.(q_proj|...)' for a causal LM). The export merges the "
                        "adapters into the base weights (a plain model folder)")
    load_in_4bit: bool = _f(False, "load the base model quantised to 4 bits (bitsandbytes; QLoRA: needs model.lora, "
                                   "a CUDA GPU and backend torch); the export merges into a full-precision base")
    bnb_4bit_compute_dtype: str = _f("bfloat16", "4-bit: compute dtype (float32 | bfloat16 | float16)")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit: nf4 | fp4")


@dataclass
class TeacherConfig:
    kind: str = _f("local", "local (in-process model) | remote (HTTP server)")
    path: str = _f("", "teacher model directory (local)")
    url: str = _f("", "teacher server base URL (remote), e.g. http://host:8000 (a trailing /v1 is accepted)")
    api_key: str = _f("", "bearer token for the remote teacher (empty: $TEACHER_API_KEY when set, else none)")
    dtype: str = _f("float32", "teacher dtype")
    model: str = _f("", "remote: served model name sent in requests (empty: the first model of GET /v1/models)")
    timeout: float = _f(60.0, "remote: seconds one scoring request may take before it is retried")
    max_retries: int = _f(3, "remote: retries of a request after a connection error, timeout, 5xx, 408 or 429 "
                             "(exponential backoff), then the run stops with an error naming the URL")
    retry_backoff: float = _f(1.0, "remote: first retry delay in seconds, doubled each retry (at most 30 s)")
    concurrency: int = _f(8, "remote: requests in flight at once (one per sample)")
    top_k_cap: int = _f(20, "remote: largest top-k asked for; vLLM refuses more than its --max-logprobs (20 by "
                            "default). opd.top_k above it is an error at start-up")


@dataclass
class DataConfig:
    train: str = _f("", "training manifest (JSONL)")
    dev: str = _f("", "dev manifest for periodic evaluation (optional)")
    prompt: str = _f("Transcribe the audio.", "prompt text, formatted with the sample's fields ({question})")
    system: str = _f("", "optional system message")
    target_field: str = _f("text", "field holding the reference completion (sft)")
    skip_bad: bool = _f(False, "skip bad manifest lines (written with reasons to <manifest>.bad.jsonl)")
    max_target_tokens: int = _f(64, "truncate reference completions to this many tokens")
    dev_max_samples: int = _f(200, "use at most this many dev samples in evaluation")
    length_group: int = _f(0, "batch rows of similar length in training: each window of this many global batches "
                              "of the epoch's shuffled order is sorted by length (audio seconds, video duration, "
                              "prompt characters) and cut into batches, whose order is shuffled again (less "
                              "padding of prompts and audio); 0 = off")
    modality: str = _f("auto", "auto | audio | av | text: audio prompts (rows need 'audio'), audio-visual prompts "
                               "(rows need 'video'; its frames and, as a separate input, its sound track or the "
                               "row's 'audio') or text-only prompts (no media); auto = av when the model has a "
                               "vision encoder and a row has 'video', else audio when it has an audio encoder and "
                               "a row has media, else text")
    num_frames: int = _f(8, "av: video frames sampled uniformly over each clip (or its begin_time..end_time)")
    missing_audio: str = _f("error", "av: a video without a sound track (and no 'audio' path in its row): error "
                                     "(refused with the file named, before training) | silence (silent audio of "
                                     "the clip's length)")
    video_max_pixels: int = _f(64 * 64, "av: largest frame area in pixels given to the vision encoder (frames are "
                                        "resized to multiples of 28 within it; 64*64 keeps a 64x64 frame at 56x56, 4 "
                                        "tokens per 2 frames); raise it for real videos and models, e.g. 360*420")


@dataclass
class RolloutConfig:
    n: int = _f(1, "completions per prompt (group size for GRPO)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    max_new_tokens: int = _f(32, "maximum completion length")


@dataclass
class OPDConfig:
    form: str = _f("distribution", "distribution (divergence on next-token distributions) | sampled_token (advantage = log pT - log pS)")
    divergence: str = _f("reverse_kl", "reverse_kl | forward_kl | jsd")
    beta: float = _f(0.5, "JSD interpolation")
    temperature: float = _f(1.0, "distillation temperature")
    support: str = _f("full", "full | teacher_topk | student_topk | union_topk")
    top_k: int = _f(0, "size of the top-k support (0 with support=full)")
    coef: float = _f(1.0, "sampled-token form: advantage scale")
    reward_weight: float = _f(0.0, "hybrid: weight of the reward group advantage added to the OPD advantage")
    rewards: dict = _f({}, "hybrid: reward name -> weight")
    chunk_size: int = _f(256, "positions per chunk of the full-vocabulary divergence")
    fused_head: str = _f("auto", "distribution form, full support: the divergence fused with the student's LM "
                                 "head (distill_loss_from_hidden), so no [B, T, V] student logits or their "
                                 "gradient are held: auto (vocabulary >= 32768, no reward term, a plain bias-free "
                                 "head not partitioned by ZeRO-3) | on | off")


@dataclass
class GRPOConfig:
    rewards: dict = _f({}, "reward name -> weight (from core/rewards.py)")
    scale: str = _f("std", "std (GRPO) | none (Dr.GRPO)")
    clip_low: float = _f(0.2, "PPO clip below 1")
    clip_high: float = _f(0.2, "PPO clip above 1")
    kl_beta: float = _f(0.0, "weight of the KL penalty to the frozen reference")
    kl_kind: str = _f("k3", "k1 | k2 | k3")
    agg: str = _f("token-mean", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm")
    epochs: int = _f(1, "optimisation epochs per rollout")
    minibatches: int = _f(1, "minibatches per epoch (one optimizer step each)")


@dataclass
class RestConfig:
    rounds: int = _f(2, "grow/improve rounds; each round starts from the previous round's model")
    samples: int = _f(4, "grow: completions sampled per training prompt (K); top_p, top_k and max_new_tokens "
                         "come from rollout, prompts per generate call from train.batch_size")
    temperature: float = _f(1.0, "grow: sampling temperature")
    rewards: dict = _f({}, "reward name -> weight (from core/rewards.py); a sample's score is the weighted sum")
    keep_min_reward: float = _f(1.0, "keep a sample whose total reward is >= this")
    max_per_prompt: int = _f(0, "keep at most this many distinct completions per prompt, highest reward first "
                                "(0 = all that pass)")
    lrs: list = _f([], "improve: SFT learning rate of each round, one per round (len must equal rest.rounds)")
    steps_per_round: int = _f(0, "improve: SFT optimizer steps per round (the schedule's length); 0 = one pass "
                                 "over the kept samples, ceil(kept / (train.batch_size * optim.grad_accum * world))")


@dataclass
class OptimConfig:
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    scheduler: str = _f("cosine", "constant | linear | cosine (transformers.get_scheduler names)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    fused: bool = _f(True, "AdamW's fused kernel (one pass over all parameters; CPU and CUDA, floating-point "
                           "parameters): on the 2-core CPU about 3x faster a step than torch's default there "
                           "(a loop over parameters), same update up to float rounding; false = torch's default")


@dataclass
class TrainLoopConfig:
    batch_size: int = _f(16, "prompts per micro-batch per process")
    max_steps: int = _f(100, "optimizer steps (the schedule's length)")
    max_seconds: float = _f(0.0, "stop after this wall-clock budget (0 = no budget); the schedule keeps max_steps")
    seed: int = _f(0, "seed for data order, sampling and init")
    eval_every: int = _f(0, "evaluate on dev every N steps (0 = only at the end)")
    eval_reward: str = _f("", "reward from the registry applied to greedy dev outputs (e.g. wer)")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, "checkpoints to keep")
    resume: str = _f("auto", "auto (latest checkpoint if any) | never | <checkpoint dir>")
    log_every: int = _f(1, "write metrics every N steps")
    max_bad_steps: int = _f(5, "stop after this many consecutive non-finite steps")
    stop_after_steps: int = _f(0, "stop (as if interrupted) after this many steps; for testing resume")


@dataclass
class BackendConfig:
    name: str = _f("torch", "torch | deepspeed")
    ds_config: str = _f("", "DeepSpeed JSON (ZeRO-2/3); 'auto' values are filled from this config")
    dist_backend: str = _f("", "gloo | nccl (default: nccl with CUDA, else gloo)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N: where the policy, teacher and reference run (auto: this "
                             "process's GPU when there is one, else the CPU; DeepSpeed takes its own accelerator)")


@dataclass
class TrainConfig:
    method: str = _f("sft", "sft | opd | grpo | rest | calibrate")
    output_dir: str = _f("exp/run", "where checkpoints, metrics and the exported model go")
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rest: RestConfig = field(default_factory=RestConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)


METHODS = ("sft", "opd", "grpo", "rest", "calibrate")


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{path}.{k}" if path else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(names))}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v if v is not None else {}, key)
        else:
            kwargs[k] = _coerce(v, t, key)
    return cls(**kwargs)


def _coerce(v, t, key):
    if t is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if t is float and isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            pass
    ok = {str: isinstance(v, str), int: isinstance(v, int) and not isinstance(v, bool),
          float: isinstance(v, float), bool: isinstance(v, bool), list: isinstance(v, list),
          dict: isinstance(v, dict)}.get(t, True)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {t.__name__}, got {v!r}")
    return v


def validate(cfg: TrainConfig) -> TrainConfig:
    def bad(key, msg):
        raise ConfigError(f"config key '{key}': {msg}")
    if cfg.method not in METHODS:
        bad("method", f"'{cfg.method}' is not one of {', '.join(METHODS)}")
    if not cfg.model.path:
        bad("model.path", "required")
    if cfg.data.length_group < 0:
        bad("data.length_group", "must be >= 0 (0 = off)")
    if not cfg.rollout.temperature > 0:
        bad("rollout.temperature", "must be > 0 (the rollout samples; greedy decoding is core.bin.decode's "
                                   "--temperature 0)")
    if not cfg.data.train and cfg.method != "calibrate":
        bad("data.train", "required")
    if cfg.method in ("opd", "calibrate"):
        if cfg.teacher.kind not in ("local", "remote"):
            bad("teacher.kind", "local | remote")
        if cfg.teacher.kind == "local" and not cfg.teacher.path:
            bad("teacher.path", f"required for method {cfg.method}")
        if cfg.teacher.kind == "remote" and not cfg.teacher.url:
            bad("teacher.url", "required for a remote teacher")
        if cfg.opd.form not in ("distribution", "sampled_token"):
            bad("opd.form", "distribution | sampled_token")
        if cfg.opd.support != "full" and cfg.opd.top_k <= 0:
            bad("opd.top_k", f"must be > 0 with support {cfg.opd.support}")
        if cfg.opd.fused_head not in ("auto", "on", "off"):
            bad("opd.fused_head", "auto | on | off")
        elif cfg.opd.fused_head == "on" and (cfg.opd.form != "distribution" or cfg.opd.support != "full"
                                             or cfg.opd.reward_weight):
            bad("opd.fused_head", "on needs form distribution, support full and no reward term (reward_weight 0)")
    if cfg.method == "calibrate" and not cfg.data.dev:
        bad("data.dev", "required for calibrate")
    if cfg.method == "grpo" and not cfg.grpo.rewards:
        bad("grpo.rewards", "at least one reward is required")
    if cfg.method == "rest":
        r = cfg.rest
        if r.rounds < 1:
            bad("rest.rounds", "must be >= 1")
        if r.samples < 1:
            bad("rest.samples", "must be >= 1")
        if not r.rewards:
            bad("rest.rewards", "at least one reward is required")
        if r.max_per_prompt < 0:
            bad("rest.max_per_prompt", "must be >= 0 (0 = all)")
        if r.steps_per_round < 0:
            bad("rest.steps_per_round", "must be >= 0 (0 = one pass over the kept samples)")
        try:  # YAML reads 1e-4 (no dot) as a string
            lrs = [float(x) for x in r.lrs if not isinstance(x, bool)]
        except (TypeError, ValueError):
            lrs = []
        if len(lrs) != r.rounds or len(r.lrs) != r.rounds:
            bad("rest.lrs", f"needs one learning rate per round (rest.rounds={r.rounds}), got {r.lrs!r}")
        r.lrs = lrs
    m = cfg.model
    if m.lora and not isinstance(m.lora.get("target_modules", []), (str, list)):
        bad("model.lora.target_modules", "a list of module names or a regex string")
    if m.load_in_4bit:
        if not m.lora:
            bad("model.lora", "model.load_in_4bit trains adapters only (QLoRA): set model.lora (e.g. {r: 16})")
        if cfg.backend.name != "torch":
            bad("model.load_in_4bit", "needs backend torch (DeepSpeed does not train a 4-bit base here)")
        if cfg.backend.device not in ("auto", "", "cuda"):
            bad("backend.device", "a 4-bit model is loaded onto this process's GPU; leave backend.device auto")
    if m.bnb_4bit_quant_type not in ("nf4", "fp4"):
        bad("model.bnb_4bit_quant_type", f"'{m.bnb_4bit_quant_type}' is not one of nf4, fp4")
    if m.bnb_4bit_compute_dtype not in ("float32", "bfloat16", "float16"):
        bad("model.bnb_4bit_compute_dtype", f"'{m.bnb_4bit_compute_dtype}' is not one of float32, bfloat16, float16")
    if cfg.data.modality not in ("auto", "audio", "av", "text"):
        bad("data.modality", f"'{cfg.data.modality}' is not one of auto, audio, av, text")
    if cfg.data.num_frames < 1:
        bad("data.num_frames", f"must be >= 1, got {cfg.data.num_frames}")
    if cfg.data.missing_audio not in ("error", "silence"):
        bad("data.missing_audio", f"'{cfg.data.missing_audio}' is not one of error, silence")
    if cfg.data.video_max_pixels < 28 * 28:
        bad("data.video_max_pixels", f"must be >= {28 * 28} (one 28x28 merged patch), got {cfg.data.video_max_pixels}")
    if cfg.backend.name not in ("torch", "deepspeed"):
        bad("backend.name", "torch | deepspeed")
    try:
        from core.utils.dist import device as _device
        _device(cfg.backend.device)
    except ValueError as e:
        bad("backend.device", str(e))
    if cfg.backend.name == "deepspeed" and cfg.backend.device not in ("auto", ""):
        bad("backend.device", "DeepSpeed places the model on its own accelerator (the GPU when there is one); "
                              "leave backend.device auto")
    if cfg.backend.name == "deepspeed" and not cfg.backend.ds_config:
        bad("backend.ds_config", "required with backend deepspeed")
    if cfg.backend.name == "deepspeed":
        ds = Path(cfg.backend.ds_config)
        if not ds.is_file():
            bad("backend.ds_config", f"{ds}: no such file")
        try:
            ds_cfg = json.loads(ds.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            bad("backend.ds_config", f"{ds}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})")
        except (OSError, UnicodeDecodeError) as e:
            bad("backend.ds_config", f"{ds}: cannot be read ({e})")
        if not isinstance(ds_cfg, dict):
            bad("backend.ds_config", f"{ds}: must hold a JSON object, got {type(ds_cfg).__name__}")
    if cfg.rollout.n < 1:
        bad("rollout.n", "must be >= 1")
    if cfg.train.batch_size < 1:
        bad("train.batch_size", "must be >= 1")
    return cfg


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not key=value")
        k, v = it.split("=", 1)
        d = out
        parts = k.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(v)
    return out


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
    ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    data = deep_merge(data, ov)
    try:
        return validate(_build(TrainConfig, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls=TrainConfig, prefix: str = "") -> str:
    """Every key with its default and help, for ``--help``."""
    lines = []
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            lines.append(describe(t, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
