"""The training forward every method, the teacher and the evaluation share: the logits (or the
LM head's input) of prompt + completion at the completion positions.

- ``completion_logits``: one forward of prompt + completion returning the logits that predict
  each completion token, ``[B, T, V]``. Position ids follow the attention mask, as in
  generation, so left-padded prompts score exactly as they were sampled; a model with
  multimodal rotary positions (``get_rope_index``: Qwen2-VL, the Qwen2.5-Omni and Qwen3-Omni-MoE
  thinkers) gets none and builds its own from the attention mask and the video grids over the
  whole prompt + completion, which continues the prompt's positions as its ``generate`` does.
  The LM head runs on the completion positions only (``logits_to_keep`` where the model takes
  it; the head's input sliced by a forward pre-hook for Qwen2-Audio and the Omni thinkers). When
  rows are copies of one prompt (the rollout's n samples), each distinct prompt runs once
  (``shared_prompt_logits``: its layers and encoders once, the copies reading its KV cache, at
  the positions the sampler would give them), or, where that cannot run (activation
  checkpointing), at least its media encoders (``encoders_once``); the logits and gradients are
  the plain forward's.
- ``completion_hidden``: the same forward, returning the LM head's input and weight (for a loss
  fused with the head).
- ``encoders_once(model, batch)``: while it is open, the model's audio / vision encoders
  (``_SHARED_ENCODERS``: Qwen2-Audio's ``audio_tower``, the Qwen2.5-Omni thinker's ``audio_tower``
  and ``visual``, Qwen3-ASR's ``audio_tower``, the Qwen3-Omni-MoE thinker's ``audio_tower`` and
  ``visual``) see only the distinct prompts of a batch whose rows are copies
  (``PromptBatch.groups``, set by ``repeat``), and every copy gets its prompt's output back by an
  ``index_select``, whose backward sums the copies' gradients into the encoder's, as the plain
  forward does. It works through hooks on the encoder modules, so the call still goes through the
  model's own forward (and any ZeRO-3 / peft hooks); other models run unchanged.
- The prompt forward with a KV cache (``_prefill``) and the position rules (``_positions``,
  ``_text_positions``, ``own_loop_ok``) that ``core.sampling`` decodes with, so that sampling and
  training place every token the same way.

What it leaves out: sampling (``core.sampling``), any loss, any teacher.
"""
from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from core.data.collate import PromptBatch, index_rows, segment_rows


def _unwrap(model):
    return getattr(model, "module", model)


def _media_kwargs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


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
    (the Qwen2.5-Omni and Qwen3-Omni-MoE thinkers), 3-D ones offset by the ``rope_deltas`` its
    prompt forward leaves (``_rope_holder``). Not for prompts that interleave audio into the video
    (``use_audio_in_video``), whose last prompt position need not be the largest."""
    if _cache_arg(model) is None:
        return False
    if not uses_mrope(model):
        return True
    interleaved = batch is not None and bool(batch.inputs.get("use_audio_in_video", False))
    return _rope_holder(model) is not None and not interleaved


# multimodal-rotary models whose decoding positions the loop reproduces (tested against their
# ``generate``); others of the kind keep ``generate`` and share their encoders only
_MROPE_LOOP_CLASSES = ("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")


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
_SLICE_HEAD_CLASSES = ("Qwen2AudioForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration",
                       "Qwen3OmniMoeThinkerForConditionalGeneration")


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
#   (the Qwen2.5-Omni and Qwen3-Omni-MoE audio towers, called by ``get_audio_features`` on the
#   unpadded frames; Qwen3-Omni's windows its items' chunks apart, so an item's rows are its own).
# - "patches": ``hidden_states`` [sum of patches, D], item i owning ``prod(grid_thw[i])`` rows;
#   ``grid_thw`` [N, 3]; output rows per item: its patches (``last_hidden_state``), or its patches
#   over ``spatial_merge_size ** 2`` (``pooler_output``, the merged tokens the LM receives, and
#   Qwen3-Omni's ``deepstack_features``, a list of such tensors).
# - "chunked_packed": ``input_features`` [N, mel, frames] and ``input_features_mask`` [N, frames]
#   per item on dim 0, frames in chunks of ``2 * n_window``; output rows packed
#   [sum of output lengths, D], item i owning the post-convolution lengths of its chunks' real
#   frames, summed (the Qwen3-ASR encoder, whose attention windows never cross items).
_SHARED_ENCODERS = {
    "Qwen2AudioEncoder": "batch",
    "Qwen2_5OmniAudioEncoder": "audio_flat",
    "Qwen2_5OmniVisionEncoder": "patches",
    "Qwen3ASREncoder": "chunked_packed",
    "Qwen3OmniMoeAudioEncoder": "audio_flat",
    "Qwen3OmniMoeVisionEncoder": "patches",
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
            out_lens = _flat_audio_lengths(self.module, sizes)
            self.items += len(first)
            return [out_lens[first].tolist()]
        if self.layout == "chunked_packed":
            x, fmask = a.get("input_features"), a.get("input_features_mask")
            if not (isinstance(x, torch.Tensor) and isinstance(fmask, torch.Tensor) and x.dim() == 3
                    and x.shape[0] == B and tuple(fmask.shape) == (B, x.shape[-1])):
                return None
            if any(isinstance(v, torch.Tensor) and k not in ("input_features", "input_features_mask")
                   for k, v in a.items()):
                return None
            chunk = 2 * int(self.module.n_window)
            if x.shape[-1] % chunk:
                return None  # the encoder refuses it itself
            a["input_features"], a["input_features_mask"] = index_rows(x, first), index_rows(fmask, first)
            per_chunk = fmask[first].reshape(len(first), -1, chunk).sum(-1).long().cpu()
            self.items += len(first)
            return [self.module._post_cnn_length(per_chunk).sum(-1).tolist()]
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


def _flat_audio_lengths(module, sizes: torch.Tensor) -> torch.Tensor:
    """Output rows per item of an ``audio_flat`` encoder given its items' mel frames ``sizes``:
    the Qwen2.5-Omni audio tower's own method (after the convolutions, after its pooling: the
    second), or the function beside the Qwen3-Omni-MoE audio encoder's class (13 rows per chunk of
    ``2 * n_window`` frames, the rest of a last chunk through three stride-2 convolutions)."""
    own = getattr(module, "_get_feat_extract_output_lengths", None)
    if callable(own):
        return own(sizes)[1]
    return sys.modules[type(module).__module__]._get_feat_extract_output_lengths(sizes, module.n_window)


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
    if isinstance(out, list):  # Qwen3-Omni's deepstack features: one tensor per merger
        return [_expand(v, plan, inverse, seen) for v in out]
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
