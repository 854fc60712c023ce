"""The ASR recipe end to end on its smoke configuration, in a temporary folder."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import recipe_env, smoke_scale, teacher_server, without_timing

ROOT = Path(__file__).resolve().parents[2]
ENV = recipe_env()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("asr_smoke")
    data, exp = tmp_path / "data", tmp_path / "exp"
    proc = subprocess.run(["bash", str(ROOT / "recipes/asr/run.sh"), "--smoke", "true",
                           "--data", str(data), "--exp", str(exp)],
                          capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data, exp


def test_asr_recipe_smoke(smoke):
    data, exp = smoke
    res = json.loads((exp / "results.json").read_text())
    for name in ("teacher", "student_before", "student_after"):
        assert 0.0 <= res[name]["wer"] and math.isfinite(res[name]["wer"])
        assert res[name]["num_utts"] == 16
    assert set(res["baselines"]) == {"sft_more", "seqkd", "td_opd"}
    # bootstrap intervals: each system's WER inside its own, and paired ones for OPD's claims
    for r in [res[n] for n in ("teacher", "student_before", "student_after")] + list(res["baselines"].values()):
        lo, hi = r["wer_ci95"]
        assert lo <= r["wer"] <= hi
    assert set(res["differences"]) == {f"student_after - {o}" for o in ("student_before", "sft_more", "seqkd", "td_opd")}
    d = res["differences"]["student_after - student_before"]
    assert d["diff"] == pytest.approx(res["student_after"]["wer"] - res["student_before"]["wer"], abs=1e-6)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1] and d["significant"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    assert "paired bootstrap" in (exp / "RESULTS.md").read_text()
    for v in ("data", "models", "opd", "sft_more", "seqkd", "td_opd", "decode_score"):
        assert v in res["stage_seconds"], v
    # the stage-2 runs got their fixed step counts (conf/budget.yaml x the smoke scale)
    tr = res["training"]
    assert tr["opd"]["steps"] == res["settings"]["compute"]["steps_run"]["opd"] > 0
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



def test_a_teacher_served_elsewhere(smoke, tmp_path):
    """--teacher_url: stages 2-3 again with the teacher behind our server (its top-k log-probs for
    calibrate and OPD, its transcriptions for sequence-level KD and its own row of the table).
    Only the wiring is checked here, so each method trains for 1 s of wall-clock (--budget 1)."""
    data, exp0 = smoke
    exp = tmp_path / "exp"
    shutil.copytree(exp0, exp, symlinks=True)
    for d in ("opd", "calibrate_before", "calibrate_after", "seqkd", "seqkd_data", "sft_more", "td_kd", "td_opd",
              "decode", "results.json"):
        p = exp / d
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    gen_len = json.loads((exp0 / "gen_length.json").read_text())["max_new_tokens"]
    with teacher_server(exp / "teacher" / "final", max_new_tokens=gen_len) as url:
        proc = subprocess.run(["bash", str(ROOT / "recipes/asr/run.sh"), "--smoke", "true", "--stage", "2",
                               "--data", str(data), "--exp", str(exp), "--teacher_url", url, "--budget", "1"],
                              capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((exp / "results.json").read_text())
    cal = res["calibrate"]
    assert cal["before"]["kl_support"] == "teacher_top20" and cal["after"]["kl_support"] == "teacher_top20"
    opd_cfg = (exp / "opd" / "config.yaml").read_text()
    assert "kind: remote" in opd_cfg and url in opd_cfg and "support: teacher_topk" in opd_cfg
    # the teacher's row came from the server: the same transcripts as decoding its folder here
    assert res["teacher"]["wer"] == pytest.approx(json.loads((exp0 / "results.json").read_text())["teacher"]["wer"])
    assert (exp / "seqkd_data" / "unlabelled_teacher.jsonl").is_file() and "seqkd" in res["baselines"]


def test_stages_2_and_3_give_the_same_numbers_again(smoke, tmp_path):
    """The compared methods train fixed step counts (conf/budget.yaml x the smoke scale), so stages
    2-3 run again from the same stage-1 models give the same results.json, figure for figure,
    whatever the machine was doing; the steps are the budget file's. (The rerun trains OPD alone,
    --baselines false: what it has, the teacher, the student before and after, calibration, OPD's
    training and its paired difference, is compared; the first run's baselines are checked for
    their step counts.)"""
    from tools.step_budget import steps_of
    data, exp0 = smoke
    exp = tmp_path / "exp"
    shutil.copytree(exp0, exp, symlinks=True)
    for d in ("opd", "calibrate_before", "calibrate_after", "seqkd", "seqkd_data", "sft_more", "td_kd", "td_opd",
              "decode", "results.json", "RESULTS.md", "plots"):
        p = exp / d
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(ROOT / "recipes/asr/run.sh"), "--smoke", "true", "--stage", "2",
                           "--data", str(data), "--exp", str(exp), "--baselines", "false"],
                          capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the two runs' folders are named alike (<exp>) so that only figures are compared
    def load(p):
        return json.loads(p.read_text().replace(str(exp0), "<exp>").replace(str(exp), "<exp>"))
    a, b = load(exp0 / "results.json"), load(exp / "results.json")
    assert not b["baselines"] and set(b["differences"]) == {"student_after - student_before"}
    for key in ("teacher", "student_before", "student_after", "calibrate", "relative_improvement"):
        assert without_timing(a[key]) == without_timing(b[key]), key
    d = "student_after - student_before"
    assert without_timing(a["differences"][d]) == without_timing(b["differences"][d])
    assert without_timing(a["training"]["opd"]) == without_timing(b["training"]["opd"])
    ca, cb = a["settings"].pop("compute"), b["settings"].pop("compute")
    assert without_timing(a["settings"]) == without_timing(b["settings"])
    assert cb["steps_run"]["opd"] == ca["steps_run"]["opd"] and cb["steps"] == ca["steps"]
    a["settings"]["compute"] = ca
    conf = ROOT / "recipes/asr/conf/budget.yaml"
    for name in ("opd", "sft_more", "seqkd", "td_kd", "td_opd"):
        assert a["training"][name]["steps"] == steps_of(conf, name, smoke_scale("asr")), name
    assert a["settings"]["compute"]["mode"] == "steps"


def test_opd_study_trains_resumes_and_reports(smoke, tmp_path):
    """local/study.sh on one setting (the weak teacher and the tiny student) of its smoke
    configuration, on the smoke recipe's data, with a budget file of its own (the recipe's step
    counts): it builds and trains the setting's warm-up, trains and scores one seed at those
    counts x the smoke scale, and writes the table, the JSON and the plot. Run again, it finds the
    seed finished and trains nothing; a setting it does not know is refused by name. (--measure,
    which writes the budget file from wall-clock runs, is left out to keep the suite short.)"""
    from tools.step_budget import steps_of
    data, _ = smoke
    exp, bud = tmp_path / "study", tmp_path / "budget"
    bud.mkdir()
    conf = bud / "budget_commands_tiny.yaml"
    shutil.copy(ROOT / "recipes/asr/conf/budget.yaml", conf)
    args = ["bash", str(ROOT / "recipes/asr/local/study.sh"), "--smoke", "true", "--settings", "commands_weak_tiny",
            "--data", str(data), "--exp", str(exp), "--budget_dir", str(bud)]
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the weak teacher is the teacher's SFT over --weak_steps; the tiny student is the tiny one
    assert json.loads((exp / "commands/teacher_weak/train_summary.json").read_text())["steps"] == 40
    assert json.loads((exp / "commands/build_tiny/models.json").read_text())["student"]["hidden"] == 32
    res = json.loads((exp / "commands_weak_tiny/seed0/results.json").read_text())
    comp = res["settings"]["compute"]
    assert comp["conf"] == str(conf) and comp["scale"] == 0.05 and comp["mode"] == "steps"
    for name in ("opd", "sft_more", "seqkd", "td_kd", "td_opd"):
        assert res["training"][name]["steps"] == steps_of(conf, name, 0.05), name
    study = json.loads((exp / "study.json").read_text())
    r = study["settings"]["commands_weak_tiny"]
    assert r["seeds"] == [0] and set(r["systems"]) == {"student SFT", "more SFT", "seq-KD", "OPD", "KD then OPD"}
    assert r["systems"]["OPD"]["per_seed"] == [res["student_after"]["wer"]]
    assert r["systems"]["seq-KD"]["per_seed"] == [res["baselines"]["seqkd"]["wer"]]
    d = r["differences"]["OPD - seq-KD"]
    assert d["diff"] == pytest.approx(res["student_after"]["wer"] - res["baselines"]["seqkd"]["wer"], abs=1e-6)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert "| commands (2-6 words) | weak | tiny |" in (exp / "STUDY.md").read_text()
    assert (exp / "study.png").stat().st_size > 1000
    # again: the seed is done, nothing trains, the same table
    before = (exp / "commands_weak_tiny/seed0/results.json").stat().st_mtime_ns
    proc = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed 0: done before" in proc.stdout and "SFT for" not in proc.stdout
    assert (exp / "commands_weak_tiny/seed0/results.json").stat().st_mtime_ns == before
    assert json.loads((exp / "study.json").read_text()) == study
    proc = subprocess.run(args[:5] + ["commands_medium_tiny"] + args[6:], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 2 and "'commands_medium_tiny': the teacher must be strong or weak" in proc.stderr
    # --readme writes the table between the study markers and the plot beside the README
    readme = tmp_path / "doc/README.md"
    readme.parent.mkdir()
    readme.write_text("# x\n\n<!-- study:start -->\n(not measured yet)\n<!-- study:end -->\n\nafter\n")
    proc = subprocess.run([sys.executable, str(ROOT / "recipes/asr/local/study_report.py"),
                           "--exp", str(exp), "--settings", "commands_weak_tiny", "--readme", str(readme)],
                          capture_output=True, text=True, env=dict(ENV, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = readme.read_text()
    assert "| commands (2-6 words) | weak | tiny |" in text and "![OPD study](assets/study.png)" in text
    assert "(not measured yet)" not in text and text.endswith("after\n")
    assert (readme.parent / "assets/study.png").read_bytes() == (exp / "study.png").read_bytes()
