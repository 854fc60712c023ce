"""The audio_visual_grpo recipe end to end on its smoke configuration, in a temporary folder:
synthetic videos, the tiny Omni thinker, SFT warm-up, GRPO, the SFT baseline, scoring."""
import json
import math
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_audio_visual_recipe_smoke(tmp_path):
    data, exp = tmp_path / "data", tmp_path / "exp"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run(["bash", str(ROOT / "recipes/audio_visual_grpo/run.sh"), "--smoke", "true",
                           "--data", str(data), "--exp", str(exp)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((exp / "results.json").read_text())
    for name in ("before", "after"):
        assert 0.0 <= res[name]["acc"] <= 1.0 and res[name]["n"] == 16
        assert set(res[name]["by_type"]) == {"count", "colour_by_count", "beep_colour", "motion"}
    assert set(res["baselines"]) == {"sft_answers"}
    tr = res["training"]
    assert tr["sft_answers"]["train_seconds"] >= 0.8 * tr["grpo"]["train_seconds"]
    # every reward component is logged per step, and the training reward rises
    rows = [json.loads(line) for line in (exp / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert len(steps) == tr["grpo"]["steps"]
    for r in steps:
        assert {"reward/format", "reward/exact_alnum", "zero_std_frac"} <= set(r)
        assert math.isclose(r["reward"], 0.1 * r["reward/format"] + 0.9 * r["reward/exact_alnum"], abs_tol=1e-4)
    reward = res["training_reward"]
    assert reward["last"] > reward["first"], reward
    assert reward["max_smoothed"] >= 0.5, reward
    # the answers of every system were decoded and scored
    for name in ("before", "after", "sft_answers"):
        hyp = (exp / "decode" / name / "hyp.jsonl").read_text().splitlines()
        assert len(hyp) == 16
    assert any((exp / "plots").glob("*.png"))
    assert (exp / "grpo" / "final" / "model.safetensors").is_file()
