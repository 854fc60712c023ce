"""Turn manifest rows into model inputs: chat-formatted prompts with their media, and targets.

A prompt is the user turn (media items, then the prompt text formatted with the row's own
fields, e.g. ``"{question}"``) followed by the generation prompt; prompts are left-padded so
that every completion starts at the same column. Targets (transcripts, reference answers) are
tokenised without specials, followed by EOS, right-padded.

``AudioPromptCollator`` serves audio-in models (Qwen2-Audio, Qwen3-ASR: whatever tensors the
processor returns, ``feature_attention_mask`` or ``input_features_mask``, go to the model as they
are; a chat template that leaves the prompt text out, as Qwen3-ASR's does, is said once in the
log); ``AVPromptCollator`` serves audio-visual ones
(the Qwen2.5-Omni and Qwen3-Omni-MoE thinkers: a video item, then its audio as a separate item, never
``use_audio_in_video``); ``TextPromptCollator`` serves text-only causal LMs (any
``AutoModelForCausalLM``); all three share one interface. ``make_collator(modality, processor,
data)`` is the one place that picks among them.

``PromptBatch.repeat`` / ``select`` slice every input per sample, including the flattened
vision patches (``pixel_values_videos`` ``[sum of patches, D]``), whose rows belong to samples
by each sample's ``video_grid_thw``. ``repeat`` records which rows are copies of one prompt
(``PromptBatch.groups``, kept through ``select``), so that a forward can run the media encoders
once per distinct prompt (``core.forward.encoders_once``).

What it leaves out: any model maths, video decoding (``core/data/video.py``), several videos or
images in one prompt.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from core.data.audio import load_audio

log = logging.getLogger(__name__)


# flattened patch tensors (rows of all samples stacked) -> the per-sample grid that sizes each one's rows
PATCH_INPUTS = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}
# processor outputs that run along the prompt's tokens (left-padded when samples are stacked)
TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def segment_rows(sizes, idx: list[int]) -> torch.Tensor:
    """Row indices ``[sum(sizes[i] for i in idx)]`` of items ``idx`` (in that order, repeats
    allowed) in a tensor whose rows are items' blocks laid end to end, item ``i`` owning
    ``sizes[i]`` consecutive rows."""
    sizes = torch.as_tensor(sizes, dtype=torch.long).cpu()
    starts = torch.cumsum(sizes, 0) - sizes
    pick = torch.as_tensor(idx, dtype=torch.long)
    n = sizes[pick]
    # each picked block's start, repeated over its rows, plus the row's offset inside the block
    offset = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return torch.repeat_interleave(starts[pick], n) + offset


def index_rows(t: torch.Tensor, idx) -> torch.Tensor:
    """Rows ``idx`` of ``t`` (dim 0, in that order, repeats allowed); the index made on ``t``'s device."""
    return t.index_select(0, torch.as_tensor(idx, dtype=torch.long, device=t.device))


def take_samples(inputs: dict[str, torch.Tensor], idx: list[int]) -> dict[str, torch.Tensor]:
    """The model inputs of samples ``idx`` (in that order, repeats allowed).

    Per-sample tensors (first dim = batch) are indexed on dim 0. A flattened patch tensor
    (``PATCH_INPUTS``) is cut by its grid: sample ``i`` owns ``prod(grid[i])`` consecutive rows,
    so its rows are gathered, not its dim-0 entries. One video (image) per sample: a grid with
    another number of rows than the batch is refused.
    """
    B = inputs["input_ids"].shape[0]
    out = {}
    for k, v in inputs.items():
        grid_key = PATCH_INPUTS.get(k)
        if grid_key is not None:
            grid = inputs.get(grid_key)
            if grid is None or grid.shape[0] != B:
                raise ValueError(f"'{k}' holds {0 if grid is None else grid.shape[0]} grids for {B} prompts; "
                                 "selecting prompts needs exactly one video/image per prompt")
            sizes = grid.long().prod(-1)
            if int(sizes.sum()) != v.shape[0]:
                raise ValueError(f"'{k}' has {v.shape[0]} patch rows but '{grid_key}' sums to {int(sizes.sum())}")
            out[k] = v.index_select(0, segment_rows(sizes, idx).to(v.device))
        else:
            out[k] = index_rows(v, idx)
    return out


