"""Sampling engine and the completion forward pass every method shares.

- ``generate_completions``: batched ``generate`` with n samples per prompt, temperature / top-p /
  top-k / max-new-tokens, special tokens suppressed (a sampled ``<|AUDIO|>`` breaks the next
  forward), stop at EOS; returns completion ids, a mask that is 1 up to and including EOS, and
  the sampled tokens' log-probabilities under ``log_softmax(logits / temperature)``, the same
  quantity ``completion_logits`` recomputes for training. Deterministic under a seed.
- ``completion_logits``: one forward of prompt + completion returning the logits that predict
  each completion token, ``[B, T, V]``. Position ids follow the attention mask, as in
  ``generate``, so left-padded prompts score exactly as they were sampled; a model with
  multimodal rotary positions (``get_rope_index``: Qwen2-VL, the Qwen2.5-Omni thinker) gets none
  and builds its own from the attention mask and the video grids over the whole prompt +
  completion, which continues the prompt's positions as its ``generate`` does. The LM head runs on
  the completion positions only (``logits_to_keep`` where the model takes it; the head's input
  sliced by a forward pre-hook for Qwen2-Audio and the Qwen2.5-Omni thinker).

What it leaves out: any loss, any teacher, any server-side engine (vLLM).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from core.data.collate import PromptBatch


@dataclass
class Completions:
    """Completions aligned with a ``PromptBatch`` (row i of both belong together)."""

    ids: torch.Tensor            # [B, T] long, pad after EOS
    mask: torch.Tensor           # [B, T] 1 for completion tokens up to and including EOS
    logp: torch.Tensor | None    # [B, T] sampled-token log-probs under the sampler (0 outside mask)
    texts: list[str]

    def select(self, idx: list[int]) -> "Completions":
        t = torch.as_tensor(idx, dtype=torch.long)
        return Completions(self.ids[t], self.mask[t], None if self.logp is None else self.logp[t],
                           [self.texts[i] for i in idx])


def eos_mask(ids: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 for every token up to and including the first EOS (all tokens if none)."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    # number of EOS strictly before position t
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (before == 0).long()


def _unwrap(model):
    return getattr(model, "module", model)


def _media_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@torch.no_grad()
def generate_completions(model, batch: PromptBatch, tokenizer, *, n: int = 1, temperature: float = 1.0,
                         top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 32,
                         do_sample: bool = True, suppress_ids: list[int] | None = None,
                         eos_ids: list[int] | None = None, seed: int | None = None,
                         synced_gpus: bool = False, return_logp: bool = True) -> tuple[PromptBatch, Completions]:
    """Sample ``n`` completions per prompt. Returns the repeated ``PromptBatch`` and ``Completions``.

    The repeated batch holds the ``n`` copies of prompt i at rows ``i*n .. i*n+n-1``.
    """
    m = _unwrap(model)
    rep = batch.repeat(n)
    eos_ids = list(eos_ids or [tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if seed is not None:
        torch.manual_seed(seed)
    was_training = m.training
    m.eval()
    gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_ids,
                  pad_token_id=pad_id, return_dict_in_generate=True, output_logits=return_logp,
                  use_cache=True)
    if do_sample:
        gen_kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if suppress_ids:
        gen_kw["suppress_tokens"] = list(suppress_ids)
    if synced_gpus:
        gen_kw["synced_gpus"] = True
    try:
        out = m.generate(**rep.inputs, **gen_kw)
    finally:
        m.train(was_training)
    P = rep.inputs["input_ids"].shape[1]
    ids = out.sequences[:, P:]
    if ids.shape[1] == 0:
        ids = torch.full((ids.shape[0], 1), eos_ids[0], dtype=torch.long)
    mask = eos_mask(ids, eos_ids)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    logp = None
    if return_logp and out.logits:
        logp = _sampled_logp(out.logits, ids, temperature if do_sample else 1.0) * mask
    del out
    texts = decode_completions(tokenizer, ids, mask)
    return rep, Completions(ids, mask, logp, texts)


def _sampled_logp(step_logits, ids: torch.Tensor, temperature: float, chunk: int = 16) -> torch.Tensor:
    """``log_softmax(logits_t / temperature)[y_t]`` for each step ``t``, ``[B, T]``.

    Works ``chunk`` steps at a time (the gathered logit minus the step's logsumexp), so no
    ``[B, T, V]`` stack, float copy or log-softmax of the whole rollout is allocated: the extra
    memory is ``chunk`` steps' ``[B, V]``, which matters with a real vocabulary (150k entries).
    """
    T = ids.shape[1]
    cols = []
    for s in range(0, T, chunk):
        lg = torch.stack(step_logits[s: s + chunk], dim=1).float()  # [B, c, V]
        if temperature != 1.0:
            lg = lg / temperature
        y = ids[:, s: s + lg.shape[1]].to(lg.device).unsqueeze(-1)
        cols.append(lg.gather(-1, y).squeeze(-1) - torch.logsumexp(lg, dim=-1))
        del lg
    return torch.cat(cols, dim=1).to(ids.device)


def decode_completions(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    return [t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True)]


_SUPPORTS: dict = {}


def _supports(model, name: str) -> bool:
    key = (type(model), name)
    if key not in _SUPPORTS:
        try:
            _SUPPORTS[key] = name in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _SUPPORTS[key] = False
    return _SUPPORTS[key]


# transformers classes whose forward is exactly ``logits = self.lm_head(self.model(...)[0])`` and
# that take no ``logits_to_keep``: for them the LM head's input is sliced to the completion positions.
_SLICE_HEAD_CLASSES = ("Qwen2AudioForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration")


def _sliceable_head(model):
    """The LM head module of a ``_SLICE_HEAD_CLASSES`` model (through a peft wrapper), else None."""
    base = _base_model(model)
    if type(base).__name__ not in _SLICE_HEAD_CLASSES:
        return None
    head = getattr(base, "lm_head", None)
    return head if isinstance(head, torch.nn.Module) else None


def _base_model(model):
    base = _unwrap(model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def uses_mrope(model) -> bool:
    """Whether the model places tokens with multimodal (3-D) rotary positions of its own."""
    return callable(getattr(_base_model(model), "get_rope_index", None))


def completion_logits(model, batch: PromptBatch, comp_ids: torch.Tensor, comp_mask: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32, divided by ``temperature``) predicting each completion token."""
    inputs = batch.inputs
    p_ids, p_mask = inputs["input_ids"], inputs["attention_mask"]
    P, T = p_ids.shape[1], comp_ids.shape[1]
    dev = p_ids.device
    input_ids = torch.cat([p_ids, comp_ids.to(dev)], dim=1)
    attn = torch.cat([p_mask, comp_mask.to(dev).to(p_mask.dtype)], dim=1)
    kw = dict(input_ids=input_ids, attention_mask=attn, use_cache=False, **_media_kwargs(inputs))
    if not uses_mrope(model):
        kw["position_ids"] = (attn.long().cumsum(-1) - 1).clamp(min=0)
    m = _unwrap(model)
    head = None if _supports(m, "logits_to_keep") else _sliceable_head(model)
    if _supports(m, "logits_to_keep"):
        kw["logits_to_keep"] = T + 1
        logits = model(**kw).logits[:, :-1]
    elif head is not None:
        # the LM head on the completion positions only: no [B, P + T, V] logits over the prompt
        # (hundreds of audio positions times the vocabulary), forward or backward. A pre-hook
        # slices the head's input, so the call still goes through the model's own forward (and
        # through any ZeRO-3 / peft hooks on it).
        def _slice(mod, args):
            return (args[0][:, P - 1: P + T - 1],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(_slice)
        try:
            logits = model(**kw).logits
        finally:
            handle.remove()
    else:
        logits = model(**kw).logits[:, P - 1: P + T - 1]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``ids`` ``[B, T]`` under ``logits`` ``[B, T, V]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
