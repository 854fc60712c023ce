"""tools/aggregate_seeds.py and tools/step_budget.py: results over seeds, step budgets."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _results(tmp_path, name, wer_after, steps):
    r = {"teacher": {"wer": 0.04, "wer_ci95": [0.03, 0.05], "model": "exp/teacher/final"},
         "student_after": {"wer": wer_after, "wer_ci95": [wer_after - 0.01, wer_after + 0.01], "model": name},
         "baselines": {"seqkd": {"wer": 0.08}},
         "training": {"opd": {"steps": steps}}, "settings": {"corpus": "synthetic"}}
    p = tmp_path / name / "results.json"
    p.parent.mkdir()
    p.write_text(json.dumps(r))
    return p


def test_three_seeds_become_means_the_checker_reads(tmp_path):
    files = [_results(tmp_path, f"seed{i}", w, 20) for i, w in enumerate((0.10, 0.12, 0.14))]
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, "-m", "tools.aggregate_seeds", "--out", str(out), "--metric", "wer",
                        *map(str, files)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    agg = json.loads(out.read_text())
    a = agg["student_after"]["wer"]
    assert a["mean"] == pytest.approx(0.12) and a["std"] == pytest.approx(0.02) and a["per_seed"] == [0.10, 0.12, 0.14]
    assert agg["teacher"]["wer"]["std"] == 0.0 and agg["baselines"]["seqkd"]["wer"]["mean"] == pytest.approx(0.08)
    ci = agg["student_after"]["wer_ci95"]["per_seed"]
    assert [pytest.approx(x) for x in ([0.09, 0.11], [0.11, 0.13], [0.13, 0.15])] == ci
    assert agg["teacher"]["model"] == "exp/teacher/final"                        # equal: kept
    assert agg["student_after"]["model"] == {"per_seed": ["seed0", "seed1", "seed2"]}
    assert agg["settings"] == {"corpus": "synthetic"} and agg["seeds"] == [0, 1, 2]
    # named from the folder above the combined file, as a README beside it would (exp/seed0/...)
    assert agg["per_seed_files"] == [f"{tmp_path.name}/seed{i}/results.json" for i in range(3)]
    assert "| student_after | 12.00 | 2.00 | 10.00, 12.00, 14.00 |" in r.stdout
    # the shared checker reads the means
    from tools.aggregate_seeds import combine
    assert combine([None, 1.0])["per_seed"] == [1.0]


def test_a_missing_seed_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.aggregate_seeds", "--out", str(tmp_path / "o.json"),
                        str(tmp_path / "nope" / "results.json")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "nope/results.json: no results.json" in r.stderr


def test_step_budget_from_measured_runs(tmp_path):
    from tools.step_budget import BudgetError, load, measure, steps_of
    for name, steps, secs in (("opd", 400, 150.0), ("sft_more", 750, 150.0), ("td_kd", 350, 75.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_summary.json").write_text(json.dumps({"steps": steps, "train_seconds": secs}))
    conf = tmp_path / "budget.yaml"
    out = measure(conf, {n: tmp_path / n for n in ("opd", "sft_more", "td_kd")}, 150, "2-core CPU",
                  shares={"td_kd": 75})
    assert out["steps"] == {"opd": 400, "sft_more": 750, "td_kd": 350}
    assert load(conf)["reference"]["machine"] == "2-core CPU" and conf.read_text().startswith("# Equal compute")
    assert steps_of(conf, "opd", 0.05) == 20 and steps_of(conf, "td_kd", 0.001) == 1
    # measuring one method again keeps the others' seconds per step, measurements and shares
    (tmp_path / "opd" / "train_summary.json").write_text(json.dumps({"steps": 300, "train_seconds": 150.0}))
    again = measure(conf, {"opd": tmp_path / "opd"}, 150, "2-core CPU")
    assert again["steps"] == {"opd": 300, "sft_more": 750, "td_kd": 350}
    assert again["seconds_per_step"] == {"sft_more": 0.2, "td_kd": round(75 / 350, 5), "opd": 0.5}
    assert again["measured"]["td_kd"] == {"steps": 350, "train_seconds": 75.0} and again["shares"] == {"td_kd": 75}
    with pytest.raises(BudgetError, match="no steps.grpo"):
        steps_of(conf, "grpo")
    conf.write_text("steps: {opd: 0}\n")
    with pytest.raises(BudgetError, match="steps.opd must be a positive integer"):
        load(conf)
    r = subprocess.run([sys.executable, "-m", "tools.step_budget", "steps", "--conf", str(tmp_path / "x.yaml"), "opd"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no step budget file" in r.stderr



def test_rest_budget_is_the_rounds_that_fit(tmp_path):
    """A ReST run is measured in rounds: those whose sampling + SFT seconds fit in the target,
    with their learning rates; ``args`` prints the overrides run.sh passes (steps for the others)."""
    from tools.step_budget import BudgetError, compute_line, compute_settings, load, measure, train_args
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "train_summary.json").write_text(json.dumps({"steps": 300, "train_seconds": 150.0}))
    (tmp_path / "rest").mkdir()
    rounds = [{"round": i, "lr": lr, "budget_seconds": sec, "sft_steps": 40}
              for i, (lr, sec) in enumerate(((1e-3, 40.0), (1e-3, 50.0), (5e-4, 55.0), (5e-4, 30.0)))]
    (tmp_path / "rest" / "rest_summary.json").write_text(json.dumps({"rounds": rounds}))
    conf = tmp_path / "budget.yaml"
    out = measure(conf, {"grpo": tmp_path / "grpo", "rest": tmp_path / "rest"}, 150, "2-core CPU")
    # 40 + 50 + 55 = 145; the fourth round's first half would pass 150
    assert out["rounds"]["rest"] == {"rounds": 3, "lrs": [1e-3, 1e-3, 5e-4]} and out["steps"] == {"grpo": 300}
    assert out["measured"]["rest"]["seconds_per_round"] == [40.0, 50.0, 55.0, 30.0]
    assert train_args(conf, "rest") == ["train.max_seconds=0", "rest.rounds=3", "rest.lrs=[0.001,0.001,0.0005]"]
    # a later measurement of one method keeps the others' entries
    measure(conf, {"grpo": tmp_path / "grpo"}, 75, "2-core CPU")
    assert load(conf)["steps"] == {"grpo": 150} and load(conf)["rounds"]["rest"]["rounds"] == 3
    assert load(conf)["measured"]["rest"]["seconds_per_round"] == [40.0, 50.0, 55.0, 30.0]
    measure(conf, {"rest": tmp_path / "rest"}, 100, "2-core CPU")   # 40 + 50; 55 / 2 would pass 100
    assert load(conf)["rounds"]["rest"]["rounds"] == 2 and load(conf)["steps"] == {"grpo": 150}
    measure(conf, {"rest": tmp_path / "rest", "grpo": tmp_path / "grpo"}, 150, "2-core CPU")
    assert train_args(conf, "rest", 0.04) == ["train.max_seconds=0", "rest.rounds=1", "rest.lrs=[0.001]"]
    assert train_args(conf, "grpo", 0.04) == ["train.max_seconds=0", "train.max_steps=12"]
    r = subprocess.run([sys.executable, "-m", "tools.step_budget", "args", "--conf", str(conf), "rest"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "train.max_seconds=0 rest.rounds=3 rest.lrs=[0.001,0.001,0.0005]"
    c = compute_settings("", conf, {"grpo": {"steps": 300}, "rest": {"steps": 120, "rounds": rounds[:2]}})
    assert c["mode"] == "steps" and c["steps_run"] == {"grpo": 300} and c["rounds"]["rest"]["rounds"] == 3
    line = compute_line(c)   # what ran: 2 rounds (a smoke scale), not the file's 3
    assert "grpo 300" in line and "rest 2 round(s)" in line and "150" in line
    assert compute_line(compute_settings("150", conf, {}), "method") == "150 s of wall-clock per method"
    from tools.step_budget import markdown
    t = markdown(conf)
    assert "| grpo | 0.500 | 300 | 150 |" in t and "| rest | rounds of 40, 50, 55 s | 3 round(s) | 150 |" in t
    conf.write_text("rounds: {rest: {rounds: 2, lrs: [0.001]}}\n")
    with pytest.raises(BudgetError, match="rounds.rest needs"):
        load(conf)


def test_a_metric_table_keeps_a_metric_that_is_not_a_rate(tmp_path):
    from tools.aggregate_seeds import aggregate, metric_table
    files = []
    for i, c in enumerate((2.5, 3.0)):
        f = tmp_path / f"s{i}.json"
        f.write_text(json.dumps({"student_after": {"CIDEr": c}, "student_before": {"CIDEr": 2.0}}))
        files.append(f)
    t = metric_table(aggregate(files), "CIDEr:1")
    assert "| system | CIDEr mean |" in t and "| student_after | 2.75 | 0.35 | 2.50, 3.00 |" in t

# a recipe in miniature: stage 1 is the shared warm-up, stage 2 "trains" with the seed, stage 3 scores
_MINI_RUN_SH = """#!/usr/bin/env bash
set -euo pipefail
readonly caller_pwd=$PWD
orig_args=("$@")
cd "$(dirname "${{BASH_SOURCE[0]}}")"
stage=1
stop_stage=3
seeds=1
seed=0
smoke=false
data=data
exp=exp
. {root}/tools/parse_options.sh
recipe=mini
. {root}/tools/recipe_common.sh
mkdir -p "${{exp}}"
if [ ${{stage}} -le 1 ] && [ ${{stop_stage}} -ge 1 ]; then echo warm > "${{exp}}/warm.txt"; fi
rc=0; run_seeds 2 wer warm.txt || rc=$?
case ${{rc}} in 0) exit 0 ;; 1) ;; *) exit ${{rc}} ;; esac
if [ ${{stage}} -le 2 ] && [ ${{stop_stage}} -ge 2 ]; then
  [ -f "${{exp}}/warm.txt" ] || {{ echo "no warm-up in ${{exp}}" >&2; exit 1; }}
  echo "${{seed}}" > "${{exp}}/trained.txt"
