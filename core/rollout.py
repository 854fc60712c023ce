"""Sampling engine and the completion forward pass every method shares.

- ``generate_completions``: n samples per prompt, temperature / top-p / top-k / max-new-tokens,
  special tokens suppressed (a sampled ``<|AUDIO|>`` breaks the next forward), stop at EOS;
  returns completion ids, a mask that is 1 up to and including EOS, and the sampled tokens'
  log-probabilities under ``log_softmax(logits / temperature)``, the same quantity
  ``completion_logits`` recomputes for training. Deterministic under a seed.
- ``sample_loop``: our KV-cached sampler behind it. Each distinct prompt is prefilled once and
  its cache copied into buffers of the final length for its n samples; then one forward per new
  token, with the processing steps of ``model.generate`` (with its ``multinomial`` draw, the same
  tokens under the same seed, tested) but without its per-step machinery, and an inverse-CDF draw
  (``draw``) that samples the same distribution much faster on a CPU. A model with multimodal
  rotary positions that keeps ``rope_deltas`` (the Qwen2.5-Omni thinker) places the prompt
  itself; its new tokens take their text positions plus that row's offset on all three axes
  (``_text_positions``), as its own decoding does. ``engine="hf"`` (and a model the loop cannot
  place, ``own_loop_ok``) uses ``model.generate``.
  ``synced_gpus`` keeps ZeRO-3 ranks stepping together until all are done.
- ``completion_logits``: one forward of prompt + completion returning the logits that predict
  each completion token, ``[B, T, V]``. Position ids follow the attention mask, as in
  generation, so left-padded prompts score exactly as they were sampled; a model with
  multimodal rotary positions (``get_rope_index``: Qwen2-VL, the Qwen2.5-Omni thinker) gets none
  and builds its own from the attention mask and the video grids over the whole prompt +
  completion, which continues the prompt's positions as its ``generate`` does. The LM head runs on
  the completion positions only (``logits_to_keep`` where the model takes it; the head's input
  sliced by a forward pre-hook for Qwen2-Audio and the Qwen2.5-Omni thinker). When rows are
  copies of one prompt (the rollout's n samples), each distinct prompt runs once
  (``shared_prompt_logits``: its layers and encoders once, the copies reading its KV cache, at
  the positions the loop would give them), or, where that cannot run (activation checkpointing),
  at least its media encoders (``encoders_once``); the logits and gradients are the plain
  forward's.
- ``encoders_once(model, batch)``: while it is open, the model's audio / vision encoders
  (``_SHARED_ENCODERS``: Qwen2-Audio's ``audio_tower``, the Qwen2.5-Omni thinker's ``audio_tower``
  and ``visual``) see only the distinct prompts of a batch whose rows are copies
  (``PromptBatch.groups``, set by ``repeat``), and every copy gets its prompt's output back by an
  ``index_select``, whose backward sums the copies' gradients into the encoder's, as the plain
  forward does. It works through hooks on the encoder modules, so the call still goes through
  the model's own forward (and any ZeRO-3 / peft hooks); other models run unchanged.

What it leaves out: any loss, any teacher, any server-side engine (vLLM).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from core.data.collate import PromptBatch, index_rows, segment_rows


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
                         synced_gpus: bool = False, return_logp: bool = True,
                         engine: str = "auto") -> tuple[PromptBatch, Completions]:
    """Sample ``n`` completions per prompt. Returns the repeated ``PromptBatch`` and ``Completions``.

    The repeated batch holds the ``n`` copies of prompt i at rows ``i*n .. i*n+n-1``.
    ``engine``: ``"auto"`` runs our KV-cached loop (``sample_loop``) where the model takes a cache
    and places tokens with ordinary positions, else ``model.generate``; ``"hf"`` always
    ``model.generate``. Both sample the same distribution; their draws differ (``draw``).
    """
    if engine not in ("auto", "hf"):
        raise ValueError(f"engine must be 'auto' or 'hf', not {engine!r}")
    m = _unwrap(model)
    rep = batch.repeat(n)
    eos_ids = list(eos_ids or [tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if seed is not None:
        torch.manual_seed(seed)
    was_training = m.training
    m.eval()
    try:
        if engine == "auto" and own_loop_ok(model, batch):
            ids, step_logp = sample_loop(
                model, batch, n, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                top_p=top_p, top_k=top_k, suppress_ids=suppress_ids, eos_ids=eos_ids, pad_id=pad_id,
                synced_gpus=synced_gpus, return_logp=return_logp)
        else:
            ids, step_logp = _hf_generate(m, rep, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                          temperature=temperature, top_p=top_p, top_k=top_k,
                                          suppress_ids=suppress_ids, eos_ids=eos_ids, pad_id=pad_id,
                                          synced_gpus=synced_gpus, return_logp=return_logp)
    finally:
        m.train(was_training)
    if ids.shape[1] == 0:
        ids = torch.full((ids.shape[0], 1), eos_ids[0], dtype=torch.long, device=ids.device)
        step_logp = None
    mask = eos_mask(ids, eos_ids)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_id))
    logp = None if step_logp is None else step_logp * mask
    texts = decode_completions(tokenizer, ids, mask)
    return rep, Completions(ids, mask, logp, texts)


def _hf_generate(m, rep: PromptBatch, *, max_new_tokens, do_sample, temperature, top_p, top_k, suppress_ids,
                 eos_ids, pad_id, synced_gpus, return_logp):
    """``model.generate`` on the repeated batch: completion ids ``[B, T]`` and the sampled tokens'
    log-probs ``[B, T]`` (or None)."""
    gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_ids,
                  pad_token_id=pad_id, return_dict_in_generate=True, output_logits=return_logp,
                  use_cache=True)
    if do_sample:
        gen_kw.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if suppress_ids:
        gen_kw["suppress_tokens"] = list(suppress_ids)
    if synced_gpus:
        gen_kw["synced_gpus"] = True
    # the prefill's media encoders run once per prompt, not once per sample (encoders_once)
    with encoders_once(m, rep):
        out = m.generate(**rep.inputs, **gen_kw)
    P = rep.inputs["input_ids"].shape[1]
    ids = out.sequences[:, P:]
    logp = None
    if return_logp and out.logits and ids.shape[1] > 0:
        logp = _sampled_logp(out.logits, ids, temperature if do_sample else 1.0)
    return ids, logp


# --------------------------------------------------------------------------- our sampling loop
def _cache_arg(model) -> str | None:
    """The name under which the model's forward takes a KV cache (transformers 5: ``cache``)."""
    m = _base_model(model)
    for name in ("cache", "past_key_values"):
        if _supports(m, name):
            return name
    return None


