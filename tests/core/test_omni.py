"""The Qwen2.5-Omni thinker on audio-visual prompts: a tiny model built from config, real mp4 clips.

Checks: the builder's model and processor round-trip through ``save_pretrained``; the
``AVPromptCollator`` puts a video item, then the audio as its own item, then the prompt; batches
of two clips of different lengths give, after ``repeat`` and ``select``, the same completion
logits as each prompt collated alone (flattened video patches cut by each sample's grid; the
thinker's own multimodal positions on left-padded prompts + completions); the rollout's
sampled-token log-probs equal the training forward's; one SFT and one GRPO step through the
trainer change the weights; a video without sound is a clear error, or silence when asked.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import config as C
from core.data.collate import AVPromptCollator, make_collator, take_samples
from core.data.manifest import ManifestError
from core.data.video import VideoError
from core.models import (build_tiny_omni_thinker, load_model_and_processor, save_model, special_token_ids,
                         train_tokenizer)
from core.rewards import register_reward
from core.forward import completion_logits, token_logp, uses_mrope
from core.sampling import generate_completions
from core.trainer import Trainer, resolve_modality

from conftest import safetensors_of

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red square", "a blue circle", "two beeps", "one low tone", "what do you see", "what do you hear"]
PROMPT = "Question: {question}"


def _mp4(path: Path, seconds: float, freq: int | None) -> Path:
    """A 64x64, 8 fps test pattern of ``seconds``, with a sine track when ``freq`` is given."""
    cmd = ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=64x64:rate=8:duration={seconds}"]
    if freq:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=16000:duration={seconds}",
                "-c:a", "aac", "-shortest"]
    else:
        cmd += ["-an"]
    subprocess.run(cmd + ["-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, capture_output=True)
    return path


@register_reward("test_omni_length")
def _length_reward(completions, **kwargs):
    """Varies between samples, so every GRPO group has a signal."""
    return [len(c) / 10.0 for c in completions]


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is needed to make the test videos (bash run.sh setup installs it)")
    root = tmp_path_factory.mktemp("omni")
    short = _mp4(root / "short.mp4", 2, 440)
    long = _mp4(root / "long.mp4", 3, 880)
    mute = _mp4(root / "mute.mp4", 2, None)
    tok = train_tokenizer(TEXTS, 300, omni=True)
    model, proc = build_tiny_omni_thinker(tok, seed=0, out_dir=root / "thinker")
    rows = [{"key": f"s{i}", "video": str(v), "task": "av_qa", "question": q, "text": t}
            for i, (v, q, t) in enumerate([(short, "what do you see", "a red square"),
                                           (long, "what do you hear", "two beeps"),
                                           (long, "what do you see", "a blue circle"),
                                           (short, "what do you hear", "one low tone")])]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps({**r, "video": Path(r["video"]).name}) + "\n" for r in rows))
    mute_manifest = root / "mute.jsonl"
    mute_manifest.write_text(json.dumps({"key": "m0", "video": "mute.mp4", "question": "what", "text": "a red square"})
                             + "\n" + json.dumps({"key": "m1", "video": "short.mp4", "question": "what",
                                                  "text": "two beeps"}) + "\n")
    return SimpleNamespace(root=root, dir=root / "thinker", model=model.eval(), proc=proc, tok=tok, rows=rows,
                           manifest=manifest, mute=mute, mute_manifest=mute_manifest)


@pytest.fixture(scope="module")
def batch(omni):
    b = AVPromptCollator(omni.proc, PROMPT).prompts(omni.rows[:2])
    lens = b.inputs["attention_mask"].sum(1)
    assert lens[0] < lens[1], "the shorter clip's prompt should be left-padded"
    return b


def _logits(model, batch, ids, mask, share="prompts"):
    with torch.no_grad():
        return completion_logits(model, batch, ids, mask, share=share)


def _reference_logits(model, alone, ids):
    """One unpadded prompt + completion, positions from the thinker's ``get_rope_index`` written out."""
    inp = alone.inputs
    full = torch.cat([inp["input_ids"], ids], dim=1)
    attn = torch.ones_like(full)
    pos, _ = model.get_rope_index(full, None, inp["video_grid_thw"], attn, False,
                                  inp["feature_attention_mask"].sum(-1), inp["video_second_per_grid"])
    media = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(input_ids=full, attention_mask=attn, position_ids=pos, use_cache=False, **media)
    P = inp["input_ids"].shape[1]
    return out.logits[:, P - 1: P - 1 + ids.shape[1]].float()


