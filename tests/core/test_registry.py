"""Methods and rewards as extension points, and the config checks where their keys are declared.

- A new method is one registered class; the trainer runs it without naming it.
- A user's reward file listed in ``rewards.modules`` is imported when the config loads (also in a
  fresh ``core.bin.train`` process) and its rewards are logged; a reward name nobody registered is
  refused at load with the key named, not at the first step.
- Choices are ``Literal``-typed and refused with the key and the choices; a section checks its
  own bounds (the remote teacher's); media prompts need ``data.prompt`` (no hidden default).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core import config as C
from core import methods as M
from core.rewards import registered_rewards

REPO = Path(__file__).resolve().parents[2]

REWARD_FILE = textwrap.dedent('''
    from core.rewards import register_reward

    @register_reward("says_the")
    def says_the(completions, **kwargs):
        """1 for a completion that contains the word 'the'."""
        return [float("the" in c.split()) for c in completions]

    def _length(completions, text=None, **kwargs):
        return [min(1.0, len(c) / 10) for c in completions]

    REWARDS = {"length_up_to_10": _length}
''')


def _base(tiny, **over) -> dict:
    d = {"model": {"path": str(tiny.student)}, "teacher": {"path": str(tiny.teacher)},
         "data": {"train": str(tiny.manifest), "prompt": "Transcribe the audio."}}
    return C.deep_merge(d, over)


def test_unknown_reward_is_refused_when_the_config_loads(tiny):
    with pytest.raises(C.ConfigError, match=r"'grpo\.rewards': unknown reward 'no_such_reward'.*rewards\.modules"):
        C.load_config(overrides=_base(tiny, method="grpo", grpo={"rewards": {"no_such_reward": 1.0}}))
    with pytest.raises(C.ConfigError, match=r"'train\.eval_reward': unknown reward 'wre'"):
        C.load_config(overrides=_base(tiny, train={"eval_reward": "wre"}))
    with pytest.raises(C.ConfigError, match=r"'rest\.rewards': unknown reward"):
        C.load_config(overrides=_base(tiny, method="rest", rest={"rewards": {"nope": 1}, "lrs": [1e-3, 1e-3]}))


def test_a_reward_file_registers_its_rewards(tiny, tmp_path, monkeypatch):
    f = tmp_path / "local" / "my_rewards.py"
    f.parent.mkdir()
    f.write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory (the recipe's)
    cfg = C.load_config(overrides=_base(tiny, method="grpo", rewards={"modules": ["local/my_rewards.py"]},
                                        grpo={"rewards": {"says_the": 1.0, "length_up_to_10": 0.5}}))
    assert {"says_the", "length_up_to_10"} <= set(registered_rewards())
    assert cfg.rewards.modules == ["local/my_rewards.py"]
    # loading it again (a second config in the same process) is harmless
    C.load_config(overrides=_base(tiny, method="grpo", rewards={"modules": [str(f)]},
                                  grpo={"rewards": {"says_the": 1.0}}))


@pytest.mark.parametrize("content,path,match", [
    (None, "local/missing.py", r"'rewards\.modules': local/missing\.py: no such file"),
    ("raise RuntimeError('boom')\n", "local/broken.py", r"'rewards\.modules': importing local/broken\.py failed: "
                                                       r"RuntimeError: boom"),
    ("REWARDS = {'x': 3}\n", "local/table.py", r"REWARDS must be a dict of name -> function"),
    (None, "no_such_package.rewards", r"importing no_such_package\.rewards failed: ModuleNotFoundError"),
])
def test_a_bad_reward_module_is_named(tiny, tmp_path, monkeypatch, content, path, match):
    if content is not None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(overrides=_base(tiny, rewards={"modules": [path]}))


def test_the_cli_trains_with_a_user_reward(tiny, tmp_path, write_config):
    """A fresh ``core.bin.train`` process imports the reward file and logs its reward per step."""
    f = tmp_path / "my_rewards.py"
    f.write_text(REWARD_FILE)
    cfg = write_config(tmp_path, "grpo", method="grpo", rewards={"modules": [str(f)]},
                       grpo={"rewards": {"says_the": 1.0, "length_up_to_10": 0.5}},
                       train={"batch_size": 2, "max_steps": 2, "resume": "never"})
    p = subprocess.run([sys.executable, "-m", "core.bin.train", "--config", str(cfg)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all({"reward/says_the", "reward/length_up_to_10"} <= set(r) for r in rows)
    for r in rows:
        assert r["reward"] == pytest.approx(r["reward/says_the"] + 0.5 * r["reward/length_up_to_10"], abs=1e-5)


@pytest.mark.parametrize("over,match", [
    ({"opd": {"divergence": "kl"}}, r"'opd\.divergence': 'kl' is not one of 'reverse_kl', 'forward_kl', 'jsd'"),
    ({"grpo": {"agg": "mean"}}, r"'grpo\.agg': 'mean' is not one of 'token-mean'"),
    ({"data": {"modality": "video"}}, r"'data\.modality': 'video' is not one of"),
    ({"backend": {"name": "fsdp"}}, r"'backend\.name': 'fsdp' is not one of 'torch', 'deepspeed'"),
    ({"teacher": {"kind": "http"}}, r"'teacher\.kind': 'http' is not one of 'local', 'remote'"),
    ({"teacher": {"kind": "remote", "url": "http://127.0.0.1:1", "timeout": 0}}, r"'teacher\.timeout': must be >= "),
    ({"teacher": {"concurrency": 0}}, r"'teacher\.concurrency': must be >= 1"),
    ({"method": "opd", "teacher": {"kind": "remote", "url": "http://127.0.0.1:1"}, "opd": {"support": "full"}},
     r"'opd\.support': a remote teacher gives top-k log-probs only"),
    ({"method": "distil"}, r"'method': 'distil' is not one of sft, opd, grpo, rest, calibrate"),
    ({"data": {"modality": "audio", "prompt": ""}}, r"'data\.prompt': required for audio and audio-visual prompts"),
])
def test_config_errors_name_the_key(tiny, over, match):
    with pytest.raises(C.ConfigError, match=match):
        C.load_config(overrides=_base(tiny, **over))


def test_an_audio_run_without_a_prompt_says_so(tiny, tmp_path):
    """``data.modality: auto`` resolved to audio with no ``data.prompt``: refused before training,
    naming the key (it used to train on "Transcribe the audio." whatever the task)."""
    from core.trainer import Trainer
    cfg = C.load_config(overrides=_base(tiny, output_dir=str(tmp_path / "run"), data={"prompt": ""}))
    with pytest.raises(C.ConfigError, match=r"'data\.prompt': required for audio"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_decode_without_a_prompt_says_so(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "core.bin.decode", "--model", str(tiny.student), "--manifest",
                        str(tiny.manifest), "--out", str(tmp_path / "hyp.jsonl")], capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2 and "--prompt is required for audio prompts" in p.stderr


def test_a_new_method_is_one_class(tiny, tmp_path, monkeypatch):
    """A method written outside core: SFT on the reference with the loss doubled. Registered, it is
    accepted by the config, its needs are asked by the trainer, and it trains."""
    from core.trainer import Trainer

    calls = []

    class DoubleSFT(M.SFT):
        name = "double_sft"

        def check(self, cfg):
            calls.append("check")

        def loss(self, ctx, exp, norm=None):
            calls.append("loss")
            loss, m = super().loss(ctx, exp, norm)
            return 2 * loss, dict(m, loss=2 * m["loss"])

    monkeypatch.setitem(M.METHODS, "double_sft", DoubleSFT())
    cfg = C.load_config(overrides=_base(tiny, method="double_sft", output_dir=str(tmp_path / "run"),
                                        train={"batch_size": 2, "max_steps": 2}))
    assert calls == ["check"]
    summary = Trainer(cfg).train()
    assert summary["steps"] == 2 and calls.count("loss") == 2
    with pytest.raises(ValueError, match="already registered"):
        M.register_method(type("Other", (M.Method,), {"name": "sft"}))
