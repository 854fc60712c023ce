"""The model side of the teacher server: prompt log-probabilities and transcriptions, in batches.

``TeacherEngine`` loads a ``save_pretrained`` folder with ``load_model_and_processor`` and runs it
under ``torch.inference_mode()``:

- ``render`` + ``encode``: chat messages -> prompt text (the processor's chat template, with
  ``add_generation_prompt`` / ``continue_final_message`` as the request asks) -> one sample's
  processor output (token ids with the audio placeholders expanded, audio features).
- ``score``: one right-padded forward for a list of encoded prompts; for every prompt position
  the log-probability and rank of the actual token and the top-k, as vLLM's ``prompt_logprobs``
  (entry 0 is ``None``; ``-inf`` clamped to -9999.0), plus the distribution of the next token.
  The LM head runs ``chunk`` positions at a time on the captured last hidden states, so no
  ``[B, L, V]`` logits tensor exists.
- ``transcribe``: greedy (or sampled) decoding of uploaded clips with ``generate_completions``
  and ``AudioPromptCollator``, the same code the recipes decode with.

A failed batch is retried one request at a time, so that one bad request fails alone. All model
work goes through ``executor`` (one thread). What it leaves out: HTTP (``core/serve/app.py``),
generation of more than one token for chat requests, and any KV cache or paged attention.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from core.serve.protocol import vocab_fingerprint

log = logging.getLogger("core.serve")

NEG_CLAMP = -9999.0  # vLLM's clamp of -inf log-probs


class BadInput(ValueError):
    """A request the model cannot take (maps to HTTP 400)."""


@dataclass
class ScoreItem:
    inputs: dict          # one sample's processor output (batch dim 1), on the CPU
    k: int                # top-k of every prompt position (0: the actual token only)
    top_logprobs: int = 0  # top-k of the next token (0: only the greedy token)


@dataclass
class ScoreResult:
    token_ids: list
    prompt_logprobs: list  # [None, {id: {"logprob", "rank", "decoded_token"}}, ...]
    next_id: int
    next_logprob: float
    next_top: list         # [(id, logprob)] best first


@dataclass
class TranscribeItem:
    path: str             # a WAV file at the model's sample rate
    prompt: str
    temperature: float = 0.0


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate on dim 0, zero-padding every other dim to the largest size."""
    if len({tuple(t.shape[1:]) for t in tensors}) == 1:
        return torch.cat(tensors, 0)
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        p = t.new_zeros((t.shape[0], *shape))
        p[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
        out.append(p)
    return torch.cat(out, 0)


class TeacherEngine:
    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "float32", device: str | None = None,
                 trust_remote_code: bool = False, served_model_name: str | None = None,
                 max_new_tokens: int = 128, chunk: int = 256):
        from core.models import load_model_and_processor, special_token_ids, tokenizer_of

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, processor = load_model_and_processor(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                    device=device)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.device = torch.device(device)
        self.model_dir = str(model_dir)
        self.name = served_model_name or self.model_dir
        self.max_new_tokens = int(max_new_tokens)
        self.chunk = int(chunk)
        fe = getattr(processor, "feature_extractor", None)
        self.has_audio = fe is not None and any(n.split(".")[-1] == "audio_tower" for n, _ in model.named_modules())
        self.sample_rate = int(getattr(fe, "sampling_rate", 16000)) if self.has_audio else None
        head = model.get_output_embeddings()
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(text_cfg.vocab_size)
        self.max_model_len = getattr(text_cfg, "max_position_embeddings", None)
        # a head we may call ourselves: a plain module, and no soft-capping after it in the forward
        self._head = head if isinstance(head, torch.nn.Module) and not getattr(
            text_cfg, "final_logit_softcapping", None) else None
        self.tokenizer_size = len(self.tokenizer.get_vocab())
        self.fingerprint = vocab_fingerprint(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_id = self.tokenizer.eos_token_id
        self.suppress_ids = special_token_ids(processor)
        self._decoded: dict[int, str] = {}
        self.forward_calls = 0   # batched forwards run by ``score``
        self.scored = 0          # prompts scored
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-model")
        self._collator = None

    # ------------------------------------------------------------------ prompts
    def render(self, messages: list[dict], *, add_generation_prompt: bool, continue_final_message: bool,
               chat_template: str | None = None, chat_template_kwargs: dict | None = None) -> str:
        """The prompt text of ``messages`` (audio parts as ``{"type": "audio", "audio": name}``);
        ``BadInput`` on template errors."""
        kw = dict(chat_template_kwargs or {})
        if chat_template:
            kw["chat_template"] = chat_template
        target = self.processor if self.has_audio else self.tokenizer
        if not (chat_template or getattr(target, "chat_template", None)):
            raise BadInput(f"model {self.name} has no chat template; pass 'chat_template' in the request")
        try:
            return target.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                              continue_final_message=continue_final_message, **kw)
        except Exception as e:  # jinja2 errors, HF's continue_final_message checks
            raise BadInput(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode(self, text: str, audios: list, extra_ids: list[int] | None = None) -> dict:
        """One prompt's processor output (batch dim 1), ``extra_ids`` appended to the tokens;
        ``BadInput`` when it does not fit the model."""
        if audios and not self.has_audio:
            raise BadInput(f"model {self.name} takes no audio input")
        try:
            if self.has_audio:
                kw = dict(audio=list(audios), sampling_rate=self.sample_rate) if audios else {}
                enc = self.processor(text=[text], return_tensors="pt", **kw)
            else:
                enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        except Exception as e:  # placeholder / audio count mismatch, bad audio for the extractor
            raise BadInput(f"the processor could not encode this prompt: {type(e).__name__}: {e}") from None
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"}
        if extra_ids:
            extra = torch.tensor([list(extra_ids)], dtype=inputs["input_ids"].dtype)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
            if "attention_mask" in inputs:
                inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        L = inputs["input_ids"].shape[1]
        if self.max_model_len and L > self.max_model_len:
            raise BadInput(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                           f"requested {L} tokens in the prompt.")
        if L == 0:
            raise BadInput("the prompt is empty")
        return inputs

    def _to_model(self, t: torch.Tensor) -> torch.Tensor:
        """To the model's device; floating inputs (audio features) also to its dtype."""
        if t.is_floating_point():
            return t.to(self.device, self.model.dtype)
        return t.to(self.device)

    def decoded(self, token_id: int) -> str:
        s = self._decoded.get(token_id)
        if s is None:
            tok = self.tokenizer.convert_ids_to_tokens(int(token_id))
            s = self.tokenizer.convert_tokens_to_string([tok]) if tok is not None else ""
            self._decoded[token_id] = s
        return s

    # ------------------------------------------------------------------ scoring
    def score(self, items: list[ScoreItem]) -> list:
        """``ScoreResult`` per item, or the exception that item raised (the batch, then one by one)."""
        try:
            return self._score_batch(items)
        except Exception as e:
            if len(items) == 1:
                log.exception("scoring failed")
                return [e]
            log.warning("batched scoring of %d prompts failed (%s: %s); scoring them one by one",
                        len(items), type(e).__name__, e)
        out = []
        for it in items:
            try:
                out += self._score_batch([it])
            except Exception as e:  # noqa: PERF203
                log.exception("scoring failed")
                out.append(e)
        return out

    @torch.inference_mode()
    def _forward_hidden(self, items: list[ScoreItem]):
        """One right-padded forward: (``[B, L, H]`` last hidden states or ``[B, L, V]`` logits, ids, lens)."""
        lens = [int(it.inputs["input_ids"].shape[1]) for it in items]
        B, L = len(items), max(lens)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, : lens[b]] = it.inputs["input_ids"][0]
            attn[b, : lens[b]] = 1
        extra = {}
        for key in sorted({k for it in items for k in it.inputs if k not in ("input_ids", "attention_mask")}):
            extra[key] = self._to_model(_pad_cat([it.inputs[key] for it in items if key in it.inputs]))
        kw = dict(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), use_cache=False, **extra)
        self.forward_calls += 1
        self.scored += B
        if self._head is None:
            return self.model(**kw).logits, ids, lens, True
        captured = {}

        def _grab(mod, args):  # keep the head's input, let the forward compute one position only
            captured["h"] = args[0]
            return (args[0][:, -1:],) + tuple(args[1:])

        handle = self._head.register_forward_pre_hook(_grab)
        try:
            self.model(**kw)
        finally:
            handle.remove()
        return captured["h"], ids, lens, False

    @torch.inference_mode()
    def _score_batch(self, items: list[ScoreItem]) -> list[ScoreResult]:
        states, ids, lens, are_logits = self._forward_hidden(items)
        results = []
        for b, it in enumerate(items):
            n = lens[b]
            row_ids = ids[b, :n]
            targets = row_ids[1:].to(self.device)
            act_lp, act_rank, top_lp, top_ids = [], [], [], []
            nxt = None
            for s in range(0, n, self.chunk):
                e = min(n, s + self.chunk)
                x = states[b, s:e]
                logits = (x if are_logits else self._head(x)).float()
                logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                if not torch.isfinite(logp).any(-1).all():
                    raise RuntimeError("the model produced non-finite log-probabilities")
                m = min(e, n - 1) - s  # rows of this chunk that predict a prompt token
                if m > 0:
                    lp, tg = logp[:m], targets[s: s + m]
                    a = lp.gather(-1, tg[:, None]).squeeze(-1)
                    act_lp.append(a)
                    act_rank.append((lp >= a[:, None]).sum(-1))
                    if it.k > 0:
                        v, i = lp.topk(min(it.k, lp.shape[-1]), dim=-1)
                        top_lp.append(v)
                        top_ids.append(i)
                if e == n:
                    last = logp[n - 1 - s]
                    v, i = last.topk(max(1, min(it.top_logprobs, last.shape[-1])))
                    nxt = (int(i[0]), float(v[0]), list(zip(i.tolist(), v.tolist())))
            results.append(self._entries(row_ids.tolist(), act_lp, act_rank, top_lp, top_ids, it, nxt))
        return results

    def _entries(self, row_ids, act_lp, act_rank, top_lp, top_ids, it, nxt) -> ScoreResult:
        def clamp(x: float) -> float:
            return x if x > NEG_CLAMP else NEG_CLAMP

        cat = lambda xs: torch.cat(xs).tolist() if xs else []  # noqa: E731
        a_lp, a_rank = cat(act_lp), cat(act_rank)
        t_lp = torch.cat(top_lp).tolist() if top_lp else None
        t_ids = torch.cat(top_ids).tolist() if top_ids else None
        entries: list = [None]
        for j in range(len(a_lp)):
            tid = row_ids[j + 1]
            d = {str(tid): {"logprob": clamp(a_lp[j]), "rank": int(a_rank[j]), "decoded_token": self.decoded(tid)}}
            if t_ids is not None:  # the actual token first, then the top-k (vLLM's order and overwrite)
                for r, (i, v) in enumerate(zip(t_ids[j], t_lp[j]), start=1):
                    d[str(i)] = {"logprob": clamp(v), "rank": r, "decoded_token": self.decoded(i)}
            entries.append(d)
        top = [(i, clamp(v)) for i, v in nxt[2][: max(1, it.top_logprobs)]]
        return ScoreResult(row_ids, entries, nxt[0], clamp(nxt[1]), top)

    # ------------------------------------------------------------------ transcription
    def transcribe(self, items: list[TranscribeItem]) -> list:
        """The text per item, or the exception that item raised (the batch, then one by one)."""
        try:
            return self._transcribe_batch(items)
        except Exception as e:
            if len(items) == 1:
                log.exception("transcription failed")
                return [e]
            log.warning("batched transcription of %d clips failed (%s: %s); decoding them one by one",
                        len(items), type(e).__name__, e)
        out = []
        for it in items:
            try:
                out += self._transcribe_batch([it])
            except Exception as e:  # noqa: PERF203
                log.exception("transcription failed")
                out.append(e)
        return out

    @torch.inference_mode()
    def _transcribe_batch(self, items: list[TranscribeItem]) -> list[str]:
        from core.data.collate import AudioPromptCollator, PromptBatch
        from core.sampling import generate_completions

        if self._collator is None:
            self._collator = AudioPromptCollator(self.processor, "{prompt}", sample_rate=self.sample_rate)
        out: list = [None] * len(items)
        for temp in sorted({it.temperature for it in items}):
            idx = [i for i, it in enumerate(items) if it.temperature == temp]
            rows = [{"key": f"upload{i}", "audio": items[i].path, "prompt": items[i].prompt} for i in idx]
            batch = self._collator.prompts(rows)
            batch = PromptBatch({k: self._to_model(v) for k, v in batch.inputs.items()}, batch.rows, batch.texts,
                                batch.audios)
            _, comp = generate_completions(self.model, batch, self.tokenizer, do_sample=temp > 0,
                                           temperature=temp if temp > 0 else 1.0, max_new_tokens=self.max_new_tokens,
                                           suppress_ids=self.suppress_ids, eos_ids=[self.eos_id], return_logp=False)
            for i, t in zip(idx, comp.texts):
                out[i] = t
        return out