# ----------------------------------------------------------------------------- model + processor
def test_tokenizer_omni_specials_keep_the_default_ids(omni):
    plain = train_tokenizer(TEXTS, 300)
    assert "<|VIDEO|>" not in plain.get_vocab() and plain.chat_template != omni.tok.chat_template
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"):
        assert omni.tok.convert_tokens_to_ids(t) == plain.convert_tokens_to_ids(t)
    assert omni.tok.video_token_id == omni.tok.convert_tokens_to_ids("<|VIDEO|>")
    assert omni.tok.vision_bos_token_id == omni.tok.convert_tokens_to_ids("<|vision_bos|>")


def test_build_save_load_round_trip(omni, batch, tmp_path):
    model, proc = load_model_and_processor(omni.dir)
    assert type(model).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert type(proc).__name__ == "Qwen2_5OmniProcessor"
    cfg = model.config
    assert cfg.vision_start_token_id == omni.tok.convert_tokens_to_ids("<|vision_bos|>")
    assert cfg.video_token_id == omni.tok.video_token_id and cfg.audio_token_id == omni.tok.audio_token_id
    assert cfg.audio_config.max_source_positions * 2 == proc.feature_extractor.nb_max_frames
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert model.generation_config.eos_token_id == omni.tok.eos_token_id
    assert model.generation_config.pad_token_id == omni.tok.pad_token_id
    a, b = omni.model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the loaded processor renders and encodes the same prompts
    again = AVPromptCollator(proc, PROMPT).prompts(omni.rows[:2])
    assert again.texts == batch.texts
    for k, v in batch.inputs.items():
        torch.testing.assert_close(again.inputs[k], v, rtol=0, atol=0)
    # and a second save of the loaded pair loads again
    save_model(model, proc, tmp_path / "again")
    m2, _ = load_model_and_processor(tmp_path / "again")
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in b.items())


# ----------------------------------------------------------------------------- collator
def test_av_collator_prompt_and_inputs(omni, batch):
    col = AVPromptCollator(omni.proc, PROMPT)
    content = col.messages(omni.rows[0])[-1]["content"]
    assert [c["type"] for c in content] == ["video", "audio", "text"]
    assert content[2]["text"] == "Question: what do you see"
    text = batch.texts[0]
    assert text.index("<|vision_bos|><|VIDEO|><|vision_eos|>") < text.index("<|audio_bos|><|AUDIO|><|audio_eos|>")
    assert text.endswith("Question: what do you see<|im_end|>\n<|im_start|>assistant\n")
    inp = batch.inputs
    assert "num_audio_tokens" not in inp and "use_audio_in_video" not in inp
    grid = inp["video_grid_thw"]
    assert grid.tolist() == [[4, 4, 4], [4, 4, 4]]  # 8 frames of 64x64 -> 4 x (4 x 4) patches
    assert inp["pixel_values_videos"].shape[0] == int(grid.prod(-1).sum())
    # each clip's own frame rate (8 frames over 2 s and over 3 s), 2 frames per temporal patch
    torch.testing.assert_close(inp["video_second_per_grid"], torch.tensor([2 / 4.0, 2 / (8 / 3)]))
    ids = inp["input_ids"]
    assert ((ids == omni.tok.video_token_id).sum(1) == 16).all()  # 4 x 4 patches merged 2 x 2 -> 16 tokens
    assert inp["input_features"].shape[:2] == (2, 128) and inp["feature_attention_mask"].shape[0] == 2
    assert inp["feature_attention_mask"].sum(1).tolist()[0] < inp["feature_attention_mask"].sum(1).tolist()[1]
    assert [c.fps for c in batch.videos] == pytest.approx([4.0, 8 / 3])


def test_make_collator_picks_by_modality(omni):
    data = C.DataConfig(prompt=PROMPT, num_frames=4, missing_audio="silence", video_max_pixels=32 * 32)
    av = make_collator("av", omni.proc, data)
    assert isinstance(av, AVPromptCollator)
    assert (av.num_frames, av.missing_audio, av.video_max_pixels, av.prompt) == (4, "silence", 32 * 32, PROMPT)
    assert type(make_collator("audio", omni.proc, data)).__name__ == "AudioPromptCollator"
    assert type(make_collator("text", omni.proc, data)).__name__ == "TextPromptCollator"
    with pytest.raises(ValueError, match="modality"):
        make_collator("vision", omni.proc, data)


