"""recipes/audio_qa/local/score.py: accuracies worked by hand, MMAU / MMSU rules, MMAU output."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / "recipes" / "audio_qa" / "local"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"audio_qa_local_{name}", LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


S = _load("score")
prepare_mmau = _load("prepare_mmau")

MAN = ["the man speaks", "the woman speaks"]
NUM = ["1", "2", "3"]
TEMPO = ["slow", "fast"]
#        key   choices answer             category  sub_category difficulty  hypothesis
CASES = [("k1", MAN, "the man speaks", "speech", "speaker", "easy",
          "<think>low voice</think><answer>the man speaks</answer>"),      # right, format ok
         ("k2", MAN, "the woman speaks", "speech", "speaker", "easy",
          "<think>x</think><answer>the man speaks</answer>"),              # wrong, format ok
         ("k3", NUM, "2", "sound", "count", "hard", "<answer>2</answer>"),  # right, no think
         ("k4", NUM, "3", "sound", "count", "hard", "B"),                   # B -> "2": wrong
         ("k5", TEMPO, "fast", "music", "tempo", "easy",
          "<think>quick</think><answer>B</answer>"),                        # B -> "fast": right
         ("k6", TEMPO, "slow", "music", "tempo", None, "")]                 # empty: wrong


def _rows():
    rows = []
    for key, choices, answer, cat, sub, diff, _ in CASES:
        r = {"key": key, "audio": f"{key}.wav", "task": "qa", "question": "q?", "choices": choices,
             "answer": answer, "category": cat, "sub_category": sub, "difficulty": diff}
        rows.append({k: v for k, v in r.items() if v is not None})
    return rows


def _hyps():
    return {c[0]: c[-1] for c in CASES}


def _write(tmp_path, rows, hyps):
    man, hyp = tmp_path / "test.jsonl", tmp_path / "hyp.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    hyp.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in hyps.items()),
                   encoding="utf-8")
    return man, hyp


def test_score_mmau_by_hand():
    res = S.score(_rows(), _hyps())
    # right: k1, k3, k5 -> 3 / 6
    assert res["rule"] == "mmau" and res["acc"] == pytest.approx(0.5) and res["n"] == 6
    half = {"acc": pytest.approx(0.5), "n": 2}
    assert res["by_category"] == {"music": half, "sound": half, "speech": half}
    assert res["by_task"] == {"count": half, "speaker": half, "tempo": half}
    assert res["by_difficulty"] == {"easy": {"acc": pytest.approx(2 / 3), "n": 3},  # k1 k2 k5
                                    "hard": half,                                   # k3 k4
                                    "(none)": {"acc": 0.0, "n": 1}}                 # k6
    assert res["by_domain"] == {}  # no row has a domain
    assert res["format_rate"] == pytest.approx(3 / 6)  # k1 k2 k5
    assert res["answer_dist"] == {"music": {"B": 1, "": 1}, "sound": {"2": 1, "B": 1},
                                  "speech": {"the man speaks": 2}}
    # without letter mapping k5's "B" is wrong
    assert S.score(_rows(), _hyps(), letters=False)["acc"] == pytest.approx(2 / 6)


def test_score_mmsu_by_hand():
    res = S.score(_rows(), _hyps(), rule="mmsu")
    # letters: k1/k2 "the man speaks" and k3 "2" have none (unparsed, as the official script
    # skips them); k4 B -> "2" != "3"; k5 B -> "fast" right; k6 empty: wrong, counted
    assert res["acc"] == pytest.approx(1 / 6) and res["n"] == 6
    assert res["n_unparsed"] == 3 and res["acc_official"] == pytest.approx(1 / 3)
    assert res["by_category"]["music"] == {"acc": pytest.approx(0.5), "n": 2}
    assert res["by_category"]["speech"] == {"acc": 0.0, "n": 2}


@pytest.mark.parametrize("pred, letter", [
    ("A", "A"), ("A.", "A"), ("(A)", "A"), ("A)", "A"), ("B: no", "B"), ("\nC\n", "C"),
    ("The answer is D.", "D"), ("the answer is (B)", "B"),
    ("Answer: C", "A"), ("All of them", "A"),  # the official rule's quirks: the first character wins
    ("b", None), ("E", None), ("None", None), ("", None), ("(B) no", None), ("2", None),
])
def test_mmsu_letter(pred, letter):
    assert S.mmsu_letter(pred) == letter


def test_mmsu_correct():
    ch = ["yes", "no", "maybe"]
    assert S.mmsu_correct("B", "no", ch)
    assert S.mmsu_correct("The answer is B.", "no", ch)
    assert not S.mmsu_correct("A", "no", ch)
    assert not S.mmsu_correct("no", "no", ch)          # text answers do not count under MMSU's rule
    assert not S.mmsu_correct("D", "no", ch)           # letter past the choices
    assert not S.mmsu_correct("B", "No", ch)           # exact string equality with the answer


def test_missing_hypotheses_and_extra_keys(tmp_path, capsys):
    hyps = _hyps()
    del hyps["k2"], hyps["k5"]
    hyps["zz"] = "B"
    with pytest.raises(ValueError, match=r"2 manifest key\(s\) have no hypothesis: k2, k5.*"
                                         r"1 hypothesis key\(s\) are not in the manifest: zz"):
        S.score(_rows(), hyps)
    man, hyp = _write(tmp_path, _rows(), hyps)
    assert S.main(["--manifest", str(man), "--hyp", str(hyp)]) == 1
    assert "k2, k5" in capsys.readouterr().err


def test_bad_hypothesis_file(tmp_path):
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text('{"key": "a", "text": "x"}\nnot json\n{"key": "a", "text": "y"}\n{"key": 1}\n')
    with pytest.raises(ValueError) as err:
        S.read_hyps(hyp)
    msg = str(err.value)
    assert f"{hyp}:2: malformed JSON" in msg and f"{hyp}:3: duplicate key 'a'" in msg and f"{hyp}:4:" in msg


def test_unknown_rule():
    with pytest.raises(ValueError, match="mmau, mmsu"):
        S.score(_rows(), _hyps(), rule="exact")


def test_cli_writes_results_and_table(tmp_path, capsys):
    man, hyp = _write(tmp_path, _rows(), _hyps())
    out = tmp_path / "exp" / "results.json"
    assert S.main(["--manifest", str(man), "--hyp", str(hyp), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res == json.loads(json.dumps(S.score(_rows(), _hyps())))
    table = capsys.readouterr().out
    assert "acc 50.00% over 6" in table and "speech" in table and "66.67%" in table


MMAU_FIELDS = ["id", "audio_id", "question", "choices", "answer", "dataset", "task", "split",
               "category", "sub-category", "difficulty", "model_output"]


def test_mmau_output_from_prepared_manifest(tmp_path):
    """prepare_mmau -> score --mmau_out: items in MMAU's official evaluation input format."""
    src = ROOT / "tests" / "resources" / "audio_qa" / "mmau"
    items = json.loads((src / "mmau-test-mini.json").read_text())
    man = tmp_path / "mmau.jsonl"
    prepare_mmau.prepare(src / "mmau-test-mini.json", man)
    hyps = {items[0]["id"]: "<think>deep voice</think><answer>Man</answer>",
            items[1]["id"]: "<answer>Yes, it is the second sound.</answer>",
            items[2]["id"]: "C"}
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps({"key": k, "text": t}) + "\n" for k, t in hyps.items()))
    pred_file, out = tmp_path / "mmau_predictions.json", tmp_path / "results.json"
    assert S.main(["--manifest", str(man), "--hyp", str(hyp), "--out", str(out),
                   "--mmau_out", str(pred_file)]) == 0
    preds = json.loads(pred_file.read_text())
    assert [list(p) for p in preds] == [MMAU_FIELDS] * 3
    for p, it in zip(preds, items):
        want = dict(it, category="Reasoning" if it["category"] == ["Reasoning"] else it["category"])
        assert {k: p[k] for k in it} == want  # every original field, category flattened
    assert [p["model_output"] for p in preds] == ["Man", "Yes, it is the second sound.", "C"]
    res = json.loads(out.read_text())
    # "Man" right, "the second sound" wrong, "C" -> "Fast" right
    assert res["acc"] == pytest.approx(2 / 3)
    assert res["by_domain"] == {"music": {"acc": 1.0, "n": 1}, "sound": {"acc": 0.5, "n": 2}}
    assert res["by_category"] == {"Information Extraction": {"acc": 1.0, "n": 1},
                                  "Reasoning": {"acc": 0.5, "n": 2}}


