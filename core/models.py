"""Load a model and its processor from a directory, or build a tiny one from config.

What it does:
- ``load_model_and_processor(path)``: picks the transformers class from the checkpoint's own
  ``config.json`` (``model_type``), never from the path: Qwen2-Audio, the Qwen2.5-Omni thinker,
  the Qwen3-Omni-MoE thinker (``output_router_logits`` turned off: no load-balancing loss),
  Qwen3-ASR (the converted ``-hf`` layout; the original ``thinker_config`` one is refused), or
  any ``AutoModelForCausalLM``; no hub access, ``trust_remote_code`` off unless asked.
- ``train_tokenizer``: a byte-level BPE trained on a recipe's own text, with the Qwen chat
  specials and a Jinja chat template that renders audio items as
  ``<|audio_bos|><|AUDIO|><|audio_eos|>``.
- ``build_tiny_qwen2_audio``: a ``Qwen2AudioForConditionalGeneration`` built from sizes, with
  the audio encoder's position table filled with Whisper sinusoids (built from config it is a
  frozen random table), a short feature chunk and an untied LM head (transformers 5 does not
  declare the composite model's tied weights, so tying by hand breaks ``save_pretrained``); saved with
  ``save_pretrained`` so the rest of the code loads it like a downloaded checkpoint.
- ``build_tiny_omni_thinker``: a ``Qwen2_5OmniThinkerForConditionalGeneration`` (audio + vision
  encoders, mrope text model) and its ``Qwen2_5OmniProcessor`` built from sizes, for the
  audio-visual path; the tokenizer comes from ``train_tokenizer(..., omni=True)``.
- ``build_tiny_qwen3_asr``: a ``Qwen3ASRForConditionalGeneration`` (chunked conv + windowed
  attention audio encoder, Qwen3 text model, tied LM head) and its ``Qwen3ASRProcessor`` with the
  released chat template, in the released checkpoints' layout; the tokenizer comes from
  ``train_tokenizer(..., qwen3_asr=True)``.
- ``build_tiny_qwen3_omni_thinker``: a ``Qwen3OmniMoeThinkerForConditionalGeneration`` (MoE text
  model with a few tiny experts, interleaved mrope, audio encoder, vision encoder with a deepstack
  merger) and its ``Qwen3OmniMoeProcessor``; the tokenizer comes from ``train_tokenizer(...,
  omni=True)`` (that processor reads the same named specials as Qwen2.5-Omni's).
- A full released Omni folder (``is_full_omni``: Qwen2.5-Omni thinker + talker + token2wav,
  Qwen3-Omni-MoE thinker + talker + code2wav) loads as its thinker; ``export_full_omni`` puts a
  trained thinker back into it, shard by shard; ``build_tiny_full_omni`` /
  ``build_tiny_full_qwen3_omni`` build tiny ones in the released layout for tests.
- ``build_tiny_causal_lm``: a text-only ``Qwen2ForCausalLM`` built from sizes (the text-model
  path: any ``AutoModelForCausalLM`` trains through the same loop with text prompts).
- ``check_vocab_match``: teacher and student must share a vocabulary; fail at start-up.
- LoRA through ``peft``: ``apply_lora`` wraps a model (default targets from
  ``lora_target_modules``: the language model's linear layers, never an encoder, nor a MoE
  model's experts (fused 3-D tensors, not linear layers) or router; QLoRA's
  ``prepare_model_for_kbit_training`` on a 4-bit base), ``save_merged_lora`` merges trained
  adapters into a freshly loaded full-precision base and saves a plain model folder.
- 4-bit loading (``load_in_4bit``): bitsandbytes through ``BitsAndBytesConfig``; refused with a
  message naming ``model.load_in_4bit`` where there is no CUDA GPU or no bitsandbytes.

What it leaves out: when to wrap (the trainer decides from the config), the Omni talker and
token2wav / code2wav (speech output: carried through the export untouched, never trained), chat
rendering of prompts (``core/data/collate.py``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# Qwen-style chat template; audio items become <|audio_bos|><|AUDIO|><|audio_eos|>, which the
# processor expands to one <|AUDIO|> per encoder frame.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'audio' or 'audio' in item or 'audio_url' in item %}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# the Qwen2.5-Omni thinker's placeholders, added by ``train_tokenizer(..., omni=True)``
OMNI_SPECIAL_TOKENS = ["<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"]
OMNI_EXTRA_SPECIALS = {
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}

# Omni chat template: video / image / audio items become their bos + placeholder + eos triple, which
# Qwen2_5OmniProcessor expands to one placeholder per encoder output position.
OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' or 'video' in item %}"
    "{{ '<|vision_bos|><|VIDEO|><|vision_eos|>' }}"
    "{% elif item['type'] == 'image' or 'image' in item %}"
    "{{ '<|vision_bos|><|IMAGE|><|vision_eos|>' }}"
    "{% elif item['type'] == 'audio' or 'audio' in item or 'audio_url' in item %}"
    "{{ '<|audio_bos|><|AUDIO|><|audio_eos|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3-ASR's specials (the Qwen3 vocabulary's names, which ``Qwen3ASRProcessor`` reads as the
# tokenizer's ``audio_token`` / ``audio_bos_token`` / ``audio_eos_token``), added by
# ``train_tokenizer(..., qwen3_asr=True)``; the first three are the chat specials of the others.
QWEN3_ASR_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>",
                            "<|audio_pad|>"]
QWEN3_ASR_EXTRA_SPECIALS = {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                            "audio_eos_token": "<|audio_end|>"}
# added tokens that are not special (``skip_special_tokens`` keeps them): the released model writes
# ``language <Name><asr_text><transcript>`` and its forced aligner reads ``<timestamp>`` markers
QWEN3_ASR_TEXT_TOKENS = ["<asr_text>", "<timestamp>"]

# The released Qwen3-ASR chat template (as transformers' conversion writes it): one system turn
# holding the text of every system message (the context / hot words, empty by default), one user
# turn holding only the audio placeholders (a user's text items are not rendered), then the
# assistant turns, each marked as generation (``return_assistant_tokens_mask``).
QWEN3_ASR_CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='', audio='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'] -%}{%- endif -%}"
    "{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'audio' or 'audio' in c or 'audio_url' in c -%}"
    "{%- set ns.audio = ns.audio + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- elif m['role'] == 'system' and c['type'] == 'text' and c['text'] is defined -%}"
    "{%- set ns.system = ns.system + c['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\n' + ns.system + '<|im_end|>\n' -}}"
    "{{- '<|im_start|>user\n' + ns.audio + '<|im_end|>\n' -}}"
    "{%- for m in messages if m['role'] == 'assistant' -%}"
    "{%- set ns.reply = '' -%}"
    "{%- if m['content'] is string -%}{%- set ns.reply = m['content'] -%}"
    "{%- else -%}{%- for c in m['content'] if c['type'] == 'text' and c['text'] is defined -%}"
    "{%- set ns.reply = ns.reply + c['text'] -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}{{- ns.reply + '<|im_end|>\n' -}}{% endgeneration %}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | os.PathLike | None = None, *,
                    omni: bool = False, qwen3_asr: bool = False):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The specials are those Qwen2-Audio's processor expects; ``<|im_end|>`` is the EOS (end of
    an assistant turn) and ``<|endoftext|>`` the pad. ``omni=True`` adds the Qwen2.5-Omni
    thinker's (``<|IMAGE|>``, ``<|VIDEO|>``, ``<|vision_bos|>``, ``<|vision_eos|>``, after the
    others, so the first six ids are the same) as named specials (``tok.video_token_id`` ...) and
    uses a chat template that also renders video and image items.

    ``qwen3_asr=True``: Qwen3-ASR's vocabulary layout instead: the specials
    ``QWEN3_ASR_SPECIAL_TOKENS`` (``<|audio_pad|>`` the audio placeholder between
    ``<|audio_start|>`` and ``<|audio_end|>``, named ``audio_token`` / ``audio_bos_token`` /
    ``audio_eos_token`` as ``Qwen3ASRProcessor`` reads them), then the BPE, then ``<asr_text>`` and
    ``<timestamp>`` as added tokens that are not special (decoding with ``skip_special_tokens``
    keeps them, as the released tokenizer does), and the released chat template
    (``QWEN3_ASR_CHAT_TEMPLATE``). The default tokenizer's ids are unchanged by this keyword.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_tokenizer: no text to train on")
    if omni and qwen3_asr:
        raise ValueError("train_tokenizer: omni and qwen3_asr are two different vocabularies; pick one")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN3_ASR_SPECIAL_TOKENS if qwen3_asr else
        SPECIAL_TOKENS + (OMNI_SPECIAL_TOKENS if omni else []),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
        extra_special_tokens=dict(OMNI_EXTRA_SPECIALS) if omni else dict(QWEN3_ASR_EXTRA_SPECIALS) if qwen3_asr else {
            "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    )
    fast.chat_template = OMNI_CHAT_TEMPLATE if omni else CHAT_TEMPLATE
    if qwen3_asr:
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ASR_TEXT_TOKENS])
        fast.chat_template = QWEN3_ASR_CHAT_TEMPLATE
    fast.padding_side = "left"
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


# --------------------------------------------------------------------------- building
def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table [length, channels] (sin half, then cos half)."""
    if channels % 2:
        raise ValueError("channels must be even")
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_inc * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def build_tiny_qwen2_audio(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                           kv_heads: int | None = None, intermediate: int | None = None,
                           audio_hidden: int | None = None, audio_layers: int | None = None,
                           audio_heads: int | None = None, num_mel_bins: int = 128,
                           chunk_seconds: int = 3, max_position_embeddings: int = 512,
                           seed: int = 0, out_dir: str | os.PathLike | None = None):
    """Build a ``Qwen2AudioForConditionalGeneration`` and its processor from sizes.

    ``chunk_seconds`` sets both the feature extractor's chunk and the encoder's
    ``max_source_positions`` (100 mel frames per second, halved by the encoder's stride) so
    they agree. Returns ``(model, processor)``; saves both when ``out_dir`` is given.
    """
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                              Qwen2AudioProcessor, WhisperFeatureExtractor)

    if int(chunk_seconds) != chunk_seconds or chunk_seconds < 1:
        # WhisperFeatureExtractor recomputes its sample count from chunk_length on every load;
        # a fractional value becomes a float count that its padding code rejects.
        raise ValueError(f"chunk_seconds must be a whole number of seconds, got {chunk_seconds}")
    chunk_seconds = int(chunk_seconds)
    frames = chunk_seconds * 100
    audio_hidden = audio_hidden or hidden
    audio_cfg = dict(
        model_type="qwen2_audio_encoder", d_model=audio_hidden, encoder_layers=audio_layers or layers,
        encoder_attention_heads=audio_heads or heads, encoder_ffn_dim=4 * audio_hidden,
        num_mel_bins=num_mel_bins, max_source_positions=frames // 2,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    text_cfg = dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg,
                              audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    _init_audio_positions(model)
    _set_generation_ids(model, tokenizer)
    fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160,
                                 chunk_length=chunk_seconds, n_fft=400)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    if out_dir is not None:
        save_model(model, processor, out_dir)
    return model, processor


def mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width split of the rotary half-dimension, in Qwen's 1:1.5:1.5 ratio
    (``[16, 24, 24]`` for head_dim 128, ``[2, 3, 3]`` for 16); the parts sum to ``head_dim // 2``."""
    half = head_dim // 2
    hw = (3 * half) // 8
    if head_dim % 2 or half - 2 * hw < 1:
        raise ValueError(f"head_dim {head_dim} is too small for multimodal rotary positions (>= 4, even)")
    return [half - 2 * hw, hw, hw]


def _omni_special_ids(tokenizer) -> dict[str, int]:
    """The ids of the Omni thinkers' named specials (``OMNI_EXTRA_SPECIALS``); ValueError naming
    the ones the tokenizer lacks."""
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in OMNI_EXTRA_SPECIALS.items()}
    missing = [OMNI_EXTRA_SPECIALS[n] for n, i in ids.items() if not isinstance(i, int) or i < 0
               or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"the tokenizer lacks the Omni specials {missing}; "
                         "build it with train_tokenizer(..., omni=True)")
    return ids


def _omni_processor(cls, tokenizer, *, num_mel_bins: int, chunk_seconds: int, patch: int, min_pixels: int,
                    video_max_pixels: int):
    """An Omni thinker's processor ``cls``: a Whisper feature extractor (``chunk_seconds``), image
    and video processors of ``patch``-pixel patches (2 x 2 merge, 2 frames per temporal patch)
    whose frames hold ``min_pixels`` to ``video_max_pixels`` pixels, our template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor
    fe = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160,
                                 chunk_length=chunk_seconds, n_fft=400)
    size = {"shortest_edge": min_pixels, "longest_edge": int(video_max_pixels)}
    kw = dict(size=size, patch_size=patch, temporal_patch_size=2, merge_size=2)
    return cls(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
               feature_extractor=fe, tokenizer=tokenizer, chat_template=OMNI_CHAT_TEMPLATE)


def build_tiny_omni_thinker(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                            kv_heads: int | None = None, intermediate: int | None = None,
                            audio_hidden: int = 64, audio_layers: int = 2, audio_heads: int | None = None,
                            vision_hidden: int = 32, vision_depth: int = 2, vision_heads: int = 2,
                            num_mel_bins: int = 128, chunk_seconds: int = 4, n_window: int = 100,
                            max_position_embeddings: int = 4096, video_max_pixels: int = 64 * 64,
                            seed: int = 0, out_dir: str | os.PathLike | None = None):
    """Build a ``Qwen2_5OmniThinkerForConditionalGeneration`` and its ``Qwen2_5OmniProcessor``.

    ``tokenizer``: from ``train_tokenizer(..., omni=True)`` (the video/image/audio placeholders
    and their bos/eos as named specials). Text model ``hidden`` x ``layers`` with multimodal
    rotary positions (``mrope_section`` from the head size); audio encoder ``audio_hidden`` x
    ``audio_layers`` whose ``max_source_positions`` matches the feature extractor's
    ``chunk_seconds`` (100 mel frames a second, halved by the encoder's stride; its sinusoid
    position table is a fixed buffer already); vision encoder ``vision_hidden`` x ``vision_depth``
    (14-pixel patches, 2 x 2 merge, 2 frames per temporal patch). The LM head is untied, as in the
    released thinker. The image and video processors cap frames at ``video_max_pixels`` (a
    64 x 64 frame becomes 56 x 56: 4 tokens per pair of frames); callers pass the same cap with the
    clip's real fps on every processor call (``videos_kwargs``), since the processor's own defaults
    upscale small frames. Returns ``(model, processor)``; saves both when ``out_dir`` is given.
    """
    from transformers import (Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    if int(chunk_seconds) != chunk_seconds or chunk_seconds < 1:
        raise ValueError(f"chunk_seconds must be a whole number of seconds, got {chunk_seconds}")
    chunk_seconds = int(chunk_seconds)
    ids = _omni_special_ids(tokenizer)
    head_dim = hidden // heads
    max_source = chunk_seconds * 100 // 2
    if max_source < n_window:
        raise ValueError(f"chunk_seconds {chunk_seconds} gives {max_source} audio positions, "
                         f"fewer than n_window {n_window}")
    text_cfg = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section(head_dim)},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    audio_cfg = dict(
        d_model=audio_hidden, encoder_layers=audio_layers, encoder_attention_heads=audio_heads or heads,
        encoder_ffn_dim=4 * audio_hidden, num_mel_bins=num_mel_bins, max_source_positions=max_source,
        n_window=n_window, output_dim=hidden, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    vision_cfg = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=vision_heads,
        out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1], patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=112,
    )
    user = tokenizer("user", add_special_tokens=False)["input_ids"]
    config = Qwen2_5OmniThinkerConfig(
        text_config=text_cfg, audio_config=audio_cfg, vision_config=vision_cfg,
        audio_token_index=ids["audio_token"], image_token_index=ids["image_token"],
        video_token_index=ids["video_token"], audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"], user_token_id=user[0] if len(user) == 1 else tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # read by the multimodal position code though not a declared field of the config
    config.vision_start_token_id = ids["vision_bos_token"]
    config.vision_end_token_id = ids["vision_eos_token"]
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    if model.lm_head.weight is model.get_input_embeddings().weight:
        raise RuntimeError("build_tiny_omni_thinker: the LM head came out tied to the input embeddings")
    _set_generation_ids(model, tokenizer)
    processor = _omni_processor(Qwen2_5OmniProcessor, tokenizer, num_mel_bins=num_mel_bins,
                                chunk_seconds=chunk_seconds, patch=14, min_pixels=56 * 56,
                                video_max_pixels=video_max_pixels)
    if out_dir is not None:
        save_model(model, processor, out_dir)
    return model, processor


# Qwen3-ASR's encoder chunk: 2 * n_window mel frames (1 s), 13 positions after its three stride-2
# convolutions. Fixed: Qwen3ASRProcessor and the model count 13 tokens per full chunk.
QWEN3_ASR_N_WINDOW = 50


def build_tiny_qwen3_asr(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                         kv_heads: int | None = None, intermediate: int | None = None,
                         audio_hidden: int | None = None, audio_layers: int | None = None,
                         audio_heads: int | None = None, downsample_hidden: int = 16, num_mel_bins: int = 128,
                         n_window_infer: int = 800, max_position_embeddings: int = 512,
                         tie_word_embeddings: bool = True, seed: int = 0,
                         out_dir: str | os.PathLike | None = None):
    """Build a ``Qwen3ASRForConditionalGeneration`` and its ``Qwen3ASRProcessor`` from sizes.

    ``tokenizer``: from ``train_tokenizer(..., qwen3_asr=True)`` (``<|audio_pad|>`` and its
    start/end markers as named specials, ``<asr_text>`` / ``<timestamp>``, the released chat
    template). The layout is that of the released checkpoints as transformers reads them
    (Qwen3-ASR-0.6B / 1.7B converted, ``model_type: qwen3_asr``): ``audio_config``
    (``qwen3_asr_encoder``: ``audio_hidden`` x ``audio_layers``, a ``downsample_hidden``-channel
    convolution stack over ``num_mel_bins`` mel bins, chunks of ``2 * n_window`` = 100 mel frames
    (``QWEN3_ASR_N_WINDOW``, the released value: the processor counts 13 audio tokens per chunk),
    attention windows of ``n_window_infer`` frames, a fixed sinusoid table of 13 positions) and
    ``text_config`` (``qwen3``: ``hidden`` x ``layers``, q/k norms, head size ``hidden // heads``),
    ``audio_token_id`` / ``timestamp_token_id`` and a projector to the text width. The LM head
    is tied to the input embeddings by default, ``Qwen3ASRConfig``'s own default
    (``tie_word_embeddings``; the class declares the tie, so ``save_pretrained`` keeps it). The
    feature extractor (``Qwen3ASRFeatureExtractor``) pads a batch to its longest clip, rounded up
    to whole chunks, and marks the real frames in ``input_features_mask``. Returns
    ``(model, processor)``; saves both when ``out_dir`` is given.
    """
    from transformers import (Qwen3ASRConfig, Qwen3ASRFeatureExtractor, Qwen3ASRForConditionalGeneration,
                              Qwen3ASRProcessor)

    names = {**QWEN3_ASR_EXTRA_SPECIALS, "timestamp": "<timestamp>", "asr_text": "<asr_text>"}
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in names.items()}
    missing = [names[n] for n, i in ids.items() if not isinstance(i, int) or i < 0 or i == tokenizer.unk_token_id]
    if missing or getattr(tokenizer, "audio_token", None) != QWEN3_ASR_EXTRA_SPECIALS["audio_token"]:
        lacks = missing or list(QWEN3_ASR_EXTRA_SPECIALS.values())
        raise ValueError(f"the tokenizer lacks Qwen3-ASR's tokens {lacks}; build it with "
                         "train_tokenizer(..., qwen3_asr=True)")
    chunk = 2 * QWEN3_ASR_N_WINDOW
    if n_window_infer < chunk or n_window_infer % chunk:
        raise ValueError(f"n_window_infer must be a positive multiple of {chunk} mel frames (whole encoder chunks), "
                         f"got {n_window_infer}")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    audio_hidden = audio_hidden or hidden
    eos = [tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.eos_token_id]
    audio_cfg = dict(
        d_model=audio_hidden, encoder_layers=audio_layers or layers, encoder_attention_heads=audio_heads or heads,
        encoder_ffn_dim=4 * audio_hidden, num_mel_bins=num_mel_bins, output_dim=hidden, n_window=QWEN3_ASR_N_WINDOW,
        n_window_infer=n_window_infer, downsample_hidden_size=downsample_hidden, max_position_embeddings=13,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    text_cfg = dict(
        model_type="qwen3", vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=hidden // heads,
        intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    config = Qwen3ASRConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_id=ids["audio_token"],
                            timestamp_token_id=ids["timestamp"], pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=eos, tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(config)
    _fill_uninitialised(model, seed)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    if tied != bool(tie_word_embeddings):
        raise RuntimeError(f"build_tiny_qwen3_asr: the LM head came out {'tied' if tied else 'untied'}, "
                           f"asked for tie_word_embeddings={tie_word_embeddings}")
    _set_generation_ids(model, tokenizer)
    model.generation_config.eos_token_id = eos
    fe = Qwen3ASRFeatureExtractor(feature_size=num_mel_bins, sampling_rate=16000, hop_length=160, n_fft=400,
                                  n_window=QWEN3_ASR_N_WINDOW)
    processor = Qwen3ASRProcessor(feature_extractor=fe, tokenizer=tokenizer, chat_template=QWEN3_ASR_CHAT_TEMPLATE)
    if out_dir is not None:
        save_model(model, processor, out_dir)
    return model, processor


def build_tiny_causal_lm(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                         kv_heads: int | None = None, intermediate: int | None = None,
                         max_position_embeddings: int = 512, tie_word_embeddings: bool = False,
                         seed: int = 0, out_dir: str | os.PathLike | None = None, family: str = "qwen2"):
    """Build a text-only ``Qwen2ForCausalLM`` (``family="qwen3"``: ``Qwen3ForCausalLM``, with its
    per-head q/k norms and explicit head size, the Qwen3 8B / 32B layout) from sizes; returns
    ``(model, tokenizer)``.

    Saves both with ``save_pretrained`` when ``out_dir`` is given, so ``load_model_and_processor``
    loads it like a downloaded checkpoint (the processor is then the tokenizer).
    """
    import transformers

    classes = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    if family not in classes:
        raise ValueError(f"family must be one of {', '.join(classes)}, got {family!r}")
    cfg_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    extra = {"head_dim": hidden // heads} if family == "qwen3" else {}
    config = cfg_cls(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, **extra)
    torch.manual_seed(seed)
    model = model_cls(config)
    _set_generation_ids(model, tokenizer)
    if out_dir is not None:
        save_model(model, tokenizer, out_dir)
    return model, tokenizer


def _init_audio_positions(model) -> None:
    enc = model.audio_tower if hasattr(model, "audio_tower") else model.model.audio_tower
    emb = enc.embed_positions
    with torch.no_grad():
        emb.weight.copy_(whisper_sinusoids(emb.weight.shape[0], emb.weight.shape[1]))
    emb.weight.requires_grad_(False)


def _set_generation_ids(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = None


def save_model(model, processor, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` model (safetensors) and processor into ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(tmp)
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# --------------------------------------------------------------------------- a student from its teacher
def _layer_list(model, count: int, exclude: tuple[str, ...], include: tuple[str, ...] = ()) -> str:
    """Name of the ``nn.ModuleList`` of ``count`` layers (the text decoder's, or the audio encoder's)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count
             and n.endswith("layers") and not any(x in n for x in exclude) and all(x in n for x in include)]
    if len(names) != 1:
        raise ValueError(f"cannot tell which layer list of {type(model).__name__} to thin ({names or 'none'} of "
                         f"length {count})")
    return names[0]


