"""Training configuration: dataclasses with help text, loaded from YAML and validated.

Every key of a YAML file must be a field of these dataclasses; an unknown or mistyped key is an
error that names its dotted path (``optim.lrr``) and the valid keys. ``key=value`` overrides
(``optim.lr=1e-4``) are parsed as YAML scalars and validated the same way.

What it leaves out: recipe settings that are not training (data sizes, model sizes live in the
recipe's own YAML read by its ``local/`` scripts).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


def _bad(key: str, msg: str):
    raise ConfigError(f"config key '{key}': {msg}")


PROMPT_REQUIRED = ("required for audio and audio-visual prompts: the text of the user turn after the media, "
                   "formatted with each row's fields, e.g. 'Transcribe the audio.' (ASR), '{question}' (QA), "
                   "'{prompt}' (rows that carry their rendered prompt)")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    path: str = _f("", "local model directory (config.json + weights + processor)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "float32 | bfloat16 | float16")
    trust_remote_code: bool = _f(False, "allow custom modelling code from the model directory")
    lora: dict = _f({}, "peft LoraConfig kwargs (r, lora_alpha, lora_dropout, target_modules, ...); empty = full "
                        "fine-tuning. Without target_modules: every linear layer of the language model's decoder "
                        "(attention q/k/v/o and MLP gate/up/down projections; in a mixture-of-experts decoder not "
                        "the fused experts nor the router), never the audio/vision encoder, as a "
                        "regex built from the model's module names (e.g. 'model\\.language_model\\..*\\.(q_proj|...)'"
                        " for Qwen2-Audio, 'model\\..*\\.(q_proj|...)' for a causal LM). The export merges the "
                        "adapters into the base weights (a plain model folder)")
    load_in_4bit: bool = _f(False, "load the base model quantised to 4 bits (bitsandbytes; QLoRA: needs model.lora, "
                                   "a CUDA GPU and backend torch); the export merges into a full-precision base")
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = _f("bfloat16", "4-bit: compute dtype (float32 | bfloat16 | float16)")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit: nf4 | fp4")
    export: Literal["auto", "full", "thinker"] = _f(
        "auto", "what final/ holds when model.path is a full Omni folder (Qwen2.5-Omni: thinker + talker + "
                "token2wav; Qwen3-Omni-MoE: thinker + talker + code2wav): auto/full: that folder with the trained "
                "thinker put back, so the model still speaks; thinker: the thinker alone. Other models: their "
                "own folder (full = auto)")

    def check(self, path: str) -> None:
        if self.lora and not isinstance(self.lora.get("target_modules", []), (str, list)):
            _bad(f"{path}.lora.target_modules", "a list of module names or a regex string")
        if self.load_in_4bit and not self.lora:
            _bad(f"{path}.lora", "model.load_in_4bit trains adapters only (QLoRA): set model.lora (e.g. {r: 16})")


@dataclass
class TeacherConfig:
    kind: Literal["local", "remote"] = _f("local", "local (in-process model) | remote (HTTP server)")
    path: str = _f("", "teacher model directory (local)")
    url: str = _f("", "teacher server base URL (remote), e.g. http://host:8000 (a trailing /v1 is accepted)")
    api_key: str = _f("", "bearer token for the remote teacher (empty: $TEACHER_API_KEY when set, else none)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "teacher dtype")
    model: str = _f("", "remote: served model name sent in requests (empty: the first model of GET /v1/models)")
    timeout: float = _f(60.0, "remote: seconds one scoring request may take before it is retried")
    max_retries: int = _f(3, "remote: retries of a request after a connection error, timeout, 5xx, 408 or 429 "
                             "(exponential backoff), then the run stops with an error naming the URL")
    retry_backoff: float = _f(1.0, "remote: first retry delay in seconds, doubled each retry (at most 30 s)")
    concurrency: int = _f(8, "remote: requests in flight at once (one per sample)")
    top_k_cap: int = _f(20, "remote: largest top-k asked for; vLLM refuses more than its --max-logprobs (20 by "
                            "default). opd.top_k above it is an error at start-up")

    def check(self, path: str) -> None:
        for key, lo in (("timeout", 1e-3), ("concurrency", 1), ("top_k_cap", 1), ("max_retries", 0),
                        ("retry_backoff", 0)):
            if getattr(self, key) < lo:
                _bad(f"{path}.{key}", f"must be >= {lo}, got {getattr(self, key)!r}")


@dataclass
class DataConfig:
    train: str = _f("", "training manifest (JSONL)")
    dev: str = _f("", "dev manifest for periodic evaluation (optional)")
    prompt: str = _f("", "the text of the user turn after the row's media, formatted with the row's fields; "
                         "required for audio and audio-visual prompts (no default: each task says its own), e.g. "
                         "'Transcribe the audio.' (ASR), '{question}' (QA), '{prompt}' (rows that carry their "
                         "rendered prompt); text prompts without it take each row's 'prompt' or 'question'")
    system: str = _f("", "optional system message")
    target_field: str = _f("text", "field holding the reference completion (sft)")
    skip_bad: bool = _f(False, "skip bad manifest lines (written with reasons to <manifest>.bad.jsonl)")
    max_target_tokens: int = _f(64, "truncate reference completions to this many tokens")
    dev_max_samples: int = _f(200, "use at most this many dev samples in evaluation")
    length_group: int = _f(0, "batch rows of similar length in training: each window of this many global batches "
                              "of the epoch's shuffled order is sorted by length (audio seconds, video duration, "
                              "prompt characters) and cut into batches, whose order is shuffled again (less "
                              "padding of prompts and audio); 0 = off")
    modality: Literal["auto", "audio", "av", "text"] = _f("auto", "auto | audio | av | text: audio prompts (rows need 'audio'), audio-visual prompts "
                               "(rows need 'video'; its frames and, as a separate input, its sound track or the "
                               "row's 'audio') or text-only prompts (no media); auto = av when the model has a "
                               "vision encoder and a row has 'video', else audio when it has an audio encoder and "
                               "a row has media, else text")
    num_frames: int = _f(8, "av: video frames sampled uniformly over each clip (or its begin_time..end_time)")
    missing_audio: Literal["error", "silence"] = _f("error", "av: a video without a sound track (and no 'audio' path in its row): error "
                                     "(refused with the file named, before training) | silence (silent audio of "
                                     "the clip's length)")
    video_max_pixels: int = _f(64 * 64, "av: largest frame area in pixels given to the vision encoder (frames are "
                                        "resized to multiples of patch x merge within it: 28 for Qwen2.5-Omni, "
                                        "32 for Qwen3-Omni; 64*64 keeps a 64x64 frame at 56x56 or 64x64, 4 "
                                        "tokens per 2 frames); raise it for real videos and models, e.g. 360*420")

    def check(self, path: str) -> None:
        if self.length_group < 0:
            _bad(f"{path}.length_group", "must be >= 0 (0 = off)")
        if self.num_frames < 1:
            _bad(f"{path}.num_frames", f"must be >= 1, got {self.num_frames}")
        if self.video_max_pixels < 28 * 28:
            _bad(f"{path}.video_max_pixels", f"must be >= {28 * 28} (one 28x28 merged patch), got {self.video_max_pixels}")


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = _f(0.3, "GPU: share of the GPU's memory vLLM may take (weights + KV cache); the "
                                             "trainer keeps the rest")
    kv_cache_gb: float = _f(1.0, "CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int = _f(0, "longest prompt + completion the engine holds (0: the model's max positions, at "
                               "most 4096)")
    enforce_eager: bool = _f(True, "no CUDA graphs / torch.compile: a start-up of seconds instead of a minute")
    tis_cap: float = _f(2.0, "truncated importance sampling: each token's policy-loss term is weighted by "
                             "min(p_trainer / p_engine, tis_cap) (0: off)")


@dataclass
class RolloutConfig:
    n: int = _f(1, "completions per prompt (group size for GRPO)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    max_new_tokens: int = _f(32, "maximum completion length")
    engine: Literal["hf", "vllm"] = _f("hf", "hf: our transformers sampling loop in the trainer's process | vllm: an "
                                             "in-process vLLM engine, its weights synced from the trainer after every "
                                             "optimizer step; the losses use the trainer's own log-probs of the samples")
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def check(self, path: str) -> None:
        if self.n < 1:
            _bad(f"{path}.n", "must be >= 1")
        if self.vllm.tis_cap < 0:
            _bad(f"{path}.vllm.tis_cap", "must be >= 0 (0: no importance weights)")
        if not self.temperature > 0:
            _bad(f"{path}.temperature", "must be > 0 (the rollout samples; greedy decoding is core.bin.decode's "
                                        "--temperature 0)")


@dataclass
class OPDConfig:
    form: Literal["distribution", "sampled_token"] = _f("distribution", "distribution (divergence on next-token distributions) | sampled_token (advantage = log pT - log pS)")
    divergence: Literal["reverse_kl", "forward_kl", "jsd"] = _f("reverse_kl", "reverse_kl | forward_kl | jsd")
    beta: float = _f(0.5, "JSD interpolation")
    temperature: float = _f(1.0, "distillation temperature")
    support: Literal["full", "teacher_topk", "student_topk", "union_topk"] = _f("full", "full | teacher_topk | student_topk | union_topk")
    top_k: int = _f(0, "size of the top-k support (0 with support=full)")
    coef: float = _f(1.0, "sampled-token form: advantage scale")
    reward_weight: float = _f(0.0, "hybrid: weight of the reward group advantage added to the OPD advantage")
    rewards: dict = _f({}, "hybrid: reward name -> weight")
    chunk_size: int = _f(256, "positions per chunk of the full-vocabulary divergence")
    fused_head: Literal["auto", "on", "off"] = _f("auto", "distribution form, full support: the divergence fused with the student's LM "
                                 "head (distill_loss_from_hidden), so no [B, T, V] student logits or their "
                                 "gradient are held: auto (vocabulary >= 32768, no reward term, a plain bias-free "
                                 "head not partitioned by ZeRO-3) | on | off")


@dataclass
class GRPOConfig:
    rewards: dict = _f({}, "reward name -> weight (from core/rewards.py)")
    scale: Literal["std", "none"] = _f("std", "std (GRPO) | none (Dr.GRPO)")
    clip_low: float = _f(0.2, "PPO clip below 1")
    clip_high: float = _f(0.2, "PPO clip above 1")
    kl_beta: float = _f(0.0, "weight of the KL penalty to the frozen reference")
    kl_kind: Literal["k1", "k2", "k3"] = _f("k3", "k1 | k2 | k3")
    agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = _f(
        "token-mean", "token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm")
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

    def check(self, path: str) -> None:
        if self.batch_size < 1:
            _bad(f"{path}.batch_size", "must be >= 1")


@dataclass
class BackendConfig:
    name: Literal["torch", "deepspeed"] = _f("torch", "torch | deepspeed")
    ds_config: str = _f("", "DeepSpeed JSON (ZeRO-2/3); 'auto' values are filled from this config")
    dist_backend: Literal["", "gloo", "nccl"] = _f("", "gloo | nccl (default: nccl with CUDA, else gloo)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N: where the policy, teacher and reference run (auto: this "
                             "process's GPU when there is one, else the CPU; DeepSpeed takes its own accelerator)")

    def check(self, path: str) -> None:
        try:
            from core.utils.dist import device as _device
            _device(self.device)
        except ValueError as e:
            _bad(f"{path}.device", str(e))
        if self.name != "deepspeed":
            return
        if self.device not in ("auto", ""):
            _bad(f"{path}.device", "DeepSpeed places the model on its own accelerator (the GPU when there is one); "
                                   "leave backend.device auto")


@dataclass
class LoggingConfig:
    report_to: list | str = _f(["tensorboard"], "experiment trackers besides metrics.jsonl: a list of tensorboard | "
                                                "wandb | mlflow (as transformers' Trainer names them); none or [] = "
                                                "metrics.jsonl only. wandb and mlflow need the 'trackers' extra "
                                                "(pip install 'audio-posttrain[trackers]')")
    project: str = _f("", "wandb project and MLflow experiment name; empty = $WANDB_PROJECT / "
                          "$MLFLOW_EXPERIMENT_NAME, else 'audio-posttrain'")
    run_name: str = _f("", "run name in wandb and MLflow; empty = output_dir")
    wandb_mode: Literal["", "online", "offline", "disabled"] = _f(
        "", "online | offline | disabled; empty = $WANDB_MODE, else wandb's default (online, after 'wandb login'). "
            "offline writes the run under output_dir/wandb, with no network, for a later 'wandb sync'")
    wandb_entity: str = _f("", "wandb team or user; empty = $WANDB_ENTITY, else your default entity")
    mlflow_tracking_uri: str = _f("", "MLflow tracking server or store (http://HOST:5000, sqlite:////abs/mlflow.db, "
                                      "databricks); empty = $MLFLOW_TRACKING_URI, else the SQLite store "
                                      "output_dir/mlflow.db ('mlflow ui --backend-store-uri sqlite:///...' "
                                      "shows it)")

    def check(self, path: str) -> None:
        from core.utils.trackers import TrackerError, check_installed, normalize_report_to
        try:
            self.report_to = normalize_report_to(self.report_to)
            check_installed(self.report_to)
        except TrackerError as e:
            _bad(f"{path}.report_to", str(e))


@dataclass
class RewardsConfig:
    modules: list = _f([], "Python files (or importable module names) imported when the config loads, whose "
                           "reward functions fn(completions, **sample_fields) -> list[float] are then usable by "
                           "name: a file registers them with @core.rewards.register_reward('name') or defines "
                           "REWARDS = {'name': fn}; relative paths resolve against the working directory (the "
                           "recipe folder)")


@dataclass
class TrainConfig:
    method: str = _f("sft", "a registered method (core.methods): sft | opd | grpo | rest | calibrate")
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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)


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
    obj = cls(**kwargs)
    if path and hasattr(obj, "check"):  # the section's own checks, where its keys are declared
        obj.check(path)
    return obj


def _coerce(v, t, key):
    if typing.get_origin(t) is Literal:
        choices = typing.get_args(t)
        if v not in choices or isinstance(v, bool):
            raise ConfigError(f"config key '{key}': {v!r} is not one of {', '.join(repr(c) for c in choices)}")
        return v
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


def _check_ds_config(path: str) -> None:
    """The DeepSpeed JSON of ``backend.ds_config``: given, readable, a JSON object."""
    if not path:
        _bad("backend.ds_config", "required with backend deepspeed")
    ds = Path(path)
    if not ds.is_file():
        _bad("backend.ds_config", f"{ds}: no such file")
    try:
        ds_cfg = json.loads(ds.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        _bad("backend.ds_config", f"{ds}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})")
    except (OSError, UnicodeDecodeError) as e:
        _bad("backend.ds_config", f"{ds}: cannot be read ({e})")
    if not isinstance(ds_cfg, dict):
        _bad("backend.ds_config", f"{ds}: must hold a JSON object, got {type(ds_cfg).__name__}")


def _check_model_folder(key: str, path: str, trust_remote_code: bool = False) -> None:
    """A model folder's type is one we support (checked only where the folder has a config.json:
    a missing folder is reported where it is loaded)."""
    from core.models import UnsupportedModel, check_model_type
    if (Path(path) / "config.json").is_file():
        try:
            check_model_type(path, trust_remote_code)
        except UnsupportedModel as e:
            _bad(key, str(e))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks across sections (each section checked its own keys when built): the method's own
    (``core.methods``), the user's reward modules imported and every reward name known."""
    from core.methods import get_method
    from core.rewards import load_reward_modules, registered_rewards
    method = get_method(cfg.method)
    if not cfg.model.path:
        _bad("model.path", "required")
    _check_model_folder("model.path", cfg.model.path, cfg.model.trust_remote_code)
    if method.uses_teacher and cfg.teacher.kind == "local" and cfg.teacher.path:
        _check_model_folder("teacher.path", cfg.teacher.path, cfg.model.trust_remote_code)
    if not cfg.data.train and not method.needs_dev:
        _bad("data.train", "required")
    if not cfg.data.prompt and cfg.data.modality in ("audio", "av"):
        _bad("data.prompt", PROMPT_REQUIRED)
    if cfg.model.load_in_4bit:
        if cfg.backend.name != "torch":
            _bad("model.load_in_4bit", "needs backend torch (DeepSpeed does not train a 4-bit base here)")
        if cfg.backend.device not in ("auto", "", "cuda"):
            _bad("backend.device", "a 4-bit model is loaded onto this process's GPU; leave backend.device auto")
    if cfg.backend.name == "deepspeed":
        _check_ds_config(cfg.backend.ds_config)
    method.check(cfg)
    cfg.logging.check("logging")
    if cfg.backend.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        _bad("backend.name", "deepspeed needs the package 'deepspeed', not installed: "
                             "pip install 'audio-posttrain[deepspeed]'")
    try:
        load_reward_modules(cfg.rewards.modules)
    except ValueError as e:
        _bad("rewards.modules", str(e).removeprefix("rewards.modules: "))
    known = set(registered_rewards())
    used = {key: list(w) for key, w in method.reward_weights(cfg).items()}
    if cfg.train.eval_reward:
        used["train.eval_reward"] = [cfg.train.eval_reward]
    for key, names in used.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            _bad(key, f"unknown reward {', '.join(map(repr, unknown))}; registered rewards: {', '.join(sorted(known))}"
                      " (a reward of your own: list its file in rewards.modules)")
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
