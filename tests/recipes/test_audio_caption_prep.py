"""audio_caption data prep: the synthetic corpus (smoke size), AudioCaps and Clotho on tiny
fixtures in their real layouts, their bad-input paths, and the real-corpus train split."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "audio_caption" / "local"
SR = 16000


def _load(name):
    spec = importlib.util.spec_from_file_location(f"audio_caption_local_{name}", LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


synth = _load("make_synthetic")
audiocaps = _load("prepare_audiocaps")
clotho = _load("prepare_clotho")
split_train = _load("split_train")

SPLITS = ("teacher_train", "student_labelled", "unlabelled", "dev", "test")
LABELLED = ("teacher_train", "student_labelled", "dev", "test")
META = ("word", "gender", "loudness", "background", "tone_pitch", "beep_count", "order")


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _wav(path: Path, seconds=0.2, sr=16000, freq=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


# ----------------------------------------------------------------------------- synthetic

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    for exe in ("espeak-ng", "sox"):
        if shutil.which(exe) is None:
            pytest.fail(f"{exe} is needed for the synthetic corpus (bash run.sh setup installs it)")
    out = tmp_path_factory.mktemp("caption_synth")
    stats = synth.main(["--out_dir", str(out), "--smoke", "--seed", "0", "--quiet"])
    return out, stats


def test_synthetic_manifests(smoke):
    out, stats = smoke
    rows = {s: _jsonl(out / f"{s}.jsonl") for s in SPLITS}
    assert {s: len(r) for s, r in rows.items()} == synth.SMOKE_COUNTS == stats["counts"]
    assert {s: stats["splits"][s]["clips"] for s in SPLITS} == synth.SMOKE_COUNTS
    for s in LABELLED:
        for r in rows[s]:
            assert r["task"] == "caption" and r["audio"] == f"wav/{r['key']}.wav" and r["key"].startswith(s)
            assert len(r["text"]) == 5 and len(set(r["text"])) == 5 and all(t.strip() for t in r["text"])
            m = {k: r[k] for k in META}
            assert r["text"][0] == synth.canonical_caption(m)
            assert set(r["text"]) <= set(synth.all_captions(m))
            assert r["text"][0].startswith("a man " if m["gender"] == "male" else "a woman ") or \
                f"then a {'man' if m['gender'] == 'male' else 'woman'} says {m['word']} " in r["text"][0]
            assert (m["tone_pitch"] is not None) == (m["background"] == "tone")
            assert (m["beep_count"] in (1, 2, 3)) == (m["background"] == "beeps")
            qs = r["questions"]
            assert len(qs) == 3 and len({q["type"] for q in qs}) == 3
            for q in qs:
                assert 3 <= len(q["choices"]) <= 4 and len(set(q["choices"])) == len(q["choices"])
                assert q["answer"] in q["choices"] and q["question"].endswith("?")
            assert 0 < r["duration"] <= 3.0
        # the project's own reader accepts them (audio headers included)
        assert len(read_manifest(out / f"{s}.jsonl", require=("text",))) == synth.SMOKE_COUNTS[s]
    # the unlabelled set carries no labels and no content metadata; the references do
    for r in rows["unlabelled"]:
        assert set(r) == {"key", "audio", "task", "duration"}
    ref = _jsonl(out / "unlabelled_reference.jsonl")
    assert [r["key"] for r in ref] == [r["key"] for r in rows["unlabelled"]]
    assert all(len(r["text"]) == 5 and len(r["questions"]) == 3 and "audio" not in r for r in ref)
    # every attribute value shows up somewhere
    every = [r for s in LABELLED for r in rows[s]] + ref
    for k, values in (("gender", synth.GENDERS), ("loudness", synth.LOUDNESS),
                      ("background", synth.BACKGROUNDS), ("order", synth.ORDERS)):
        assert {r[k] for r in every} == set(values), k
    # the tokenizer corpus: prompt strings, and all training text
    corpus = (out / "text_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert corpus[:5] == ["Describe the audio.", "Caption:", "Question:", "Choices:", "Answer:"]
    lines = set(corpus)
    for r in rows["teacher_train"] + rows["student_labelled"]:
        assert set(r["text"]) <= lines
        for q in r["questions"]:
            assert {q["question"], q["answer"], *q["choices"]} <= lines
    words = {w for line in corpus for w in line.replace(",", " ").replace("?", " ").replace(".", " ").split()}
    assert len(words) < 120  # a small vocabulary for a ~500-token BPE


def test_synthetic_audio(smoke):
    out, _ = smoke
    rows = [r for s in SPLITS for r in _jsonl(out / f"{s}.jsonl")]
    audio = [r["audio"] for r in rows]
    assert len(set(audio)) == len(audio) == sum(synth.SMOKE_COUNTS.values())  # no file in two splits
    assert sorted(p.name for p in (out / "wav").iterdir()) == sorted(Path(a).name for a in audio)
    assert not (out / ".parts").exists()
    for r in rows:
        x, sr = sf.read(str(out / r["audio"]), always_2d=True)
        assert sr == SR and x.shape[1] == 1 and 0 < len(x) <= 3.0 * SR
        assert abs(len(x) / SR - r["duration"]) < 1e-3
        assert np.abs(x).max() > 0.05


def _first_event(x: np.ndarray, n: int = 1024) -> np.ndarray:
    start = int(np.flatnonzero(np.abs(x) > 0.01)[0])
    return x[start + 200: start + 200 + n]


def test_synthetic_audio_matches_metadata(smoke):
    """The captions' facts are in the audio: loudness, and what the first event is."""
    out, _ = smoke
    rows = [r for s in LABELLED for r in _jsonl(out / f"{s}.jsonl")]
    checked = 0
    for r in rows:
        x, _ = sf.read(str(out / r["audio"]))
        if r["order"] != "overlap":
            peak = np.abs(x).max()
            assert (peak > 0.6) if r["loudness"] == "loud" else (peak < 0.45), (r["key"], peak)
        if r["order"] != "sound_first":
            continue
        seg = _first_event(x)
        spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
        freqs = np.fft.rfftfreq(len(seg), 1 / SR)
        top = freqs[spec.argmax()]
        if r["background"] == "tone":
            assert (top > 1500) if r["tone_pitch"] == "high" else (top < 300), (r["key"], top)
        elif r["background"] == "beeps":
            assert 750 < top < 1250, (r["key"], top)
        else:
            assert spec[freqs > 2000].sum() > 2 * spec[freqs < 1000].sum(), r["key"]
        checked += 1
    assert checked >= 5