def _kept(n: int, keep_every: int) -> list[int]:
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    return list(range(0, n, keep_every))


def student_from_teacher(teacher_dir: str | os.PathLike, out_dir: str | os.PathLike, *, keep_every: int = 2,
                         audio_keep_every: int = 1, trust_remote_code: bool = False) -> dict:
    """A smaller student made of the teacher's own layers: decoder layers 0, k, 2k, ... of the
    teacher (``keep_every`` = k), optionally every ``audio_keep_every``-th audio encoder layer too,
    and everything else (embeddings, LM head, norms, encoders, projector) copied, each tensor
    initialised from the teacher's. Saved with the teacher's processor, so the pair shares its
    tokenizer and processor exactly. Returns what was kept."""
    import copy

    model, processor = load_model_and_processor(teacher_dir, trust_remote_code=trust_remote_code)
    cfg = copy.deepcopy(model.config)
    text = cfg.get_text_config()
    n = text.num_hidden_layers
    keep = _kept(n, keep_every)
    plan = {_layer_list(model, n, exclude=("audio", "visual", "vision")): keep}
    text.num_hidden_layers = len(keep)
    if isinstance(getattr(text, "layer_types", None), list):
        text.layer_types = [text.layer_types[i] for i in keep]
    if getattr(text, "max_window_layers", None) is not None:
        text.max_window_layers = min(text.max_window_layers, len(keep))
    audio = getattr(cfg, "audio_config", None)
    audio_keep = None
    if audio is not None and audio_keep_every > 1:
        na = audio.encoder_layers
        audio_keep = _kept(na, audio_keep_every)
        plan[_layer_list(model, na, exclude=(), include=("audio",))] = audio_keep
        audio.encoder_layers = len(audio_keep)
    student = type(model)(cfg)
    src = model.state_dict()
    dst = {}
    for key in student.state_dict():
        name = key
        for prefix, kept in plan.items():
            head = prefix + "."
            if key.startswith(head):
                idx, rest = key[len(head):].split(".", 1)
                name = f"{head}{kept[int(idx)]}.{rest}"
        dst[key] = src[name]
    student.load_state_dict(dst, strict=True)
    _refreeze_audio_positions(student)
    student.generation_config = copy.deepcopy(model.generation_config)
    save_model(student, processor, out_dir)
    return {"from": str(teacher_dir), "decoder_layers": keep, "teacher_decoder_layers": n,
            "audio_layers": audio_keep, "parameters": count_parameters(student),
            "teacher_parameters": count_parameters(model)}


