"""``core.bin.decode`` on text-only causal LMs (and that audio models still decode as before).

A tiny ``Qwen2ForCausalLM`` is built in the test (``train_tokenizer`` + ``build_tiny_causal_lm``);
its manifest has no media, the prompt of each row is its ``prompt`` field. Checks: decode picks
the text collator, writes one line per row (``key``, ``text``, ``ref``), greedy decoding is
deterministic and equals a direct ``generate`` on the same chat-formatted prompts; after a short
SFT on a trivial prompt -> answer mapping the decoded answers are the mapping; ``--modality
audio`` on a text model and a manifest line without a key fail clearly; an audio model with an
audio manifest still goes through ``AudioPromptCollator`` and matches direct generation.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core import config as C
from core.bin.decode import decode, main
from core.models import build_tiny_causal_lm, load_model_and_processor, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    ("what colour is the sky", "blue"),
    ("what colour is grass", "green"),
    ("what colour is snow", "white"),
    ("what colour is coal", "black"),
    ("count to three", "one two three"),
    ("say hello", "hello world"),
]


@pytest.fixture(scope="module")
def text_lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_text")
    tok = train_tokenizer([f"{p} {t}" for p, t in PAIRS] * 4, vocab_size=300)
    build_tiny_causal_lm(tok, hidden=48, layers=1, heads=4, seed=0, out_dir=root / "base")
    rows = [{"key": f"q{i}", "task": "qa", "prompt": p, "text": t} for i, (p, t) in enumerate(PAIRS)]
    manifest = root / "qa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, base=root / "base", manifest=manifest, rows=rows)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _direct_generate(model_dir: Path, rows: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy ``generate`` on the chat-formatted prompts, one row at a time (no padding)."""
    model, tok = load_model_and_processor(model_dir)
    model.eval()
    out = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 suppress_tokens=[i for i in tok.all_special_ids if i != tok.eos_token_id])
        new = seq[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


def test_text_model_decodes_one_line_per_row_deterministically(text_lm, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    info = decode(str(text_lm.base), str(text_lm.manifest), str(a), batch_size=4, max_new_tokens=6)
    assert info["modality"] == "text" and info["samples"] == len(PAIRS)
    got = _read(a)
    assert [h["key"] for h in got] == [r["key"] for r in text_lm.rows]
    assert all(set(h) == {"key", "text", "ref"} for h in got)
    assert [h["ref"] for h in got] == [t for _, t in PAIRS]
    # the CLI, another batch size: the same greedy hypotheses
    assert main(["--model", str(text_lm.base), "--manifest", str(text_lm.manifest), "--out", str(b),
                 "--batch_size", "3", "--max_new_tokens", "6"]) == 0
    assert [h["text"] for h in _read(b)] == [h["text"] for h in got]
    assert [h["text"] for h in got] == _direct_generate(text_lm.base, text_lm.rows, 6)


def test_sft_trained_text_model_reproduces_the_mapping(text_lm, tmp_path):
    from core.trainer import run

    cfg = C.load_config(overrides={
        "method": "sft", "output_dir": str(tmp_path / "sft"),
        "model": {"path": str(text_lm.base)},
        "data": {"train": str(text_lm.manifest), "prompt": "{prompt}", "max_target_tokens": 8},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "train": {"batch_size": len(PAIRS), "max_steps": 40, "resume": "never"},
    })
    run(cfg)
    out = tmp_path / "hyp.jsonl"
    decode(str(tmp_path / "sft" / "final"), str(text_lm.manifest), str(out), max_new_tokens=6)
    assert {h["key"]: h["text"] for h in _read(out)} == {r["key"]: r["text"] for r in text_lm.rows}


def test_as_manifest_and_field_templates(text_lm, tmp_path):
    out = tmp_path / "kd.jsonl"
    decode(str(text_lm.base), str(text_lm.manifest), str(out), prompt="{prompt}", as_manifest=True,
           target_field="target", max_new_tokens=4)
    rows = _read(out)
    assert len(rows) == len(PAIRS) and all("target" in r and r["prompt"] == p for r, (p, _) in zip(rows, PAIRS))


def test_text_model_bad_input_fails_clearly(text_lm, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": "a", "prompt": "say hello"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    assert main(["--model", str(text_lm.base), "--manifest", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: key" in capsys.readouterr().err
    assert main(["--model", str(text_lm.base), "--manifest", str(text_lm.manifest), "--out",
                 str(tmp_path / "o.jsonl"), "--modality", "audio"]) == 2
    assert "no audio encoder" in capsys.readouterr().err


def test_audio_model_still_uses_the_audio_collator(tiny, tmp_path):
    from core.data.collate import AudioPromptCollator
    from core.sampling import generate_completions
    from core.models import special_token_ids

    rows = tiny.rows[:3]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "hyp.jsonl"
    info = decode(str(tiny.student), str(manifest), str(out), max_new_tokens=5, prompt="Transcribe the audio.")
    assert info["modality"] == "audio"
    model, proc = load_model_and_processor(tiny.student)
    torch.set_grad_enabled(False)
    try:
        _, comp = generate_completions(model, AudioPromptCollator(proc, "Transcribe the audio.").prompts(rows),
                                       proc.tokenizer, do_sample=False, max_new_tokens=5,
                                       suppress_ids=special_token_ids(proc), eos_ids=[proc.tokenizer.eos_token_id],
                                       return_logp=False)
    finally:
        torch.set_grad_enabled(True)
    assert [h["text"] for h in _read(out)] == comp.texts
    assert [h["ref"] for h in _read(out)] == [r["text"] for r in rows]


def test_length_order_longest_first_output_in_manifest_order(tiny, tmp_path, monkeypatch):
    """Rows are batched longest audio first (no short clip padded to a long one) and written back
    in the manifest's order: the same hypotheses as decoding in the manifest's order."""
    import soundfile as sf
    from core.bin import decode as D
    from core.data.collate import AudioPromptCollator

    rows = tiny.rows[:6]
    secs = [sf.info(r["audio"]).duration for r in rows]
    assert len(set(secs)) > 1, "the fixture clips should differ in length"
    order = D.length_order(rows)
    assert [secs[i] for i in order] == sorted(secs, reverse=True)
    # a segment's length is its times; a video row's is its duration field; then prompt length
    assert D.length_order([{"audio": rows[0]["audio"], "begin_time": 0.0, "end_time": 0.1},
                           {"audio": rows[0]["audio"], "begin_time": 0.0, "end_time": 0.3}]) == [1, 0]
    # -1 means the whole file, as in the manifest format
    whole = {"audio": rows[0]["audio"], "begin_time": -1, "end_time": -1}
    assert D.length_order([{"audio": rows[0]["audio"], "begin_time": 0.0, "end_time": 0.01}, whole]) == [1, 0]
    assert D.length_order([whole, {"audio": rows[0]["audio"], "end_time": secs[0] + 0.5}]) == [1, 0]
    assert D.length_order([{"video": "a.mp4", "duration": 2.0}, {"video": "b.mp4", "duration": 5.0},
                           {"prompt": "x"}, {"prompt": "xyz"}]) == [1, 0, 3, 2]

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = []
    real = AudioPromptCollator.prompts
    monkeypatch.setattr(AudioPromptCollator, "prompts",
                        lambda self, chunk: batches.append([r["key"] for r in chunk]) or real(self, chunk))
    a, b = tmp_path / "sorted.jsonl", tmp_path / "plain.jsonl"
    decode(str(tiny.student), str(manifest), str(a), max_new_tokens=5, batch_size=2, prompt="Transcribe the audio.")
    assert batches == [[rows[i]["key"] for i in order[k: k + 2]] for k in range(0, 6, 2)]
    batches.clear()
    assert main(["--model", str(tiny.student), "--manifest", str(manifest), "--out", str(b),
                 "--max_new_tokens", "5", "--batch_size", "2", "--no_sort", "--prompt", "Transcribe the audio."]) == 0
    assert batches == [[r["key"] for r in rows[k: k + 2]] for k in range(0, 6, 2)]
    got, plain = _read(a), _read(b)
    assert [h["key"] for h in got] == [r["key"] for r in rows] == [h["key"] for h in plain]
    assert [h["text"] for h in got] == [h["text"] for h in plain]


def test_a_training_manifest_leaves_out_empty_outputs(tmp_path, caplog):
    """``--as_manifest`` writes SFT data (sequence-level KD): an empty output would be an empty
    target, which the manifest reader refuses, so such rows are left out and counted in the log;
    when every output is empty there is nothing to train on, and that is an error naming the file."""
    import logging

    from core.bin.decode import write_hypotheses
    rows = [{"key": f"u{i}", "audio": "a.wav", "task": "asr"} for i in range(4)]
    out = tmp_path / "kd.jsonl"
    with caplog.at_level(logging.WARNING):
        write_hypotheses(str(out), rows, ["one two", "", "  ", "three"], as_manifest=True)
    assert [r["key"] for r in map(json.loads, out.read_text().splitlines())] == ["u0", "u3"]
    assert "2 of 4 outputs are empty and left out of the manifest (e.g. u1, u2)" in caplog.text
    with pytest.raises(SystemExit, match=r"kd2.jsonl: all 4 outputs are empty"):
        write_hypotheses(str(tmp_path / "kd2.jsonl"), rows, [""] * 4, as_manifest=True)