def test_synthetic_deterministic(smoke, tmp_path):
    out, _ = smoke
    voices = __import__("tools.synth.speech", fromlist=["list_voices"]).list_voices("en")
    # the plan (parameters, captions, questions) is a function of the seed ...
    again = synth.plan(synth.SMOKE_COUNTS, 0, voices)
    rows = [r for s in LABELLED for r in _jsonl(out / f"{s}.jsonl")]
    by_key = {c.key: c for c in again}
    for r in rows:
        c = by_key[r["key"]]
        assert (c.text, c.questions, c.meta) == (r["text"], r["questions"], {k: r[k] for k in META})
    other = synth.plan(synth.SMOKE_COUNTS, 1, voices)
    assert [c.text for c in other] != [c.text for c in again]
    # ... and so is the audio, byte for byte (a split's first clips do not depend on the counts)
    counts = ["--teacher_train", "3", "--student_labelled", "0", "--unlabelled", "0", "--dev", "0", "--test", "2"]
    synth.main(["--out_dir", str(tmp_path), "--seed", "0", "--quiet", *counts])
    for key in ("teacher_train_00000", "teacher_train_00001", "teacher_train_00002", "test_00000", "test_00001"):
        assert (tmp_path / "wav" / f"{key}.wav").read_bytes() == (out / "wav" / f"{key}.wav").read_bytes(), key
    assert _jsonl(tmp_path / "teacher_train.jsonl") == _jsonl(out / "teacher_train.jsonl")[:3]


def test_synthetic_bad_counts(tmp_path):
    with pytest.raises(SystemExit, match="--dev=-1"):
        synth.main(["--out_dir", str(tmp_path), "--dev", "-1", "--quiet"])


# ----------------------------------------------------------------------------- AudioCaps

AC_HEADER = "audiocap_id,youtube_id,start_time,caption\n"