# --------------------------------------------------------------------------- full Omni folders
FULL_OMNI_TYPES = ("qwen2_5_omni", "qwen3_omni_moe")
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def is_full_omni(path: str | os.PathLike) -> bool:
    """A released full Omni folder (``FULL_OMNI_TYPES``): Qwen2.5-Omni (thinker + talker +
    token2wav) or Qwen3-Omni-MoE (thinker + talker + code2wav), weights prefixed ``thinker.``."""
    return (Path(path) / "config.json").is_file() and model_type_of(path) in FULL_OMNI_TYPES


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights")
    return files


def export_full_omni(source: str | os.PathLike, thinker_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     shard_bytes: int = 2 << 30) -> dict:
    """A full Omni folder at ``out_dir`` (Qwen2.5-Omni or Qwen3-Omni-MoE, ``is_full_omni``):
    ``source`` (the released folder training started from) with its thinker weights (``thinker.*``)
    replaced by those of ``thinker_dir`` (our export of the trained thinker), each cast to the
    source tensor's dtype; every other tensor (talker, token2wav / code2wav) and every other file of
    ``source`` (config, processor, speaker dictionary ...) as they were. Written tensor by tensor
    (one shard in memory at a time) to ``out_dir``.tmp, then moved into place.

    Raises ValueError when the trained thinker's tensors do not match the source thinker's names
    and shapes (another model). Returns counts of the tensors written.
    """
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    source, thinker_dir, out_dir = Path(source), Path(thinker_dir), Path(out_dir)
    trained: dict[str, tuple[Path, str]] = {}
    for f in _safetensor_files(thinker_dir):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # saved as "thinker.X" (loaded from a full folder) or "X"
                trained["thinker." + k.removeprefix("thinker.")] = (f, k)
    src_keys: dict[str, Path] = {}
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, str] = {}
    for f in _safetensor_files(source):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                src_keys[k] = f
                shapes[k] = tuple(h.get_slice(k).get_shape())
                dtypes[k] = h.get_slice(k).get_dtype()
    src_thinker = {k for k in src_keys if k.startswith("thinker.")}
    missing, extra = sorted(src_thinker - set(trained)), sorted(set(trained) - src_thinker)
    if missing or extra:
        raise ValueError(f"{thinker_dir}: its thinker does not match {source}'s ({len(missing)} tensors missing, "
                         f"e.g. {missing[:3]}; {len(extra)} extra, e.g. {extra[:3]})")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for p in source.iterdir():  # config, processor, generation config, spk_dict.pt ...
        if p.is_file() and not any(p.match(pat) for pat in _WEIGHT_FILES):
            shutil.copy2(p, tmp / p.name)
    handles: dict[Path, object] = {}
    shard: dict = {}
    shard_size, total, written = 0, 0, []   # written: (temporary file, its keys), in order

    def tensor(path: Path, key: str):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path].get_tensor(key)

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = tmp / f"shard-{len(written):05d}.tmp"
            save_file(shard, str(name), metadata={"format": "pt"})
            written.append((name, list(shard)))
            shard, shard_size = {}, 0

    for k in sorted(src_keys):
        if k in trained:
            t = tensor(*trained[k])
            if tuple(t.shape) != shapes[k]:
                raise ValueError(f"{thinker_dir}: tensor {k} has shape {tuple(t.shape)}, {source} has {shapes[k]}")
            t = t.to(_SAFETENSORS_DTYPES.get(dtypes[k], t.dtype))
        else:
            t = tensor(src_keys[k], k)
        nbytes = t.numel() * t.element_size()
        if shard_size and shard_size + nbytes > shard_bytes:
            flush()  # one shard in memory at a time
        shard[k] = t.contiguous()
        shard_size += nbytes
        total += nbytes
    flush()
    n = len(written)
    weight_map = {}
    for i, (name, keys) in enumerate(written):
        final_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(name, tmp / final_name)
        weight_map.update({k: final_name for k in keys})
    if n > 1:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {"thinker_tensors": len(src_thinker), "other_tensors": len(src_keys) - len(src_thinker), "shards": n}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _fill_uninitialised(model, seed: int) -> int:
    """Parameters that the model's constructor left as raw memory (``torch.empty`` that no
    ``_init_weights`` branch touches; seen in Qwen3-Omni-MoE's talker / code2wav) can hold NaN or
    Inf, which depends on what the process allocated before. Any parameter with a non-finite value
    is drawn again from N(0, 0.02) with ``seed``. Returns how many were redrawn."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, prm in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if not torch.isfinite(prm).all():
                prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float32).mul_(0.02).to(prm.dtype))
                n += 1
    return n


def build_tiny_full_omni(thinker_dir: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """A full ``Qwen2_5OmniForConditionalGeneration`` folder in the released layout (weights
    prefixed ``thinker.`` / ``talker.`` / ``token2wav.``, the config nesting all three) around the
    tiny thinker in ``thinker_dir`` (its weights and processor), with a tiny talker and token2wav.
    For tests: the layout of Qwen2.5-Omni-3B/7B at a size that trains on a CPU."""
    from transformers import AutoProcessor, Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration as Thinker

    thinker = Thinker.from_pretrained(str(thinker_dir))
    processor = AutoProcessor.from_pretrained(str(thinker_dir))
    vocab = thinker.config.text_config.vocab_size
    talker = dict(vocab_size=64, embedding_size=thinker.config.text_config.hidden_size, hidden_size=32,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, head_dim=16,
                  tts_codec_start_token_id=60, tts_codec_end_token_id=61, tts_codec_pad_token_id=62,
                  tts_codec_mask_token_id=63, tts_text_start_token_id=min(1, vocab - 1),
                  tts_text_end_token_id=min(2, vocab - 1), tts_text_pad_token_id=min(3, vocab - 1),
                  rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ff_mult=2, emb_dim=16, head_dim=16,
                        repeats=2, num_embeds=64, mel_dim=16, enc_emb_dim=16, enc_dim=16,
                        enc_channels=[16, 16, 16, 16, 32], enc_kernel_sizes=[5, 3, 3, 3, 1],
                        enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8, enc_res2net_scale=2,
                        enc_se_channels=8),
        bigvgan_config=dict(mel_dim=16, upsample_initial_channel=32, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4]))
    config = Qwen2_5OmniConfig(thinker_config=thinker.config.to_dict(), talker_config=talker,
                               token2wav_config=token2wav)
    torch.manual_seed(seed)
    full = Qwen2_5OmniForConditionalGeneration(config)
    _fill_uninitialised(full, seed)
    missing, unexpected = full.thinker.load_state_dict(thinker.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"build_tiny_full_omni: thinker weights do not fit ({missing[:3]}, {unexpected[:3]})")
    out_dir = Path(out_dir)
    full.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    # the released speaker dictionary (from_pretrained of the whole model reads it): per voice the
    # talker's first text token, a speaker vector and a reference mel for token2wav
    mel = token2wav["dit_config"]["mel_dim"]
    torch.save({name: {"bos_token": talker["tts_text_start_token_id"], "cond": torch.randn(1, 16),
                       "ref_mel": torch.randn(1, 30, mel)} for name in ("Chelsie", "Ethan")},
               out_dir / "spk_dict.pt")
    return out_dir


# --------------------------------------------------------------------------- Qwen3-Omni-MoE
def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width split of the rotary half-dimension for Qwen3-Omni's interleaved
    multimodal rotary positions, in the released 24:20:20 ratio (``[24, 20, 20]`` for head_dim 128,
    ``[4, 2, 2]`` for 16); the parts sum to ``head_dim // 2``."""
    half = head_dim // 2
    hw = half * 5 // 16
    if head_dim % 2 or hw < 1:
        raise ValueError(f"head_dim {head_dim} is too small for multimodal rotary positions (>= 8, even)")
    return [half - 2 * hw, hw, hw]


