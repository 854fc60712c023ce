"""Tests for tools/: compute_wer, plot_metrics, parse_options.sh, recipe_common.sh (train, fresh,
readme_args), report.write_results, synth.speech, and the ASR recipe's synthetic corpus maker
(smoke preset)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.compute_wer import normalize_text, read_transcripts, score  # noqa: E402
from tools.compute_wer import main as wer_main  # noqa: E402
from tools.plot_metrics import load_metrics, plot  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


# ---------------------------------------------------------------- compute_wer


def test_normalize_text():
    assert normalize_text("  Turn ON, the   Light! ") == "turn on the light"
    assert normalize_text("Don't stop—the 'music'.") == "don't stop the music"
    assert normalize_text("你好，世界！ 再 见", "zh") == "你好世界再见"


def test_score_counts_by_hand():
    refs = {
        "a": "turn on the light",     # hyp: one substitution (on -> off)
        "b": "go left",               # hyp: one insertion (now)
        "c": "one two three four",    # hyp: two deletions (two, four)
        "d": "stop the music",        # exact
    }
    hyps = {"a": "turn off the light", "b": "go left now", "c": "one three", "d": "stop the music"}
    r = score(refs, hyps)
    # by hand: S=1, I=1, D=2; reference words 4+2+4+3 = 13; hits 3+2+2+3 = 10
    assert (r["substitutions"], r["insertions"], r["deletions"]) == (1, 1, 2)
    assert r["hits"] == 10 and r["num_ref_words"] == 13
    assert r["errors"] == 4
    assert r["wer"] == pytest.approx(4 / 13)
    assert r["num_missing"] == 0 and r["num_utts"] == 4 and r["num_utts_with_errors"] == 3
    per = r["utterances"]
    # worst first: c (2 errors), then b (1 of 2 words) before a (1 of 4), then d
    assert [u["key"] for u in per] == ["c", "b", "a", "d"]
    keys_by_errors = {u["key"]: (u["errors"], u["ref_len"]) for u in per}
    assert keys_by_errors == {"a": (1, 4), "b": (1, 2), "c": (2, 4), "d": (0, 3)}


def test_score_orders_equal_errors_by_rate():
    r = score({"a": "w x y z", "b": "w x"}, {"a": "w x y q", "b": "w q"})
    assert [u["key"] for u in r["utterances"]] == ["b", "a"]


def test_score_missing_hypothesis_counts_as_deletions():
    refs = {"a": "one two three", "b": "go left"}
    hyps = {"a": "one two three", "zzz": "extra"}
    r = score(refs, hyps)
    assert r["num_missing"] == 1 and r["missing_keys"] == ["b"]
    assert r["deletions"] == 2 and r["num_ref_words"] == 5
    assert r["wer"] == pytest.approx(2 / 5)
    assert r["num_extra"] == 1 and r["extra_keys"] == ["zzz"]
    missing = [u for u in r["utterances"] if u["missing"]]
    assert len(missing) == 1 and missing[0]["key"] == "b" and missing[0]["errors"] == 2


def test_score_normalises_when_asked():
    r = score({"a": "Turn on the light."}, {"a": "turn on the LIGHT"}, lang="en")
    assert r["wer"] == 0.0
    r = score({"a": "Turn on the light."}, {"a": "turn on the LIGHT"})
    assert r["substitutions"] == 2  # "Turn" vs "turn", "light." vs "LIGHT"


def test_cer_chinese():
    refs = {"a": "你好，世界！", "b": "今天 天气 好"}
    # a: 世 -> 是 (1 sub) and an extra 啊 (1 ins); b: 气 deleted (1 del)
    hyps = {"a": "你好是界啊", "b": "今天天好"}
    r = score(refs, hyps, cer=True, lang="zh")
    assert r["metric"] == "cer" and r["unit"] == "char"
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (1, 1, 1)
    assert r["num_ref_words"] == 4 + 5
    assert r["cer"] == pytest.approx(3 / 9)


def test_compute_wer_cli(tmp_path, capsys):
    ref = tmp_path / "ref.jsonl"
    hyp = tmp_path / "hyp.jsonl"
    ref.write_text("\n".join(json.dumps(x) for x in [
        {"key": "u1", "audio": "wav/u1.wav", "task": "asr", "text": "Go left."},
        {"key": "u2", "audio": "wav/u2.wav", "task": "asr", "text": "three four five"},
    ]) + "\n")
    hyp.write_text(json.dumps({"key": "u1", "text": "go right"}) + "\n")
    out, details = tmp_path / "report.json", tmp_path / "utt_errors.txt"
    r = wer_main(["--ref", str(ref), "--hyp", str(hyp), "--out", str(out), "--details", str(details)])
    printed = capsys.readouterr().out
    assert "%WER 80.00 [ 4 / 5, 0 ins, 3 del, 1 sub ]" in printed
    assert "missing hypotheses: 1" in printed
    saved = json.loads(out.read_text())
    assert saved["wer"] == pytest.approx(0.8) and saved["missing_keys"] == ["u2"]
    assert r["num_missing"] == 1
    text = details.read_text()
    assert text.index("u2") < text.index("u1")  # worst first
    assert "missing hypothesis" in text


def test_read_transcripts_reports_all_bad_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"key": "a", "text": "x"}\n{not json\n{"key": "b"}\n{"key": "a", "text": "y"}\n')
    with pytest.raises(ValueError) as e:
        read_transcripts(p)
    msg = str(e.value)
    assert f"{p}:2" in msg and f"{p}:3" in msg and f"{p}:4" in msg and "duplicate" in msg


# ---------------------------------------------------------------- plot_metrics


def test_plot_metrics_writes_pngs(tmp_path):
    a, b = tmp_path / "run_a.jsonl", tmp_path / "run_b.jsonl"
    with open(a, "w") as f:
        for s in range(20):
            row = {"step": s, "loss": 2.0 / (s + 1), "lr": 1e-3, "reward/acc": s / 20, "tag": "x", "ok": True}
            if s % 4 == 0:
                row["kl"] = 0.01 * s
            f.write(json.dumps(row) + "\n")
    with open(b, "w") as f:
        for s in range(0, 20, 2):
            f.write(json.dumps({"step": s, "loss": 1.5 / (s + 1), "grad_norm": float("nan")}) + "\n")
    series = load_metrics(a)
    assert set(series) == {"loss", "lr", "reward/acc", "kl"}  # strings and booleans ignored
    assert series["kl"][0] == [0.0, 4.0, 8.0, 12.0, 16.0]
    assert "grad_norm" not in load_metrics(b)  # NaN ignored

    paths = plot([a, b], ["loss", "kl", "reward/acc"], tmp_path / "plots", labels=["A", "B"], smooth=3)
    names = sorted(p.name for p in paths)
    assert names == ["kl.png", "loss.png", "metrics.png", "reward_acc.png"]
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_errors(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0, "loss": 1}\nbroken\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        load_metrics(p)
    q = tmp_path / "q.jsonl"
    q.write_text('{"step": 0, "loss": 1}\n{"step": 1, "lo')  # unfinished last line: skipped
    assert load_metrics(q)["loss"] == ([0.0], [1.0])
    with pytest.raises(ValueError, match="nothing to plot"):
        plot([q], ["nope"], tmp_path / "out")


# ---------------------------------------------------------------- parse_options.sh

_RUN_SH = """#!/usr/bin/env bash
set -euo pipefail
stage=0
stop_stage=100
use_gpu=false
data_dir="data/a b"
. {parse}
echo "stage=${{stage}} stop_stage=${{stop_stage}} use_gpu=${{use_gpu}} data_dir=${{data_dir}} rest=$*"
"""


@pytest.fixture()
def run_sh(tmp_path):
    p = tmp_path / "run.sh"
    p.write_text(_RUN_SH.format(parse=ROOT / "tools" / "parse_options.sh"))
    return p


def _bash(script, *args):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=30)


def test_parse_options_sets_values(run_sh):
    r = _bash(run_sh, "--stage", "1", "--stop-stage=3", "--data_dir", "x y", "--use_gpu", "true", "pos", "--z")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stage=1 stop_stage=3 use_gpu=true data_dir=x y rest=pos --z"
    r = _bash(run_sh)
    assert r.stdout.strip() == "stage=0 stop_stage=100 use_gpu=false data_dir=data/a b rest="


def test_parse_options_rejects_bad_input(run_sh):
    r = _bash(run_sh, "--nope", "1")
    assert r.returncode != 0 and "unknown option '--nope'" in r.stderr and r.stdout == ""
    r = _bash(run_sh, "--use_gpu", "maybe")
    assert r.returncode != 0 and "true or false" in r.stderr
    r = _bash(run_sh, "--stage")
    assert r.returncode != 0 and "needs a value" in r.stderr


def test_parse_options_help(run_sh):
    r = _bash(run_sh, "--help")
    assert r.returncode == 0
    assert "--stage" in r.stdout and "--stop_stage" in r.stdout and "100" in r.stdout
    assert "data/a b" in r.stdout and "stage=0" not in r.stdout  # exits before the script body


# ---------------------------------------------------------------- recipe_common.sh

_COMMON_SH = """set -euo pipefail
. {common}
fakepy() {{ printf '[%s]' "$@"; echo; }}
PY=fakepy
{body}
"""


def _common(tmp_path, body):
    """Runs ``body`` after sourcing tools/recipe_common.sh with PY replaced by an argument printer."""
    (tmp_path / "conf.yaml").write_text("method: sft\n")
    script = tmp_path / "common.sh"
    script.write_text(_COMMON_SH.format(common=ROOT / "tools" / "recipe_common.sh", body=body))
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd=tmp_path)


def test_train_wrapper_builds_one_command(tmp_path):
    r = _common(tmp_path, "seed=3\ntrain conf.yaml a=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("[-m][core.bin.train][--config][conf.yaml][train.seed=3][model.dtype=float32]"
                                "[teacher.dtype=float32][train.resume=auto][a=1]")
    # per-recipe overrides, the launch options, DeepSpeed, LoRA, then the call's own overrides
    # (last, so they win)
    r = _common(tmp_path, 'seed=0; backend=deepspeed; lora=true; resume=never; train_extra=("x=a b")\n'
                          "train conf.yaml train.resume=auto")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("[-m][core.bin.train][--config][conf.yaml][train.seed=0][x=a b][model.dtype=float32]"
                                "[teacher.dtype=float32][train.resume=never][backend.name=deepspeed]"
                                "[model.lora={r: 16, lora_alpha: 32, lora_dropout: 0.0}][train.resume=auto]")


def test_train_wrapper_errors(tmp_path):
    r = _common(tmp_path, "seed=0; backend=tpu\ntrain conf.yaml\necho after")
    assert r.returncode != 0 and "--backend must be torch or deepspeed, got 'tpu'" in r.stderr
    assert "after" not in r.stdout
    r = _common(tmp_path, "seed=0\ntrain missing.yaml")
    assert r.returncode != 0 and "no config file missing.yaml" in r.stderr


def test_fresh_and_readme_args(tmp_path):
    (tmp_path / "old" / "x").mkdir(parents=True)
    r = _common(tmp_path, 'fresh old never_made; echo "readme=${readme_args[*]:-none}"')
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "old").exists() and r.stdout.strip() == "readme=none"
    r = _common(tmp_path, "fresh /")
    assert r.returncode != 0 and "refusing" in r.stderr
    # --update_readme true (set before recipe_common.sh is sourced) hands make_results.py the README
    script = tmp_path / "u.sh"
    script.write_text(f"set -euo pipefail\nupdate_readme=true\n. {ROOT / 'tools' / 'recipe_common.sh'}\n"
                      'echo "${readme_args[*]}"\n')
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "--readme README.md", r.stderr


# ---------------------------------------------------------------- report


def test_write_results_leaves_the_readme_alone_unless_asked(tmp_path):
    from tools.report import END, START, write_results
    readme = tmp_path / "README.md"
    original = f"# Recipe\n\n{START}\nold table\n{END}\n\nmore text\n"
    readme.write_text(original)
    exp = tmp_path / "exp"
    out = write_results(exp, "| a | b |\n|---|---|\n| 1 | 2 |")
    assert out == exp / "RESULTS.md" and "| 1 | 2 |" in out.read_text()
    assert readme.read_text() == original
    write_results(exp, "| smoke |", readme=readme, smoke=True)  # a smoke run never touches it
    assert readme.read_text() == original and "| smoke |" in out.read_text()
    write_results(exp, "| new |", readme=readme)
    assert readme.read_text() == f"# Recipe\n\n{START}\n| new |\n{END}\n\nmore text\n"
    with pytest.raises(SystemExit, match="no such file"):
        write_results(exp, "x", readme=tmp_path / "nope.md")


# ---------------------------------------------------------------- synth.speech


@needs_espeak
def test_synthesize_one_phrase(tmp_path):
    from tools.synth.speech import SynthesisError, list_variants, list_voices, synthesize

    voices = list_voices("en")
    assert "en-us" in voices and all(v.startswith("en") for v in voices)
    assert {"m3", "f2"} <= set(list_variants())
    out = tmp_path / "x.wav"
    dur = synthesize("turn on the light", out, voice="en-us", speed=170, pitch=50, variant="m3")
    info = sf.info(str(out))
    assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
    audio, _ = sf.read(str(out), dtype="float32")
    assert dur == pytest.approx(len(audio) / 16000)
    assert 0.4 < dur < 3.0
    assert float(np.sqrt(np.mean(audio ** 2))) > 0.01
    with pytest.raises(SynthesisError, match="variant"):
        synthesize("hello", tmp_path / "y.wav", voice="en-us", variant="no-such-variant")
    with pytest.raises(SynthesisError, match="voice"):
        synthesize("hello", tmp_path / "y.wav", voice="xx-nowhere")
    assert not (tmp_path / "y.wav").exists()


@needs_espeak
def test_synthesize_many_reports_failures(tmp_path):
    from tools.synth.speech import SynthesisError, SynthJob, synthesize_many

    jobs = [SynthJob("go left", tmp_path / "a.wav"), {"text": "three four", "out_wav": tmp_path / "b.wav",
                                                       "voice": "en-gb", "variant": "f2"}]
    durs = synthesize_many(jobs, workers=2, progress=False)
    assert len(durs) == 2 and all(d > 0.2 for d in durs)
    with pytest.raises(SynthesisError, match="1 of 2"):
        synthesize_many([SynthJob("go", tmp_path / "c.wav"), SynthJob("go", tmp_path / "d.wav", speed=5)],
                        progress=False)


# ---------------------------------------------------------------- make_synthetic (smoke)


@needs_espeak
def test_make_synthetic_smoke(tmp_path):
    out = tmp_path / "data"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "asr" / "local" / "make_synthetic.py"),
                        "--smoke", "--out_dir", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    expected = {"teacher_train": 64, "student_labelled": 16, "unlabelled": 48, "dev": 16, "test": 16}
    manifests = {}
    for split, n in expected.items():
        rows = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        manifests[split] = rows
    keys = [row["key"] for rows in manifests.values() for row in rows]
    assert len(keys) == len(set(keys))  # disjoint splits
    audio = [row["audio"] for rows in manifests.values() for row in rows]
    assert len(audio) == len(set(audio))
    renderings = [(row.get("text"), row["voice"], row["variant"], row["speed"], row["pitch"])
                  for split in ("teacher_train", "student_labelled", "dev", "test") for row in manifests[split]]
    assert len(renderings) == len(set(renderings))
    for split, rows in manifests.items():
        for row in rows:
            assert row["task"] == "asr" and row["audio"] == f"wav/{row['key']}.wav"
            assert ("text" in row) == (split != "unlabelled")
            if "text" in row:
                assert 2 <= len(row["text"].split()) <= 6
            info = sf.info(str(out / row["audio"]))
            assert info.samplerate == 16000 and info.channels == 1
            assert info.duration <= 3.2 + 1e-6
    refs = [json.loads(x) for x in (out / "unlabelled_reference.jsonl").read_text().splitlines()]
    assert [x["key"] for x in refs] == [row["key"] for row in manifests["unlabelled"]]
    assert all(set(x) == {"key", "text"} and x["text"] for x in refs)
    # voices are shared across splits
    voices = {split: {row["voice"] for row in rows} for split, rows in manifests.items()}
    assert len(voices["teacher_train"] & voices["unlabelled"]) >= 2
    corpus = (out / "text_corpus.txt").read_text().splitlines()
    assert len(corpus) == 64 + 16
    stats = json.loads((out / "stats.json").read_text())
    assert stats["total_utts"] == 160 and stats["splits"]["unlabelled"]["num_utts"] == 48
    assert stats["splits"]["test"]["max_seconds"] <= 3.2


def test_sound_render_is_the_same_bytes_every_time(tmp_path):
    """sox dithers its 16-bit output with random noise unless told to be repeatable: two renders of
    the same segments must be identical files (the recipes' synthetic data is then reproducible)."""
    if shutil.which("sox") is None:
        pytest.fail("sox is needed (bash run.sh setup installs it)")
    from tools.synth.sound import Segment, render
    segs = [Segment(440, 0.3, 0.5, "sine", 0.1), Segment("C5", 0.2, 0.3, "square", 0.0)]
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    assert render(segs, a) == render(segs, b)
    assert a.read_bytes() == b.read_bytes()
    x, sr = sf.read(a)
    assert sr == 16000 and np.abs(x).max() > 0.2  # a real clip, not silence


def test_gen_length_measures_strings_and_lists_of_references(tmp_path):
    """tools/gen_length.py: the longest reference in the model's tokens (+ EOS); a caption row's
    ``text`` is a list of references and each counts; rows without the field are skipped."""
    from core.models import train_tokenizer
    from tools.gen_length import auto_max_new_tokens, longest_reference
    tok = train_tokenizer(["a dog barks", "rain falls on a metal roof loudly"], 300, out_dir=tmp_path / "tok")
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in (
        {"key": "a", "text": ["a dog barks", "rain falls on a metal roof loudly"]},
        {"key": "b", "text": "a dog barks"}, {"key": "c"})) + "\n")
    want = len(tok("rain falls on a metal roof loudly", add_special_tokens=False)["input_ids"]) + 1
    assert longest_reference(tok, [m]) == (want, 2)
    r = auto_max_new_tokens(tmp_path / "tok", [m], floor=1)
    assert r["max_new_tokens"] == math.ceil(1.25 * want) + 8 and r["rows"] == 2
    with pytest.raises(ValueError, match="no row"):
        longest_reference(tok, [m], field="answer")