@dataclass
class PromptBatch:
    """Prompts of one batch: ``inputs`` go to the model; ``rows``, ``texts`` and the decoded media
    (``audios``: waveforms, ``videos``: ``VideoClip``s) stay for scoring and remote teachers.

    ``groups``: rows with the same value hold copies of one prompt (identical inputs), as
    ``repeat`` makes them; ``None`` (a collator's batch) when no row is known to copy another.
    ``processor_kwargs``: the keywords each row's processor call had besides its text and media
    (an audio-visual row's ``videos_kwargs``), for an engine that runs the processor again (vLLM);
    empty when there were none.
    """

    inputs: dict[str, torch.Tensor]
    rows: list[dict]
    texts: list[str]
    audios: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    groups: list[int] | None = None
    processor_kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def repeat(self, n: int) -> "PromptBatch":
        """Each prompt ``n`` times, the copies of one prompt next to each other (and in one group)."""
        if n == 1:
            return self
        idx = [i for i in range(len(self)) for _ in range(n)]
        rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
        groups = rep(self.groups if self.groups is not None else list(range(len(self))))
        return PromptBatch(take_samples(self.inputs, idx), rep(self.rows), rep(self.texts), rep(self.audios),
                           rep(self.videos), groups, rep(self.processor_kwargs))

    def select(self, idx: list[int]) -> "PromptBatch":
        idx = [int(i) for i in idx]
        pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
        return PromptBatch(take_samples(self.inputs, idx), pick(self.rows), pick(self.texts), pick(self.audios),
                           pick(self.videos), None if self.groups is None else pick(self.groups),
                           pick(self.processor_kwargs))

    def to(self, device) -> "PromptBatch":
        """The same prompts with every input tensor on ``device`` (this batch itself when they are
        all there already); the rows, texts and decoded media stay as they are."""
        device = torch.device(device)
        if all(not isinstance(v, torch.Tensor) or v.device == device for v in self.inputs.values()):
            return self
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return PromptBatch(inputs, self.rows, self.texts, self.audios, self.videos, self.groups,
                           self.processor_kwargs)

    def distinct(self) -> tuple[list[int], list[int]] | None:
        """``(first, inverse)`` over the prompts of ``groups``: ``first[u]`` is the row of the u-th
        distinct prompt (in order of first appearance), ``inverse[i]`` the u of row ``i``, so
        ``take_samples(take_samples(inputs, first), inverse)`` is ``inputs``. ``None`` when no
        row is known to copy another."""
        if self.groups is None or len(set(self.groups)) == len(self.groups):
            return None
        first, where, inverse = [], {}, []
        for i, g in enumerate(self.groups):
            if g not in where:
                where[g] = len(first)
                first.append(i)
            inverse.append(where[g])
        return first, inverse


def format_prompt(template: str, row: dict) -> str:
    """``template`` formatted with the row's fields; a missing field names the sample."""
    try:
        return template.format(**row)
    except KeyError as e:
        raise KeyError(f"prompt template needs field {e} missing from sample {row.get('key')!r}") from None