def build_tiny_qwen3_omni_thinker(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                                  kv_heads: int | None = None, head_dim: int | None = None,
                                  experts: int = 4, experts_per_tok: int = 2, moe_intermediate: int = 32,
                                  audio_hidden: int = 32, audio_layers: int = 2, audio_heads: int = 2,
                                  downsample_hidden: int = 16, vision_hidden: int = 32, vision_depth: int = 2,
                                  vision_heads: int = 2, num_mel_bins: int = 128, max_position_embeddings: int = 4096,
                                  video_max_pixels: int = 64 * 64, seed: int = 0,
                                  out_dir: str | os.PathLike | None = None):
    """Build a ``Qwen3OmniMoeThinkerForConditionalGeneration`` and its ``Qwen3OmniMoeProcessor``.

    The layout of Qwen3-Omni-30B-A3B's thinker at a size that trains on a CPU: a MoE text model
    (``hidden`` x ``layers``, per-head q/k norms, every layer sparse: ``experts`` experts of width
    ``moe_intermediate``, ``experts_per_tok`` routed per token, normalised top-k weights; the
    router's load-balancing loss off, ``output_router_logits: false``) with interleaved
    multimodal rotary positions (``interleaved_mrope_section``), an audio encoder
    (``audio_hidden`` x ``audio_layers``; three stride-2 convolutions of ``downsample_hidden``
    channels over chunks of 100 mel frames, 13 tokens per chunk, as released: ``n_window`` 50,
    which the processor assumes), a vision encoder (``vision_hidden`` x ``vision_depth``, 16-pixel
    patches, 2 x 2 merge, 2 frames per temporal patch, a learned position grid, one deepstack
    merger after block 0) and an untied LM head. ``position_id_per_seconds`` is the released 13.
    ``tokenizer``: from ``train_tokenizer(..., omni=True)`` (the processor reads the same named
    specials as Qwen2.5-Omni's). The image and video processors cap frames at ``video_max_pixels``
    (a 64 x 64 frame stays 64 x 64: 4 tokens per pair of frames); callers pass the cap and the
    clip's fps on every call (``AVPromptCollator`` does). Audio is padded to the batch's longest
    clip (the released processor's ``padding: longest``). Returns ``(model, processor)``; saves
    both when ``out_dir`` is given.
    """
    from transformers import (Qwen3OmniMoeProcessor, Qwen3OmniMoeThinkerConfig,
                              Qwen3OmniMoeThinkerForConditionalGeneration)

    ids = _omni_special_ids(tokenizer)
    if experts_per_tok > experts:
        raise ValueError(f"experts_per_tok {experts_per_tok} is more than the {experts} experts")
    head_dim = head_dim or hidden // heads
    text_cfg = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, head_dim=head_dim, intermediate_size=2 * hidden,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": interleaved_mrope_section(head_dim),
                         "interleaved": True, "mrope_interleaved": True},
        num_experts=experts, num_experts_per_tok=experts_per_tok, moe_intermediate_size=moe_intermediate,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, output_router_logits=False,
        router_aux_loss_coef=0.001, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    audio_cfg = dict(
        d_model=audio_hidden, encoder_layers=audio_layers, encoder_attention_heads=audio_heads,
        encoder_ffn_dim=2 * audio_hidden, num_mel_bins=num_mel_bins, max_source_positions=1500, n_window=50,
        n_window_infer=800, conv_chunksize=500, downsample_hidden_size=downsample_hidden, output_dim=hidden,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    vision_cfg = dict(
        depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=vision_heads,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
        num_position_embeddings=64, deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh",
    )
    user = tokenizer("user", add_special_tokens=False)["input_ids"]
    config = Qwen3OmniMoeThinkerConfig(
        text_config=text_cfg, audio_config=audio_cfg, vision_config=vision_cfg,
        audio_token_id=ids["audio_token"], image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"], position_id_per_seconds=13,
        user_token_id=user[0] if len(user) == 1 else tokenizer.pad_token_id, tie_word_embeddings=False,
        # read by the multimodal position code, as in the released config, though not declared fields
        vision_start_token_id=ids["vision_bos_token"], vision_end_token_id=ids["vision_eos_token"],
        audio_end_token_id=ids["audio_eos_token"],
    )
    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    _fill_uninitialised(model, seed)
    if model.lm_head.weight is model.get_input_embeddings().weight:
        raise RuntimeError("build_tiny_qwen3_omni_thinker: the LM head came out tied to the input embeddings")
    _set_generation_ids(model, tokenizer)
    processor = _omni_processor(Qwen3OmniMoeProcessor, tokenizer, num_mel_bins=num_mel_bins, chunk_seconds=30,
                                patch=16, min_pixels=32 * 32, video_max_pixels=video_max_pixels)
    if out_dir is not None:
        save_model(model, processor, out_dir)
    return model, processor


def build_tiny_full_qwen3_omni(thinker_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                               seed: int = 0) -> Path:
    """A full ``Qwen3OmniMoeForConditionalGeneration`` folder in the released layout (model_type
    ``qwen3_omni_moe``; ``thinker_config`` / ``talker_config`` (with its ``text_config`` and
    ``code_predictor_config``) / ``code2wav_config`` nested as transformers reads them; weights
    prefixed ``thinker.`` / ``talker.`` / ``code2wav.``; the voices in
    ``talker_config.speaker_id``, no speaker file) around the tiny thinker in ``thinker_dir`` (its
    weights and processor), with a tiny MoE talker (a shared expert, as released), code predictor
    and code2wav vocoder. For tests: the layout of Qwen3-Omni-30B-A3B-Instruct at CPU size."""
    from transformers import (AutoProcessor, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration,
                              Qwen3OmniMoeThinkerForConditionalGeneration)

    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(thinker_dir))
    processor = AutoProcessor.from_pretrained(str(thinker_dir))
    tok = tokenizer_of(processor)
    tc = thinker.config
    text = tc.get_text_config()

    def one_id(word: str) -> int:
        got = tok(word, add_special_tokens=False)["input_ids"]
        return got[0] if len(got) == 1 else tok.pad_token_id

    talker = dict(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_intermediate_size=16,
                         num_experts=2, num_experts_per_tok=1, shared_expert_intermediate_size=32,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": interleaved_mrope_section(16), "interleaved": True}),
        code_predictor_config=dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=4),
        num_code_groups=4, thinker_hidden_size=text.hidden_size, accept_hidden_layer=text.num_hidden_layers,
        codec_pad_id=58, codec_bos_id=59, codec_eos_token_id=60, codec_nothink_id=61, codec_think_bos_id=62,
        codec_think_eos_id=63, audio_token_id=tc.audio_token_id, image_token_id=tc.image_token_id,
        video_token_id=tc.video_token_id, vision_start_token_id=tc.vision_start_token_id,
        audio_start_token_id=tc.audio_start_token_id, position_id_per_seconds=tc.position_id_per_seconds,
        spatial_merge_size=tc.vision_config.spatial_merge_size, speaker_id={"ethan": 50, "chelsie": 51})
    code2wav = dict(codebook_size=32, hidden_size=32, max_position_embeddings=256, num_attention_heads=2,
                    num_key_value_heads=2, sliding_window=8, intermediate_size=64, num_hidden_layers=1,
                    num_quantizers=4, upsample_rates=[2, 2], upsampling_ratios=[2], decoder_dim=32)
    config = Qwen3OmniMoeConfig(
        thinker_config=tc.to_dict(), talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
        im_start_token_id=tok.convert_tokens_to_ids("<|im_start|>"), im_end_token_id=tok.eos_token_id,
        tts_pad_token_id=tok.pad_token_id, tts_bos_token_id=tok.pad_token_id, tts_eos_token_id=tok.pad_token_id,
        system_token_id=one_id("system"), user_token_id=one_id("user"), assistant_token_id=one_id("assistant"))
    torch.manual_seed(seed)
    full = Qwen3OmniMoeForConditionalGeneration(config)
    _fill_uninitialised(full, seed)
    missing, unexpected = full.thinker.load_state_dict(thinker.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"build_tiny_full_qwen3_omni: thinker weights do not fit ({missing[:3]}, {unexpected[:3]})")
    out_dir = Path(out_dir)
    full.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- loading
