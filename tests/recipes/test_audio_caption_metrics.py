"""recipes/audio_caption/local: caption metrics (caption_metrics.py) and the cascaded evaluation
(cascade.py).

Caption metrics: identical captions score BLEU-4 ~1 and ROUGE-L 1, captions sharing no word 0;
BLEU-1 of a one-sentence corpus equals clipped unigram precision times the brevity penalty worked
out here; CIDEr prefers the matching captions on a 4-clip corpus; empty hypotheses are scored and
counted; bad references fail clearly; without Java, METEOR and SPICE are named under ``skipped``;
the CLI reads decode output and a manifest.

Cascade: make-train rows and fields, the prompt's contents, ``build`` from a processor folder,
and end to end: a tiny text model SFT-trained through ``core.bin.train`` with
``conf/cascade_sft.yaml`` on hand-made captions ("a man says red") answers the clips' questions
from their true captions, fails with swapped captions (so it reads the caption) and scores the
answer prior with no caption.
"""
from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "audio_caption"
LOCAL = RECIPE / "local"

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"audio_caption_local_{name}", LOCAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


M = _load("caption_metrics")
CA = _load("cascade")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ============================================================================ caption metrics

CLIPS = {
    "c1": ["a man speaks while a car passes by", "a man talks as a car drives past"],
    "c2": ["a dog barks loudly in the distance", "dogs bark far away"],
    "c3": ["rain falls on a metal roof", "heavy rain hits a tin roof"],
    "c4": ["birds chirp in a quiet forest", "birds are singing in the woods"],
}


def test_identical_captions_score_one():
    hyps = {k: v[0] for k, v in CLIPS.items()}
    s = M.score_captions(hyps, CLIPS, java_metrics=False)
    assert s["BLEU_4"] == pytest.approx(1.0, abs=1e-6) and s["BLEU_1"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0)
    assert s["n"] == 4 and s["empty_hyps"] == 0
    assert set(s) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", "n", "empty_hyps", "skipped",
                      "per_clip", "ci95"}
    # per-clip scores whose means are the corpus figures, and intervals around them
    for m in ("ROUGE_L", "CIDEr"):
        per = s["per_clip"][m]
        assert set(per) == set(CLIPS) and sum(per.values()) / 4 == pytest.approx(s[m])
        assert s["ci95"][m][0] <= s[m] + 1e-9 and s[m] - 1e-9 <= s["ci95"][m][1]
    # case and punctuation do not count
    loud = {k: v[0].upper() + "!" for k, v in CLIPS.items()}
    assert M.score_captions(loud, CLIPS, java_metrics=False)["BLEU_4"] == pytest.approx(1.0, abs=1e-6)


def test_captions_sharing_no_word_score_zero():
    hyps = {k: "xylophone quartet zebra umbrella" for k in CLIPS}
    s = M.score_captions(hyps, CLIPS, java_metrics=False)
    for m in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"):
        assert s[m] == pytest.approx(0.0, abs=1e-6), m


def test_bleu1_by_hand_on_one_sentence():
    hyp = "a dog barks at the dog"
    ref = "The dog barks loudly at a cat, nearby."
    h, r = hyp.split(), ref.lower().replace(",", "").replace(".", "").split()
    rc = Counter(r)
    clipped = sum(min(n, rc[w]) for w, n in Counter(h).items())  # a, dog (1 of 2), barks, at, the = 5
    assert clipped == 5
    bp = math.exp(1 - len(r) / len(h)) if len(h) < len(r) else 1.0  # 6 words against 8
    expected = clipped / len(h) * bp
    s = M.score_captions({"x": hyp}, {"x": [ref]}, java_metrics=False)
    assert s["BLEU_1"] == pytest.approx(expected, rel=1e-6)


def test_cider_prefers_the_matching_captions():
    right = {k: v[1] for k, v in CLIPS.items()}
    keys = sorted(CLIPS)
    wrong = {k: CLIPS[keys[(i + 1) % 4]][1] for i, k in enumerate(keys)}  # another clip's caption
    refs = {k: v[:1] for k, v in CLIPS.items()}
    s_right = M.score_captions(right, refs, java_metrics=False)
    s_wrong = M.score_captions(wrong, refs, java_metrics=False)
    assert s_right["CIDEr"] > s_wrong["CIDEr"] + 0.5
    assert s_right["BLEU_1"] > s_wrong["BLEU_1"]


