"""The ASR recipe end to end on its smoke configuration, in a temporary folder."""
import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_asr_recipe_smoke(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(ROOT / "recipes/asr/run.sh"), "--smoke", "true",
                           "--data", str(data), "--exp", str(exp)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((exp / "results.json").read_text())
    for name in ("teacher", "student_before", "student_after"):
        assert 0.0 <= res[name]["wer"] and math.isfinite(res[name]["wer"])
        assert res[name]["num_utts"] == 16
    assert set(res["baselines"]) == {"sft_more", "seqkd", "td_opd"}
    for v in ("data", "models", "opd", "sft_more", "seqkd", "td_opd", "decode_score"):
        assert v in res["stage_seconds"], v
    # the stage-2 runs got equal wall-clock: each baseline's training time is close to OPD's
    tr = res["training"]
    assert tr["sft_more"]["train_seconds"] >= 0.8 * tr["opd"]["train_seconds"]
    # OPD lowers what it optimises: the student's per-token reverse KL to the teacher on dev
    cal = res["calibrate"]
    assert cal["after"]["reverse_kl_per_token"] < cal["before"]["reverse_kl_per_token"]
    # per-utterance errors written worst first
    rep = json.loads((exp / "decode/student_after/report.json").read_text())
    errs = [u["errors"] for u in rep["utterances"]]
    assert errs == sorted(errs, reverse=True)
    assert (exp / "opd/final/model.safetensors").is_file()
    assert (exp / "opd/config.yaml").is_file()
    assert any((exp / "plots").glob("*.png"))
    # the unlabelled manifest has no transcripts
    for line in (data / "unlabelled.jsonl").read_text().splitlines():
        assert "text" not in json.loads(line)
