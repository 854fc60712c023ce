"""LibriSpeech and AISHELL-1 prep scripts on tiny fixtures in the corpora's real layout."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "asr" / "local"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"asr_local_{name}", LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


librispeech = _load("prepare_librispeech")
aishell = _load("prepare_aishell")


def _audio(path: Path, seconds=0.3, sr=16000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr)).astype(np.float32)
    sf.write(str(path), x, sr)


def _lines(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- LibriSpeech

@pytest.fixture
def libri(tmp_path):
    """LibriSpeech/{dev-clean,test-clean}/<spk>/<chapter>/ with a few unmatched items."""
    root = tmp_path / "corpus" / "LibriSpeech"
    # dev-clean: 2 speakers; one flac without transcript line, one line without flac
    d = root / "dev-clean" / "1272" / "128104"
    for u in ("0000", "0001", "0002"):
        _audio(d / f"1272-128104-{u}.flac")
    _lines(d / "1272-128104.trans.txt", ["1272-128104-0000 MISTER QUILTER IS THE APOSTLE",
                                         "1272-128104-0001 NOR IS MISTER QUILTER'S MANNER"])
    d = root / "dev-clean" / "2277" / "149896"
    _audio(d / "2277-149896-0000.flac")
    _lines(d / "2277-149896.trans.txt", ["2277-149896-0000 HE WAS IN A FEVERED STATE",
                                         "2277-149896-0001 HE SAID NOTHING"])
    # test-clean: everything matched
    d = root / "test-clean" / "1089" / "134686"
    for u in ("0000", "0001"):
        _audio(d / f"1089-134686-{u}.flac")
    _lines(d / "1089-134686.trans.txt", ["1089-134686-0000 HE HOPED THERE WOULD BE STEW",
                                         "1089-134686-0001 STUFF IT INTO YOU"])
    return tmp_path / "corpus"


def test_librispeech_prepare(libri, tmp_path):
    out = tmp_path / "data"
    stats = librispeech.prepare(libri, ["dev-clean", "test-clean"], out)

    dev = stats["dev-clean"]
    assert dev["utterances"] == 3
    assert dev["no_transcript"] == 1 and dev["no_audio"] == 1
    rows = _jsonl(out / "dev-clean.jsonl")
    assert [r["key"] for r in rows] == ["1272-128104-0000", "1272-128104-0001", "2277-149896-0000"]
    r = rows[0]
    assert r["text"] == "MISTER QUILTER IS THE APOSTLE"
    assert r["task"] == "asr" and r["speaker"] == "1272" and r["chapter"] == "128104"
    assert Path(r["audio"]).is_absolute() and Path(r["audio"]).name == "1272-128104-0000.flac"
    missing = (out / "dev-clean.missing.txt").read_text().splitlines()
    assert len(missing) == 2
    assert any(m.startswith("no_transcript\t") and m.split("\t")[1].endswith("1272-128104-0002.flac")
               for m in missing)
    assert any(m.startswith("no_audio\t2277-149896-0001\t") and "trans.txt:2" in m
               for m in missing)

    test = stats["test-clean"]
    assert test["utterances"] == 2 and test["no_transcript"] == 0 and test["no_audio"] == 0
    assert (out / "test-clean.missing.txt").read_text() == ""

    # the manifests pass the strict reader, media checks included
    assert len(read_manifest(out / "dev-clean.jsonl", require=("text",))) == 3


def test_librispeech_missing_part_fails_before_writing(libri, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="train-clean-100"):
        librispeech.prepare(libri, ["dev-clean", "train-clean-100"], out)
    assert not (out / "dev-clean.jsonl").exists()


def test_librispeech_cli(libri, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(LOCAL / "prepare_librispeech.py"), "--corpus_dir", str(libri),
         "--parts", "dev-clean", "test-clean", "--out_dir", str(out),
         "--map", "dev-clean=dev", "test-clean=test"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "dev-clean: 3 utterances" in proc.stdout
    assert "no_transcript=1" in proc.stdout and "no_audio=1" in proc.stdout
    assert len(_jsonl(out / "dev.jsonl")) == 3 and len(_jsonl(out / "test.jsonl")) == 2
    assert len((out / "dev.missing.txt").read_text().splitlines()) == 2

    bad = subprocess.run(
        [sys.executable, str(LOCAL / "prepare_librispeech.py"), "--corpus_dir", str(tmp_path / "x"),
         "--parts", "dev-clean", "--out_dir", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 1 and "dev-clean" in bad.stderr


# ----------------------------------------------------------------------------- AISHELL-1

def _aishell(base: Path):
    """data_aishell/{wav/{train,dev,test}/<spk>/<utt>.wav, transcript/...} with unmatched items."""
    wav = base / "wav"
    utts = {"train": ["BAC009S0002W0122", "BAC009S0002W0123", "BAC009S0003W0121"],
            "dev": ["BAC009S0724W0121", "BAC009S0724W0122"],
            "test": ["BAC009S0764W0121"]}
    for i, (split, ids) in enumerate(utts.items()):
        for j, u in enumerate(ids):
            _audio(wav / split / u[6:11] / f"{u}.wav", seed=10 * i + j)
    _lines(base / "transcript" / "aishell_transcript_v0.8.txt", [
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购",
        "BAC009S0002W0123 也 成为 地方 政府 的 眼中 钉",
        # BAC009S0003W0121 (train) has no line
        "BAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况",
        "BAC009S0724W0122 一二 线 城市 虽然 也 处于 调整 中",
        "BAC009S0764W0121 甚至 出现 交易 几乎 停滞 的 情况",
        "BAC009S0999W0999 这 条 没有 音频",  # no wav in any split
    ])


def test_aishell_prepare(tmp_path):
    _aishell(tmp_path / "corpus" / "data_aishell")
    out = tmp_path / "data"
    stats = aishell.prepare(tmp_path / "corpus", out)

    assert stats["train"]["utterances"] == 2 and stats["train"]["no_transcript"] == 1
    assert stats["dev"]["utterances"] == 2 and stats["dev"]["no_transcript"] == 0
    assert stats["test"]["utterances"] == 1
    assert stats["transcript"]["no_audio"] == 1

    rows = _jsonl(out / "train.jsonl")
    assert rows[0] == {"key": "BAC009S0002W0122", "audio": rows[0]["audio"],
                       "text": "而对楼市成交抑制作用最大的限购", "task": "asr", "language": "zh",
                       "speaker": "S0002"}
    assert Path(rows[0]["audio"]).is_absolute()
    assert all(" " not in r["text"] for s in ("train", "dev", "test")
               for r in _jsonl(out / f"{s}.jsonl"))

    missing = (out / "train.missing.txt").read_text().splitlines()
    assert len(missing) == 1 and missing[0].startswith("no_transcript\t")
    assert missing[0].split("\t")[1].endswith("BAC009S0003W0121.wav")
    assert (out / "dev.missing.txt").read_text() == ""
    no_audio = (out / "transcript.missing.txt").read_text().splitlines()
    assert len(no_audio) == 1 and no_audio[0].startswith("no_audio\tBAC009S0999W0999\t")

    for s in ("train", "dev", "test"):
        read_manifest(out / f"{s}.jsonl", require=("text",))


def test_aishell_accepts_data_aishell_folder_itself(tmp_path):
    _aishell(tmp_path / "data_aishell")
    stats = aishell.prepare(tmp_path / "data_aishell", tmp_path / "out")
    assert stats["dev"]["utterances"] == 2


def test_aishell_missing_pieces_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="AISHELL-1 not found"):
        aishell.prepare(tmp_path / "nothing", tmp_path / "out")
    base = tmp_path / "c" / "data_aishell"
    _aishell(base)
    (base / "transcript" / "aishell_transcript_v0.8.txt").unlink()
    with pytest.raises(FileNotFoundError, match="transcript"):
        aishell.prepare(tmp_path / "c", tmp_path / "out")


def test_aishell_cli(tmp_path):
    _aishell(tmp_path / "corpus" / "data_aishell")
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(LOCAL / "prepare_aishell.py"), "--corpus_dir",
         str(tmp_path / "corpus"), "--out_dir", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train: 2 utterances" in proc.stdout and "1 wav(s) without transcript" in proc.stdout
    assert "1 line(s) without a wav" in proc.stdout
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["dev.jsonl", "test.jsonl", "train.jsonl"]