def test_mmau_output_fallbacks():
    items = S.mmau_items(_rows(), _hyps())
    assert [list(p) for p in items] == [MMAU_FIELDS] * 6
    p = items[2]
    assert p["id"] == "k3" and p["audio_id"] == "k3.wav" and p["sub-category"] == "count"
    assert p["task"] == "qa" and p["model_output"] == "2" and p["dataset"] is None


def test_rows_without_answer_are_not_scored(tmp_path, capsys):
    src = ROOT / "tests" / "resources" / "audio_qa" / "mmau"
    d = tmp_path / "MMAU"
    shutil.copytree(src, d)
    items = json.loads((d / "mmau-test-mini.json").read_text())
    for it in items:
        del it["answer"]
    (d / "mmau-test-mini.json").write_text(json.dumps(items))
    man = tmp_path / "mmau_test.jsonl"
    prepare_mmau.prepare(d / "mmau-test-mini.json", man)
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps({"key": it["id"], "text": "Man"}) + "\n" for it in items))
    pred_file = tmp_path / "sub.json"
    rc = S.main(["--manifest", str(man), "--hyp", str(hyp), "--mmau_out", str(pred_file),
                 "--out", str(tmp_path / "r.json")])
    assert rc == 1
    assert "3 row(s) have no answer" in capsys.readouterr().err
    preds = json.loads(pred_file.read_text())  # the file to submit is still written
    assert len(preds) == 3 and all("answer" not in p and p["model_output"] == "Man" for p in preds)
    assert not (tmp_path / "r.json").exists()