@pytest.fixture
def ac(tmp_path):
    """AudioCaps: {train,val,test}.csv and audio/<split>/ in the usual naming, plus one clip named
    by an audiocap_id (.flac)."""
    d = tmp_path / "audiocaps"
    d.mkdir()
    (d / "train.csv").write_text(
        AC_HEADER + "91139,r1nicOVtvkQ,130,A woman talks nearby as water pours\n"
        '58146,UDGBjjwyaqE,20,"Wind blows, and a man speaks"\n'
        "11542,-xPD8oOXOsA,0,Birds chirp in the distance\n", encoding="utf-8")
    val = [(101 + i, "zYsmu8oMuL8", 30, f"val clip one caption {i}") for i in range(3)]
    val += [(201 + i, "-aZ9RlAlP2s", 50, f"val clip two caption {i}") for i in range(5)]
    val += [(104 + i, "zYsmu8oMuL8", 30, f"val clip one caption {3 + i}") for i in range(2)]  # interleaved
    (d / "val.csv").write_text(AC_HEADER + "".join(f"{a},{y},{s},{c}\n" for a, y, s, c in val), encoding="utf-8")
    (d / "test.csv").write_text(
        AC_HEADER + "".join(f'{301 + i},kNgQGfjq1Xs,10,"a dog barks, test caption {i}"\n' for i in range(5)),
        encoding="utf-8")
    for yt, st in (("r1nicOVtvkQ", 130), ("UDGBjjwyaqE", 20), ("-xPD8oOXOsA", 0)):
        _wav(d / "audio" / "train" / f"{yt}_{st}.wav")
    _wav(d / "audio" / "val" / "zYsmu8oMuL8_30.wav")
    _wav(d / "audio" / "val" / "203.flac")
    _wav(d / "audio" / "test" / "kNgQGfjq1Xs_10.wav")
    return d


def test_audiocaps_prepare(ac, tmp_path):
    out = tmp_path / "data"
    st = audiocaps.prepare(ac, out)
    assert st["clips"] == {"train": 3, "dev": 2, "test": 1} and st["captions"] == {"train": 3, "dev": 10, "test": 5}
    assert st["skipped"] == 0 and st["skipped_file"] is None and not (out / "skipped.jsonl").exists()
    train = _jsonl(out / "train.jsonl")
    assert [r["key"] for r in train] == ["r1nicOVtvkQ_130", "UDGBjjwyaqE_20", "-xPD8oOXOsA_0"]
    assert train[1]["text"] == ["Wind blows, and a man speaks"]
    assert train[1]["audio"] == str((ac / "audio" / "train" / "UDGBjjwyaqE_20.wav").resolve())
    assert train[0]["start_time"] == 130 and train[0]["audiocap_ids"] == ["91139"]
    assert all(r["task"] == "caption" and r["dataset"] == "audiocaps" and r["split"] == "train" for r in train)
    dev = _jsonl(out / "dev.jsonl")
    assert [r["key"] for r in dev] == ["zYsmu8oMuL8_30", "-aZ9RlAlP2s_50"]
    assert dev[0]["text"] == [f"val clip one caption {i}" for i in range(5)]
    assert dev[0]["audiocap_ids"] == ["101", "102", "103", "104", "105"]
    assert dev[1]["audio"].endswith("/val/203.flac") and len(dev[1]["text"]) == 5 and dev[1]["split"] == "dev"
    test = _jsonl(out / "test.jsonl")
    assert test[0]["text"][0] == "a dog barks, test caption 0" and len(test[0]["text"]) == 5
    for name in ("train", "dev", "test"):
        read_manifest(out / f"{name}.jsonl", require=("text",))


def test_audiocaps_audio_dir_and_dataset_folder(ac, tmp_path):
    """CSVs under dataset/ (the GitHub layout), audio in a separate --audio_dir, via the CLI."""
    (ac / "dataset").mkdir()
    for s in ("train", "val", "test"):
        (ac / f"{s}.csv").rename(ac / "dataset" / f"{s}.csv")
    audio = tmp_path / "elsewhere"
    (ac / "audio").rename(audio)
    out = tmp_path / "data"
    assert audiocaps.main(["--corpus_dir", str(ac), "--out_dir", str(out)]) == 1  # not found by default
    assert audiocaps.main(["--corpus_dir", str(ac), "--out_dir", str(out), "--audio_dir", str(audio)]) == 0
    assert len(_jsonl(out / "dev.jsonl")) == 2