def _out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else getattr(out, "past_key_values", None)


def own_loop_ok(model, batch: PromptBatch | None = None) -> bool:
    """Whether ``sample_loop`` (and the shared prompt forward) can run ``model`` (on ``batch``): its
    forward takes a KV cache and explicit positions: 1-D ones, or, for a multimodal-rotary model
    (the Omni thinker), 3-D ones offset by the ``rope_deltas`` its prompt forward leaves
    (``_rope_holder``). Not for prompts that interleave audio into the video
    (``use_audio_in_video``), whose last prompt position need not be the largest."""
    if _cache_arg(model) is None:
        return False
    if not uses_mrope(model):
        return True
    interleaved = batch is not None and bool(batch.inputs.get("use_audio_in_video", False))
    return _rope_holder(model) is not None and not interleaved


# multimodal-rotary models whose decoding positions the loop reproduces (tested against their
# ``generate``); others of the kind keep ``generate`` and share their encoders only
_MROPE_LOOP_CLASSES = ("Qwen2_5OmniThinkerForConditionalGeneration",)


def _rope_holder(model):
    """The module of a ``_MROPE_LOOP_CLASSES`` model that keeps ``rope_deltas`` (the offset of each
    row's text positions after its media, set by a prompt forward), or None."""
    base = _base_model(model)
    if type(base).__name__ not in _MROPE_LOOP_CLASSES:
        return None
    for m in (base, getattr(base, "model", None)):
        if m is not None and hasattr(m, "rope_deltas"):
            return m
    return None


