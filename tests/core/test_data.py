"""Manifest validation (every bad-input path names file:line and field) and audio loading."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import soundfile as sf

from core.data.audio import AudioError, audio_duration, load_audio
from core.data.manifest import (ManifestError, load_manifest_dataset, read_manifest,
                                write_manifest)

SR = 16000


def _wav(path, seconds=1.0, sr=SR, channels=1, freq=440.0):
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    if channels > 1:
        x = np.stack([x * (c + 1) / channels for c in range(channels)], axis=1)
    sf.write(str(path), x, sr)
    return path


def _manifest(path, lines):
    """Writes raw lines (dicts are JSON-encoded, strings written as they are)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path


def _error(path, **kw) -> str:
    with pytest.raises(ManifestError) as ei:
        read_manifest(path, **kw)
    return str(ei.value)


@pytest.fixture
def good(tmp_path):
    _wav(tmp_path / "a.wav")
    return tmp_path


# ----------------------------------------------------------------------------- good input

def test_reads_valid_manifest_and_resolves_relative_paths(good):
    sub = good / "sub"
    sub.mkdir()
    _wav(sub / "b.wav")
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "text": "hello", "task": "asr", "category": "x"},
        "",
        {"key": "b", "audio": "sub/b.wav", "text": ["one", "two"], "begin_time": 0.1,
         "end_time": 0.5, "question": "q?", "choices": ["x", "y"], "answer": "y"},
        {"key": "c", "audio": str(good / "a.wav"), "begin_time": -1, "end_time": -1},
    ])
    rows = read_manifest(m)
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["audio"] == str(good / "a.wav")
    assert rows[1]["audio"] == str(sub / "b.wav")
    assert os.path.isabs(rows[2]["audio"])
    assert rows[0]["category"] == "x"  # metadata kept
    assert "_line" not in rows[0]


def test_relative_paths_resolve_against_manifest_folder_not_cwd(good, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav", "text": "hi"}])
    assert read_manifest(m)[0]["audio"] == str(good / "a.wav")
    # the same file through a relative manifest path
    assert read_manifest(os.path.relpath(m))[0]["audio"] == str(good / "a.wav")


def test_write_manifest_roundtrip_is_atomic_and_keeps_relative_paths(good):
    rows = [{"key": "a", "audio": "a.wav", "text": "héllo", "n": np.int64(3)}]
    out = good / "w.jsonl"
    assert write_manifest(out, rows) == 1
    assert json.loads(out.read_text(encoding="utf-8"))["audio"] == "a.wav"
    assert "héllo" in out.read_text(encoding="utf-8")
    assert read_manifest(out)[0]["n"] == 3
    # a failing write leaves the previous file untouched and no temp files behind
    with pytest.raises(ValueError, match="row 1"):
        write_manifest(out, [{"key": "b", "audio": "a.wav"}, {"key": "c", "x": float("nan")}])
    assert json.loads(out.read_text(encoding="utf-8"))["key"] == "a"
    assert sorted(p.name for p in good.iterdir()) == ["a.wav", "w.jsonl"]


def test_load_manifest_dataset(good):
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "text": "x"},
        {"key": "b", "audio": "a.wav", "text": ["y", "z"], "source": "s"},
    ])
    ds = load_manifest_dataset(m, require=("text",))
    assert len(ds) == 2
    assert set(ds.column_names) == {"key", "audio", "text", "source"}
    assert ds[0]["text"] == ["x"] and ds[1]["text"] == ["y", "z"]
    assert ds[0]["source"] is None and ds[1]["source"] == "s"
    assert ds[0]["audio"] == str(good / "a.wav")


# ----------------------------------------------------------------------------- each bad input

def test_missing_audio_file(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav"},
                                     {"key": "b", "audio": "nope.wav"}])
    msg = _error(m)
    assert f"{m}:2: audio: " in msg and "nope.wav" in msg and "no such audio file" in msg
    # without media checks the row passes
    assert len(read_manifest(m, check_media=False)) == 2


def test_corrupt_audio(good):
    (good / "bad.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "bad.wav", "text": "x"}])
    msg = _error(m)
    assert f"{m}:1: audio: {good / 'bad.wav'}: unreadable or corrupt audio" in msg


def test_zero_length_audio(good):
    sf.write(str(good / "empty.wav"), np.zeros(0, dtype=np.float32), SR)
    (good / "zero_bytes.wav").write_bytes(b"")
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "empty.wav"},
                                     {"key": "b", "audio": "zero_bytes.wav"}])
    msg = _error(m)
    assert f"{m}:1: audio: {good / 'empty.wav'}: empty audio (0 frames)" in msg
    assert f"{m}:2: audio: {good / 'zero_bytes.wav'}: empty file (0 bytes)" in msg