def model_type_of(path: str | os.PathLike) -> str:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json)")
    return json.loads(cfg.read_text()).get("model_type", "")


# model_type -> the transformers class that trains it (besides every text-only causal LM)
MULTIMODAL_CLASSES = {
    "qwen2_audio": "Qwen2AudioForConditionalGeneration",
    "qwen2_5_omni": "Qwen2_5OmniThinkerForConditionalGeneration",        # a full Omni folder: its thinker
    "qwen2_5_omni_thinker": "Qwen2_5OmniThinkerForConditionalGeneration",
    "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration",     # a full Qwen3-Omni folder: its thinker
    "qwen3_omni_moe_thinker": "Qwen3OmniMoeThinkerForConditionalGeneration",
    "qwen3_asr": "Qwen3ASRForConditionalGeneration",
}


class UnsupportedModel(ValueError):
    """A checkpoint whose ``model_type`` this project cannot train, serve or decode."""


def check_model_type(path: str | os.PathLike, trust_remote_code: bool = False) -> str:
    """``model_type`` of the folder ``path`` when supported: one of ``MULTIMODAL_CLASSES``, a
    text-only causal LM transformers knows (qwen2, qwen3, llama, ...), or with
    ``trust_remote_code`` a folder whose ``auto_map`` names an ``AutoModelForCausalLM``. Raises
    UnsupportedModel naming the type and the supported ones otherwise (e.g. ``qwen3_vl_moe``),
    and for a Qwen3-ASR folder in the original release's layout (``thinker_config``, read by the
    ``qwen-asr`` package), which transformers would silently build at its default size."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    mtype = model_type_of(path)
    if mtype == "qwen3_asr":
        _check_qwen3_asr_layout(path)
    if mtype in MULTIMODAL_CLASSES or mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return mtype
    auto_map = json.loads((Path(path) / "config.json").read_text()).get("auto_map") or {}
    if "AutoModelForCausalLM" in auto_map:
        if trust_remote_code:
            return mtype
        raise UnsupportedModel(f"{Path(path) / 'config.json'}: model_type {mtype!r} is defined by code in the "
                               f"folder ({auto_map['AutoModelForCausalLM']}), which runs only when asked: "
                               "trust_remote_code (model.trust_remote_code: true, --trust-remote-code)")
    raise UnsupportedModel(
        f"{Path(path) / 'config.json'}: model_type {mtype or '(none)'!r} is not supported. Supported: "
        + ", ".join(f"{t} ({c})" for t, c in MULTIMODAL_CLASSES.items())
        + ", and text-only causal LMs (AutoModelForCausalLM: qwen2, qwen3, llama, mistral, gemma ...)")


def _check_qwen3_asr_layout(path: str | os.PathLike) -> None:
    """Refuse a Qwen3-ASR folder in the original release's layout: its config nests the model in
    ``thinker_config`` and its weights are prefixed ``thinker.``; transformers' ``Qwen3ASRConfig``
    ignores that key and would build the default 1.7B shapes around none of the weights."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    if "thinker_config" in cfg and "text_config" not in cfg:
        raise UnsupportedModel(
            f"{Path(path) / 'config.json'}: a Qwen3-ASR checkpoint in the original layout (thinker_config, weights "
            "prefixed 'thinker.', for the qwen-asr package), which transformers does not read. Use the converted "
            "release (Qwen/Qwen3-ASR-0.6B-hf, Qwen/Qwen3-ASR-1.7B-hf) or convert the folder with "
            "src/transformers/models/qwen3_asr/convert_qwen3_asr_to_hf.py from the transformers source repository "
            "(not in the installed package): --src_dir <folder> --dst_dir <new folder>")
    if "Qwen3ASRForTokenClassification" in (cfg.get("architectures") or []):
        raise UnsupportedModel(f"{Path(path) / 'config.json'}: a Qwen3 forced aligner (Qwen3ASRForTokenClassification: "
                               "timestamps per word, no text generation); only the Qwen3-ASR speech recognisers "
                               "(Qwen3ASRForConditionalGeneration) train here")