def _text_positions(positions: torch.Tensor, deltas: torch.Tensor | None) -> torch.Tensor:
    """Positions ``[B, L]`` of text tokens after the prompt, as the model takes them: as they are,
    or, with a multimodal-rotary model's per-row ``deltas`` ``[B, 1]``, shifted and repeated over
    its three rotary axes (time, height, width), ``[3, B, L]``, as its own decoding builds them."""
    if deltas is None:
        return positions
    return (positions + deltas.to(positions.device).reshape(-1, 1)).unsqueeze(0).expand(3, -1, -1)


def _head_logits(model, kw: dict, start: int, stop: int) -> tuple[torch.Tensor, object]:
    """One forward of ``kw`` (``L`` positions); returns the logits of positions ``start..stop-1``
    and the model output. The LM head runs on those positions only where the model allows it
    (``logits_to_keep`` when ``stop`` is ``L`` or ``L - 1``; for ``_SLICE_HEAD_CLASSES`` a forward
    pre-hook slices the head's input, so the call still goes through the model's own forward and
    any ZeRO-3 / peft hooks on it): no ``[B, L, V]`` logits over a long (audio) prompt."""
    L = kw["input_ids"].shape[1]
    if _takes_logits_to_keep(model) and stop >= L - 1:
        out = model(**kw, logits_to_keep=L - start)
        return out.logits[:, : stop - start], out
    head = _sliceable_head(model)
    if head is None:
        out = model(**kw)
        return out.logits[:, start:stop], out
    handle = head.register_forward_pre_hook(lambda mod, args: (args[0][:, start:stop],) + tuple(args[1:]))
    try:
        out = model(**kw)
    finally:
        handle.remove()
    return out.logits, out


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask (left padding), as ``generate`` builds them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(model, batch: PromptBatch, rows: list[int] | None):
    """Forward of the prompts of ``batch`` (of its rows ``rows`` if given) with a KV cache.
    Returns (last-position logits ``[U, V]``, the cache, the rows' rotary ``deltas`` ``[U, 1]``
    for a multimodal-rotary model, which places the prompt's tokens itself, else None)."""
    inputs = batch.inputs if rows is None else batch.select(rows).inputs
    p_mask = inputs["attention_mask"]
    L = p_mask.shape[1]
    kw = dict(input_ids=inputs["input_ids"], attention_mask=p_mask, use_cache=True, **_media_kwargs(inputs))
    holder = _rope_holder(model) if uses_mrope(model) else None
    if holder is None:
        kw["position_ids"] = _positions(p_mask)
    else:
        holder.rope_deltas = None  # computed afresh from this prompt forward
    logits, out = _head_logits(model, kw, L - 1, L)
    logits = logits[:, -1]
    cache = _out_cache(out)
    if cache is None:
        raise RuntimeError(f"{type(_base_model(model)).__name__} returned no KV cache from a forward with use_cache")
    deltas = None
    if holder is not None:
        deltas = holder.rope_deltas
        if deltas is None:
            raise RuntimeError(f"{type(_base_model(model)).__name__} left no rope_deltas after its prompt forward")
        deltas = deltas.reshape(-1, 1)
    return logits, cache, deltas


