"""The Qwen3-ASR family (``qwen3_asr``: ``Qwen3ASRForConditionalGeneration`` + ``Qwen3ASRProcessor``)
through every path, as a tiny student / teacher pair in the released checkpoints' layout.

Built by ``core.models.build_tiny_qwen3_asr`` from a tokenizer of ``train_tokenizer(...,
qwen3_asr=True)`` on the espeak-ng clips of the ``tiny`` fixture (each < 3 s; the encoder's real
1 s chunks of 100 mel frames, 13 audio tokens per full chunk). Checks:

- the saved folder: config nesting (``audio_config`` ``qwen3_asr_encoder``, ``text_config``
  ``qwen3``, the audio / timestamp token ids), the processor's files and classes, the released
  chat template's rendering, ``<asr_text>`` kept by ``skip_special_tokens`` and parsed by the
  processor, the number of audio placeholders per clip, a tied LM head; the default tokenizer
  unchanged by the new keyword;
- a folder in the original release's layout (``thinker_config``) and a forced aligner are refused
  with one clear error;
- decode (``core.bin.decode.decode``) and the prompt-text warning of the audio collator;
- two steps of sft, opd, grpo, rest and LoRA; each export loads in plain transformers
  (``Qwen3ASRForConditionalGeneration.from_pretrained``) and generates from a clip;
- our sampling loop's log-probs equal the training forward's on the same tokens, and the
  encoder shared by the copies of a prompt (``share="encoders"`` / ``"prompts"``) gives the plain
  forward's logits and gradients while running once per distinct prompt;
- the teacher behind our server answers a ``prompt_logprobs`` request equal to a local forward,
  and a remote-teacher OPD run's losses equal the local run's (teacher top-k support).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import soundfile as sf
import torch

from core import config as C
from core.models import (UnsupportedModel, build_tiny_qwen3_asr, check_model_type, load_model_and_processor,
                         special_token_ids, train_tokenizer)
from core.rewards import register_reward
from core.trainer import Trainer
from core.trainer import run as train_run

from conftest import check_served_teacher, run_losses

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Transcribe the audio."
N_ROWS = 6


@register_reward("test_qwen3_asr_length")
def _length_reward(completions, **kwargs):
    """Varies between samples, so GRPO groups and ReST's filter have a signal."""
    return [min(1.0, len(c) / 20.0) for c in completions]


@pytest.fixture(scope="module")
def asr(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3_asr")
    tok = train_tokenizer(tiny.texts, 300, qwen3_asr=True)
    build_tiny_qwen3_asr(tok, hidden=32, layers=1, heads=2, seed=0, out_dir=root / "student")
    build_tiny_qwen3_asr(tok, hidden=48, layers=1, heads=2, audio_hidden=32, seed=1, out_dir=root / "teacher")
    rows = tiny.rows[:N_ROWS]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, tok=tok, student=root / "student", teacher=root / "teacher", rows=rows,
                           manifest=manifest)


def _cfg(asr, out: Path, method: str, **over) -> C.TrainConfig:
    base = {"method": method, "output_dir": str(out), "model": {"path": str(asr.student)},
            "data": {"train": str(asr.manifest), "prompt": PROMPT, "max_target_tokens": 16},
            "rollout": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            "grpo": {"rewards": {"test_qwen3_asr_length": 1.0}},
            "optim": {"lr": 3e-3, "scheduler": "constant"},
            "train": {"batch_size": 3, "max_steps": 2, "resume": "never"}}
    if method == "opd":
        base["teacher"] = {"path": str(asr.teacher)}
        base["opd"] = {"form": "distribution", "divergence": "reverse_kl", "support": "teacher_topk", "top_k": 8}
    return C.load_config(overrides=C.deep_merge(base, over))


def _wav(row):
    return sf.read(row["audio"], dtype="float32")[0]


