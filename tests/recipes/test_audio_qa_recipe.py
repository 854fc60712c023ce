"""The audio_qa recipe end to end on its smoke configuration, in a temporary folder: data, both
warm-ups, GRPO of policy and teacher, ReST, OPD from the GRPO teacher, the SFT baseline, scoring."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from conftest import recipe_env, smoke_scale, without_timing

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SCALE = smoke_scale("audio_qa")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio_qa")
    data, exp = tmp / "data", tmp / "exp"
    env = recipe_env()
    proc = subprocess.run(["bash", str(ROOT / "recipes/audio_qa/run.sh"), "--smoke", "true",
                           "--data", str(data), "--exp", str(exp)],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, exp, proc


def test_results_json_has_every_system(smoke_run):
    data, exp, _ = smoke_run
    res = json.loads((exp / "results.json").read_text())
    n_test = sum(1 for line in (data / "test.jsonl").read_text().splitlines() if line.strip())
    for name in ("base", "grpo", "rest", "opd", "teacher_sft", "teacher_grpo"):
        r = res[name]
        assert 0.0 <= r["acc"] <= 1.0 and math.isfinite(r["acc"]), name
        assert r["n"] == n_test
        # breakdowns sum up to the overall count
        for group in ("by_category", "by_task", "by_difficulty"):
            assert sum(v["n"] for v in r[group].values()) == n_test, (name, group)
        assert set(r["by_category"]) <= {"speech", "sound", "music"}
    assert set(res["baselines"]) == {"sft_answers"}
    for name in ("base", "grpo", "rest", "opd", "teacher_sft", "teacher_grpo"):
        lo, hi = res[name]["acc_ci95"]
        assert lo <= res[name]["acc"] <= hi and "per_item" not in res[name]
    assert set(res["differences"]) == {f"{k} - base" for k in ("grpo", "rest", "opd", "sft_answers")}
    for k, d in res["differences"].items():
        assert d["diff"] == pytest.approx(res["delta_vs_base"][k.split(" ")[0]], abs=1e-4)
        assert d["n"] == n_test and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    for k in ("grpo", "rest", "opd", "sft_answers"):
        assert k in res["delta_vs_base"]
    for stage in ("data", "models", "grpo", "teacher_grpo", "rest", "opd", "sft_answers"):
        assert stage in res["stage_seconds"], stage
    # every method trained conf/budget.yaml's steps (ReST: its rounds), x the smoke scale
    from tools.step_budget import steps_of, train_args
    conf = ROOT / "recipes/audio_qa/conf/budget.yaml"
    for name in ("grpo", "teacher_grpo", "opd", "sft_answers"):
        assert res["training"][name]["steps"] == steps_of(conf, name, SMOKE_SCALE), name
    rounds = int(train_args(conf, "rest", SMOKE_SCALE)[1].split("=")[1])
    assert len(res["training"]["rest"]["rounds"]) == rounds
    assert res["settings"]["compute"]["mode"] == "steps"


def test_methods_trained_from_the_base_and_wrote_their_models(smoke_run):
    _, exp, _ = smoke_run
    for run in ("base_sft", "teacher_sft", "grpo", "teacher_grpo", "rest", "opd", "sft_answers"):
        assert (exp / run / "final" / "config.json").is_file(), run
    for run in ("grpo", "opd", "sft_answers"):
        cfg = (exp / run / "config.yaml").read_text()
        assert str(exp / "base_sft" / "final") in cfg, run
    assert str(exp / "teacher_grpo" / "final") in (exp / "opd" / "config.yaml").read_text()
    # GRPO logged every reward component on its own
    lines = [json.loads(x) for x in (exp / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("reward/format" in x and "reward/mcq_accuracy" in x for x in lines)
    rest = json.loads((exp / "rest" / "rest_summary.json").read_text())
    assert rest


def test_stages_2_to_6_give_the_same_numbers_again(smoke_run, tmp_path):
    """GRPO, ReST, OPD and the SFT baseline train fixed step counts (ReST: rounds), so stages 2-6
    run again from the same warm-up give the same results.json, figure for figure (timings aside)."""
    data, exp0, _ = smoke_run
    exp = tmp_path / "exp"
    exp.mkdir()
    for d in ("base_sft", "teacher_sft", "student_init", "teacher_init", "models.json"):   # the warm-up, linked
        (exp / d).symlink_to(exp0 / d)
    proc = subprocess.run(["bash", str(ROOT / "recipes/audio_qa/run.sh"), "--smoke", "true", "--stage", "2",
                           "--data", str(data), "--exp", str(exp)],
                          capture_output=True, text=True, env=recipe_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def load(p):
        return json.loads(p.read_text().replace(str(exp0), "<exp>").replace(str(exp), "<exp>"))
    a, b = load(exp0 / "results.json"), load(exp / "results.json")
    a.pop("stage_seconds"), b.pop("stage_seconds")
    assert without_timing(a) == without_timing(b)


def test_mmau_predictions_are_in_the_official_input_format(smoke_run):
    data, exp, _ = smoke_run
    items = json.loads((exp / "decode" / "grpo" / "mmau_predictions.json").read_text())
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines() if x.strip()]
    assert len(items) == len(rows)
    for it, row in zip(items, rows):
        assert {"id", "question", "choices", "answer", "model_output", "category", "difficulty"} <= set(it)
        assert it["answer"] == row["answer"] and it["choices"] == row["choices"]
        assert isinstance(it["model_output"], str)


def test_reward_curves_are_drawn(smoke_run):
    _, exp, _ = smoke_run
    assert (exp / "plots" / "reward.png").is_file()


def test_lora_switch_trains_every_stage(smoke_run, tmp_path):
    """``--lora true``: GRPO, ReST, OPD and the SFT baseline train peft adapters from the same warm
    bases, and every exported model is a plain, merged checkpoint."""
    import shutil
    data, exp, _ = smoke_run
    exp2 = tmp_path / "exp_lora"
    for d in ("base_sft", "teacher_sft"):
        shutil.copytree(exp / d / "final", exp2 / d / "final")
    env = recipe_env()
    proc = subprocess.run(["bash", str(ROOT / "recipes/audio_qa/run.sh"), "--smoke", "true", "--lora", "true",
                           "--stage", "2", "--stop_stage", "5", "--data", str(data), "--exp", str(exp2)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from core.models import load_model_and_processor
    for run in ("grpo", "teacher_grpo", "rest", "opd", "sft_answers"):
        final = exp2 / run / "final"
        assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists(), run
        cfg = (exp2 / run / "config.yaml").read_text()
        assert "lora_alpha: 32" in cfg, run
    model, _ = load_model_and_processor(exp2 / "grpo" / "final")
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"


def test_opd_from_a_teacher_served_elsewhere(smoke_run, tmp_path):
    """--teacher_url: OPD (stage 4) distils from the teacher behind our server (its top-k
    log-probs), and the scoring stage decodes the served teacher's row through the server: the
    answers of decoding its folder here. (The server batches requests as they arrive, so its
    padding differs from the local batch's; a greedy near-tie may turn one answer, not more.)"""
    import shutil

    from conftest import teacher_server
    data, exp0, _ = smoke_run
    exp = tmp_path / "exp"
    for d in ("base_sft", "grpo", "rest"):
        shutil.copytree(exp0 / d / "final", exp / d / "final")
    gen_len = json.loads((exp0 / "gen_length.json").read_text())["max_new_tokens"]
    assert gen_len == 32  # the recipe's default --max_new_tokens
    env = recipe_env()
    with teacher_server(exp0 / "teacher_grpo" / "final", max_new_tokens=gen_len) as url:
        proc = subprocess.run(["bash", str(ROOT / "recipes/audio_qa/run.sh"), "--smoke", "true", "--stage", "4",
                               "--baselines", "false", "--data", str(data), "--exp", str(exp), "--teacher_url", url],
                              capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    opd_cfg = (exp / "opd" / "config.yaml").read_text()
    assert "kind: remote" in opd_cfg and url in opd_cfg and "support: teacher_topk" in opd_cfg
    losses = [json.loads(x)["loss"] for x in (exp / "opd" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
    res = json.loads((exp / "results.json").read_text())
    local = json.loads((exp0 / "results.json").read_text())["teacher_grpo"]
    assert res["teacher_served"]["n"] == local["n"]
    served = {h["key"]: h["text"] for h in map(json.loads, (exp / "decode/teacher_served/hyp.jsonl").read_text().splitlines())}
    here = {h["key"]: h["text"] for h in map(json.loads, (exp0 / "decode/teacher_grpo/hyp.jsonl").read_text().splitlines())}
    assert served.keys() == here.keys() and sum(served[k] != here[k] for k in here) <= 1
    assert abs(res["teacher_served"]["acc"] - local["acc"]) <= 1 / local["n"] + 1e-9
    assert res["settings"]["teacher_url"] == url and res["settings"]["generation_length"]["max_new_tokens"] == 32
    assert "teacher_grpo" not in res or res["teacher_grpo"] is None