def _expand_prompts(cache, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Give row ``i`` of the expanded batch the cache and logits of prompt ``rows[i]``; an
    ``index_select``, so the copies' gradients sum into the prompt's."""
    if rows == list(range(logits.shape[0])):
        return logits
    idx = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
    cache.batch_select_indices(idx)
    return logits.index_select(0, idx)


def _static_cache(model, cache, rows: list[int], length: int):
    """A ``StaticCache`` of ``length`` positions holding, for row i, the prompt cache of ``cache``'s
    row ``rows[i]`` (copied layer by layer), or None where the model's cache is not a plain
    ``DynamicCache``. Decoding then writes each new key and value in place instead of growing
    (copying) every layer's cache at every step, about a sixth of a decode step here."""
    from transformers import DynamicCache, StaticCache
    if type(cache) is not DynamicCache:
        return None
    config = _base_model(model).config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    # the full-length mask below is what sdpa / eager attention read; flash attention would take
    # an all-ones mask for "no mask" and attend the empty slots. Sliding-window layers keep only
    # the window: their positions would not be the prompt's.
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    try:
        lens = {int(layer.get_seq_length()) for layer in cache.layers}
        if any(getattr(layer, "is_sliding", False) for layer in cache.layers) or len(lens) != 1:
            return None
        static = StaticCache(config=config, max_cache_len=length)
        if len(static.layers) != len(cache.layers) or any(getattr(x, "is_sliding", False) for x in static.layers):
            return None
        for dst, src in zip(static.layers, cache.layers):
            idx = torch.as_tensor(rows, dtype=torch.long, device=src.keys.device)
            dst.update(src.keys.index_select(0, idx), src.values.index_select(0, idx))
    except (TypeError, ValueError, AttributeError, IndexError):  # a cache layout this transformers build lacks
        return None
    return static


def _filter_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores of each row (ties with the k-th kept); -inf elsewhere."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _filter_top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose probabilities sum to at most ``1 - p``
    (the most likely token always stays); -inf there."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    drop_sorted = ascending.softmax(-1).cumsum(-1) <= 1.0 - p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` ``[B, V]`` (rows summing to about 1), index j with
    probability ``probs[:, j]``; zero entries are never drawn.

    Inverse-CDF sampling: one uniform per row against the row's cumulative sums (in float64, so
    the smallest probabilities of a 150k vocabulary keep their share). The distribution of
    ``torch.multinomial(probs, 1)`` at a fraction of its CPU cost (measured here: 0.09 ms against
    1.3 ms for [16, 2048], 1.6 ms against 72 ms for [16, 151936]), and deterministic under
    ``torch.manual_seed``; the draws themselves differ from ``multinomial``'s.
    """
    cdf = probs.to(torch.float64).cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("sampling probabilities are NaN, infinite or all zero (non-finite logits, or a "
                         "temperature of 0 with sampling on)")
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    # the first index whose cumulative sum exceeds u: a zero entry never does before its neighbour
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _all_ranks_done(done: bool, device) -> bool:
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()):
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    tdist.all_reduce(flag)
    return float(flag) == 0.0


def sample_loop(model, batch: PromptBatch, n: int, *, max_new_tokens: int, do_sample: bool = True,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                suppress_ids: list[int] | None = None, eos_ids: list[int], pad_id: int,
                synced_gpus: bool = False, return_logp: bool = True):
    """Our KV-cached sampler: ``n`` completions per prompt of ``batch``.

    The prompts are prefilled once each (the distinct prompts of ``batch``; their cache and last
    logits are then copied to the ``n`` samples), then one forward per new token. Each step:
    special tokens to -inf, then (sampling) divide by ``temperature``, top-k, top-p, one draw from
    the softmax (``draw``: inverse CDF, the distribution of ``torch.multinomial`` at a fraction of
    its CPU cost), or (greedy) argmax; finished rows get ``pad_id``. These are the steps of
    ``model.generate`` with the same settings (with ``multinomial`` as the draw, the same seed
    samples the same tokens, tested); a checkpoint's own ``generation_config`` extras (repetition
    penalty and the like) are not applied: the samples come from the policy's own softmax. The
    log-probs are the sampled tokens' under ``log_softmax(logits / temperature)`` (1 when greedy).
    ``synced_gpus``: keep stepping until every rank is done (ZeRO-3 gathers).

    Returns ids ``[B*n, T]`` (T <= max_new_tokens, ending when every row has sampled an EOS) and
    the log-probs ``[B*n, T]`` (None unless ``return_logp``).
    """
    inputs = batch.inputs
    p_mask = inputs["attention_mask"]
    dev = p_mask.device
    B0, P = p_mask.shape
    distinct = batch.distinct()
    first, inverse = distinct if distinct is not None else (None, list(range(B0)))
    rows = [inverse[i] for i in range(B0) for _ in range(n)]
    B = len(rows)
    if max_new_tokens <= 0:
        return torch.zeros(B, 0, dtype=torch.long, device=dev), None
    cache_arg = _cache_arg(model)
    logits, cache, deltas = _prefill(model, batch, first)
    if deltas is not None:  # the rotary offset of each sample's prompt
        deltas = index_rows(deltas, rows)
    static = _static_cache(model, cache, rows, P + max_new_tokens)
    if static is not None:  # the prompts' keys and values copied once into buffers of the final length
        cache, logits = static, index_rows(logits, rows)
    else:
        logits = _expand_prompts(cache, logits, rows)
    mask = torch.cat([p_mask.repeat_interleave(n, dim=0), p_mask.new_ones(B, max_new_tokens)], dim=1)
    pos = mask[:, :P].long().sum(-1, keepdim=True)  # the first new token's position (positions count real tokens)
    V = logits.shape[-1]  # suppressed ids past the LM head's rows (added tokens) cannot be sampled anyway
    sup = sorted(i for i in set(suppress_ids or []) if 0 <= i < V)
    sup = torch.as_tensor(sup, dtype=torch.long, device=dev) if sup else None
    eos = torch.as_tensor(list(eos_ids), dtype=torch.long, device=dev)
    temp = temperature if do_sample else 1.0
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    toks, lps = [], []
    for t in range(max_new_tokens):
        logits = logits.float()
        scores = logits if sup is None else logits.index_fill(-1, sup, float("-inf"))
        if do_sample:
            if temperature != 1.0:
                scores = scores / temperature
            scores = _filter_top_p(_filter_top_k(scores, top_k), top_p)
            nxt = draw(torch.softmax(scores, dim=-1))
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        toks.append(nxt)
        if return_logp:
            lg = logits / temp if temp != 1.0 else logits
            lps.append(lg.gather(-1, nxt[:, None]).squeeze(1) - torch.logsumexp(lg, dim=-1))
        finished |= torch.isin(nxt, eos)
        done = bool(finished.all())
        if synced_gpus:
            done = _all_ranks_done(done, dev)
        if done or t == max_new_tokens - 1:
            break
        out = model(input_ids=nxt[:, None], attention_mask=mask if static is not None else mask[:, :P + t + 1],
                    position_ids=_text_positions(pos + t, deltas), use_cache=True, **{cache_arg: cache})
        logits = out.logits[:, -1]
        new_cache = _out_cache(out)
        cache = cache if new_cache is None else new_cache
    ids = torch.stack(toks, dim=1)
    return ids, (torch.stack(lps, dim=1) if return_logp else None)


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


def _takes_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (asked of the model inside a peft
    wrapper, whose forward hands its keyword arguments through)."""
    return _supports(_base_model(model), "logits_to_keep")


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