# ----------------------------------------------------------------------------- the folder
def test_folder_has_the_released_layout(asr, tiny):
    from transformers import AutoProcessor, Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    cfg = json.loads((asr.student / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_asr" and cfg["architectures"] == ["Qwen3ASRForConditionalGeneration"]
    assert "thinker_config" not in cfg
    audio, text = cfg["audio_config"], cfg["text_config"]
    assert audio["model_type"] == "qwen3_asr_encoder" and text["model_type"] == "qwen3"
    assert (audio["n_window"], audio["n_window_infer"], audio["max_position_embeddings"]) == (50, 800, 13)
    assert audio["output_dim"] == text["hidden_size"] == 32 and audio["num_mel_bins"] == 128
    assert text["head_dim"] == 16 and text["tie_word_embeddings"] is True
    tok = asr.tok
    assert cfg["audio_token_id"] == tok.convert_tokens_to_ids("<|audio_pad|>")
    assert cfg["timestamp_token_id"] == tok.convert_tokens_to_ids("<timestamp>")
    assert cfg["eos_token_id"] == [tok.convert_tokens_to_ids("<|endoftext|>"), tok.eos_token_id]
    for name in ("model.safetensors", "processor_config.json", "chat_template.jinja", "tokenizer.json",
                 "tokenizer_config.json", "generation_config.json"):
        assert (asr.student / name).is_file(), name

    proc = AutoProcessor.from_pretrained(asr.student)
    assert isinstance(proc, Qwen3ASRProcessor) and isinstance(proc.feature_extractor, Qwen3ASRFeatureExtractor)
    assert (proc.audio_token, proc.audio_bos_token, proc.audio_eos_token) == (
        "<|audio_pad|>", "<|audio_start|>", "<|audio_end|>")
    # the released template: an (empty) system turn, only the audio in the user turn
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": PROMPT}]}]
    assert proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n"
        "<|im_start|>assistant\n")
    ctx = [{"role": "system", "content": [{"type": "text", "text": "hot words"}]}, *msgs,
           {"role": "assistant", "content": [{"type": "text", "text": "language English<asr_text>"}]}]
    assert proc.apply_chat_template(ctx, tokenize=False, continue_final_message=True).startswith(
        "<|im_start|>system\nhot words<|im_end|>\n")
    # <asr_text> is an added token that decoding keeps, as the released model writes it
    ids = proc.tokenizer("language English<asr_text>hello world<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<asr_text>") in ids
    assert proc.decode(ids, return_format="parsed") == {"language": "English", "transcription": "hello world"}

    # one placeholder per encoder output: 13 per full 1 s chunk of 100 frames, the rest by the convolutions
    wavs = [_wav(r) for r in asr.rows[:3]]
    enc = proc(text=[proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)] * 3, audio=wavs,
               sampling_rate=16000, return_tensors="pt", padding=True)
    assert enc["input_features"].shape[-1] % 100 == 0 and "input_features_mask" in enc
    for i, w in enumerate(wavs):
        frames = int(enc["input_features_mask"][i].sum())
        assert abs(frames - max(len(w), 8000) / 160) <= 1  # 10 ms frames of the real samples
        rem = frames % 100
        after = ((rem - 1) // 2 + 1 - 1) // 2 + 1 if rem else 0
        expect = (frames // 100) * 13 + ((after - 1) // 2 + 1 if rem else 0)
        assert int((enc["input_ids"][i] == proc.audio_token_id).sum()) == expect

    model, _ = load_model_and_processor(asr.student)
    assert type(model).__name__ == "Qwen3ASRForConditionalGeneration"
    assert model.lm_head.weight is model.get_input_embeddings().weight
    # the default tokenizer (Qwen2-Audio's specials) is the one it always was
    assert train_tokenizer(tiny.texts, 300).get_vocab() == tiny.tokenizer.get_vocab()
    with pytest.raises(ValueError, match="qwen3_asr=True"):
        build_tiny_qwen3_asr(tiny.tokenizer, hidden=32, layers=1, heads=2)


def test_original_layout_and_forced_aligner_are_refused(asr, tmp_path):
    cfg = json.loads((asr.student / "config.json").read_text())
    orig = tmp_path / "Qwen3-ASR-original"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": "qwen3_asr",
        "support_languages": ["English"],
        "thinker_config": {"audio_config": cfg["audio_config"], "text_config": cfg["text_config"],
                           "audio_token_id": cfg["audio_token_id"]}}))
    with pytest.raises(UnsupportedModel, match="original layout.*convert_qwen3_asr_to_hf"):
        check_model_type(orig)
    aligner = tmp_path / "aligner"
    aligner.mkdir()
    (aligner / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ASRForTokenClassification"]}))
    with pytest.raises(UnsupportedModel, match="forced aligner"):
        load_model_and_processor(aligner)
    assert check_model_type(asr.student) == "qwen3_asr"


# ----------------------------------------------------------------------------- decode
def test_decodes_and_says_the_prompt_text_is_not_rendered(asr, tmp_path, caplog):
    from core.bin.decode import decode
    with caplog.at_level(logging.WARNING, logger="core.data.collate"):
        info = decode(str(asr.student), str(asr.manifest), str(tmp_path / "hyp.jsonl"), prompt=PROMPT,
                      max_new_tokens=4, device="cpu", batch_size=4)
    assert info["samples"] == len(asr.rows) and info["modality"] == "audio"
    out = [json.loads(x) for x in (tmp_path / "hyp.jsonl").read_text().splitlines()]
    assert [o["key"] for o in out] == [r["key"] for r in asr.rows] and all(o["ref"] for o in out)
    warned = [r.getMessage() for r in caplog.records if "leaves the prompt text" in r.getMessage()]
    assert len(warned) == 1 and PROMPT in warned[0]


# ----------------------------------------------------------------------------- the rollout and the forward
def test_a_clip_encodes_the_same_in_any_batch(asr):
    """The collator encodes each clip alone: a row's tokens, features and mask are those of the
    row collated by itself. (Qwen3-ASR's feature extractor, called on a batch, pads the waveforms
    to the longest clip, and a shorter clip then keeps one more real frame than alone: 143
    instead of 142 for a 1.43 s clip, with transformers 5.25.)"""
    from core.data.collate import AudioPromptCollator
    _, proc = load_model_and_processor(asr.student)
    col = AudioPromptCollator(proc, PROMPT)
    rows = sorted(asr.rows[:4], key=lambda r: len(_wav(r)))
    batch = col.prompts(rows).inputs
    lens = batch["input_features_mask"].sum(-1)
    assert len(set(lens.tolist())) == len(rows)  # clips of different lengths
    for i, r in enumerate(rows):
        alone = col.prompts([r]).inputs
        n, f = alone["input_ids"].shape[1], alone["input_features"].shape[-1]
        assert torch.equal(batch["input_ids"][i, -n:], alone["input_ids"][0])
        assert int(batch["attention_mask"][i].sum()) == n and not batch["attention_mask"][i, :-n].any()
        assert torch.equal(batch["input_features"][i, :, :f], alone["input_features"][0])
        assert torch.equal(batch["input_features_mask"][i, :f], alone["input_features_mask"][0])
        assert not batch["input_features"][i, :, f:].any() and not batch["input_features_mask"][i, f:].any()


def test_student_from_teacher_thins_both_stacks(asr, tmp_path):
    from core.models import student_from_teacher
    build_tiny_qwen3_asr(asr.tok, hidden=32, layers=2, heads=2, audio_layers=2, seed=2, out_dir=tmp_path / "t2")
    info = student_from_teacher(tmp_path / "t2", tmp_path / "s1", keep_every=2, audio_keep_every=2)
    assert info["decoder_layers"] == [0] and info["audio_layers"] == [0]
    model, _ = load_model_and_processor(tmp_path / "s1")
    assert (model.config.text_config.num_hidden_layers, model.config.audio_config.encoder_layers) == (1, 1)
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_own_loop_logprobs_equal_the_training_forward(asr):
    from core.data.collate import AudioPromptCollator
    from core.forward import completion_logits, own_loop_ok, shared_encoders, token_logp
    from core.sampling import generate_completions

    model, proc = load_model_and_processor(asr.student)
    batch = AudioPromptCollator(proc, PROMPT).prompts(asr.rows[:3])
    assert set(batch.inputs) == {"input_ids", "attention_mask", "input_features", "input_features_mask"}
    assert own_loop_ok(model, batch)
    rep, comp = generate_completions(model, batch, proc.tokenizer, n=3, temperature=1.0, max_new_tokens=8,
                                     suppress_ids=special_token_ids(proc), seed=0)
    again = generate_completions(model, batch, proc.tokenizer, n=3, temperature=1.0, max_new_tokens=8,
                                 suppress_ids=special_token_ids(proc), seed=0)[1]
    assert torch.equal(comp.ids, again.ids)  # deterministic under a seed
    assert not torch.isin(comp.ids[comp.mask.bool()], torch.tensor(special_token_ids(proc))).any()
    m = comp.mask.bool()

    # the encoder hook counts the items the audio tower ran on
    (enc,) = shared_encoders(model)
    assert type(enc).__name__ == "Qwen3ASREncoder"
    items: list[int] = []
    handle = enc.register_forward_hook(
        lambda mod, a, kw, out: items.append((a[0] if a else kw["input_features"]).shape[0]), with_kwargs=True)
    model.train()
    w = torch.rand(comp.ids.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    got = {}
    try:
        for share in ("none", "encoders", "prompts"):
            model.zero_grad(set_to_none=True)
            items.clear()
            logits = completion_logits(model, rep, comp.ids, comp.mask, share=share)
            lp = token_logp(logits, comp.ids)
            (lp * comp.mask * w).sum().backward()
            got[share] = (lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            assert items == ([len(rep)] if share == "none" else [len(batch)]), (share, items)
    finally:
        handle.remove()
    torch.testing.assert_close(got["none"][0][m], comp.logp[m], atol=1e-5, rtol=0)
    for share in ("encoders", "prompts"):
        torch.testing.assert_close(got[share][0][m], got["none"][0][m], atol=1e-5, rtol=0)
        assert got[share][1].keys() == got["none"][1].keys()
        for n, g in got["none"][1].items():
            torch.testing.assert_close(got[share][1][n], g, atol=1e-5, rtol=1e-5, msg=f"{share}: {n}")
    assert any("audio_tower" in n and float(g.abs().max()) > 0 for n, g in got["none"][1].items())


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method, over", [
    ("sft", {}), ("opd", {}), ("grpo", {}),
    ("rest", {"rest": {"rewards": {"test_qwen3_asr_length": 1.0}, "keep_min_reward": 0.0, "rounds": 1,
                       "samples": 2, "steps_per_round": 2, "lrs": [3e-3]}}),
    ("lora", {"model": {"lora": {"r": 4, "lora_alpha": 8}}}),
], ids=["sft", "opd", "grpo", "rest", "lora"])
def test_every_method_trains_and_exports(asr, tmp_path, method, over):
    """Two steps (ReST: one round of two), then the export loads in plain transformers and
    generates from a clip, and our loader reads it for the next stage."""
    from transformers import AutoProcessor, Qwen3ASRForConditionalGeneration
    res = train_run(_cfg(asr, tmp_path / method, "sft" if method == "lora" else method, **over))
    final = Path(res["final_model"])
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    losses = run_losses(tmp_path / method)
    assert losses and all(math.isfinite(x) for x in losses)
    model = Qwen3ASRForConditionalGeneration.from_pretrained(str(final))
    proc = AutoProcessor.from_pretrained(str(final))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]
    enc = proc(text=[proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)],
               audio=[_wav(asr.rows[0])], sampling_rate=16000, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    again, _ = load_model_and_processor(final)
    assert type(again).__name__ == "Qwen3ASRForConditionalGeneration"
    if method == "lora":  # the merged export differs from the base where the adapters trained
        base, _ = load_model_and_processor(asr.student)
        sd, sd0 = again.state_dict(), base.state_dict()
        assert sd.keys() == sd0.keys()
        assert any(not torch.equal(sd[k], sd0[k]) for k in sd if "language_model.layers" in k)
        assert all(torch.equal(sd[k], sd0[k]) for k in sd if "audio_tower" in k)


# ----------------------------------------------------------------------------- the server
def test_served_prompt_logprobs_and_remote_opd(asr, tmp_path):
    """The teacher behind our server: one ``prompt_logprobs`` request equals a plain forward of the
    prompt the released template renders (the audio alone in the user turn); a remote OPD run's
    losses equal the local run's."""
    def opd(out, teacher):
        return Trainer(_cfg(asr, out, "opd", train={"max_steps": 3}, **({"teacher": teacher} if teacher else {}))).train()
    prefill = "hello world<|im_end|>"
    _, text = check_served_teacher(asr.teacher, asr.rows[0]["audio"], PROMPT, opd, tmp_path, prefill=prefill)
    assert text.endswith("<|audio_end|><|im_end|>\n<|im_start|>assistant\n" + prefill)
