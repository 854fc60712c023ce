"""audio_visual_grpo data: the synthetic corpus (checked against its own videos), Daily-Omni and
IntentBench prep on tiny fixtures in their real layouts, and prompt rendering."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.data.manifest import read_manifest
from core.data.video import load_video
from core.rewards import format_reward

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "audio_visual_grpo" / "local"

pytestmark = pytest.mark.skipif(any(shutil.which(x) is None for x in ("ffmpeg", "sox", "espeak-ng")),
                                reason="ffmpeg, sox and espeak-ng are needed (bash run.sh setup)")


def _load(name):
    mod_name = f"audio_visual_grpo_local_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


P = _load("prompt")
synth = _load("make_synthetic")
daily = _load("prepare_dailyomni")
intent = _load("prepare_intentbench")
score = _load("score")


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- prompts

def test_render_prompt_letters_once():
    row = {"question": "Which colour?", "choices": ["red", "green", "blue", "yellow"], "answer": "B"}
    assert P.render_prompt(row) == ("Which colour?\nA. red\nB. green\nC. blue\nD. yellow\n"
                                    "Think first, then answer as <think>...</think><answer>...</answer> "
                                    "with the letter of one choice.")
    lettered = dict(row, choices=["A. red", "B. green", "C. blue", "D. yellow"])
    assert P.render_prompt(lettered) == P.render_prompt(row)  # no "A. A. red"
    # a choice that merely starts like a label, out of order, is lettered normally
    odd = dict(row, choices=["B. minor", "A. major"])
    assert "A. B. minor\nB. A. major" in P.render_prompt(odd)
    assert P.render_target(row, "it is green") == "<think>it is green</think><answer>B</answer>"
    assert P.render_target(row) == f"<think>{P.DEFAULT_REASONING}</think><answer>B</answer>"
    assert P.render_prompt({"question": "Is she lying?", "problem_type": "judge"}).endswith("with Yes or No.")
    emer = P.render_prompt({"question": "Emotions?", "choices": ["happy", "sad"], "problem_type": "emer_ov_mc"})
    assert "A. happy\nB. sad\n" in emer and emer.endswith("separated by commas.")
    assert [P.strip_letter(c, i) for i, c in enumerate(["A. x", "(B) y", "C) z", "D: w", "plain"])] == \
        ["x", "y", "z", "w", "plain"]
    assert P.strip_letter("B. x", 0) == "B. x"  # the wrong letter is not a label
    assert P.is_lettered(["A. x", "B. y"]) and not P.is_lettered(["A. x", "y"])


# ----------------------------------------------------------------------------- synthetic corpus

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("avsynth")
    assert synth.main(["--out_dir", str(out), "--smoke", "--seed", "5"]) == 0
    return out


COLOUR_RGB = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1)}


def _mask(frame, colour):
    on = frame > 128
    want = COLOUR_RGB[colour]
    return np.all([on[..., i] == bool(want[i]) for i in range(3)], axis=0)


def _cell_colours(frame):
    """{colour: boxes} from the centre pixel of each grid cell."""
    out = {c: 0 for c in COLOUR_RGB}
    grid, cell = synth.GRID, synth.CELL
    for r in range(grid):
        for c in range(grid):
            px = frame[cell * r + cell // 2, cell * c + cell // 2]
            for name, rgb in COLOUR_RGB.items():
                if all((px[i] > 128) == bool(rgb[i]) for i in range(3)):
                    out[name] += 1
    return out


def _check_against_media(row, clip):
    """The row's answer, worked out again from the decoded frames and sound."""
    t, ans, spoken = row["Type"], row["answer_text"], row["spoken"]
    if t == "count":
        assert _cell_colours(clip.frames[len(clip.frames) // 2])[spoken] == int(ans)
    elif t == "colour_by_count":
        n = {"one": 1, "two": 2, "three": 3}[spoken]
        counts = _cell_colours(clip.frames[0])
        match = [c for c, k in counts.items() if k == n]
        assert (match[0] if match else "none of them") == ans
    elif t == "motion":
        first, last = (np.argwhere(_mask(clip.frames[i], spoken)).mean(0) for i in (0, -1))
        dy, dx = last - first
        got = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert got == ans
    elif t == "beep_colour":
        loud = np.nonzero(np.abs(clip.audio) > 0.2)[0]
        t_beep = loud.mean() / clip.sample_rate
        frame = clip.frames[int(t_beep / clip.duration * len(clip.frames))]
        shown = [c for c in COLOUR_RGB if _mask(frame, c).sum() > 50]
        assert shown == [ans]
    else:
        raise AssertionError(f"unknown Type {t}")


def test_synthetic_smoke(smoke):
    counts = {s: len(_jsonl(smoke / f"{s}.jsonl")) for s in ("train", "sft", "dev", "test")}
    assert counts == {"train": 32, "sft": 16, "dev": 8, "test": 16}
    rows = [r for s in counts for r in _jsonl(smoke / f"{s}.jsonl")]
    assert len({r["key"] for r in rows}) == len(rows) == len({r["video"] for r in rows})
    # the warm-up describes its own clips: none of them is a GRPO (train), sft, dev or test clip
    describe = _jsonl(smoke / "describe.jsonl")
    assert len(describe) == 32 and all(d["task"] == "av_describe" and d["target"] for d in describe)
    assert not {d["video"] for d in describe} & {r["video"] for r in rows}
    assert len({d["video"] for d in describe}) == 32
    for d in describe[:4]:
        assert load_video(smoke / d["video"], num_frames=8).has_audio
    base = _jsonl(smoke / "base_sft.jsonl")
    assert [r["key"] for r in base] == [r["key"] for r in describe + _jsonl(smoke / "sft.jsonl")]
    fields = {"key", "video", "task", "question", "choices", "answer", "answer_text", "Type", "duration",
              "prompt", "target"}
    types = set()
    for r in rows:
        assert fields <= set(r), r["key"]
        assert r["task"] == "av_qa" and r["answer"] in "ABCD" and len(r["answer"]) == 1
        assert len(r["choices"]) == 4 and r["choices"]["ABCD".index(r["answer"])] == r["answer_text"]
        assert r["prompt"] == P.render_prompt(r) and "\nA. " in r["prompt"] and "\nD. " in r["prompt"]
        assert format_reward([r["target"]]) == [1.0] and score.extract_letter(r["target"]) == r["answer"]
        assert not Path(r["video"]).is_absolute() and r["duration"] in (2.0, 3.0)
        types.add(r["Type"])
        clip = load_video(smoke / r["video"], num_frames=8)
        assert clip.has_audio and clip.frames.shape == (8, 64, 64, 3)
        assert clip.duration == pytest.approx(r["duration"], abs=0.01)
        assert len(clip.audio) == round(r["duration"] * 16000) and np.abs(clip.audio).max() > 0.05
        _check_against_media(r, clip)
    assert types == set(synth.TASKS)
    corpus = (smoke / "text_corpus.txt").read_text(encoding="utf-8")
    for r in rows[:10]:
        assert r["prompt"] in corpus and r["target"] in corpus
    assert "<answer>" in corpus.splitlines() and "none of them" in corpus.splitlines()
    stats = json.loads((smoke / "stats.json").read_text())
    assert stats["counts"] == dict(counts, describe=32) and sum(stats["test"]["Type"].values()) == 16
    assert not (smoke / ".audio_tmp").exists()
    # the videos pass the project's manifest checks (audio track included); answers there are
    # choice texts, so the rows are checked with answer_text in that field
    m = smoke / "as_text.jsonl"
    m.write_text("".join(json.dumps(dict(r, answer=r["answer_text"])) + "\n" for r in rows), encoding="utf-8")
    assert len(read_manifest(m, require=("question", "choices"))) == len(rows)


def test_synthetic_deterministic():
    voices = ["en-us", "en-gb"]
    a = synth.make_split("dev", 24, 7, voices)
    b = synth.make_split("dev", 24, 7, voices)
    c = synth.make_split("dev", 24, 8, voices)
    assert a == b and a[0] != c[0]
    shuffled = synth.make_split("dev", 24, 7, voices, shuffle_choices=True)[0]
    assert [r["answer_text"] for r in shuffled] == [r["answer_text"] for r in a[0]]
    assert any(r["choices"] != synth.CHOICES[r["Type"]] for r in shuffled)
    assert all(r["choices"][ord(r["answer"]) - 65] == r["answer_text"] for r in shuffled)


# ----------------------------------------------------------------------------- Daily-Omni

def _tiny_mp4(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=32x32:rate=4:duration=1", "-f", "lavfi", "-i",
                    "sine=frequency=500:sample_rate=16000:duration=1", "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-c:a", "aac", "-shortest", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def one_mp4(tmp_path_factory):
    return _tiny_mp4(tmp_path_factory.mktemp("mp4") / "x.mp4")


def _daily_records():
    return [
        {"Question": "What sound plays when the door opens?", "Choice": ["A. a bell", "B. a dog", "C. music", "D. rain"],
         "Answer": "A", "video_id": "vid_one", "Type": "AV Event Alignment", "video_category": "Daily Life",
         "video_duration": "30s", "content_parent_category": "Home", "content_fine_category": "Kitchen"},
        {"Question": "Who speaks first?", "Choice": ["A. the man", "B. the woman", "C. the child", "D. nobody"],
         "Answer": "c", "video_id": "vid_two", "Type": "Reasoning", "video_category": "Vlog",
         "video_duration": "60s"},  # no content_parent_category; lowercase answer
        {"Question": "What happens after the music stops?", "Choice": ["A. x", "B. y", "C. z", "D. w"],
         "Answer": "D", "video_id": "vid_one", "Type": "Event Sequence", "video_category": "Daily Life",
         "video_duration": "30s"},
    ]


@pytest.fixture
def daily_dir(tmp_path, one_mp4):
    d = tmp_path / "Daily-Omni"
    for vid in ("vid_one", "vid_two"):
        dst = d / "Videos" / vid / f"{vid}_video.mp4"
        dst.parent.mkdir(parents=True)
        shutil.copy(one_mp4, dst)
    (d / "qa.json").write_text(json.dumps(_daily_records()), encoding="utf-8")
    return d


def test_dailyomni_prepare(daily_dir, tmp_path):
    out = tmp_path / "data" / "dailyomni.jsonl"
    st = daily.prepare(daily_dir, out)
    assert st == {"manifest": str(out), "rows": 3, "bad": 0, "bad_file": None}
    rows = _jsonl(out)
    r0, r1 = rows[0], rows[1]
    assert r0["key"] == "vid_one-0000" and r1["key"] == "vid_two-0001"
    assert r0["video"] == str((daily_dir / "Videos" / "vid_one" / "vid_one_video.mp4").resolve())
    assert r0["choices"] == ["a bell", "a dog", "music", "rain"] and r0["answer"] == "A"
    assert r0["answer_text"] == "a bell" and r0["task"] == "av_qa" and r0["dataset"] == "daily-omni"
    assert r0["Type"] == "AV Event Alignment" and r0["video_duration"] == "30s"
    assert r0["content_parent_category"] == "Home" and r0["content_fine_category"] == "Kitchen"
    assert "content_parent_category" not in r1 and r1["answer"] == "C" and r1["answer_text"] == "the child"
    assert r0["prompt"].count("A. a bell") == 1 and "A. A." not in r0["prompt"]
    assert r0["prompt"].startswith("What sound plays when the door opens?\nA. a bell\nB. a dog\n")
    assert r0["target"].endswith("<answer>A</answer>")
    clip = load_video(r0["video"], num_frames=2)
    assert clip.has_audio


def test_dailyomni_bad_records_and_skip_bad(daily_dir, tmp_path, capsys):
    recs = _daily_records()
    recs[0]["Answer"] = "E"                                   # not a letter A-D
    recs[1]["Choice"] = recs[1]["Choice"][:3]                  # three choices
    recs.append(dict(recs[2], video_id="vid_missing"))         # no video
    recs.append(dict(recs[2], Choice=["B. x", "A. y", "C. z", "D. w"]))  # labels out of order
    (daily_dir / "qa.json").write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "d.jsonl"
    with pytest.raises(daily.PrepError) as err:
        daily.prepare(daily_dir, out)
    msg = str(err.value)
    assert "4 problem(s)" in msg and not out.exists()
    assert "qa.json: item 0 (id vid_one): Answer: must be one letter A-D, got 'E'" in msg
    assert "item 1 (id vid_two): Choice: needs exactly 4 choices (A-D), got 3" in msg
    assert "item 3 (id vid_missing): video_id: no such video file" in msg
    assert "item 4 (id vid_one): Choice: choice 0 is labelled 'B', expected 'A'" in msg
    rc = daily.main(["--corpus_dir", str(daily_dir), "--out", str(out)])
    assert rc == 1 and "no such video file" in capsys.readouterr().err
    rc = daily.main(["--corpus_dir", str(daily_dir), "--out", str(out), "--skip_bad"])
    assert rc == 0 and "skipped 4 bad record(s)" in capsys.readouterr().out
    assert [r["key"] for r in _jsonl(out)] == ["vid_one-0002"]
    bad = _jsonl(f"{out}.bad.jsonl")
    assert [b["index"] for b in bad] == [0, 1, 3, 4] and bad[0]["reasons"] == ["Answer: must be one letter A-D, got 'E'"]
    assert bad[2]["item"]["video_id"] == "vid_missing"


def test_dailyomni_not_a_list(daily_dir, tmp_path):
    (daily_dir / "qa.json").write_text('{"Question": "x"}', encoding="utf-8")
    with pytest.raises(daily.PrepError, match="expected a JSON list"):
        daily.prepare(daily_dir, tmp_path / "d.jsonl")


# ----------------------------------------------------------------------------- IntentBench

def _intent_records():
    return [
        {"problem": "Why does the man smile?", "problem_type": "multiple choice",
         "options": ["A. he is happy", "B. he is nervous", "C. he is lying", "D. he is tired"],
         "solution": "<think>he laughs</think><answer>A</answer>", "answer": "A", "video": "socialiq/v1.mp4",
         "data_type": "video", "content_parent_category": "social"},
        {"problem": "Which emotions does the speaker show?", "problem_type": "emer_ov_mc",
         "options": ["happy", "sad", "angry", "surprised", "worried"],
         "solution": "<answer>C, A</answer>", "video": "emer/v2.mp4", "data_type": "video"},  # no answer field
        {"problem": "Is the woman telling the truth?", "problem_type": "judge",
         "solution": "<think>she hesitates</think><answer>no</answer>", "answer": "no",
         "video": "deception/v3.mp4", "data_type": "video", "problem_id": 17},
    ]


@pytest.fixture
def intent_dir(tmp_path, one_mp4):
    d = tmp_path / "IntentBench"
    for rel in ("socialiq/v1.mp4", "emer/v2.mp4", "deception/v3.mp4"):
        (d / "videos" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(one_mp4, d / "videos" / rel)
    (d / "qa.json").write_text(json.dumps(_intent_records()), encoding="utf-8")
    return d


def test_intentbench_prepare(intent_dir, tmp_path):
    out = tmp_path / "ib.jsonl"
    st = intent.prepare(intent_dir / "qa.json", intent_dir / "videos", out)
    assert st["rows"] == 3 and st["bad"] == 0
    assert st["problem_types"] == {"multiple choice": 1, "emer_ov_mc": 1, "judge": 1}
    mc, emer, judge = _jsonl(out)
    assert mc["key"] == "intentbench-000000" and mc["problem_type"] == "multiple choice"
    assert mc["choices"] == ["he is happy", "he is nervous", "he is lying", "he is tired"]
    assert mc["answer"] == "A" and mc["answer_text"] == "he is happy" and mc["data_type"] == "video"
    assert mc["video"] == str((intent_dir / "videos" / "socialiq" / "v1.mp4").resolve())
    assert mc["content_parent_category"] == "social" and mc["Type"] == "multiple choice"
    assert mc["target"] == "<think>he laughs</think><answer>A</answer>"
    assert "A. he is happy\n" in mc["prompt"] and mc["prompt"].endswith("with the letter of one choice.")
    assert "content_parent_category" not in emer
    assert emer["answer"] == "A,C" and emer["answer_text"] == "happy; angry"
    assert emer["choices"][0] == "happy" and "E. worried" in emer["prompt"]
    assert emer["prompt"].endswith("separated by commas.")
    assert judge["key"] == "17" and judge["answer"] == "No" and "choices" not in judge
    assert judge["prompt"] == "Is the woman telling the truth?\n" + P.INSTRUCTIONS["judge"]
    # rows and the scorer agree: the reference answers score 1
    for r in (mc, emer, judge):
        assert score.score_one(r["target"], r)[0] == 1.0


def test_intentbench_bad_records_and_skip_bad(intent_dir, tmp_path):
    recs = _intent_records()
    recs[0]["solution"] = "<answer>F</answer>"                        # no option F
    recs[1]["problem_type"] = "numerical"                              # unsupported type
    recs[2]["video"] = "deception/missing.mp4"                         # no video
    recs.append(dict(_intent_records()[0], problem_id="p1"))
    recs.append(dict(_intent_records()[0], problem_id="p1"))           # duplicate id
    recs.append({k: v for k, v in _intent_records()[0].items() if k != "options"})  # MC without options
    (intent_dir / "qa.json").write_text(json.dumps(recs), encoding="utf-8")
    out = tmp_path / "ib.jsonl"
    with pytest.raises(intent.PrepError) as err:
        intent.prepare(intent_dir / "qa.json", intent_dir / "videos", out)
    msg = str(err.value)
    assert "5 problem(s)" in msg
    assert "item 0 (id None): solution: a multiple choice answer must be one letter of ABCD, got 'F'" in msg
    assert "item 1 (id None): problem_type: 'numerical' is not supported" in msg
    assert "item 2 (id 17): video: no such video file" in msg
    assert "item 4 (id p1): problem_id: duplicate id 'p1' (first at item 3)" in msg
    assert "item 5 (id None): options: missing (a multiple choice record needs its options)" in msg
    rc = intent.main(["--json", str(intent_dir / "qa.json"), "--video_root", str(intent_dir / "videos"),
                      "--out", str(out), "--skip_bad"])
    assert rc == 0
    assert [r["key"] for r in _jsonl(out)] == ["p1"]
    assert [b["index"] for b in _jsonl(f"{out}.bad.jsonl")] == [0, 1, 2, 4, 5]
