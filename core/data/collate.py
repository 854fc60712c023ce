"""Turn manifest rows into model inputs: chat-formatted prompts with their media, and targets.

A prompt is the user turn (media items, then the prompt text formatted with the row's own
fields, e.g. ``"{question}"``) followed by the generation prompt; prompts are left-padded so
that every completion starts at the same column. Targets (transcripts, reference answers) are
tokenised without specials, followed by EOS, right-padded.

``AudioPromptCollator`` serves audio-in models; ``TextPromptCollator`` serves text-only causal
LMs (any ``AutoModelForCausalLM``) with the same interface and no media.

What it leaves out: video (the audio-visual recipe brings its own collator with the same
``PromptBatch`` shape) and any model maths.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from core.data.audio import load_audio


@dataclass
class PromptBatch:
    """Prompts of one batch: ``inputs`` go to the model; ``rows`` and ``texts`` stay for scoring."""

    inputs: dict[str, torch.Tensor]
    rows: list[dict]
    texts: list[str]
    audios: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def repeat(self, n: int) -> "PromptBatch":
        """Each prompt ``n`` times, the copies of one prompt next to each other."""
        if n == 1:
            return self
        inputs = {k: v.repeat_interleave(n, dim=0) for k, v in self.inputs.items()}
        rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731
        return PromptBatch(inputs, rep(self.rows), rep(self.texts), rep(self.audios))

    def select(self, idx: list[int]) -> "PromptBatch":
        t = torch.as_tensor(idx, dtype=torch.long)
        inputs = {k: v.index_select(0, t) for k, v in self.inputs.items()}
        pick = lambda xs: [xs[i] for i in idx] if xs else xs  # noqa: E731
        return PromptBatch(inputs, pick(self.rows), pick(self.texts), pick(self.audios))


class AudioPromptCollator:
    """Builds ``PromptBatch`` objects for audio-in, text-out models (Qwen2-Audio style)."""

    def __init__(self, processor, prompt: str = "Transcribe the audio.", *, system: str | None = None,
                 sample_rate: int = 16000):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.system = system
        self.sample_rate = sample_rate

    def messages(self, row: dict) -> list[dict]:
        try:
            text = self.prompt.format(**row)
        except KeyError as e:
            raise KeyError(f"prompt template needs field {e} missing from sample {row.get('key')!r}") from None
        content = [{"type": "audio", "audio": row["audio"]}, {"type": "text", "text": text}]
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": content}]

    def prompts(self, rows: list[dict]) -> PromptBatch:
        texts = [self.processor.apply_chat_template(self.messages(r), add_generation_prompt=True, tokenize=False)
                 for r in rows]
        audios = [load_audio(r["audio"], r.get("begin_time"), r.get("end_time"), sample_rate=self.sample_rate)
                  for r in rows]
        old_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.processor(text=texts, audio=audios, sampling_rate=self.sample_rate,
                                 return_tensors="pt", padding=True)
        finally:
            self.tokenizer.padding_side = old_side
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "num_audio_tokens"}
        return PromptBatch(inputs, list(rows), texts, audios)

    def targets(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise reference completions + EOS, right-padded: ``(ids [B,T], mask [B,T])``."""
        return tokenize_targets(self.tokenizer, texts, max_len)


class TextPromptCollator:
    """Builds ``PromptBatch`` objects for text-only causal LMs; same interface as ``AudioPromptCollator``.

    The user turn's text is, in order of preference: the ``prompt`` template formatted with the
    row's fields when the template names a field (``"Answer: {question}"``); else the row's own
    ``prompt`` field; else its ``question`` field; else the template as it is. Prompts are
    chat-formatted with the tokenizer's chat template (the raw text when it has none) and
    left-padded; there are no media inputs.
    """

    def __init__(self, processor, prompt: str = "{prompt}", *, system: str | None = None, **_ignored):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.prompt = prompt
        self.system = system

    def text(self, row: dict) -> str:
        if "{" in self.prompt:
            try:
                return self.prompt.format(**row)
            except KeyError as e:
                raise KeyError(f"prompt template needs field {e} missing from sample {row.get('key')!r}") from None
        for name in ("prompt", "question"):
            v = row.get(name)
            if isinstance(v, str) and v:
                return v
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
