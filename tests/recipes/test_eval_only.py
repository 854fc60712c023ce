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