fi
if [ ${{stage}} -le 3 ] && [ ${{stop_stage}} -ge 3 ]; then
  s=$(cat "${{exp}}/trained.txt")
  echo "{{\\"after\\": {{\\"wer\\": 0.1$s}}, \\"settings\\": {{\\"seed\\": $s}}}}" > "${{exp}}/results.json"
fi
"""


def test_run_seeds_repeats_the_stages_after_the_warm_up(tmp_path):
    """``--seeds 3``: the warm-up once, stages 2-3 per seed in exp/seed<s>/ (linked to the
    warm-up), their results combined with mean / std / per seed, a table in exp/RESULTS.md."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "run.sh").write_text(_MINI_RUN_SH.format(root=ROOT))
    r = subprocess.run(["bash", str(recipe / "run.sh"), "--seeds", "3", "--seed", "4", "--exp", str(tmp_path / "exp")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    exp = tmp_path / "exp"
    for s in (4, 5, 6):
        assert (exp / f"seed{s}" / "warm.txt").is_symlink() and (exp / f"seed{s}" / "trained.txt").read_text() == f"{s}\n"
    agg = json.loads((exp / "results.json").read_text())
    assert agg["seeds"] == [4, 5, 6] and agg["after"]["wer"]["per_seed"] == [0.14, 0.15, 0.16]
    assert agg["after"]["wer"]["mean"] == pytest.approx(0.15)
    assert "| after | 15.00 | 1.00 | 14.00, 15.00, 16.00 |" in (exp / "RESULTS.md").read_text()
    assert "seed 6 (3 of 3)" in r.stdout
    bad = subprocess.run(["bash", str(recipe / "run.sh"), "--seeds", "x"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds must be a positive integer" in bad.stderr