def check_4bit_available(key: str = "model.load_in_4bit") -> None:
    """Raise ``ConfigError`` naming ``key`` unless a CUDA GPU and bitsandbytes are both present."""
    import importlib.util

    from core.config import ConfigError

    lacks = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                   ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if lacks:
        raise ConfigError(f"config key '{key}': 4-bit loading needs a CUDA GPU and bitsandbytes; this machine has "
                          f"no {' and no '.join(lacks)}. Set {key}: false to train in model.dtype instead "
                          "(nothing is loaded in full precision behind your back).")


def load_model_and_processor(path: str | os.PathLike, *, dtype: str | torch.dtype = "float32",
                             trust_remote_code: bool = False, device: str | None = None,
                             load_in_4bit: bool = False, bnb_4bit_compute_dtype: str = "bfloat16",
                             bnb_4bit_quant_type: str = "nf4"):
    """Load ``(model, processor)`` from a local directory; the class comes from ``model_type``.

    ``load_in_4bit``: quantise the weights with bitsandbytes (``bnb_4bit_*``: compute dtype, nf4 |
    fp4, double quantisation) onto this process's GPU; refused without CUDA or bitsandbytes.
    """
    from transformers import AutoProcessor, AutoTokenizer

    path = str(path)
    mtype = check_model_type(path, trust_remote_code)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kw: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        check_4bit_available()
        from transformers import BitsAndBytesConfig
        compute = getattr(torch, bnb_4bit_compute_dtype)
        kw.update(dtype=compute, device_map={"": torch.cuda.current_device()},
                  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                                                         bnb_4bit_quant_type=bnb_4bit_quant_type,
                                                         bnb_4bit_use_double_quant=True))
    if mtype == "qwen2_audio":
        from transformers import Qwen2AudioForConditionalGeneration as cls
    elif mtype in ("qwen2_5_omni_thinker",):
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration as cls
    elif mtype == "qwen2_5_omni":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration as cls
    elif mtype in ("qwen3_omni_moe", "qwen3_omni_moe_thinker"):
        from transformers import Qwen3OmniMoeThinkerForConditionalGeneration as cls
    elif mtype == "qwen3_asr":
        from transformers import Qwen3ASRForConditionalGeneration as cls
    else:
        from transformers import AutoModelForCausalLM as cls
    model = cls.from_pretrained(path, **kw)
    _refreeze_audio_positions(model)
    _no_router_logits(model)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # text-only checkpoints have only a tokenizer
        processor = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok = getattr(processor, "tokenizer", processor)
    if model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device:
        model.to(device)
    return model, processor


def _refreeze_audio_positions(model) -> None:
    """Keep the audio encoder's position table frozen after loading.

    Whisper-style encoders (Qwen2-Audio's included) build ``embed_positions`` with
    ``requires_grad_(False)``, but ``from_pretrained`` in transformers 5 hands back every
    parameter trainable, so the fixed sinusoid table would drift during training.
    """
    for name, mod in model.named_modules():
        if name.split(".")[-2:] == ["audio_tower", "embed_positions"] and isinstance(mod, torch.nn.Embedding):
            mod.weight.requires_grad_(False)


def _no_router_logits(model) -> None:
    """Turn off a mixture-of-experts model's ``output_router_logits`` (Qwen3-Omni-MoE's thinker ...).

    With it on, every forward collects each layer's router logits and computes the
    load-balancing loss over ``attention_mask``, which a forward reading a KV cache (our sampler,
    the shared prompt forward) does not match; and our losses never read the model's own
    ``loss`` / ``aux_loss``. The routers still train through the policy / distillation gradient
    (the routing weights are differentiable); no load-balancing term is added.
    """
    config = getattr(model, "config", None)
    seen = {id(c): c for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else None)
            if c is not None}
    for c in seen.values():
        if getattr(c, "output_router_logits", False):
            log.info("%s: output_router_logits off (the router's load-balancing loss is not part of these losses)",
                     type(model).__name__)
            c.output_router_logits = False