# encoder classes whose work can be shared among the copies of one prompt -> how their inputs hold
# the N items (one audio / one video per sample):
# - "batch": ``input_features`` [N, mel, frames]; every other tensor argument per item on dim 0
#   (Qwen2-Audio's attention mask [N, 1, L, L]); outputs [N, ...].
# - "audio_flat": ``input_features`` [mel, sum of frames], item i owning ``feature_lens[i]``
#   columns; ``feature_lens`` / ``aftercnn_lens`` [N]; output rows [sum of output lengths, D]
#   (the Qwen2.5-Omni audio tower, called by ``get_audio_features`` on the unpadded frames).
# - "patches": ``hidden_states`` [sum of patches, D], item i owning ``prod(grid_thw[i])`` rows;
#   ``grid_thw`` [N, 3]; output rows per item: its patches (``last_hidden_state``), or its patches
#   over ``spatial_merge_size ** 2`` (``pooler_output``, the merged tokens the LM receives).
_SHARED_ENCODERS = {
    "Qwen2AudioEncoder": "batch",
    "Qwen2_5OmniAudioEncoder": "audio_flat",
    "Qwen2_5OmniVisionEncoder": "patches",
}


def shared_encoders(model) -> list[torch.nn.Module]:
    """The ``_SHARED_ENCODERS`` modules of ``model`` (through DeepSpeed / DDP and peft wrappers):
    children of the model or of its inner ``model``."""
    base = _base_model(model)
    found: dict[int, torch.nn.Module] = {}
    for owner in (base, getattr(base, "model", None)):
        if isinstance(owner, torch.nn.Module):
            for child in owner.children():
                if type(child).__name__ in _SHARED_ENCODERS:
                    found.setdefault(id(child), child)
    return list(found.values())