def test_take_samples_cuts_patch_rows_by_grid(batch):
    inp = batch.inputs
    n0 = int(inp["video_grid_thw"][0].prod())
    got = take_samples(inp, [1, 0, 1])
    pv = inp["pixel_values_videos"]
    torch.testing.assert_close(got["pixel_values_videos"], torch.cat([pv[n0:], pv[:n0], pv[n0:]]), rtol=0, atol=0)
    assert got["input_ids"].shape[0] == 3 and torch.equal(got["video_grid_thw"][0], inp["video_grid_thw"][1])
    with pytest.raises(ValueError, match="one video"):
        take_samples({**inp, "video_grid_thw": inp["video_grid_thw"][:1]}, [0])


def test_repeat_and_select_match_each_prompt_alone(omni, batch):
    g = torch.Generator().manual_seed(0)
    specials = set(special_token_ids(omni.proc)) | {omni.tok.eos_token_id}
    normal = torch.tensor([i for i in range(len(omni.tok)) if i not in specials])
    rep = batch.repeat(2)
    assert [r["key"] for r in rep.rows] == ["s0", "s0", "s1", "s1"]
    ids = normal[torch.randint(len(normal), (4, 5), generator=g)]
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # one completion ends early (pad after it)
    ids[1, 3:] = omni.tok.pad_token_id
    logits = _logits(omni.model, rep, ids, mask)
    col = AVPromptCollator(omni.proc, PROMPT)
    for i in range(4):
        alone = col.prompts([rep.rows[i]])
        one = _logits(omni.model, alone, ids[i: i + 1], mask[i: i + 1])
        m = mask[i].bool()
        torch.testing.assert_close(logits[i][m], one[0][m], atol=1e-5, rtol=0)
        n = int(m.sum())
        ref = _reference_logits(omni.model, alone, ids[i: i + 1, :n])
        torch.testing.assert_close(logits[i][:n], ref[0], atol=1e-5, rtol=0)
    sel = rep.select([3, 0])
    assert [r["key"] for r in sel.rows] == ["s1", "s0"]
    torch.testing.assert_close(_logits(omni.model, sel, ids[[3, 0]], mask[[3, 0]]), logits[[3, 0]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rollout_logp_equals_the_training_forward(omni, batch, temperature):
    model = copy.deepcopy(omni.model)
    bias = torch.zeros(model.lm_head.out_features)
    bias[omni.tok.eos_token_id] = 4.0  # EOS made likely, so completions end at different lengths
    model.lm_head.bias = torch.nn.Parameter(bias)
    tok = omni.tok
    rep, comp = generate_completions(model, batch, tok, n=3, temperature=temperature, max_new_tokens=8, seed=3,
                                     suppress_ids=special_token_ids(omni.proc), eos_ids=[tok.eos_token_id])
    assert comp.ids.shape[0] == 6 and comp.logp is not None
    assert len(set(comp.mask.sum(1).tolist())) > 1, "completions should end at different lengths"
    # the plain forward (the thinker places every position itself), not our positions on both sides
    lp = token_logp(_logits(model, rep, comp.ids, comp.mask, share="none") / temperature, comp.ids) * comp.mask
    torch.testing.assert_close(comp.logp, lp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5, top_p=0.9), dict(do_sample=False)])
def test_our_loop_samples_what_generate_samples(omni, batch, kw, monkeypatch):
    """Our KV-cached loop on the thinker (3-D rotary positions: the prompt forward's offsets, then
    text positions on all three axes) with ``generate``'s own draw samples exactly ``generate``'s
    tokens on left-padded audio-visual prompts, and the log-probs match the training forward."""
    import core.sampling as R
    assert R.own_loop_ok(omni.model, batch) and uses_mrope(omni.model)
    interleaved = copy.copy(batch)
    interleaved.inputs = dict(batch.inputs, use_audio_in_video=True)
    assert not R.own_loop_ok(omni.model, interleaved)  # its last prompt position need not be the largest
    static = []
    real_static = R._static_cache
    monkeypatch.setattr(R, "_static_cache", lambda *a, **k: static.append(real_static(*a, **k)) or static[-1])
    monkeypatch.setattr(R, "draw", lambda probs: torch.multinomial(probs, 1).squeeze(1))
    model = copy.deepcopy(omni.model)
    if kw.get("do_sample", True):  # some samples end early (greedy would then stop at once)
        bias = torch.zeros(model.lm_head.out_features)
        bias[omni.tok.eos_token_id] = 3.0
        model.lm_head.bias = torch.nn.Parameter(bias)
    args = dict(n=3, max_new_tokens=10, seed=11, suppress_ids=special_token_ids(omni.proc),
                eos_ids=[omni.tok.eos_token_id], **kw)
    rep, ours = generate_completions(model, batch, omni.tok, **args)
    _, hf = generate_completions(model, batch, omni.tok, engine="hf", **args)
    assert torch.equal(ours.ids, hf.ids) and torch.equal(ours.mask, hf.mask)
    assert ours.ids.shape[1] > 1
    assert len(static) == 1 and static[0] is not None, "the thinker should decode into a static cache"
    if kw.get("do_sample", True):  # the same distributions step by step, not only the same draws
        torch.testing.assert_close(ours.logp, hf.logp, atol=1e-5, rtol=0)
    if kw.get("do_sample", True) and not kw:
        assert len(set(ours.mask.sum(1).tolist())) > 1, "completions should end at different lengths"
        lp = token_logp(_logits(model, rep, ours.ids, ours.mask, share="none"), ours.ids) * ours.mask
        torch.testing.assert_close(ours.logp, lp, atol=1e-5, rtol=0)