def test_empty_text(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav", "text": "  "},
                                     {"key": "b", "audio": "a.wav", "text": []},
                                     {"key": "c", "audio": "a.wav", "text": ["ok", ""]},
                                     {"key": "d", "audio": "a.wav", "text": 5}])
    msg = _error(m)
    assert f"{m}:1: text: empty text" in msg
    assert f"{m}:2: text: empty list of texts" in msg
    assert f"{m}:3: text: list item(s) [1] must be non-empty strings" in msg
    assert f"{m}:4: text: must be a non-empty string" in msg


def test_required_field_missing_or_empty(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav"},
                                     {"key": "b", "audio": "a.wav", "text": ""}])
    msg = _error(m, require=("text",))
    assert f"{m}:1: text: required field is missing" in msg
    assert f"{m}:2: text: required field is empty" in msg
    assert "problems in manifest" in msg


def test_malformed_json_line(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav"},
                                     '{"key": "b", "audio": "a.wav"',
                                     '["not", "an", "object"]'])
    msg = _error(m)
    assert f"{m}:2: json: malformed JSON" in msg
    assert f"{m}:3: json: expected a JSON object, got list" in msg


def test_duplicate_key_and_missing_key(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "audio": "a.wav"},
                                     {"key": "a", "audio": "a.wav"},
                                     {"audio": "a.wav"},
                                     {"key": 7, "audio": "a.wav"}])
    msg = _error(m)
    assert f"{m}:2: key: duplicate key 'a' (first on line 1)" in msg
    assert f"{m}:3: key: missing" in msg
    assert f"{m}:4: key: must be a non-empty string" in msg


def test_answer_not_in_choices(good):
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "question": "q", "choices": ["dog", "cat"], "answer": "cow"},
        {"key": "b", "audio": "a.wav", "choices": ["only"], "answer": "only"},
        {"key": "c", "audio": "a.wav", "choices": ["dog", "cat"]},  # unlabelled MCQ is fine
        {"key": "d", "audio": "a.wav", "choices": ["dog", "cat"], "answer": "B"},  # the letter of a choice
        {"key": "e", "audio": "a.wav", "choices": ["dog", "cat", "cow"], "answer": "A,C"},  # a set of letters
        {"key": "f", "audio": "a.wav", "choices": ["dog", "cat"], "answer": "C"},  # past the last choice
    ])
    msg = _error(m)
    assert f"{m}:1: answer: 'cow' is neither one of choices" in msg
    assert f"{m}:2: choices: needs at least 2 choices" in msg
    assert ":3:" not in msg and ":4:" not in msg and ":5:" not in msg
    assert f"{m}:6: answer: 'C' is neither one of choices" in msg


def test_bad_times_and_segment_past_end(good):
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "begin_time": 0.5, "end_time": 0.2},
        {"key": "b", "audio": "a.wav", "begin_time": "0.1"},
        {"key": "c", "audio": "a.wav", "begin_time": -3},
        {"key": "d", "audio": "a.wav", "begin_time": 0.2, "end_time": 5.0},
        {"key": "e", "audio": "a.wav", "begin_time": 0.2, "end_time": 1.02},  # within tolerance
    ])
    msg = _error(m)
    assert f"{m}:1: end_time: end_time 0.2 must be greater than begin_time 0.5" in msg
    assert f"{m}:2: begin_time: must be a number" in msg
    assert f"{m}:3: begin_time: must be >= 0, or -1 for the whole file" in msg
    assert f"{m}:4: end_time: end_time 5.0 is past the end of" in msg and "duration 1.000 s" in msg
    assert ":5:" not in msg


def test_no_media_path(good):
    m = _manifest(good / "m.jsonl", [{"key": "a", "text": "x"}])
    assert f"{m}:1: audio: no 'audio' or 'video' path" in _error(m)
    assert read_manifest(m, require_media=False) == [{"key": "a", "text": "x"}]


def test_several_problems_listed_together(good):
    (good / "bad.wav").write_bytes(b"RIFF" + os.urandom(100))
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "text": "fine"},
        {"key": "b", "audio": "missing.wav", "text": ""},
        "{oops",
        {"key": "a", "audio": "bad.wav", "text": "x"},
        {"key": "e", "audio": "a.wav", "choices": ["x", "y"], "answer": "z"},
    ])
    with pytest.raises(ManifestError) as ei:
        read_manifest(m)
    err = ei.value
    assert str(err).startswith(f"{m}: 6 problems in manifest:")
    got = [(p.line, p.field) for p in err.problems]
    assert got == [(2, "text"), (2, "audio"), (3, "json"), (4, "key"), (4, "audio"),
                   (5, "answer")]
    listed = str(err).splitlines()[1:]
    assert len(listed) == 6 and all(line.startswith(f"{m}:") for line in listed)


