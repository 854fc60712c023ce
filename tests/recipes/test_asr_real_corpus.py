"""Stage 0 of the ASR recipe on small LibriSpeech / AISHELL-1 copies in their real layouts:
manifests, the speaker-disjoint split into teacher / labelled / unlabelled sets, and the
report of audio without a transcript."""
import json
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[2]


def _audio(path: Path, seed: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(4800)).astype(np.float32), 16000)


def _jsonl(p: Path):
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _run_stage0(tmp_path, corpus, corpus_dir):
    data = tmp_path / "data"
    proc = subprocess.run(["bash", str(ROOT / "recipes/asr/run.sh"), "--stage", "0", "--stop_stage", "0",
                           "--corpus", corpus, "--corpus_dir", str(corpus_dir), "--data", str(data),
                           "--exp", str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return data, proc.stdout + proc.stderr


def _check_split(data: Path):
    sets = {n: _jsonl(data / f"{n}.jsonl") for n in ("teacher_train", "student_labelled", "unlabelled", "dev", "test")}
    for n in ("teacher_train", "student_labelled", "unlabelled"):
        assert sets[n], n
    spk = {n: {r["speaker"] for r in sets[n]} for n in ("teacher_train", "student_labelled", "unlabelled")}
    assert not (spk["teacher_train"] & spk["student_labelled"])
    assert not (spk["teacher_train"] & spk["unlabelled"])
    assert not (spk["student_labelled"] & spk["unlabelled"])
    assert all("text" not in r for r in sets["unlabelled"])
    refs = {r["key"] for r in _jsonl(data / "unlabelled_reference.jsonl")}
    assert refs == {r["key"] for r in sets["unlabelled"]}
    assert (data / "text_corpus.txt").read_text().strip()
    return sets


def test_librispeech_stage0(tmp_path):
    root = tmp_path / "LibriSpeech"
    n = 0
    for part, speakers in (("train-clean-100", ["19", "26", "32", "39", "40", "60"]), ("dev-clean", ["84"]),
                           ("test-clean", ["1089"])):
        for spk in speakers:
            d = root / part / spk / "100"
            lines = []
            for u in range(2):
                uid = f"{spk}-100-{u:04d}"
                _audio(d / f"{uid}.flac", n)
                n += 1
                lines.append(f"{uid} HELLO WORLD NUMBER {u}")
            (d / f"{spk}-100.trans.txt").write_text("\n".join(lines) + "\n")
    # one flac without a transcript line: counted and reported, never silently dropped
    _audio(root / "train-clean-100" / "19" / "100" / "19-100-0009.flac", 99)
    data, out = _run_stage0(tmp_path, "librispeech", root)
    sets = _check_split(data)
    assert sum(len(sets[k]) for k in ("teacher_train", "student_labelled", "unlabelled")) == 12
    assert "19-100-0009" in (data / "raw" / "train.missing.txt").read_text()
    assert [r["text"] for r in sets["test"]] == ["HELLO WORLD NUMBER 0", "HELLO WORLD NUMBER 1"]


def test_aishell_stage0(tmp_path):
    base = tmp_path / "aishell" / "data_aishell"
    lines, n = [], 0
    for split, speakers in (("train", ["S0002", "S0003", "S0004", "S0005"]), ("dev", ["S0724"]), ("test", ["S0764"])):
        for spk in speakers:
            for u in range(2):
                uid = f"BAC009{spk}W{u:04d}"
                _audio(base / "wav" / split / spk / f"{uid}.wav", n)
                n += 1
                lines.append(f"{uid} 而 对 楼市 成交")
    _audio(base / "wav" / "train" / "S0002" / "BAC009S0002W0099.wav", 77)  # no transcript line
    (base / "transcript").mkdir(parents=True)
    (base / "transcript" / "aishell_transcript_v0.8.txt").write_text("\n".join(lines) + "\n")
    data, out = _run_stage0(tmp_path, "aishell", tmp_path / "aishell")
    sets = _check_split(data)
    assert sets["test"][0]["text"] == "而对楼市成交"  # word segmentation joined for CER
    assert "BAC009S0002W0099" in (data / "raw" / "train.missing.txt").read_text()