class _EncoderOnce:
    """The hooks of one encoder: the pre-hook cuts its inputs to the distinct prompts' items
    (``first``), the forward hook gives every sample its prompt's output rows (``inverse``).

    A call it cannot map (not one item per sample, or a tensor argument it does not know, such as
    precomputed vision positions) passes through untouched. ``items`` counts the items the
    encoder ran on (the tests read it).
    """

    def __init__(self, module: torch.nn.Module, first: list[int], inverse: list[int]):
        self.module, self.first, self.inverse = module, first, inverse
        self.layout = _SHARED_ENCODERS[type(module).__name__]
        self.sig = inspect.signature(module.forward)
        self.pending: list = []   # per call in flight: the output row sizes of the distinct items, or None
        self.items = 0

    def pre(self, module, args, kwargs):
        try:
            bound = self.sig.bind(*args, **kwargs)
        except TypeError:
            bound = None
        try:
            plan = self._cut(bound.arguments) if bound is not None else None
        except Exception:  # noqa: BLE001  a call it cannot map passes through untouched (see above)
            plan = None
        self.pending.append(plan)
        return (bound.args, bound.kwargs) if plan is not None else None

    def post(self, module, args, kwargs, output):
        plan = self.pending.pop()
        if plan is None:
            return None
        seen: dict[int, object] = {}  # one expansion per tensor (an output may name one tensor twice)
        return _expand(output, plan, self.inverse, seen)

    def _cut(self, a: dict):
        """Cut the bound arguments ``a`` in place to the distinct items; returns the candidate
        per-item output row sizes ``[[sizes of the distinct items], ...]``, or None to pass."""
        B, first = len(self.inverse), self.first
        extra = a.get("kwargs", {})
        if any(isinstance(v, torch.Tensor) for v in extra.values()):
            return None
        if self.layout == "batch":
            names = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
            x = next(iter(a.values()), None)
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != B:
                return None
            if any(a[k].dim() == 0 or a[k].shape[0] not in (B, 1) for k in names):
                return None
            for k in names:
                if a[k].shape[0] == B:
                    a[k] = index_rows(a[k], first)
            self.items += len(first)
            return [[1] * len(first)]
        if self.layout == "audio_flat":
            x, lens = a.get("input_features"), a.get("feature_lens")
            known = {"input_features", "feature_lens", "aftercnn_lens"}
            if not (isinstance(x, torch.Tensor) and isinstance(lens, torch.Tensor) and lens.dim() == 1
                    and lens.shape[0] == B and int(lens.sum()) == x.shape[-1]):
                return None
            if any(isinstance(v, torch.Tensor) and k not in known for k, v in a.items()):
                return None
            sizes = lens.long().cpu()
            a["input_features"] = x.index_select(-1, segment_rows(sizes, first).to(x.device))
            for k in ("feature_lens", "aftercnn_lens"):
                if isinstance(a.get(k), torch.Tensor):
                    a[k] = index_rows(a[k], first)
            out_lens = self.module._get_feat_extract_output_lengths(sizes)[1]
            self.items += len(first)
            return [out_lens[first].tolist()]
        # "patches"
        x, grid = a.get("hidden_states"), a.get("grid_thw")
        if not (isinstance(x, torch.Tensor) and isinstance(grid, torch.Tensor) and grid.dim() == 2
                and grid.shape[0] == B):
            return None
        if any(isinstance(v, torch.Tensor) and k not in ("hidden_states", "grid_thw") for k, v in a.items()):
            return None
        sizes = grid.long().prod(-1).cpu()
        if int(sizes.sum()) != x.shape[0]:
            return None
        a["hidden_states"] = x.index_select(0, segment_rows(sizes, first).to(x.device))
        a["grid_thw"] = index_rows(grid, first)
        merge = int(getattr(self.module, "spatial_merge_size", 1)) ** 2
        self.items += len(first)
        return [sizes[first].tolist(), (sizes[first] // merge).tolist()]


def _expand(out, plan: list[list[int]], inverse: list[int], seen: dict):
    """``out`` (a tensor, a ModelOutput, a tuple of them) with every tensor whose rows are the
    distinct items' blocks (by one of ``plan``'s row sizes) expanded to the samples' blocks."""
    if isinstance(out, torch.Tensor):
        if id(out) in seen:
            return seen[id(out)]
        res = out
        for sizes in plan:
            if out.dim() > 0 and out.shape[0] == sum(sizes):
                res = out.index_select(0, segment_rows(sizes, inverse).to(out.device))
                break
        seen[id(out)] = res
        return res
    if isinstance(out, dict):  # ModelOutput (setting a key sets the attribute too)
        for k in list(out.keys()):
            out[k] = _expand(out[k], plan, inverse, seen)
        return out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_expand(v, plan, inverse, seen) for v in out)
    return out


@contextlib.contextmanager
def encoders_once(model, batch: PromptBatch):
    """Run ``model``'s media encoders once per distinct prompt of ``batch`` while open.

    Yields the ``_EncoderOnce`` of each shared encoder (none when ``batch`` has no copies or the
    model no ``_SHARED_ENCODERS`` module: then nothing changes). The outputs, and through the
    ``index_select`` the gradients (the copies' sum), are the plain forward's; only encoder
    dropout, if a model trains with it, is then drawn once per prompt rather than per copy.
    """
    distinct = batch.distinct()
    if distinct is None:
        yield []
        return
    first, inverse = distinct
    hooks, handles = [], []
    try:
        for enc in shared_encoders(model):
            h = _EncoderOnce(enc, first, inverse)
            handles.append(enc.register_forward_pre_hook(h.pre, with_kwargs=True))
            handles.append(enc.register_forward_hook(h.post, with_kwargs=True))
            hooks.append(h)
        yield hooks
    finally:
        for handle in handles:
            handle.remove()


SHARE_MODES = ("prompts", "encoders", "none")


def completion_logits(model, batch: PromptBatch, comp_ids: torch.Tensor, comp_mask: torch.Tensor,
                      temperature: float = 1.0, *, share: str = "prompts") -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32, divided by ``temperature``) predicting each completion token.

    ``share`` (only matters when rows of ``batch`` are copies of one prompt, ``PromptBatch.groups``):
    - ``"prompts"``: each distinct prompt runs once, encoders and layers (``shared_prompt_logits``),
      where the model takes a KV cache and our positions (``own_loop_ok``) and is not checkpointing
      activations;
      else as ``"encoders"``.
    - ``"encoders"``: the media encoders run once per distinct prompt (``encoders_once``), the
      layers on every row.
    - ``"none"``: every row runs everything, a plain forward.
    All three give the same logits and gradients (up to float rounding).
    """
    if share not in SHARE_MODES:
        raise ValueError(f"share must be one of {SHARE_MODES}, not {share!r}")
    if share == "prompts" and batch.distinct() is not None and _prompt_share_ok(model, batch):
        return shared_prompt_logits(model, batch, comp_ids, comp_mask, temperature)
    with encoders_once(model, batch) if share != "none" else contextlib.nullcontext():
        return _completion_logits(model, batch, comp_ids, comp_mask, temperature)


def _prompt_share_ok(model, batch: PromptBatch | None = None) -> bool:
    base = _base_model(model)
    flag = ("is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    checkpointing = bool(getattr(base, flag, False)) and base.training
    return own_loop_ok(model, batch) and not (checkpointing and torch.is_grad_enabled())


def shared_prompt_logits(model, batch: PromptBatch, comp_ids: torch.Tensor, comp_mask: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """``completion_logits`` with each distinct prompt of ``batch`` run once.

    Two forwards: the distinct prompts (media encoders included) with a KV cache, whose cache and
    last-position logits are then ``index_select``-ed to every copy; then the completions
    (all but the last token) reading that cache. The copies' gradients sum into the prompt's
    through the ``index_select``, as they would in a plain forward over every row, so logits and
    gradients equal the plain forward's; the prompt's layers run ``U`` times instead of ``B``.
    Dropout in the prompt's layers (LoRA dropout, say), if a model trains with it, is then drawn
    once per prompt rather than per copy.
    """
    distinct = batch.distinct()
    first, inverse = distinct if distinct is not None else (None, list(range(len(batch))))
    p_mask = batch.inputs["attention_mask"]
    dev = p_mask.device
    P, T = p_mask.shape[1], comp_ids.shape[1]
    last, cache, deltas = _prefill(model, batch, first)
    parts = [_expand_prompts(cache, last, inverse)[:, None]]
    if T > 1:
        attn = torch.cat([p_mask, comp_mask.to(dev).to(p_mask.dtype)], dim=1)[:, :P + T - 1]
        if deltas is not None:
            deltas = index_rows(deltas, inverse)
        pos = _text_positions(_positions(attn)[:, P:], deltas)
        out = model(input_ids=comp_ids[:, :-1].to(dev), attention_mask=attn, position_ids=pos, use_cache=True,
                    **{_cache_arg(model): cache})
        parts.append(out.logits)
    logits = torch.cat(parts, dim=1).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _completion_logits(model, batch: PromptBatch, comp_ids: torch.Tensor, comp_mask: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    inputs = batch.inputs
    p_ids, p_mask = inputs["input_ids"], inputs["attention_mask"]
    P, T = p_ids.shape[1], comp_ids.shape[1]
    dev = p_ids.device
    input_ids = torch.cat([p_ids, comp_ids.to(dev)], dim=1)
    attn = torch.cat([p_mask, comp_mask.to(dev).to(p_mask.dtype)], dim=1)
    kw = dict(input_ids=input_ids, attention_mask=attn, use_cache=False, **_media_kwargs(inputs))
    if not uses_mrope(model):
        kw["position_ids"] = _positions(attn)
    logits, _ = _head_logits(model, kw, P - 1, P + T - 1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


# config keys of models whose logits are not the head's output as it is (softcapping, scaling)
_LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_head(model):
    """The model's LM head module (through DeepSpeed / peft wrappers), or None."""
    base = _base_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Module) else None