def test_empty_manifest_and_missing_manifest(good):
    m = _manifest(good / "m.jsonl", ["", "   "])
    assert "manifest: no samples" in _error(m)
    assert read_manifest(m, allow_empty=True) == []
    with pytest.raises(FileNotFoundError, match="no such manifest file"):
        read_manifest(good / "absent.jsonl")


def test_skip_bad_writes_side_file_and_logs(good, caplog):
    m = _manifest(good / "m.jsonl", [
        {"key": "a", "audio": "a.wav", "text": "fine"},
        {"key": "b", "audio": "missing.wav", "text": "x"},
        "{oops",
        {"key": "c", "audio": "a.wav", "text": "also fine"},
    ])
    with caplog.at_level(logging.WARNING, logger="core.data.manifest"):
        rows = read_manifest(m, skip_bad=True)
    assert [r["key"] for r in rows] == ["a", "c"]
    side = good / "m.jsonl.bad.jsonl"
    bad = [json.loads(line) for line in side.read_text().splitlines()]
    assert [b["line"] for b in bad] == [2, 3]
    assert bad[0]["key"] == "b" and "no such audio file" in bad[0]["reasons"][0]
    assert bad[1]["raw"] == "{oops" and bad[1]["reasons"][0].startswith("json: malformed JSON")
    assert any("skipped 2 bad line(s) of 4" in r.getMessage() and str(side) in r.getMessage()
               for r in caplog.records)

    out = good / "elsewhere" / "bad.jsonl"
    read_manifest(m, skip_bad=True, bad_lines_out=out)
    assert len(out.read_text().splitlines()) == 2


def test_skip_bad_with_nothing_left_still_fails(good):
    m = _manifest(good / "m.jsonl", [{"key": "b", "audio": "missing.wav"}])
    msg = _error(m, skip_bad=True)
    assert "no such audio file" in msg and "m.jsonl.bad.jsonl" in msg


# ----------------------------------------------------------------------------- audio

def test_load_audio_whole_and_segment(tmp_path):
    p = _wav(tmp_path / "a.wav", seconds=2.0)
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1 and x.shape[0] == 2 * SR
    seg = load_audio(p, begin_time=0.5, end_time=1.25)
    assert seg.shape[0] == int(0.75 * SR)
    np.testing.assert_allclose(seg, x[int(0.5 * SR):int(1.25 * SR)], atol=1e-4)
    assert load_audio(p, begin_time=1.5).shape[0] == SR // 2
    assert load_audio(p, begin_time=-1, end_time=-1).shape[0] == 2 * SR
    assert audio_duration(p) == pytest.approx(2.0)


def test_load_audio_resamples_8k_to_16k(tmp_path):
    p = _wav(tmp_path / "a8k.wav", seconds=1.0, sr=8000, freq=500.0)
    x = load_audio(p, sample_rate=16000)
    assert abs(x.shape[0] - 16000) <= 2
    spec = np.abs(np.fft.rfft(x))
    peak_hz = np.argmax(spec) * 16000 / x.shape[0]
    assert abs(peak_hz - 500.0) < 5.0
    # segment then resample
    seg = load_audio(p, begin_time=0.25, end_time=0.75, sample_rate=16000)
    assert abs(seg.shape[0] - 8000) <= 2
    assert load_audio(p, sample_rate=None).shape[0] == 8000


def test_load_audio_downmixes_stereo(tmp_path):
    p = tmp_path / "st.wav"
    left = np.full(SR, 0.2, dtype=np.float32)
    right = np.full(SR, 0.6, dtype=np.float32)
    sf.write(str(p), np.stack([left, right], axis=1), SR, subtype="FLOAT")
    x = load_audio(p)
    assert x.ndim == 1 and x.shape[0] == SR
    np.testing.assert_allclose(x, 0.4, atol=1e-6)


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: no such audio file"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(AudioError, match=r"bad\.wav: unreadable or corrupt audio"):
        load_audio(tmp_path / "bad.wav")
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioError, match=r"empty\.wav: empty audio \(0 frames\)"):
        load_audio(tmp_path / "empty.wav")
    p = _wav(tmp_path / "a.wav", seconds=1.0)
    with pytest.raises(AudioError, match=r"a\.wav: empty segment"):
        load_audio(p, begin_time=0.5, end_time=0.5)
    with pytest.raises(AudioError, match=r"a\.wav: empty segment"):
        load_audio(p, begin_time=1.0)
    with pytest.raises(AudioError, match=r"a\.wav: end_time 3.0 is past the end"):
        load_audio(p, begin_time=0.0, end_time=3.0)
    with pytest.raises(AudioError, match=r"a\.wav: begin_time must be >= 0"):
        load_audio(p, begin_time=-0.5)
    assert issubclass(AudioError, ValueError)