def test_shared_prompt_forward_equals_the_plain_one(omni, batch):
    """Each distinct audio-visual prompt run once (its KV cache read by its samples' completions, at
    3-D positions) gives the logits and every gradient of the plain forward over all rows."""
    rep = batch.repeat(3)
    g = torch.Generator().manual_seed(1)
    specials = set(special_token_ids(omni.proc)) | {omni.tok.eos_token_id}
    normal = torch.tensor([i for i in range(len(omni.tok)) if i not in specials])
    ids = normal[torch.randint(len(normal), (6, 6), generator=g)]
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    ids[2, 4:] = omni.tok.pad_token_id
    w = torch.randn(6, 6, generator=g)
    grads = {}
    for share in ("prompts", "none"):
        model = copy.deepcopy(omni.model).train()
        logits = completion_logits(model, rep, ids, mask, share=share)
        loss = (token_logp(logits, ids) * mask * w).sum()
        loss.backward()
        grads[share] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    m = mask.bool()  # the logits after a completion's end predict nothing and are not compared
    torch.testing.assert_close(grads["prompts"][0][m], grads["none"][0][m], atol=1e-5, rtol=0)
    assert grads["prompts"][1].keys() == grads["none"][1].keys() and len(grads["none"][1]) > 10
    for n, gp in grads["none"][1].items():
        torch.testing.assert_close(grads["prompts"][1][n], gp, atol=1e-5, rtol=1e-4, msg=n)


# ----------------------------------------------------------------------------- trainer
def _cfg(omni, out, method, **over) -> C.TrainConfig:
    base = {"method": method, "output_dir": str(out), "model": {"path": str(omni.dir)},
            "data": {"train": str(omni.manifest), "prompt": PROMPT},
            "rollout": {"n": 2, "max_new_tokens": 6, "temperature": 1.0},
            "grpo": {"rewards": {"test_omni_length": 1.0}},
            "optim": {"lr": 1e-2, "grad_clip": 0.0, "scheduler": "constant"},
            "train": {"batch_size": 2, "max_steps": 1, "resume": "never"},
            "backend": {"dist_backend": "gloo"}}
    return C.load_config(overrides=C.deep_merge(base, over))


@pytest.mark.parametrize("method", ["sft", "grpo"])
def test_one_trainer_step_changes_the_weights(omni, tmp_path, method):
    cfg = _cfg(omni, tmp_path / method, method)
    assert resolve_modality(cfg, omni.model) == "av"
    tr = Trainer(cfg)
    assert tr.modality == "av" and isinstance(tr.collator, AVPromptCollator)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    res = tr.train()
    assert res["steps"] == 1 and res["skipped_steps"] == 0
    after = dict(tr.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n].detach())]
    assert any(n.startswith("model.language_model.") for n in changed)
    assert all(torch.isfinite(p).all() for p in after.values())
    row = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["loss"] == row["loss"] and row["grad_norm"] > 0  # finite, with a gradient
    loaded, _ = load_model_and_processor(res["final_model"])
    assert torch.equal(loaded.state_dict()["lm_head.weight"], after["lm_head.weight"].detach())