def test_empty_hypotheses_are_scored_and_counted():
    hyps = {k: v[0] for k, v in CLIPS.items()}
    hyps["c2"] = ""
    hyps["c3"] = "..."
    s = M.score_captions(hyps, CLIPS, java_metrics=False)
    full = M.score_captions({k: v[0] for k, v in CLIPS.items()}, CLIPS, java_metrics=False)
    assert s["n"] == 4 and s["empty_hyps"] == 2
    assert 0 < s["CIDEr"] < full["CIDEr"] and s["BLEU_1"] < full["BLEU_1"]


def test_bad_references_fail_clearly():
    with pytest.raises(ValueError, match="have no references: c9"):
        M.score_captions({"c9": "a dog"}, {}, java_metrics=False)
    with pytest.raises(ValueError, match="'c1': empty list of references"):
        M.score_captions({"c1": "a dog"}, {"c1": []}, java_metrics=False)
    with pytest.raises(ValueError, match="reference key.*no hypothesis: c2"):
        M.score_captions({"c1": "a dog"}, {"c1": ["a dog"], "c2": ["a cat"]}, java_metrics=False)
    with pytest.raises(ValueError, match=r"'c1': reference\(s\) \[1\] are empty"):
        M.score_captions({"c1": "a dog"}, {"c1": ["a dog", "?!"]}, java_metrics=False)


def test_without_java_meteor_and_spice_are_skipped(monkeypatch):
    real_which = M.shutil.which
    monkeypatch.setattr(M.shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name, *a, **k))
    s = M.score_captions({k: v[0] for k, v in CLIPS.items()}, CLIPS)
    assert "METEOR" not in s and "SPICE" not in s
    assert s["skipped"]["METEOR"].startswith("needs Java") and s["skipped"]["SPICE"].startswith("needs Java")