# MMAU's evaluation.py (github.com/Sakshi113/MMAU) on its own input file: every output class,
# decided by hand from its string_match rule; "ours" is the documented lenient score (letters
# mapped to their choice).
PEOPLE = ["Man", "Woman", "Child", "Robot"]
#            output                                   official  ours
MMAU_CLASSES = [("A", False, True), ("(A)", False, True), ("A.", False, True),
                ("a", False, False),                    # not a letter to us: one token "a"
                ("The answer is A.", False, False),
                ("Man", True, True), ("man", True, True), ("MAN.", True, True),
                ("(A) Man", True, True), ("A. Man", True, True),
                ("The answer is Man.", True, True),
                ("<think>deep voice</think><answer>Man</answer>", True, True),
                ("It is a man, not a woman.", False, False),   # names a wrong choice
                ("Man or Child", False, False), ("Woman", False, False), ("B", False, False),
                ("", False, False)]


@pytest.mark.parametrize("output, official, ours", MMAU_CLASSES)
def test_mmau_official_and_lenient_on_every_output_class(output, official, ours):
    rows = [{"key": "k", "audio": "k.wav", "question": "Who speaks?", "choices": PEOPLE, "answer": "Man",
             "domain": "speech", "difficulty": "easy"}]
    res = S.score(rows, {"k": output})
    assert res["acc_official"] == float(official) and res["acc"] == float(ours)
    # the official number is MMAU's rule on the file we write, with nothing of ours in between
    item = S.mmau_items(rows, {"k": output})[0]
    assert item["task"] == "speech" and S.string_match("Man", item["model_output"], PEOPLE) == official
    assert "official_warnings" not in res


def test_mmau_official_tokens_and_letter_words():
    rows = [{"key": "n", "audio": "n.wav", "question": "q", "choices": ["White noise", "Wind"],
             "answer": "White noise", "domain": "sound", "difficulty": "hard"},
            {"key": "w", "audio": "w.wav", "question": "q", "choices": ["the", "a", "an"],
             "answer": "a", "domain": "speech", "difficulty": "medium"}]
    res = S.score(rows, {"n": "white-noise", "w": "A"})
    assert res["acc_official"] == 1.0
    # "A" names the choice "a": it is not read as option A ("the")
    assert res["acc"] == 1.0
    res = S.score(rows, {"n": "noise", "w": "B"})
    assert res["acc_official"] == 0.0 and res["acc"] == 0.5  # B -> "a" is ours only


def test_mmau_official_warns_on_rows_its_script_cannot_tabulate():
    res = S.score(_rows(), _hyps())  # no domain (MMAU's task) in these rows
    assert "official_warnings" in res and "evaluation.py stops" in res["official_warnings"][0]
    # k1 and k3 name their answers; letters (k4 "B", k5 "B") and k6 "" are wrong officially
    assert res["acc_official"] == pytest.approx(2 / 6)