def fusable_head(model) -> torch.nn.Linear | None:
    """The LM head when a loss can take its place (``completion_hidden``): a plain bias-free
    ``nn.Linear`` whose weight is whole here (not a ZeRO-3 partition, not a peft wrapper)."""
    head = output_head(model)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    config = getattr(_base_model(model), "config", None)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if any(getattr(config, k, None) not in (None, 1.0) for k in _LOGIT_SCALES):  # logits changed after the head
        return None
    w = head.weight
    if w.dim() != 2 or w.numel() == 0 or w.shape[1] != head.in_features or hasattr(w, "ds_id"):
        return None
    return head


def completion_hidden(model, batch: PromptBatch, comp_ids: torch.Tensor, comp_mask: torch.Tensor, *,
                      share: str = "prompts") -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states that predict each completion token ``[B, T, H]`` (float32) and the
    LM head weight ``[V, H]``: ``completion_logits`` with the head's forward replaced by the
    identity while it runs, for a loss fused with the head (``distill_loss_from_hidden``), so
    that ``hidden @ weight.T`` are the logits ``completion_logits`` would give."""
    head = fusable_head(model)
    if head is None:
        raise ValueError(f"{type(_base_model(model)).__name__}'s LM head is no plain bias-free nn.Linear held "
                         "whole here (peft-wrapped, ZeRO-3-partitioned, or logits scaled after it): use the logits")
    had = head.__dict__.get("forward")  # e.g. an accelerate hook's wrapper: put back afterwards
    head.forward = lambda x: x  # an instance attribute: nn.Module.__call__ runs it instead of Linear.forward
    try:
        hidden = completion_logits(model, batch, comp_ids, comp_mask, share=share)
    finally:
        if had is None:
            del head.forward
        else:
            head.forward = had
    return hidden, head.weight


def token_logp(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``ids`` ``[B, T]`` under ``logits`` ``[B, T, V]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
