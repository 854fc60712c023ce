"""A recipe folder copies cleanly into a new task, and a user's run leaves the repository clean.

In a temporary git clone of this working tree (its uncommitted files included), recipes/audio_qa
is copied to recipes/my_task, its prompt changed and a reward file of its own added through
``rewards.modules`` in its GRPO config; then recipes/audio_qa is deleted and the copy's smoke
stages 0-2 run, then its scoring stage: it needs nothing of the recipe it came from. Every run leaves ``git status`` clean (outputs go to the ignored data/ and
exp/); the results table goes to exp/RESULTS.md, and into the README only with
``--update_readme true``.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import recipe_env

ROOT = Path(__file__).resolve().parents[2]
OLD_INSTRUCTION = 'INSTRUCTION = "Think first, then answer as <think>...</think><answer>...</answer>."'
NEW_INSTRUCTION = "Listen to the clip, think, then answer as <think>...</think><answer>...</answer>."
OLD_REWARDS = "rewards: {format: 0.1, mcq_accuracy: 1.0}"
NEW_REWARDS = "rewards: {format: 0.1, mcq_accuracy: 1.0, my_task_short: 0.1, my_task_in_choices: 0.1}"
REWARDS_PY = '''"""Rewards of my_task: one registered with the decorator, one through REWARDS."""
from core.rewards import extract_answer, register_reward


@register_reward("my_task_short")
def short_answer(completions, **fields):
    return [float(0 < len(extract_answer(c)) <= 20) for c in completions]


def in_choices(completions, choices=None, **fields):
    return [float(extract_answer(c).strip() in [str(x) for x in ch]) for c, ch in zip(completions, choices)]


REWARDS = {"my_task_in_choices": in_choices}
'''


def _git(repo: Path, *args) -> str:
    proc = subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _snapshot(dst: Path) -> None:
    """``dst``: a clone of this repository holding the working tree's files as they are now
    (committed or not; ignored ones left out), committed, with the project's .venv linked in."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dst)], check=True, timeout=300)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                            capture_output=True, check=True, timeout=120).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src, out = ROOT / rel, dst / rel
        if src.is_file() or src.is_symlink():
            if out.is_symlink() or out.is_file():
                out.unlink()
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out, follow_symlinks=False)
    for rel in filter(None, _git(dst, "ls-files", "-z").split("\0")):  # removed from the working tree
        if not (ROOT / rel).exists() and not (ROOT / rel).is_symlink():
            (dst / rel).unlink()
    (dst / ".venv").symlink_to(ROOT / ".venv")   # tools/recipe_common.sh looks for <repo>/.venv
    with open(dst / ".git" / "info" / "exclude", "a") as f:
        f.write(".venv\n")
    _git(dst, "add", "-A")
    _git(dst, "commit", "-q", "--allow-empty", "-m", "snapshot of the working tree")  # a clean tree: nothing new


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected one {old!r}"
    path.write_text(text.replace(old, new))


