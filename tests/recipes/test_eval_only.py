"""``run.sh --eval_only true --model DIR`` of the recipes: one checkpoint scored on a test set in
its real layout (fixtures under tests/resources), with no training data and no training output;
the official score is the benchmark's own rule on the predictions file the run wrote."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cpu_env

RES = REPO / "tests" / "resources"


def _run(recipe: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(["bash", str(REPO / "recipes" / recipe / "run.sh"), *args], cwd=REPO, env=cpu_env(2),
                       capture_output=True, text=True, timeout=timeout)
    return p


def test_audio_qa_eval_only_on_mmau_test_mini(tiny, tmp_path):
    from core.rewards import string_match
    data, exp = tmp_path / "data", tmp_path / "exp"
    p = _run("audio_qa", "--eval_only", "true", "--model", str(tiny.student), "--corpus", "mmau",
             "--test_json", str(RES / "audio_qa" / "mmau" / "mmau-test-mini.json"),
             "--data", str(data), "--exp", str(exp))
    assert p.returncode == 0, p.stderr[-4000:]
    name = tiny.student.name
    res = json.loads((exp / "results.json").read_text())
    assert res["eval_only"] is True and res["settings"]["rule"] == "mmau"
    r = res[name]
    assert r["n"] == 3 and 0.0 <= r["acc"] <= 1.0
    # the official number is MMAU's string_match over the file we wrote, item by item
    items = json.loads((exp / "decode" / name / "mmau_predictions.json").read_text())
    assert len(items) == 3 and all("model_output" in it and it["task"] in ("sound", "music", "speech") for it in items)
    official = sum(string_match(it["answer"], it["model_output"], it["choices"]) for it in items) / len(items)
    assert r["acc_official"] == pytest.approx(official)
    # a released model is asked for the answer alone (no think/answer tags), with its choices
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    assert all(row["prompt"].endswith("Answer with the text of one choice.") and "<think>" not in row["prompt"]
               for row in rows)
    assert "official MMAU evaluation.py" in p.stdout
    assert not (exp / "base_sft").exists()  # nothing was trained


def test_eval_only_refuses_what_it_cannot_score(tiny, tmp_path):
    p = _run("audio_qa", "--eval_only", "true", "--corpus", "mmau", "--exp", str(tmp_path / "e"))
    assert p.returncode != 0 and "--eval_only needs --model DIR" in p.stderr
    p = _run("audio_qa", "--eval_only", "true", "--model", str(tmp_path), "--corpus", "mmau")
    assert p.returncode != 0 and "not a model folder (no config.json)" in p.stderr
    p = _run("audio_qa", "--eval_only", "true", "--model", str(tiny.student), "--corpus", "synthetic",
             "--exp", str(tmp_path / "e"))
    assert p.returncode != 0 and "--corpus mmau or mmsu" in p.stderr


def _mp4(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=32x32:rate=4:duration=1",
                    "-f", "lavfi", "-i", "sine=frequency=500:sample_rate=16000:duration=1", "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def av_sets(tmp_path_factory):
    """Daily-Omni (qa.json + Videos/<id>/<id>_video.mp4) and IntentBench (records + videos) in their
    real layouts, and a tiny Omni thinker."""
    from core.models import build_tiny_omni_thinker, train_tokenizer
    root = tmp_path_factory.mktemp("av_eval")
    clip = _mp4(root / "clip.mp4")
    daily = root / "Daily-Omni"
    for vid in ("vid_one", "vid_two"):
        (daily / "Videos" / vid).mkdir(parents=True)
        (daily / "Videos" / vid / f"{vid}_video.mp4").write_bytes(clip.read_bytes())
    (daily / "qa.json").write_text(json.dumps([
        {"Question": "What plays first?", "Choice": ["A. a bell", "B. a dog", "C. music", "D. rain"], "Answer": "A",
         "video_id": "vid_one", "Type": "AV Event Alignment", "video_category": "Daily Life", "video_duration": "30s"},
        {"Question": "Who speaks?", "Choice": ["A. a man", "B. a woman", "C. a child", "D. nobody"], "Answer": "C",
         "video_id": "vid_two", "Type": "Reasoning", "video_category": "Vlog", "video_duration": "60s"}]))
    ib = root / "IntentBench"
    for rel in ("social/v1.mp4", "deception/v2.mp4"):
        (ib / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ib / "videos" / rel).write_bytes(clip.read_bytes())
    (ib / "qa.json").write_text(json.dumps([
        {"problem": "Why does he smile?", "problem_type": "multiple choice",
         "options": ["A. happy", "B. nervous", "C. lying", "D. tired"], "solution": "<answer>A</answer>",
         "answer": "A", "video": "social/v1.mp4", "data_type": "video"},
        {"problem": "Is she telling the truth?", "problem_type": "judge", "solution": "<answer>no</answer>",
         "answer": "no", "video": "deception/v2.mp4", "data_type": "video"}]))
    tok = train_tokenizer(["what plays first a bell a dog", "who speaks a man a woman", "yes no A B C D"], 300, omni=True)
    build_tiny_omni_thinker(tok, hidden=32, layers=1, heads=2, audio_hidden=32, audio_layers=1, vision_hidden=32,
                            vision_depth=1, seed=0, out_dir=root / "thinker")
    return root, daily, ib


def test_audio_visual_eval_only_on_dailyomni_and_intentbench(av_sets, tmp_path):
    root, daily, ib = av_sets
    data, exp = tmp_path / "data", tmp_path / "exp"
    p = _run("audio_visual_grpo", "--eval_only", "true", "--model", str(root / "thinker"),
             "--dailyomni_dir", str(daily), "--intentbench_json", str(ib / "qa.json"),
             "--intentbench_video_root", str(ib / "videos"), "--num_frames", "2", "--max_new_tokens", "6",
             "--data", str(data), "--exp", str(exp))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((exp / "results.json").read_text())
    r = res["thinker"]
    assert res["eval_only"] is True and r["n"] == 4
    out = exp / "decode" / "thinker"
    daily_items = json.loads((out / "dailyomni_predictions.json").read_text())
    ib_file = json.loads((out / "intentbench_results.json").read_text())
    assert [d["video_id"] for d in daily_items] == ["vid_one", "vid_two"]
    assert [d["Choice"][0] for d in daily_items] == ["A. a bell", "A. a man"]
    assert len(ib_file["results"]) == 2 and "mean_acc" in ib_file["final_acc"][0]
    # the official score is the benchmarks' own rules on those files, written out here again:
    # Daily-Omni's prefix match, HumanOmniV2's first <answer> block (exact for multiple choice,
    # substrings yes/no for judge)
    import re

    def first_answer(t):
        m = re.search(r"<answer>\s*(.*?)\s*</answer>", t, re.DOTALL)
        return (m.group(1).strip() if m else "") or t

    daily_ok = [float(d["model_answer"].strip().upper().startswith(d["Answer"])) if d["model_answer"] else 0.0
                for d in daily_items]
    mc, judge = ib_file["results"]
    mc_ok = float(first_answer(mc["output"]).strip() == "A")
    j = first_answer(judge["output"]).lower()
    judge_ok = float("no" in j)  # the answer is "no" ("yes" is not in it)
    assert [mc["reward"], judge["reward"]] == [mc_ok, judge_ok]
    assert r["acc_official"] == pytest.approx((sum(daily_ok) + mc_ok + judge_ok) / 4)
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"].endswith("Answer with the letter of the correct option only.")
    assert "<answer>" in rows[2]["prompt"]  # IntentBench's scorer reads the answer tags
    assert not (exp / "sft").exists()


def test_asr_eval_only_on_librispeech_test_clean(tiny, tmp_path):
    """LibriSpeech's layout (<part>/<speaker>/<chapter>/*.flac + *.trans.txt), the tiny student
    scored with WER; the decoding length comes from the test transcripts (tools/gen_length.py)."""
    import soundfile as sf
    root = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    root.mkdir(parents=True)
    lines = []
    for i, row in enumerate(tiny.rows[:3]):
        uid = f"1089-134686-{i:04d}"
        wav, sr = sf.read(row["audio"], dtype="float32")
        sf.write(root / f"{uid}.flac", wav, sr)
        lines.append(f"{uid} {row['text'].upper()}")
    (root / "1089-134686.trans.txt").write_text("\n".join(lines) + "\n")
    data, exp = tmp_path / "data", tmp_path / "exp"
    p = _run("asr", "--eval_only", "true", "--model", str(tiny.student), "--corpus", "librispeech",
             "--corpus_dir", str(tmp_path / "LibriSpeech"), "--data", str(data), "--exp", str(exp))
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((exp / "results.json").read_text())
    r = res[tiny.student.name]
    assert res["eval_only"] is True and r["num_utts"] == 3 and r["wer"] >= 0
    gl = json.loads((exp / "gen_length.json").read_text())
    longest = max(len(tiny.tokenizer(x.split(" ", 1)[1], add_special_tokens=False)["input_ids"]) + 1 for x in lines)
    assert gl["longest_reference_tokens"] == longest and r["max_new_tokens"] == gl["max_new_tokens"] >= longest
    assert (exp / "decode" / tiny.student.name / "utt_errors.txt").is_file()
    assert "%WER" in p.stdout


def test_audio_caption_eval_only_on_audiocaps_test(tiny, tmp_path):
    """AudioCaps' layout (test.csv: audiocap_id,youtube_id,start_time,caption; audio/test/<yt>_<start>.wav),
    five captions per clip, scored with BLEU / ROUGE-L / CIDEr."""
    import shutil
    d = tmp_path / "audiocaps"
    (d / "audio" / "test").mkdir(parents=True)
    rows = ["audiocap_id,youtube_id,start_time,caption"]
    for i, row in enumerate(tiny.rows[:2]):
        yt = f"clip{i}xxxxxx"
        shutil.copy(row["audio"], d / "audio" / "test" / f"{yt}_10.wav")
        rows += [f"{100 * i + j},{yt},10,{row['text']} caption {j}" for j in range(5)]
    (d / "test.csv").write_text("\n".join(rows) + "\n")
    data, exp = tmp_path / "data", tmp_path / "exp"
    p = _run("audio_caption", "--eval_only", "true", "--model", str(tiny.student), "--corpus", "audiocaps",
             "--corpus_dir", str(d), "--data", str(data), "--exp", str(exp), "--max_new_tokens", "8")
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((exp / "results.json").read_text())
    m = res[tiny.student.name]
    assert res["eval_only"] is True and res["decode"][tiny.student.name]["num_clips"] == 2
    assert {"BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr"} <= set(m) and all(v >= 0 for v in m.values())
    assert len((exp / "decode" / tiny.student.name / "hyp.jsonl").read_text().splitlines()) == 2