def test_video_without_sound_is_an_error_or_silence(omni, tmp_path):
    with pytest.raises(VideoError, match="mute.mp4.*no audio track"):
        AVPromptCollator(omni.proc, PROMPT).prompts([{"key": "m0", "video": str(omni.mute), "question": "q"}])
    with pytest.raises(ManifestError, match=r"mute\.jsonl:1: video: .*mute\.mp4.*no audio track") as err:
        Trainer(_cfg(omni, tmp_path / "err", "sft", data={"train": str(omni.mute_manifest)}))
    assert "data.missing_audio: silence" in str(err.value) and "mute.jsonl:2" not in str(err.value)
    b = AVPromptCollator(omni.proc, PROMPT, missing_audio="silence").prompts(
        [{"key": "m0", "video": str(omni.mute), "question": "q"}])
    assert not b.videos[0].has_audio and float(abs(b.audios[0]).max()) == 0.0
    tr = Trainer(_cfg(omni, tmp_path / "silence", "sft",
                      data={"train": str(omni.mute_manifest), "missing_audio": "silence"}))
    assert [r["key"] for r in tr.rows] == ["m0", "m1"]
    assert tr.train()["steps"] == 1


def test_av_config_keys_are_validated(omni, tmp_path):
    for key, value, msg in [("missing_audio", "zeros", "data.missing_audio"), ("num_frames", 0, "data.num_frames"),
                            ("video_max_pixels", 100, "data.video_max_pixels"), ("modality", "video", "data.modality")]:
        with pytest.raises(C.ConfigError, match=msg):
            _cfg(omni, tmp_path, "sft", data={key: value})
    assert C.DataConfig().num_frames == 8 and C.DataConfig().missing_audio == "error"


# ----------------------------------------------------------------------------- full Omni folders
@pytest.fixture(scope="module")
def full_omni(omni):
    from core.models import build_tiny_full_omni
    return build_tiny_full_omni(omni.dir, omni.root / "Qwen2.5-Omni-tiny")


def test_a_full_omni_folder_trains_and_exports_whole(omni, full_omni, tmp_path):
    """Training from a released-layout Qwen2.5-Omni folder (thinker + talker + token2wav) exports
    that folder with the trained thinker put back: plain transformers loads the whole model, the
    talker and token2wav are bitwise the source's, the thinker is the trained one."""
    from transformers import Qwen2_5OmniForConditionalGeneration
    src = safetensors_of(full_omni)
    assert {k.split(".")[0] for k in src} == {"thinker", "talker", "token2wav"}
    cfg = _cfg(omni, tmp_path / "full", "sft", model={"path": str(full_omni)})
    tr = Trainer(cfg)
    res = tr.train()
    final = Path(res["final_model"])
    assert json.loads((final / "config.json").read_text())["model_type"] == "qwen2_5_omni"
    out = safetensors_of(final)
    assert out.keys() == src.keys()
    for k in src:
        if not k.startswith("thinker."):
            assert torch.equal(out[k], src[k]), k
    changed = [k for k in src if k.startswith("thinker.") and not torch.equal(out[k], src[k])]
    assert any(".layers." in k for k in changed)
    whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(final))
    trained = {n: p.detach() for n, p in tr.model.named_parameters()}
    torch.testing.assert_close(whole.thinker.lm_head.weight, trained["lm_head.weight"], rtol=0, atol=0)
    assert whole.has_talker and whole.token2wav is not None
    # our loader reads it again as its thinker, for the next stage
    again, _ = load_model_and_processor(final)
    assert torch.equal(again.lm_head.weight, trained["lm_head.weight"])
    # model.export: thinker keeps only the thinker
    cfg = _cfg(omni, tmp_path / "thinker_only", "sft", model={"path": str(full_omni), "export": "thinker"})
    final = Path(Trainer(cfg).train()["final_model"])
    assert json.loads((final / "config.json").read_text())["model_type"] != "qwen2_5_omni"
    assert not any(k.startswith(("talker.", "token2wav.")) for k in safetensors_of(final))


def test_export_full_omni_refuses_another_thinker(omni, full_omni, tmp_path):
    from core.models import build_tiny_omni_thinker, export_full_omni
    other = tmp_path / "other"
    build_tiny_omni_thinker(omni.tok, hidden=32, seed=1, out_dir=other)  # other dimensions
    with pytest.raises(ValueError, match="does not match|has shape"):
        export_full_omni(full_omni, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_full_omni_in_shards(omni, full_omni, tmp_path):
    """Written shard by shard (small shards here): an index, and the same tensors as the source."""
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from core.models import export_full_omni
    Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(full_omni)).save_pretrained(tmp_path / "th")
    counts = export_full_omni(full_omni, tmp_path / "th", tmp_path / "out", shard_bytes=200_000)
    assert counts["shards"] > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert not list((tmp_path / "out").glob("*.tmp"))
    src, out = safetensors_of(full_omni), safetensors_of(tmp_path / "out")
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    Qwen2_5OmniForConditionalGeneration.from_pretrained(str(tmp_path / "out"))