def test_audiocaps_all_problems_at_once(ac, tmp_path, capsys):
    (ac / "audio" / "train" / "UDGBjjwyaqE_20.wav").unlink()                   # train.csv:3 missing audio
    lines = (ac / "val.csv").read_text(encoding="utf-8").splitlines()
    lines[2] = "102,zYsmu8oMuL8,30,   "                                        # val.csv:3 empty caption
    lines[5] = "202,-aZ9RlAlP2s,fifty,val clip two caption 1"                 # val.csv:6 bad start_time
    (ac / "val.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(ac / "test.csv", "a", encoding="utf-8") as f:
        f.write("306,kNgQGfjq1Xs,10\n")                                       # test.csv:7 malformed row
    out = tmp_path / "data"
    with pytest.raises(audiocaps.PrepError) as err:
        audiocaps.prepare(ac, out)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert f"{ac / 'train.csv'}:3: audio: no audio file for clip UDGBjjwyaqE_20" in msg
    assert f"{ac / 'val.csv'}:3: caption: empty caption" in msg
    assert f"{ac / 'val.csv'}:6: start_time: must be a number" in msg
    assert f"{ac / 'test.csv'}:7: row: expected 4 fields" in msg
    assert not out.exists()
    # the command line prints the same and exits 1
    assert audiocaps.main(["--corpus_dir", str(ac), "--out_dir", str(out)]) == 1
    assert f"{ac / 'val.csv'}:3: caption: empty caption" in capsys.readouterr().err


def test_audiocaps_skip_bad(ac, tmp_path, capsys):
    (ac / "audio" / "train" / "UDGBjjwyaqE_20.wav").unlink()
    lines = (ac / "val.csv").read_text(encoding="utf-8").splitlines()
    lines[2] = '102,zYsmu8oMuL8,30,""'
    (ac / "val.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    assert audiocaps.main(["--corpus_dir", str(ac), "--out_dir", str(out), "--skip_bad"]) == 0
    assert "skipped 2 bad row(s)" in capsys.readouterr().out
    skipped = _jsonl(out / "skipped.jsonl")
    assert [(Path(s["file"]).name, s["line"], s["split"]) for s in skipped] == [("train.csv", 3, "train"),
                                                                                 ("val.csv", 3, "val")]
    assert skipped[0]["reasons"][0].startswith("audio: no audio file")
    assert skipped[0]["row"]["youtube_id"] == "UDGBjjwyaqE"
    assert skipped[1]["reasons"] == ["caption: empty caption"]
    assert [r["key"] for r in _jsonl(out / "train.jsonl")] == ["r1nicOVtvkQ_130", "-xPD8oOXOsA_0"]
    dev = _jsonl(out / "dev.jsonl")
    assert len(dev[0]["text"]) == 4 and "102" not in dev[0]["audiocap_ids"]
    # a clean run afterwards removes the stale side file
    _wav(ac / "audio" / "train" / "UDGBjjwyaqE_20.wav")
    (ac / "val.csv").write_text("\n".join(lines[:2] + lines[3:]) + "\n", encoding="utf-8")
    assert audiocaps.main(["--corpus_dir", str(ac), "--out_dir", str(out)]) == 0
    assert not (out / "skipped.jsonl").exists()


def test_audiocaps_file_level_errors(ac, tmp_path):
    (ac / "test.csv").write_text("id,youtube,start,text\n1,a,0,b\n", encoding="utf-8")
    with pytest.raises(audiocaps.PrepError, match=r"test\.csv:1: header: expected audiocap_id,youtube_id"):
        audiocaps.prepare(ac, tmp_path / "o", skip_bad=True)
    (ac / "test.csv").unlink()
    with pytest.raises(audiocaps.PrepError, match=r"AudioCaps test\.csv not found"):
        audiocaps.prepare(ac, tmp_path / "o")


# ----------------------------------------------------------------------------- Clotho

CL_HEADER = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"


def _cl_row(name, caps):
    return ",".join([name] + [f'"{c}"' if "," in c or "\n" in c else c for c in caps]) + "\n"


@pytest.fixture
def cl(tmp_path):
    """Clotho v2: clotho_captions_<split>.csv, audio in <split>/ (development, evaluation) and in
    clotho_audio_validation/; the evaluation CSV inside clotho_csv_files/."""
    d = tmp_path / "clotho"
    dev_caps = {
        "Distorted AM Radio noise.wav": ["a radio is tuned, with static and whistles"]
        + [f"radio noise {i}" for i in range(4)],
        "Footsteps on gravel.wav": [f"someone walks on gravel {i}" for i in range(5)],
        "birds_morning.wav": ["birds sing, then a car passes, then birds sing again"]
        + [f"birds {i}" for i in range(4)],
    }
    d.mkdir()
    (d / "clotho_captions_development.csv").write_text(CL_HEADER + "".join(_cl_row(n, c) for n, c in dev_caps.items()),
                                                       encoding="utf-8")
    (d / "clotho_captions_validation.csv").write_text(
        CL_HEADER + _cl_row("rain.wav", [f"rain falls {i}" for i in range(5)]), encoding="utf-8")
    (d / "clotho_csv_files").mkdir()
    (d / "clotho_csv_files" / "clotho_captions_evaluation.csv").write_text(
        CL_HEADER + _cl_row("door.wav", [f"a door creaks {i}" for i in range(5)]), encoding="utf-8")
    for n in dev_caps:
        _wav(d / "development" / n, sr=44100)
    _wav(d / "clotho_audio_validation" / "rain.wav", sr=44100)
    _wav(d / "evaluation" / "door.wav", sr=44100)
    return d


def test_clotho_prepare(cl, tmp_path):
    out = tmp_path / "data"
    st = clotho.prepare(cl, out)
    assert st["clips"] == {"train": 3, "dev": 1, "test": 1} and st["captions"] == {"train": 15, "dev": 5, "test": 5}
    train = _jsonl(out / "train.jsonl")
    assert [r["key"] for r in train] == ["Distorted_AM_Radio_noise", "Footsteps_on_gravel", "birds_morning"]
    assert train[0]["text"][0] == "a radio is tuned, with static and whistles" and len(train[0]["text"]) == 5
    assert train[2]["text"][0] == "birds sing, then a car passes, then birds sing again"
    assert train[0]["file_name"] == "Distorted AM Radio noise.wav"
    assert train[0]["audio"] == str((cl / "development" / "Distorted AM Radio noise.wav").resolve())
    assert all(r["task"] == "caption" and r["dataset"] == "clotho" and r["split"] == "train" for r in train)
    dev = _jsonl(out / "dev.jsonl")
    assert dev[0]["audio"].endswith("clotho_audio_validation/rain.wav") and dev[0]["split"] == "dev"
    assert _jsonl(out / "test.jsonl")[0]["key"] == "door"
    for name in ("train", "dev", "test"):
        read_manifest(out / f"{name}.jsonl", require=("text",))


def test_clotho_bad_rows_and_skip(cl, tmp_path, capsys):
    path = cl / "clotho_captions_development.csv"
    text = path.read_text(encoding="utf-8")
    text += _cl_row("multi.wav", ["a caption over\ntwo lines"] + [f"m {i}" for i in range(4)])  # lines 5-6
    text += _cl_row("empty.wav", ["fine", "", "fine", "fine", "fine"])                        # line 7
    text += "short.wav,only one caption\n"                                                    # line 8
    text += _cl_row("missing.wav", [f"no audio {i}" for i in range(5)])                       # line 9
    path.write_text(text, encoding="utf-8")
    for n in ("multi.wav", "empty.wav", "short.wav"):
        _wav(cl / "development" / n)
    out = tmp_path / "data"
    with pytest.raises(clotho.PrepError) as err:
        clotho.prepare(cl, out)
    msg = str(err.value)
    assert "3 problem(s)" in msg
    assert f"{path}:7: caption_2: empty caption" in msg
    assert f"{path}:8: row: expected 6 fields" in msg
    assert f"{path}:9: audio: no audio file 'missing.wav'" in msg
    assert not out.exists()
    assert clotho.main(["--corpus_dir", str(cl), "--out_dir", str(out), "--skip_bad"]) == 0
    assert "skipped 3 bad row(s)" in capsys.readouterr().out
    skipped = _jsonl(out / "skipped.jsonl")
    assert [s["line"] for s in skipped] == [7, 8, 9]
    assert skipped[0]["row"]["file_name"] == "empty.wav" and skipped[0]["split"] == "development"
    train = _jsonl(out / "train.jsonl")
    assert [r["key"] for r in train][-1] == "multi" and train[-1]["text"][0] == "a caption over\ntwo lines"


def test_clotho_duplicate_and_header(cl, tmp_path):
    path = cl / "clotho_captions_validation.csv"
    with open(path, "a", encoding="utf-8") as f:
        f.write(_cl_row("rain.wav", [f"again {i}" for i in range(5)]))
    with pytest.raises(clotho.PrepError, match=r"validation\.csv:3: file_name: duplicate file_name 'rain.wav' "
                                               r"\(first on line 2\)"):
        clotho.prepare(cl, tmp_path / "o")
    path.write_text("name,caption\nrain.wav,x\n", encoding="utf-8")
    with pytest.raises(clotho.PrepError, match=r"validation\.csv:1: header: expected file_name,caption_1"):
        clotho.prepare(cl, tmp_path / "o", skip_bad=True)


# ----------------------------------------------------------------------------- split_train

def test_split_train_relative_paths(smoke, tmp_path):
    src, _ = smoke
    out = tmp_path / "deeper" / "split"
    args = ["--train", str(src / "teacher_train.jsonl"), "--dev", str(src / "dev.jsonl"),
            "--test", str(src / "test.jsonl"), "--out_dir", str(out), "--student_labelled", "8",
            "--teacher_share", "0.5", "--seed", "3"]
    assert split_train.main(args) == 0
    train = _jsonl(src / "teacher_train.jsonl")
    got = {s: _jsonl(out / f"{s}.jsonl") for s in SPLITS}
    assert {s: len(r) for s, r in got.items()} == {"teacher_train": 24, "student_labelled": 8, "unlabelled": 16,
                                                   "dev": 8, "test": 16}
    keys = [r["key"] for s in ("teacher_train", "student_labelled", "unlabelled") for r in got[s]]
    assert sorted(keys) == sorted(r["key"] for r in train)  # a partition of the clips
    for s in SPLITS:
        for r in got[s]:
            assert not os.path.isabs(r["audio"]) and (out / r["audio"]).resolve() == (src / "wav" / f"{r['key']}.wav")
        read_manifest(out / f"{s}.jsonl", require=() if s == "unlabelled" else ("text",))
    assert all("text" not in r and "questions" not in r for r in got["unlabelled"])
    ref = _jsonl(out / "unlabelled_reference.jsonl")
    by_key = {r["key"]: r for r in train}
    assert all(r["text"] == by_key[r["key"]]["text"] and r["questions"] == by_key[r["key"]]["questions"] for r in ref)
    corpus = (out / "text_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert corpus[:5] == ["Describe the audio.", "Caption:", "Question:", "Choices:", "Answer:"]
    assert set(got["teacher_train"][0]["text"]) <= set(corpus)
    # the same seed gives the same split, another seed another one
    out2 = tmp_path / "again"
    assert split_train.main([*args[:7], str(out2), *args[8:]]) == 0
    assert _jsonl(out2 / "student_labelled.jsonl") == [
        dict(r, audio=os.path.relpath(out / r["audio"], out2)) for r in got["student_labelled"]]
    out3 = tmp_path / "other"
    assert split_train.main([*args[:7], str(out3), *args[8:-1], "4"]) == 0
    assert [r["key"] for r in _jsonl(out3 / "teacher_train.jsonl")] != [r["key"] for r in got["teacher_train"]]


def test_split_train_absolute_paths_and_errors(ac, tmp_path):
    data = tmp_path / "data"
    audiocaps.prepare(ac, data)
    out = tmp_path / "split"
    base = ["--train", str(data / "train.jsonl"), "--dev", str(data / "dev.jsonl"), "--test",
            str(data / "test.jsonl"), "--out_dir", str(out)]
    assert split_train.main([*base, "--student_labelled", "1", "--teacher_share", "0.34"]) == 0
    rows = [r for s in ("teacher_train", "student_labelled", "unlabelled") for r in _jsonl(out / f"{s}.jsonl")]
    assert len(rows) == 3 and all(os.path.isabs(r["audio"]) and os.path.isfile(r["audio"]) for r in rows)
    with pytest.raises(SystemExit, match="cannot give"):
        split_train.main([*base, "--student_labelled", "5"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "a", "audio": "nope.wav", "task": "caption", "text": ["x"]}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: audio"):
        split_train.main(["--train", str(bad), *base[2:], "--student_labelled", "1"])