@pytest.mark.skipif(M.shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_runs_when_java_is_there():
    s = M.score_captions({k: v[0] for k, v in CLIPS.items()}, CLIPS)
    assert s["METEOR"] == pytest.approx(1.0, abs=0.01) and "METEOR" not in s["skipped"]


def test_cli_reads_decode_output_and_manifest(tmp_path, capsys):
    man = _jsonl(tmp_path / "test.jsonl", [{"key": k, "audio": f"{k}.wav", "task": "caption", "text": v}
                                          for k, v in CLIPS.items()])
    hyp = _jsonl(tmp_path / "hyp.jsonl", [{"key": k, "text": v[1]} for k, v in CLIPS.items()])
    out = tmp_path / "scores" / "s.json"
    assert M.main(["--hyp", str(hyp), "--ref", str(man), "--out", str(out), "--no_java"]) == 0
    s = json.loads(out.read_text())
    assert s == M.score_captions({k: v[1] for k, v in CLIPS.items()}, CLIPS, java_metrics=False)
    assert "CIDEr" in capsys.readouterr().out
    # a row with an empty reference list: file:line and the field
    bad = _jsonl(tmp_path / "bad.jsonl", [{"key": "c1", "text": CLIPS["c1"]}, {"key": "c2", "text": []}])
    assert M.main(["--hyp", str(hyp), "--ref", str(bad), "--no_java"]) == 1
    assert f"{bad}:2: text" in capsys.readouterr().err
    # a hypothesis for a clip the manifest does not have
    short = _jsonl(tmp_path / "short.jsonl", [{"key": "c1", "text": CLIPS["c1"]}])
    assert M.main(["--hyp", str(hyp), "--ref", str(short), "--no_java"]) == 1
    assert "have no references" in capsys.readouterr().err


# ============================================================================ cascade

SPK, WORDS = ["man", "woman"], ["red", "blue", "green"]
TEMPLATES = ["a {s} says {w}", "the {s} is saying {w}", "{w} spoken by a {s}"]


def _questions(s: str, w: str) -> list[dict]:
    return [{"question": "who speaks?", "choices": SPK, "answer": s},
            {"question": "which word is said?", "choices": WORDS, "answer": w, "category": "word"}]


def _clip_rows() -> list[dict]:
    return [{"key": f"{s}_{w}", "audio": f"{s}_{w}.wav", "task": "caption",
             "text": [t.format(s=s, w=w) for t in TEMPLATES], "questions": _questions(s, w)}
            for s in SPK for w in WORDS]


def test_render_prompt():
    p = CA.render_prompt("a man says red", {"question": "who speaks?", "choices": ["man", "woman"], "answer": "man"})
    assert p == "Caption: a man says red\nQuestion: who speaks?\nChoices: man | woman\nAnswer:"


def test_make_train_rows_and_fields(tmp_path, capsys):
    rows = _clip_rows()[:3]
    rows[2] = dict(rows[2], text=rows[2]["text"][:1])  # one reference only
    a = _jsonl(tmp_path / "a.jsonl", rows[:2])
    b = _jsonl(tmp_path / "b.jsonl", rows[2:] + [{"key": "noq", "task": "caption", "text": "a cat"}])
    out = tmp_path / "qa" / "train.jsonl"
    assert CA.main(["make-train", "--manifest", str(a), "--manifest", str(b), "--out", str(out),
                    "--refs_per_clip", "2"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = [json.loads(line) for line in out.read_text().splitlines()]
    # 2 clips x 2 refs x 2 questions + 1 clip x 1 ref x 2 questions
    assert len(got) == 10 and info == {"rows": 10, "clips": 3, "clips_without_questions": 1, "out": str(out)}
    assert all(set(r) == {"key", "task", "prompt", "target", "question", "choices", "answer"} for r in got)
    assert all(r["task"] == "qa" and r["target"] == r["answer"] and r["answer"] in r["choices"] for r in got)
    assert len({r["key"] for r in got}) == 10
    first = got[0]
    assert first["prompt"] == CA.render_prompt("a man says red", _questions("man", "red")[0])
    assert first["target"] == "man"
    assert not any("spoken by" in r["prompt"] for r in got)  # the third reference is past --refs_per_clip
    # the rows are a valid text manifest for the trainer
    from core.data.manifest import read_manifest
    assert len(read_manifest(out, require=("target",), require_media=False)) == 10


def test_make_train_bad_questions_name_file_line_and_item(tmp_path, capsys):
    rows = _clip_rows()[:2]
    rows[1] = dict(rows[1], questions=[{"question": "who?", "choices": ["man", "woman"], "answer": "child"},
                                       {"question": "", "choices": ["x"], "answer": "x"}])
    m = _jsonl(tmp_path / "m.jsonl", rows)
    assert CA.main(["make-train", "--manifest", str(m), "--out", str(tmp_path / "o.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"{m}:2: questions[0].answer: 'child' is not one of the choices" in err
    assert f"{m}:2: questions[1].question" in err and f"{m}:2: questions[1].choices" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_build_from_a_processor_folder(tmp_path):
    from core.models import build_tiny_qwen2_audio, load_model_and_processor, train_tokenizer

    tok = train_tokenizer(["a man says red", "a woman says blue"], 280)
    build_tiny_qwen2_audio(tok, hidden=32, layers=1, heads=2, audio_layers=1, out_dir=tmp_path / "captioner")
    assert CA.main(["build", "--tokenizer", str(tmp_path / "captioner"), "--out", str(tmp_path / "qa"),
                    "--hidden", "32", "--layers", "1"]) == 0
    model, t = load_model_and_processor(tmp_path / "qa")
    assert type(model).__name__ == "Qwen2ForCausalLM" and t.get_vocab() == tok.get_vocab()
    assert t.chat_template  # the recipe's chat template came along
    # --model: checked (and linked), not built
    assert CA.main(["build", "--model", str(tmp_path / "qa"), "--out", str(tmp_path / "linked")]) == 0
    assert (tmp_path / "linked").is_symlink()
    assert CA.main(["build", "--model", str(tmp_path / "nothing")]) == 1


@pytest.fixture(scope="module")
def cascade_model(tmp_path_factory):
    """A tiny text model SFT-trained (core.bin.train, conf/cascade_sft.yaml) on the 6 clips' rows."""
    from core.bin.train import main as train_main
    from core.models import train_tokenizer

    root = tmp_path_factory.mktemp("cascade")
    clips = _jsonl(root / "clips.jsonl", _clip_rows())
    assert CA.main(["make-train", "--manifest", str(clips), "--out", str(root / "qa_train.jsonl")]) == 0
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["target"]
             for line in (root / "qa_train.jsonl").read_text().splitlines()]
    train_tokenizer(texts, 300, root / "tok")
    assert CA.main(["build", "--tokenizer", str(root / "tok"), "--out", str(root / "init"), "--layers", "1"]) == 0
    assert train_main(["--config", str(RECIPE / "conf" / "cascade_sft.yaml"), f"model.path={root / 'init'}",
                       f"data.train={root / 'qa_train.jsonl'}", f"output_dir={root / 'run'}",
                       "train.max_steps=100", "train.save_every=0", "train.resume=never"]) == 0
    summary = json.loads((root / "run" / "train_summary.json").read_text())
    return SimpleNamespace(root=root, clips=clips, model=root / "run" / "final", summary=summary)


def test_cascade_reads_the_caption(cascade_model, tmp_path):
    cm = cascade_model
    rows = _clip_rows()
    truth = {r["key"]: r["text"][0] for r in rows}
    # each clip gets the caption of a clip with the other speaker and another word
    other = {f"{s}_{w}": f"{SPK[1 - i]}_{WORDS[(j + 1) % 3]}" for i, s in enumerate(SPK) for j, w in enumerate(WORDS)}
    hyp_true = _jsonl(tmp_path / "true.jsonl", [{"key": k, "text": v} for k, v in truth.items()])
    hyp_swap = _jsonl(tmp_path / "swap.jsonl", [{"key": k, "text": truth[other[k]]} for k in truth])

    res = CA.evaluate(str(cm.model), str(hyp_true), str(cm.clips), str(tmp_path / "true.json"))
    assert res["n"] == 12 and res["n_clips"] == 6 and res["caption_source"] == "hypotheses"
    assert set(res["by_question"]) == {"who speaks?", "word"}  # grouped by category, else by the question
    assert res["acc"] >= 0.9, res  # chance is (1/2 + 1/3) / 2
    assert json.loads((tmp_path / "true.json").read_text()) == res
    answers = [json.loads(line) for line in Path(res["answers"]).read_text().splitlines()]
    assert len(answers) == 12 and all(set(a) == {"key", "text", "ref"} for a in answers)

    swapped = CA.evaluate(str(cm.model), str(hyp_swap), str(cm.clips), str(tmp_path / "swap.json"))
    assert swapped["acc"] <= 0.25 < res["acc"] - 0.5, swapped

    # the reserved words: first reference (the ceiling) and no caption (the floor), through the CLI
    assert CA.main(["eval", "--model", str(cm.model), "--hyp", "refs", "--manifest", str(cm.clips),
                    "--out", str(tmp_path / "refs.json")]) == 0
    refs = json.loads((tmp_path / "refs.json").read_text())
    assert refs["caption_source"] == "first_reference" and refs["acc"] == res["acc"]
    blind = CA.evaluate(str(cm.model), "none", str(cm.clips), str(tmp_path / "none.json"))
    assert blind["caption_source"] == "none" and blind["empty_captions"] == 6
    assert blind["acc"] < res["acc"]


def test_cascade_eval_needs_a_caption_for_every_clip(cascade_model, tmp_path, capsys):
    cm = cascade_model
    hyp = _jsonl(tmp_path / "h.jsonl", [{"key": "man_red", "text": "a man says red"},
                                        {"key": "stray", "text": "x"}])
    assert CA.main(["eval", "--model", str(cm.model), "--hyp", str(hyp), "--manifest", str(cm.clips),
                    "--out", str(tmp_path / "o.json")]) == 1
    err = capsys.readouterr().err
    assert "5 clip(s) with questions have no caption" in err and "stray" in err