# --------------------------------------------------------------------------- LoRA
# modules holding an encoder: LoRA's default targets never reach into them
_ENCODERS = ("audio_tower", "visual", "vision_tower", "vision_model", "audio_encoder", "multi_modal_projector")


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_target_modules(model) -> str:
    """Default LoRA targets: a regex (peft full-matches it against module names) for every linear
    layer of the language model's decoder (``get_decoder()``): attention and MLP projections.

    Qwen2-Audio gives ``model\\.language_model\\..*\\.(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)``,
    a Qwen2 causal LM the same under ``model\\.``; the LM head and any encoder are left out.

    Mixture-of-experts decoders (the Qwen3-Omni-MoE thinker: ``model\\.language_model\\..*\\.(k_proj|o_proj|
    q_proj|v_proj)``): the experts are fused 3-D parameters, not linear layers, so they stay frozen,
    and the router (a linear ``gate`` / ``router`` / ``shared_expert_gate`` beside ``experts``) is
    never a target, so routing stays the base model's; dense MLP layers (``mlp_only_layers``, a
    shared expert) keep their projections as targets. To adapt the experts, name them in peft's
    ``target_parameters`` (``model.lora``).
    """
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((n for n, m in model.named_modules() if m is dec), None) if dec is not None else None
    routers = {n for n, m in dec.named_modules() if hasattr(m, "experts")} if prefix is not None else set()
    names = [n for n, m in dec.named_modules() if isinstance(m, torch.nn.Linear)
             and not (n.rsplit(".", 1)[-1] in ("gate", "router", "shared_expert_gate")
                      and n.rsplit(".", 1)[0] in routers)] if prefix is not None else []
    if not names or any(p in _ENCODERS for n in names for p in n.split(".")):
        raise ValueError(f"no default LoRA targets for {type(model).__name__} (its language model's decoder "
                         "was not found apart from the encoders); set model.lora.target_modules")
    leaves = "|".join(sorted({re.escape(n.rsplit(".", 1)[-1]) for n in names}))
    return (re.escape(prefix) + r"\." if prefix else "") + rf".*\.({leaves})"


def apply_lora(model, lora: dict, *, kbit: bool = False):
    """Wrap ``model`` with peft LoRA adapters (``lora``: ``LoraConfig`` kwargs); the base is frozen.

    ``target_modules`` defaults to ``lora_target_modules(model)``; for a mixture-of-experts model
    as the list of the modules it matches, by full name: peft (0.21) resolves a regex for MoE model
    types (``qwen3_omni_moe`` ...) to bare leaf names (``q_proj`` ...), which would also match the
    audio encoder's projections. The default targets are checked to hold no encoder module.
    ``kbit``: a 4-bit base first goes through ``prepare_model_for_kbit_training`` (fp32 norms,
    gradient checkpointing).
    """
    from peft import LoraConfig, get_peft_model

    from core.config import ConfigError

    kw = dict(lora)
    default = not kw.get("target_modules")
    try:
        if default:
            rx = kw["target_modules"] = lora_target_modules(model)
            if any(hasattr(m, "experts") for m in model.modules()):
                kw["target_modules"] = [n for n, _ in model.named_modules() if re.fullmatch(rx, n)]
        lcfg = LoraConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model.lora': {e}") from None
    shown = rx if default else lcfg.target_modules
    if kbit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lcfg)
    if default:
        inside = [n for n, m in model.named_modules() if hasattr(m, "lora_A")
                  and any(p in _ENCODERS for p in n.split("."))]
        if inside:
            raise RuntimeError(f"LoRA's default targets reached an encoder ({inside[:3]}); set model.lora.target_modules")
    log.info("LoRA on %s: %d trainable of %d parameters", shown,
             sum(p.numel() for p in model.parameters() if p.requires_grad), count_parameters(model))
    return model


def adapter_state_dict(peft_model) -> dict:
    """The trained adapter weights (and ``modules_to_save``), detached CPU copies."""
    from peft import get_peft_model_state_dict
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def save_merged_lora(adapters: dict, peft_config, base_loader, processor, out_dir) -> None:
    """Merge ``adapters`` into a fresh base and save a plain ``save_pretrained`` folder.

    ``base_loader()`` returns the base model in full precision on the CPU (never the training
    copy, which may be quantised or partitioned by ZeRO-3); the adapters are loaded into a peft
    wrapper of it, merged (``merge_and_unload``) and the result saved with ``save_model``: it
    loads as the original class, without peft.
    """
    import copy

    from peft import get_peft_model, set_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):  # the wrapper's init draws random numbers
        pm = get_peft_model(base_loader(), copy.deepcopy(peft_config))
    res = set_peft_model_state_dict(pm, adapters)
    missing = [k for k in res.missing_keys if "lora_" in k or "modules_to_save" in k]
    if res.unexpected_keys or missing:
        raise RuntimeError(f"LoRA export: adapter weights do not fit the base model (unexpected "
                           f"{list(res.unexpected_keys)[:5]}, missing {missing[:5]})")
    save_model(pm.merge_and_unload(), processor, out_dir)


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def check_vocab_match(student_processor, teacher_processor, *, student_model=None, teacher_model=None,
                      what: str = "teacher") -> int | None:
    """Raise ``ValueError`` at start-up if the two vocabularies differ (size or token ids).

    Models that share a tokenizer may pad their embedding tables to different sizes (Qwen2.5 up
    to 3B: 151,936 rows, 7B: 152,064, for 151,665 tokens). That is no mismatch: the tokenizer's
    size is returned, the number of rows every divergence compares (the padded rows are never a
    token). Returns None when the output sizes agree."""
    st, tt = tokenizer_of(student_processor), tokenizer_of(teacher_processor)
    sv, tv = st.get_vocab(), tt.get_vocab()
    problems = []
    if len(sv) != len(tv):
        problems.append(f"tokenizer sizes differ: student {len(sv)}, {what} {len(tv)}")
    diff = [t for t, i in sv.items() if tv.get(t) != i]
    if diff:
        problems.append(f"{len(diff)} tokens map to different ids (e.g. {diff[:5]})")
    limit = None
    if student_model is not None and teacher_model is not None:
        s_out = student_model.get_output_embeddings().weight.shape[0]
        t_out = teacher_model.get_output_embeddings().weight.shape[0]
        n_tok = max(sv.values(), default=-1) + 1  # ids run 0 .. n_tok-1 (added tokens included)
        if s_out != t_out:
            if not problems and min(s_out, t_out) >= n_tok:
                limit = n_tok  # padded tables: compare the rows that are tokens
            else:
                problems.append(f"output vocabulary sizes differ: student {s_out}, {what} {t_out}"
                                + (f" (fewer rows than the tokenizer's {n_tok} ids)" if min(s_out, t_out) < n_tok else ""))
    if problems:
        raise ValueError(f"student/{what} vocabulary mismatch: " + "; ".join(problems)
                         + ". Distillation needs a shared tokenizer.")
    return limit


def special_token_ids(processor) -> list[int]:
    """Ids of every special token (placeholders, chat markers, pad) except EOS."""
    tok = tokenizer_of(processor)
    ids = set(tok.all_special_ids)
    for t in ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<|im_start|>", "<|endoftext|>",
              "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
            ids.add(i)
    ids.update(getattr(tok, "added_tokens_decoder", {}).keys())
    ids.discard(tok.eos_token_id)
    return sorted(i for i in ids if i is not None)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