def _run(repo: Path, *args, timeout=1200):
    env = recipe_env()
    env.pop("PYTHONPATH", None)   # the recipe finds core and tools by itself
    proc = subprocess.run(["bash", str(repo / "recipes/my_task/run.sh"), "--smoke", "true", *map(str, args)],
                          cwd=repo, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _status(repo: Path) -> str:
    return _git(repo, "status", "--porcelain", "--untracked-files=all")


def _grpo_metrics(task: Path) -> list[dict]:
    return [json.loads(x) for x in (task / "exp" / "grpo" / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    repo = tmp_path_factory.mktemp("recipe_copy") / "repo"
    _snapshot(repo)
    task = repo / "recipes" / "my_task"
    shutil.copytree(repo / "recipes" / "audio_qa", task, symlinks=True,
                    ignore=shutil.ignore_patterns("exp", "data", "__pycache__"))
    _edit(task / "run.sh", "recipe=audio_qa\n", "recipe=my_task\n")
    _edit(task / "local" / "prompt.py", OLD_INSTRUCTION, f'INSTRUCTION = "{NEW_INSTRUCTION}"')
    (task / "local" / "my_rewards.py").write_text(REWARDS_PY)
    _edit(task / "conf" / "grpo.yaml", OLD_REWARDS, NEW_REWARDS)
    with open(task / "conf" / "grpo.yaml", "a") as f:
        f.write("rewards:\n  modules: [local/my_rewards.py]   # relative to the recipe folder\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "my_task: a copy of audio_qa")
    return repo, task


@pytest.fixture(scope="module")
def without_original(copied):
    """recipes/audio_qa deleted (and committed); the copy runs from nothing: stages 0-2, then the
    scoring stage as a user runs it, then as a maintainer refreshing the README."""
    repo, task = copied
    shutil.rmtree(repo / "recipes" / "audio_qa")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "without audio_qa")
    proc = _run(repo, "--stop_stage", 2)
    status_after_training = _status(repo)
    readme_before = (task / "README.md").read_text()
    # the last stage as in a full run (not the smoke preset's), without --update_readme
    env_smoke_off = ("--stage", 6, "--stop_stage", 6, "--smoke", "false")
    _run(repo, *env_smoke_off)
    user = {"status": _status(repo), "readme": (task / "README.md").read_text(),
            "results_md": (task / "exp" / "RESULTS.md").read_text()}
    _run(repo, *env_smoke_off, "--update_readme", "true")
    maintainer = {"status": _status(repo), "readme": (task / "README.md").read_text()}
    return repo, task, status_after_training, readme_before, user, maintainer, proc


def test_no_symlinks_and_no_other_recipe_in_the_copy(copied):
    _, task = copied
    links = [p for p in task.rglob("*") if p.is_symlink()]
    assert not links, links
    for p in (task / "local").glob("*.py"):
        text = p.read_text()
        assert "audio_qa" not in text.replace("the audio_qa recipe", ""), p  # the name only in prose
        assert "sys.path" not in text and "recipes/" not in text, p


def test_copy_uses_its_own_prompt_and_reward(without_original):
    repo, task, status_after_training, *_, proc = without_original
    assert "[my_task] stage 2" in proc.stdout
    rows = [json.loads(x) for x in (task / "data" / "train.jsonl").read_text().splitlines() if x.strip()]
    assert rows and all(r["prompt"].endswith(NEW_INSTRUCTION) for r in rows)
    lines = _grpo_metrics(task)
    assert lines and all("reward/my_task_short" in x and "reward/my_task_in_choices" in x for x in lines)
    assert all("reward/format" in x and "reward/mcq_accuracy" in x for x in lines)
    assert "local/my_rewards.py" in (task / "exp" / "grpo" / "config.yaml").read_text()
    assert status_after_training == ""   # data/ and exp/ are ignored: nothing tracked changed, nothing new


def test_copy_runs_without_the_original(without_original):
    repo, task, status_after_training, _, user, _, _ = without_original
    assert not (repo / "recipes" / "audio_qa").exists()
    assert status_after_training == ""
    lines = _grpo_metrics(task)
    assert lines and all("reward/my_task_short" in x and "reward/my_task_in_choices" in x for x in lines)
    res = json.loads((task / "exp" / "results.json").read_text())
    assert 0.0 <= res["base"]["acc"] <= 1.0 and 0.0 <= res["grpo"]["acc"] <= 1.0


def test_a_run_writes_results_md_and_leaves_the_readme_alone(without_original):
    _, _, _, readme_before, user, _, _ = without_original
    assert user["status"] == "" and user["readme"] == readme_before
    assert user["results_md"].startswith("# Results") and "| base |" in user["results_md"]
    assert "| grpo |" in user["results_md"]


def test_update_readme_refreshes_the_table(without_original):
    _, _, _, readme_before, user, maintainer, _ = without_original
    assert maintainer["status"].strip() == "M recipes/my_task/README.md"
    assert maintainer["readme"] != readme_before
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    table = maintainer["readme"].split(start)[1].split(end)[0]
    assert "| base |" in table and "| grpo |" in table
    # the README outside the markers is as it was
    assert maintainer["readme"].split(start)[0] == readme_before.split(start)[0]
    assert maintainer["readme"].split(end)[1] == readme_before.split(end)[1]