def _require_prompt(prompt, kind: str) -> None:
    """Media prompts have no text of their own: the task's prompt must be given (no default, so a
    config that forgets it fails here instead of training on some other task's prompt)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{kind} prompts need a prompt text (config key 'data.prompt', decode's --prompt), e.g. "
                         "'Transcribe the audio.' or '{question}'; none was given")


class AudioPromptCollator:
    """Builds ``PromptBatch`` objects for audio-in, text-out models (Qwen2-Audio, Qwen3-ASR).

    The prompt text is always put in the user turn; whether the model sees it is the chat
    template's choice. Qwen3-ASR's released template renders only the audio there (its context
    is the system message, ``system``): the first batch whose rendered prompt lacks the text logs
    a warning saying so, once per collator.

    Each row goes through the processor alone and the rows are then stacked (``stack_encodings``),
    so a clip's features and its number of audio tokens never depend on the other clips of its
    batch, and equal what a server that encodes one request at a time computes. (Qwen3-ASR's
    feature extractor pads a batch to its longest clip: the edge frames of a shorter clip and its
    count of real frames would change with the batch. Fixed-length extractors, Qwen2-Audio's 30 s
    chunk, give the batch call's tensors either way.)
    """

    def __init__(self, processor, prompt: str, *, system: str | None = None, sample_rate: int = 16000):
        _require_prompt(prompt, "audio")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.system = system
        self.sample_rate = sample_rate
        self._prompt_checked = False

    def messages(self, row: dict) -> list[dict]:
        text = format_prompt(self.prompt, row)
        content = [{"type": "audio", "audio": row["audio"]}, {"type": "text", "text": text}]
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": content}]

    def _check_prompt_shown(self, row: dict, rendered: str) -> None:
        if self._prompt_checked:
            return
        self._prompt_checked = True
        text = format_prompt(self.prompt, row).strip()
        if text and text not in rendered:
            log.warning("the chat template of this processor leaves the prompt text %r out of the rendered prompt "
                        "(Qwen3-ASR's renders only the audio in the user turn; give context as data.system): "
                        "the model sees %r", text, rendered)

    def prompts(self, rows: list[dict]) -> PromptBatch:
        texts = [self.processor.apply_chat_template(self.messages(r), add_generation_prompt=True, tokenize=False)
                 for r in rows]
        if rows:
            self._check_prompt_shown(rows[0], texts[0])
        audios = [load_audio(r["audio"], r.get("begin_time"), r.get("end_time"), sample_rate=self.sample_rate)
                  for r in rows]
        encs = []
        for text, audio in zip(texts, audios):
            enc = self.processor(text=[text], audio=[audio], sampling_rate=self.sample_rate, return_tensors="pt")
            encs.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"})
        inputs = stack_encodings(encs, self.tokenizer.pad_token_id) if encs else {}
        return PromptBatch(inputs, list(rows), texts, audios)

    def targets(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise reference completions + EOS, right-padded: ``(ids [B,T], mask [B,T])``."""
        return tokenize_targets(self.tokenizer, texts, max_len)


def stack_encodings(encs: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch from processor outputs of one sample each (batch dim 1, the same keys).

    The tensors that run along the prompt's tokens (``TOKEN_INPUTS``: ``input_ids``, padded with
    ``pad_id``; ``attention_mask`` and the others with 0) are left-padded, as the tokenizer pads
    prompts. Flattened patches (``PATCH_INPUTS``: each sample's rows, sized by its grid) are
    concatenated. Every other tensor (audio features, their masks, grids) has a batch dim of 1 and
    is zero-padded at the end of each other dim to the largest size, which a feature mask then
    marks as padding.
    """
    keys = list(encs[0])
    for i, e in enumerate(encs):
        if set(e) != set(keys):
            raise ValueError(f"the processor returned {sorted(e)} for sample {i}, {sorted(keys)} for sample 0")
        bad = [k for k in keys if k not in PATCH_INPUTS and (e[k].dim() == 0 or e[k].shape[0] != 1)]
        if bad:
            raise ValueError(f"the processor returned {bad} without a batch dim of 1 for one sample")
    out = {}
    for k in keys:
        ts = [e[k] for e in encs]
        if k in PATCH_INPUTS:
            out[k] = torch.cat(ts)
        elif k in TOKEN_INPUTS:
            L = max(t.shape[1] for t in ts)
            fill = pad_id if k == "input_ids" else 0
            out[k] = torch.cat([torch.nn.functional.pad(t, (L - t.shape[1], 0), value=fill) for t in ts])
        elif len({tuple(t.shape) for t in ts}) == 1:
            out[k] = torch.cat(ts)
        else:
            shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
            padded = []
            for t in ts:
                z = t.new_zeros((1, *shape))
                z[(slice(None),) + tuple(slice(0, n) for n in t.shape[1:])] = t
                padded.append(z)
            out[k] = torch.cat(padded)
    return out


class AVPromptCollator:
    """Builds ``PromptBatch`` objects for audio-visual models (the Qwen2.5-Omni and Qwen3-Omni-MoE
    thinkers); same interface as ``AudioPromptCollator``.

    Each row's ``video`` is decoded by ``core.data.video.load_video`` (``num_frames`` frames
    sampled uniformly over ``begin_time`` .. ``end_time``, and the sound track at
    ``sample_rate``); a row with its own ``audio`` path uses that audio instead of the track. The
    user turn is a video item, then the audio as a separate item, then the prompt text
    (``prompt`` formatted with the row's fields, as in ``AudioPromptCollator``). The processor is
    called once per row (the rows are then stacked by ``stack_encodings``, so a clip's inputs never
    depend on its batch: Qwen3-Omni's processor pads audio to a batch's longest clip) with
    ``videos_kwargs`` holding the frame cap ``video_max_pixels`` (its defaults would upscale small
    frames) and the clip's real fps; ``video_second_per_grid`` is set from each clip's own fps,
    and the processor's ``num_audio_tokens`` is dropped; each row's ``videos_kwargs`` stay in
    ``PromptBatch.processor_kwargs``. ``missing_audio``: ``error`` (a video without a sound track,
    and no ``audio`` path, is an error naming the file) or ``silence`` (it gets silent audio of
    the clip's length). A ``video_max_pixels`` smaller than one merged patch of the processor's
    vision grid (28 x 28 for Qwen2.5-Omni, 32 x 32 for Qwen3-Omni: patch size x merge size) is
    refused here, naming ``data.video_max_pixels``.
    """

    def __init__(self, processor, prompt: str, *, system: str | None = None,
                 sample_rate: int = 16000, num_frames: int = 8, missing_audio: str = "error",
                 video_max_pixels: int = 64 * 64):
        _require_prompt(prompt, "audio-visual")
        if missing_audio not in ("error", "silence"):
            raise ValueError(f"missing_audio must be 'error' or 'silence', got {missing_audio!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.system = system
        self.sample_rate = sample_rate
        self.num_frames = int(num_frames)
        self.missing_audio = missing_audio
        self.video_max_pixels = int(video_max_pixels)
        vp = getattr(processor, "video_processor", None)
        side = int(getattr(vp, "patch_size", 14) or 14) * int(getattr(vp, "merge_size", 2) or 2)
        if self.video_max_pixels < side * side:
            raise ValueError(f"data.video_max_pixels {self.video_max_pixels} is smaller than one merged patch of this "
                             f"model's vision encoder ({side}x{side} = {side * side} pixels)")

    def messages(self, row: dict) -> list[dict]:
        if not row.get("video"):
            raise KeyError(f"sample {row.get('key')!r} has no 'video' path (audio-visual prompts need one)")
        text = format_prompt(self.prompt, row)
        content = [{"type": "video", "video": row["video"]},
                   {"type": "audio", "audio": row.get("audio") or row["video"]},
                   {"type": "text", "text": text}]
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": content}]

    def videos_kwargs(self, fps: float) -> dict:
        """The processor's ``videos_kwargs``: the frame-size cap and the sampled frames' rate."""
        return {"size": {"shortest_edge": min(56 * 56, self.video_max_pixels), "longest_edge": self.video_max_pixels},
                "fps": float(fps)}

    def load(self, row: dict):
        """``(clip, audio)`` of one row: the decoded video and the waveform that goes with it."""
        from core.data.video import load_video

        own_audio = bool(row.get("audio"))
        clip = load_video(row["video"], num_frames=self.num_frames, sample_rate=self.sample_rate,
                          missing_audio="silence" if own_audio else self.missing_audio,
                          begin_time=row.get("begin_time"), end_time=row.get("end_time"))
        if own_audio:
            audio = load_audio(row["audio"], row.get("begin_time"), row.get("end_time"), sample_rate=self.sample_rate)
        else:
            audio = clip.audio
        return clip, audio

    def prompts(self, rows: list[dict]) -> PromptBatch:
        texts = [self.processor.apply_chat_template(self.messages(r), add_generation_prompt=True, tokenize=False)
                 for r in rows]
        loaded = [self.load(r) for r in rows]
        clips, audios = [c for c, _ in loaded], [a for _, a in loaded]
        encs, kwargs = [], [{"videos_kwargs": self.videos_kwargs(c.fps)} for c in clips]
        for text, clip, audio, kw in zip(texts, clips, audios, kwargs):  # one row at a time, at its own fps
            enc = self.processor(text=[text], videos=[clip.frames], audio=[audio], sampling_rate=self.sample_rate,
                                 return_tensors="pt", **kw)
            encs.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"})
        inputs = stack_encodings(encs, self.tokenizer.pad_token_id) if encs else {}
        if "video_second_per_grid" in inputs:
            tps = getattr(getattr(self.processor, "video_processor", None), "temporal_patch_size", 2)
            inputs["video_second_per_grid"] = torch.tensor([tps / float(c.fps) for c in clips],
                                                           dtype=inputs["video_second_per_grid"].dtype)
        return PromptBatch(inputs, list(rows), texts, audios, clips, processor_kwargs=kwargs)

    def targets(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise reference completions + EOS, right-padded: ``(ids [B,T], mask [B,T])``."""
        return tokenize_targets(self.tokenizer, texts, max_len)


MODALITIES = ("audio", "av", "text")


def make_collator(modality: str, processor, data=None, **overrides):
    """The collator for ``modality`` (``audio`` | ``av`` | ``text``).

    ``data``: a ``DataConfig`` (or anything with its attributes) giving ``prompt``, ``system``,
    ``num_frames``, ``missing_audio`` and ``video_max_pixels``; ``overrides`` (same names, plus
    ``sample_rate``) win over it; what neither gives keeps the collator's default.
    """
    kw: dict[str, Any] = {}
    if data is not None:
        for name in ("prompt", "system", "num_frames", "missing_audio", "video_max_pixels"):
            if hasattr(data, name):
                kw[name] = getattr(data, name)
        kw["system"] = kw.get("system") or None
    kw.update(overrides)
    allowed = {"text": ("prompt", "system"), "audio": ("prompt", "system", "sample_rate"),
               "av": ("prompt", "system", "sample_rate", "num_frames", "missing_audio", "video_max_pixels")}
    if modality not in allowed:
        raise ValueError(f"modality {modality!r} is not one of {', '.join(MODALITIES)}")
    cls = {"text": TextPromptCollator, "audio": AudioPromptCollator, "av": AVPromptCollator}[modality]
    kw = {k: v for k, v in kw.items() if k in allowed[modality] and (v is not None or k == "system")}
    return cls(processor, **kw)


class TextPromptCollator:
    """Builds ``PromptBatch`` objects for text-only causal LMs; same interface as ``AudioPromptCollator``.

    The user turn's text is, in order of preference: the ``prompt`` template formatted with the
    row's fields when the template names a field (``"Answer: {question}"``); else the row's own
    ``prompt`` field; else its ``question`` field; else the template as it is. Prompts are
    chat-formatted with the tokenizer's chat template (the raw text when it has none) and
    left-padded; there are no media inputs.
    """

    def __init__(self, processor, prompt: str = "", *, system: str | None = None, **_ignored):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.system = system

    def text(self, row: dict) -> str:
        if "{" in self.prompt:
            return format_prompt(self.prompt, row)
        for name in ("prompt", "question"):
            v = row.get(name)
            if isinstance(v, str) and v:
                return v
        if not self.prompt:
            raise KeyError(f"sample {row.get('key')!r} has no 'prompt' or 'question' field and no prompt text was "
                           "given (data.prompt / --prompt)")
        return self.prompt

    def messages(self, row: dict) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.text(row)}]

    def render(self, row: dict) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(self.messages(row), add_generation_prompt=True, tokenize=False)
        return (self.system + "\n" if self.system else "") + self.text(row)

    def prompts(self, rows: list[dict]) -> PromptBatch:
        texts = [self.render(r) for r in rows]
        tok = self.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old_side
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return PromptBatch(inputs, list(rows), texts, [])

    def targets(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise reference completions + EOS, right-padded: ``(ids [B,T], mask [B,T])``."""
        return tokenize_targets(self.tokenizer, texts, max_len)


def tokenize_targets(tok, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference completions without specials, then EOS, cut to ``max_len``, right-padded."""
    seqs = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if max_len is not None:
            ids = ids[:max_len]
        seqs.append(ids)
    return pad_right(seqs, tok.pad_token_id)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
