"""recipes/audio_visual_grpo/local/score.py: letter extraction and every rule, worked by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "audio_visual_grpo" / "local"


def _load(name):
    mod_name = f"audio_visual_grpo_local_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


S = _load("score")


@pytest.mark.parametrize("text,letter", [
    ("<think>two red boxes</think><answer>B</answer>", "B"),   # the tag
    ("<think>x</think><answer> c </answer>", "C"),              # lowercase, spaces
    ("<answer>B. two</answer>", "B"),
    ("<answer>(D)</answer>", "D"),
    ("B", "B"),                                                 # bare letter at the start
    ("a", "A"),
    ("C) blue because ...", "C"),
    ("<think>A looks wrong</think>D", "D"),                    # reasoning removed first
    ("<think>x</think><answer>A</answer><answer>C</answer>", "C"),  # the last block
    ("Based on the video, A", None),                            # "Based" is not B
    ("Based on the video, the answer is B.", "B"),              # named after "answer is"
    ("The answer: (C)", "C"), ("I pick option D", "D"),
    ("the answer is a dog", None),                              # a lowercase word, not a letter
    ("<answer>E</answer>", None),                               # not one of four letters
    ("<answer>the green one</answer>", None),
    ("<think>unfinished", None),
    ("", None),
])
def test_extract_letter(text, letter):
    assert S.extract_letter(text) == letter


def test_letter_sets_and_yes_no():
    assert S.letter_set("A,C") == {"A", "C"} and S.letter_set("a, (c). ") == {"A", "C"}
    assert S.letter_set("none") == set()
    assert S.f1({"A", "C"}, {"A", "B", "C"}) == pytest.approx(0.8)   # P 1, R 2/3
    assert S.f1({"D"}, {"A", "B"}) == 0.0 and S.f1(set(), {"A"}) == 0.0
    assert S.yes_no("Yes, she is.") == "yes" and S.yes_no("NO") == "no" and S.yes_no("I know it") is None


ROWS = [  # synthetic / Daily-Omni rows (letter rule)
    {"key": "s1", "answer": "B", "Type": "count", "duration": 2.0, "choices": ["0", "1", "2", "3"]},
    {"key": "s2", "answer": "A", "Type": "count", "duration": 3.0, "choices": ["0", "1", "2", "3"]},
    {"key": "s3", "answer": "C", "Type": "motion", "duration": 2.0, "choices": ["l", "r", "u", "d"]},
    {"key": "d1", "answer": "D", "Type": "AV Event Alignment", "video_duration": "30s"},
]
HYPS = {"s1": "<think>voice: red</think><answer>B</answer>",  # right (tag)
        "s2": "a",                                               # right (bare, lowercase)
        "s3": "<think>moves</think><answer>the up one</answer>", # unparsed, wrong
        "d1": "B. because"}                                      # parsed, wrong


def test_letter_rule_breakdowns():
    res = S.score(ROWS, HYPS)
    assert res["acc"] == pytest.approx(0.5) and res["n"] == 4 and res["unparsed"] == 1
    # official (Daily-Omni): s1 "B" and s2 "a" start with their letters; s3, d1 do not
    assert res["acc_official"] == pytest.approx(0.5)
    assert res["by_type"] == {"AV Event Alignment": {"acc": 0.0, "n": 1, "acc_official": 0.0},
                              "count": {"acc": 1.0, "n": 2, "acc_official": 1.0},
                              "motion": {"acc": 0.0, "n": 1, "acc_official": 0.0}}
    assert res["by_duration"] == {"2s": {"acc": 0.5, "n": 2, "acc_official": 0.5},
                                  "30s": {"acc": 0.0, "n": 1, "acc_official": 0.0},
                                  "3s": {"acc": 1.0, "n": 1, "acc_official": 1.0}}
    assert res["by_rule"] == {"letter": {"acc": 0.5, "n": 4, "acc_official": 0.5}}
    assert res["format_rate"] == pytest.approx(0.5)
    assert res["pred_dist"]["count"] == {"B": 1, "A": 1} and res["pred_dist"]["motion"] == {"(unparsed)": 1}


IB_ROWS = [
    {"key": "m1", "problem_type": "multiple choice", "answer": "B"},
    {"key": "m2", "problem_type": "multiple choice", "answer": "B"},
    {"key": "e1", "problem_type": "emer_ov_mc", "answer": "A,B,C"},
    {"key": "e2", "problem_type": "emer_ov_mc", "answer": "A,B"},
    {"key": "j1", "problem_type": "judge", "answer": "Yes"},
    {"key": "j2", "problem_type": "judge", "answer": "No"},
    {"key": "j3", "problem_type": "judge", "answer": "No"},
]
IB_HYPS = {"m1": "<think>x</think><answer> B </answer>",   # exact match after strip: 1
           "m2": "<answer>B. nervous</answer>",             # not exact: 0
           "e1": "<answer>A, C</answer>",                   # F1 0.8
           "e2": "<answer>D</answer>",                      # F1 0
           "j1": "<answer>yes</answer>",                    # 1
           "j2": "<think>hm</think><answer>Yes.</answer>",  # 0
           "j3": "<answer>hard to say</answer>"}            # unparsed, 0


def test_intentbench_rules():
    assert S.score_one(IB_HYPS["e1"], IB_ROWS[2]) == (pytest.approx(0.8), True, "A,C")
    res = S.score(IB_ROWS, IB_HYPS)
    assert res["acc"] == pytest.approx((1 + 0 + 0.8 + 0 + 1 + 0 + 0) / 7)
    assert res["unparsed"] == 1
    # official: e1 "A, C" splits into "A" and " C" (0.4 against "A,B,C"), the rest as ours
    assert res["acc_official"] == pytest.approx((1 + 0 + 0.4 + 0 + 1 + 0 + 0) / 7)
    assert res["by_type"]["multiple choice"] == {"acc": 0.5, "n": 2, "acc_official": 0.5}
    assert res["by_type"]["emer_ov_mc"] == {"acc": pytest.approx(0.4), "n": 2, "acc_official": pytest.approx(0.2)}
    assert res["by_type"]["judge"] == {"acc": pytest.approx(1 / 3), "n": 3, "acc_official": pytest.approx(1 / 3)}
    assert res["by_duration"] == {}


def test_errors():
    with pytest.raises(ValueError, match="1 manifest key"):
        S.score(ROWS, {k: v for k, v in HYPS.items() if k != "s1"})
    with pytest.raises(ValueError, match="unknown problem_type 'numerical'"):
        S.score([{"key": "x", "answer": "1", "problem_type": "numerical"}], {"x": "1"})


def test_cli(tmp_path, capsys):
    man, hyp, out = tmp_path / "test.jsonl", tmp_path / "hyp.jsonl", tmp_path / "exp" / "score.json"
    man.write_text("".join(json.dumps(r) + "\n" for r in ROWS + IB_ROWS), encoding="utf-8")
    hyp.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in {**HYPS, **IB_HYPS}.items()),
                   encoding="utf-8")
    assert S.main(["--hyp", str(hyp), "--manifest", str(man), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 11 and res["unparsed"] == 2
    assert res["acc"] == pytest.approx((2 + 2.8) / 11)
    assert set(res) >= {"acc", "n", "by_type", "by_duration", "unparsed"}
    assert "acc 43.64% over 11" in capsys.readouterr().out
    # a bad manifest line is named file:line and field
    man.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"key": "z"}) + "\n", encoding="utf-8")
    assert S.main(["--hyp", str(hyp), "--manifest", str(man)]) == 1
    assert f"{man}:2: answer: missing" in capsys.readouterr().err


# Each benchmark's own rule on every output class, decided by hand from its code
# (Daily-Omni: test_model_api/test_utils.py evaluate_answer; IntentBench: HumanOmniV2's
# eval_humanomniv2.py), beside our lenient score.
DAILY_CLASSES = [  # output, official right, ours right   (answer B)
    ("B", True, True), ("b", True, True), ("B.", True, True), ("B. Facial treatment", True, True),
    ("(B)", False, True), ("The answer is B.", False, True),
    ("Based on the video, the answer is B.", True, True),      # official: "B" of "Based"
    ("Based on the video, the answer is C.", True, False),     # right by accident officially
    ("Answer: C", False, False), ("Definitely B", False, False),
    ("<think>x</think><answer>B</answer>", True, True),         # the file holds the answer block
    ("<answer>C</answer> then <answer>B</answer>", True, True),  # the file holds the last block's "B"
    ("", False, False)]


@pytest.mark.parametrize("output, official, ours", DAILY_CLASSES)
def test_dailyomni_official_and_lenient(output, official, ours):
    row = {"key": "v-0001", "video_id": "v", "question": "q?", "choices": ["w", "x", "y", "z"], "answer": "B",
           "Type": "Reasoning", "video_duration": "30s"}
    res = S.score([row], {"v-0001": output})
    assert res["acc_official"] == float(official) and res["acc"] == float(ours)
    item = S.official_predictions([row], {"v-0001": output})["dailyomni"][0]
    assert item["Choice"] == ["A. w", "B. x", "C. y", "D. z"] and item["Answer"] == "B"
    assert S.dailyomni_official(item["model_answer"], "B") == official == item["correct"]


IB_CLASSES = [  # output, problem_type, answer, official reward
    ("<answer>A</answer>", "multiple choice", "A", 1.0), ("<answer> A </answer>", "multiple choice", "A", 1.0),
    ("<answer>(A)</answer>", "multiple choice", "A", 0.0), ("<answer>a</answer>", "multiple choice", "A", 0.0),
    ("<answer>A.</answer>", "multiple choice", "A", 0.0),
    ("<answer>C</answer> <answer>A</answer>", "multiple choice", "A", 0.0),   # the first block
    ("A", "multiple choice", "A", 1.0),            # no block: the item's own output (see docstring)
    ("<answer>A,E</answer>", "emer_ov_mc", "A,E", 1.0), ("<answer>E,A</answer>", "emer_ov_mc", "A,E", 1.0),
    ("<answer>A,E,E</answer>", "emer_ov_mc", "A,E", 0.8), ("<answer>A</answer>", "emer_ov_mc", "A,E", 2 / 3),
    ("<answer>A, E</answer>", "emer_ov_mc", "A,E", 0.5), ("<answer>A,B</answer>", "emer_ov_mc", "A,E", 0.5),
    ("<answer>a,e</answer>", "emer_ov_mc", "A,E", 0.0),
    ("<answer>Yes</answer>", "judge", "Yes", 1.0), ("<answer>Eyes</answer>", "judge", "Yes", 1.0),
    ("<answer>Nope</answer>", "judge", "Yes", 0.0), ("<answer>Nope</answer>", "judge", "No", 1.0),
    ("<answer>I don't know</answer>", "judge", "No", 1.0), ("<answer>Yes</answer>", "judge", "No", 0.0),
]


@pytest.mark.parametrize("output, problem_type, answer, reward", IB_CLASSES)
def test_intentbench_official(output, problem_type, answer, reward):
    row = {"key": "i1", "problem_type": problem_type, "answer": answer, "video": "/v.mp4"}
    res = S.score([row], {"i1": output})
    assert res["acc_official"] == pytest.approx(reward)
    out = S.official_predictions([row], {"i1": output})["intentbench"]
    assert out["results"][0]["output"] == output and out["results"][0]["reward"] == pytest.approx(reward)
    assert out["final_acc"] == [{"mean_acc": pytest.approx(reward)}]


def test_official_files(tmp_path):
    written = S.write_official(tmp_path, ROWS + IB_ROWS, {**HYPS, **IB_HYPS})
    assert [p.name for p in written] == ["dailyomni_predictions.json", "intentbench_results.json"]
    daily = json.loads((tmp_path / "dailyomni_predictions.json").read_text())
    assert [d["correct"] for d in daily] == [True, True, False, False]
    ib = json.loads((tmp_path / "intentbench_results.json").read_text())
    assert ib["final_acc"][0]["mean_acc"] == pytest.approx(2.4 / 7) and len(ib["results"]) == 7
