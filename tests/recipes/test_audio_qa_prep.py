"""MMAU and MMSU prep scripts on tiny fixtures in the corpora's real layouts."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from core.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "audio_qa" / "local"
MMAU_FIXTURE = ROOT / "tests" / "resources" / "audio_qa" / "mmau"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"audio_qa_local_{name}", LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


mmau = _load("prepare_mmau")
mmsu = _load("prepare_mmsu")


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def _wav_bytes(seconds=0.1, sr=16000, freq=440.0):
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


# ----------------------------------------------------------------------------- MMAU

@pytest.fixture
def mmau_dir(tmp_path):
    """A copy of the committed fixture: mmau-test-mini.json + test-mini-audios/*.wav."""
    d = tmp_path / "MMAU"
    shutil.copytree(MMAU_FIXTURE, d)
    return d


def _items(d):
    return json.loads((d / "mmau-test-mini.json").read_text(encoding="utf-8"))


def _write_items(d, items):
    (d / "mmau-test-mini.json").write_text(json.dumps(items), encoding="utf-8")


def test_mmau_prepare(mmau_dir, tmp_path):
    out = tmp_path / "data" / "mmau_test.jsonl"
    st = mmau.prepare(mmau_dir / "mmau-test-mini.json", out)
    assert st == {"manifest": str(out), "rows": 3, "bad": 0, "bad_file": None, "answers": True}
    rows = _jsonl(out)
    items = _items(mmau_dir)
    assert [r["key"] for r in rows] == [it["id"] for it in items]
    r = rows[1]
    assert r["category"] == "Reasoning"  # one-element list flattened
    assert r["task"] == "qa" and r["domain"] == "sound" and r["benchmark"] == "mmau"
    assert r["sub_category"] == "Temporal Event Reasoning" and r["difficulty"] == "easy"
    assert r["dataset"] == "synthetic" and r["split"] == "test-mini"
    assert r["mmau_id"] == items[1]["id"] and r["audio_id"] == items[1]["audio_id"]
    assert r["audio"] == str((mmau_dir / "test-mini-audios" / f"{items[1]['id']}.wav").resolve())
    assert r["answer"] == "No, it is not present." and r["choices"] == items[1]["choices"]
    assert rows[2]["domain"] == "music" and rows[2]["category"] == "Information Extraction"
    # the manifest passes the project's own checks, audio headers included
    got = read_manifest(out, require=("question", "choices", "answer"))
    assert len(got) == 3


def test_mmau_all_problems_at_once(mmau_dir, tmp_path):
    items = _items(mmau_dir)
    items[0]["answer"] = "Dog"                                       # not one of the choices
    (mmau_dir / "test-mini-audios" / f"{items[1]['id']}.wav").unlink()  # missing audio file
    del items[2]["question"]                                         # missing field
    items.append(dict(items[0], answer="Man"))                       # duplicate id
    _write_items(mmau_dir, items)
    out = tmp_path / "mmau.jsonl"
    with pytest.raises(mmau.PrepError) as err:
        mmau.prepare(mmau_dir / "mmau-test-mini.json", out)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert f"item 0 (id {items[0]['id']}): answer: 'Dog' is not one of the choices" in msg
    assert f"item 1 (id {items[1]['id']}): audio_id: no such audio file" in msg
    assert f"item 2 (id {items[2]['id']}): question: missing" in msg
    assert "item 3" in msg and "duplicate id (first at item 0)" in msg
    assert not out.exists()


def test_mmau_skip_bad(mmau_dir, tmp_path):
    items = _items(mmau_dir)
    items[0]["answer"] = "Dog"
    _write_items(mmau_dir, items)
    out = tmp_path / "mmau.jsonl"
    rc = mmau.main(["--json", str(mmau_dir / "mmau-test-mini.json"), "--out", str(out), "--skip_bad"])
    assert rc == 0
    assert [r["key"] for r in _jsonl(out)] == [items[1]["id"], items[2]["id"]]
    bad = _jsonl(f"{out}.bad.jsonl")
    assert len(bad) == 1 and bad[0]["index"] == 0 and bad[0]["id"] == items[0]["id"]
    assert "answer" in bad[0]["reasons"][0] and bad[0]["item"]["answer"] == "Dog"


def test_mmau_bad_json_and_cli_error(mmau_dir, tmp_path, capsys):
    (mmau_dir / "mmau-test-mini.json").write_text('[{"id": "x",', encoding="utf-8")
    rc = mmau.main(["--json", str(mmau_dir / "mmau-test-mini.json"), "--out", str(tmp_path / "m.jsonl")])
    assert rc == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_mmau_test_split_without_answers(mmau_dir, tmp_path):
    items = _items(mmau_dir)
    for it in items:
        del it["answer"]
    _write_items(mmau_dir, items)
    out = tmp_path / "mmau_test.jsonl"
    st = mmau.prepare(mmau_dir / "mmau-test-mini.json", out)
    assert st["rows"] == 3 and st["answers"] is False
    rows = _jsonl(out)
    assert all("answer" not in r and r["answer_missing"] is True for r in rows)
    # only some answers missing: those items are errors
    items[0]["answer"] = "Man"
    _write_items(mmau_dir, items)
    with pytest.raises(mmau.PrepError, match="item 1 .*answer: missing"):
        mmau.prepare(mmau_dir / "mmau-test-mini.json", out)


def test_mmau_audio_dir(mmau_dir, tmp_path):
    """--audio_dir: the JSON elsewhere than its audio folder."""
    json_copy = tmp_path / "meta" / "mmau-test-mini.json"
    json_copy.parent.mkdir()
    shutil.copy(mmau_dir / "mmau-test-mini.json", json_copy)
    with pytest.raises(mmau.PrepError, match="no such audio file"):
        mmau.prepare(json_copy, tmp_path / "a.jsonl")
    st = mmau.prepare(json_copy, tmp_path / "a.jsonl", audio_dir=str(mmau_dir))
    assert st["rows"] == 3


# ----------------------------------------------------------------------------- MMSU

def _mmsu_records(n=3):
    recs = []
    for i in range(n):
        recs.append({
            "id": f"mmsu_{i:03d}", "question": f"What does the speaker mean? ({i})",
            "choice_a": "yes", "choice_b": "no", "choice_c": "maybe", "choice_d": "unsure",
            "answer_gt": ["yes", "no", "maybe"][i % 3], "task_name": "intent_detection",
            "category": "reasoning", "sub-category": "semantics", "sub-sub-category": "intent",
            "linguistics_sub_discipline": "pragmatics",
            "audio": {"bytes": _wav_bytes(freq=300 + 100 * i), "path": f"mmsu_{i:03d}.wav"},
        })
    return recs


def _to_parquet(recs, path):
    """Like the HF repository: a parquet file whose audio column is an (encoded) Audio feature."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_list(recs).cast_column("audio", datasets.Audio())
    ds.to_parquet(str(path))


def test_mmsu_prepare_parquet(tmp_path):
    recs = _mmsu_records()
    recs[2]["choice_d"] = None  # a 3-choice item
    _to_parquet(recs, tmp_path / "MMSU" / "data" / "train-00000-of-00001.parquet")
    out = tmp_path / "data" / "mmsu_test.jsonl"
    st = mmsu.prepare(tmp_path / "MMSU", out)
    assert st["rows"] == 3 and st["written_audio"] == 3 and st["bad"] == 0
    rows = _jsonl(out)
    r = rows[0]
    assert r["key"] == "mmsu_000" and r["mmsu_id"] == "mmsu_000"
    assert r["audio"] == "mmsu_test_audio/mmsu_000.wav"  # relative to the manifest's folder
    assert r["choices"] == ["yes", "no", "maybe", "unsure"] and r["answer"] == "yes"
    assert r["task"] == "qa" and r["dataset"] == "MMSU" and r["benchmark"] == "mmsu"
    assert r["category"] == "reasoning" and r["sub_category"] == "semantics"
    assert r["task_name"] == "intent_detection" and r["sub_sub_category"] == "intent"
    assert "choice_a" not in r and "answer_gt" not in r
    assert rows[2]["choices"] == ["yes", "no", "maybe"] and rows[2]["answer"] == "maybe"
    got = read_manifest(out, require=("question", "choices", "answer"))  # headers checked
    x, sr = sf.read(got[1]["audio"])
    ref, _ = sf.read(io.BytesIO(recs[1]["audio"]["bytes"]))
    assert sr == 16000 and np.allclose(x, ref, atol=1e-4)


def test_mmsu_json_paths_and_saved_dataset(tmp_path):
    # JSONL with audio paths relative to the data folder
    d = tmp_path / "mmsu_json"
    (d / "audio").mkdir(parents=True)
    recs = _mmsu_records(2)
    for r in recs:
        (d / "audio" / f"{r['id']}.wav").write_bytes(r["audio"]["bytes"])
        r["audio"] = f"audio/{r['id']}.wav"
    (d / "mmsu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    st = mmsu.prepare(d, tmp_path / "a.jsonl")
    assert st["rows"] == 2 and st["written_audio"] == 0
    assert _jsonl(tmp_path / "a.jsonl")[0]["audio"] == str(d / "audio" / "mmsu_000.wav")
    # a save_to_disk DatasetDict, audio as array + sampling_rate
    recs = _mmsu_records(2)
    for r in recs:
        r["audio"] = {"array": [0.0, 0.1, -0.1, 0.2] * 100, "sampling_rate": 8000, "path": None}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "saved"))
    st = mmsu.prepare(tmp_path / "saved", tmp_path / "b.jsonl", split="train")
    assert st["rows"] == 2 and st["written_audio"] == 2
    x, sr = sf.read(tmp_path / _jsonl(tmp_path / "b.jsonl")[1]["audio"])
    assert sr == 8000 and len(x) == 400


def test_mmsu_all_problems_at_once(tmp_path):
    recs = _mmsu_records(5)                          # item 0 is good: its wav is written, then removed
    recs[1]["answer_gt"] = "perhaps"                 # not one of the choices
    recs[2]["audio"] = {"bytes": b"not a wav file", "path": "x.wav"}
    recs[3]["choice_b"] = None                       # gap: choice_c and choice_d are set
    recs[4]["question"] = ""
    _to_parquet(recs, tmp_path / "MMSU" / "test.parquet")
    out = tmp_path / "mmsu.jsonl"
    with pytest.raises(mmsu.PrepError) as err:
        mmsu.prepare(tmp_path / "MMSU", out)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "item 1 (id mmsu_001): answer_gt: 'perhaps' is not one of the choices" in msg
    assert "item 2 (id mmsu_002): audio: undecodable audio bytes" in msg
    assert "item 3 (id mmsu_003): choice_b: empty while a later choice is set" in msg
    assert "item 4 (id mmsu_004): question: missing or empty" in msg
    assert not out.exists() and not list(tmp_path.glob("mmsu_audio/*.wav"))


def test_mmsu_skip_bad_and_cli(tmp_path):
    recs = _mmsu_records(3)
    recs[1]["answer_gt"] = "perhaps"
    recs[2]["audio"] = "missing/file.wav"
    # a JSON list file with mixed audio forms does not fit one Arrow column: use paths for all
    (tmp_path / "MMSU" / "wav").mkdir(parents=True)
    for r in recs[:2]:
        (tmp_path / "MMSU" / "wav" / f"{r['id']}.wav").write_bytes(r["audio"]["bytes"])
        r["audio"] = f"wav/{r['id']}.wav"
    recs.append(dict(recs[0]))                       # duplicate id
    (tmp_path / "MMSU" / "mmsu.json").write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "out" / "mmsu.jsonl"
    rc = mmsu.main(["--data", str(tmp_path / "MMSU"), "--out", str(out), "--skip_bad"])
    assert rc == 0
    assert [r["key"] for r in _jsonl(out)] == ["mmsu_000"]
    bad = _jsonl(f"{out}.bad.jsonl")
    assert [b["id"] for b in bad] == ["mmsu_001", "mmsu_002", "mmsu_000"]
    assert bad[2]["index"] == 3 and bad[2]["reasons"] == ["id: duplicate id (first at item 0)"]
    assert bad[0]["reasons"] == ["answer_gt: 'perhaps' is not one of the choices "
                                 "['yes', 'no', 'maybe', 'unsure']"]
    assert bad[1]["reasons"][0].startswith("audio: no such audio file")
    rc = mmsu.main(["--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 1


# ----------------------------------------------------------------------------- both

def test_bad_out_and_nothing_left(mmau_dir, tmp_path, capsys):
    """--bad_out names the side file; when every item is bad it is still written, then the run fails."""
    items = _items(mmau_dir)
    for it in items:
        it["answer"] = "Dog"
    _write_items(mmau_dir, items)
    out, side = tmp_path / "mmau.jsonl", tmp_path / "side" / "mmau_bad.jsonl"
    rc = mmau.main(["--json", str(mmau_dir / "mmau-test-mini.json"), "--out", str(out), "--skip_bad",
                    "--bad_out", str(side)])
    assert rc == 1 and not out.exists() and len(_jsonl(side)) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: 4 problem(s):") and err.rstrip().endswith("no valid item left")

    recs = _mmsu_records(2)
    for r in recs:
        r["answer_gt"] = "perhaps"
    _to_parquet(recs, tmp_path / "MMSU" / "test.parquet")
    with pytest.raises(mmsu.PrepError, match="no valid record left") as e:
        mmsu.prepare(tmp_path / "MMSU", tmp_path / "mmsu.jsonl", skip_bad=True, bad_out=str(side))
    assert len(e.value.problems) == 3 and [b["id"] for b in _jsonl(side)] == ["mmsu_000", "mmsu_001"]
    assert not (tmp_path / "mmsu.jsonl").exists()


@pytest.mark.parametrize("script", ["prepare_mmau.py", "prepare_mmsu.py", "score.py"])
def test_cli_help(script):
    # local/ scripts import tools.*: run.sh puts the repository root on PYTHONPATH, as here
    res = subprocess.run([sys.executable, str(LOCAL / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0 and "--out" in res.stdout


# ----------------------------------------------------------------------------- run.sh stage 0, real corpora

def _mmau_train_json(tmp_path, n=10) -> Path:
    """An MMAU-layout training JSON of ``n`` items over the fixture's clips, in another folder."""
    items = json.loads((MMAU_FIXTURE / "mmau-test-mini.json").read_text())
    d = tmp_path / "train_json"
    shutil.copytree(MMAU_FIXTURE / "test-mini-audios", d / "test-mini-audios")
    out = [dict(items[i % len(items)], id=f"train_{i}") for i in range(n)]
    (d / "train.json").write_text(json.dumps(out))
    return d / "train.json"


def _stage0(args, cwd):
    return subprocess.run(["bash", str(ROOT / "recipes/audio_qa/run.sh"), "--stage", "0", "--stop_stage", "0", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("corpus", ["mmau", "mmsu"])
def test_run_sh_stage0_real_corpora(tmp_path, corpus):
    train_json = _mmau_train_json(tmp_path)
    args = ["--corpus", corpus, "--train_json", str(train_json.relative_to(tmp_path)), "--data", "qa_data",
            "--exp", "qa_exp"]
    if corpus == "mmau":
        args += ["--test_json", str(MMAU_FIXTURE / "mmau-test-mini.json")]
    else:
        _to_parquet(_mmsu_records(), tmp_path / "MMSU" / "test.parquet")
        args += ["--mmsu_dir", "MMSU"]
    # relative paths are taken from the caller's folder, not the recipe's
    proc = _stage0(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = tmp_path / "qa_data"
    rows = {n: read_manifest(data / f"{n}.jsonl") for n in ("train", "dev", "test", "base_sft")}
    assert len(rows["train"]) == 8 and len(rows["dev"]) == 2 and len(rows["base_sft"]) == 8
    for name, rs in rows.items():
        for r in rs:
            assert r["prompt"].startswith(r["question"]) and "target" in r, name
            assert Path(r["audio"]).is_file(), (name, r["audio"])  # audio paths still resolve
    lines = (data / "text_corpus.txt").read_text().splitlines()
    assert sum(line.startswith("<think>") for line in lines) == 10  # every training target
    if corpus == "mmsu":  # MMSU's scorer reads a letter: lettered choices, letter answers
        r = rows["test"][0]
        assert "A. yes | B. no" in r["prompt"] and r["target"].endswith("<answer>A</answer>")
    assert not (data / "stats.json").exists()


def test_run_sh_stage0_refuses_training_questions_without_answers(tmp_path):
    train_json = _mmau_train_json(tmp_path)
    items = json.loads(train_json.read_text())
    for it in items:
        it.pop("answer")
    train_json.write_text(json.dumps(items))
    proc = _stage0(["--corpus", "mmau", "--train_json", str(train_json), "--test_json",
                    str(MMAU_FIXTURE / "mmau-test-mini.json"), "--data", str(tmp_path / "data"),
                    "--exp", str(tmp_path / "exp")], cwd=tmp_path)
    assert proc.returncode != 0
    assert "need answers" in proc.stderr and str(train_json) in proc.stderr
