"""A real vLLM OpenAI-compatible server as the remote teacher (CPU build, tiny text models with
head size 32), started with the README's command (``core.vllm_engine.server_command``).

Checks: ``RemoteTeacher``'s log-probs and top-k from vLLM equal ``LocalTeacher``'s on the same
batch (1e-4); an OPD run through the trainer with ``teacher.kind: remote`` against vLLM scores
every sample and gives the losses of the same run with the local teacher.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import vllm_server

from core import config as C
from core.data.collate import TextPromptCollator, tokenize_targets
from core.models import build_tiny_causal_lm, load_model_and_processor, train_tokenizer
from core.sampling import Completions
from core.teacher import LocalTeacher, RemoteTeacher
from core.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
K = 5
WORDS = ["one two three", "hello world", "the cat sat on the mat", "red green and blue",
         "a dog ran in the park", "it is cold today", "fish swim in water", "birds fly high"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_teacher")
    # whole words as tokens, so that a sampled completion's text tokenises back to the same ids
    # (vLLM scores the text of the prefill, not our ids)
    tok = train_tokenizer(WORDS * 8, vocab_size=120)
    build_tiny_causal_lm(tok, hidden=96, layers=2, heads=3, seed=1, out_dir=root / "teacher")
    build_tiny_causal_lm(tok, hidden=64, layers=2, heads=2, seed=0, out_dir=root / "student")
    rows = [{"key": f"s{i}", "task": "qa", "prompt": w.split()[0], "text": w} for i, w in enumerate(WORDS)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a student that writes words (SFT on the rows), sampling among its top 3 tokens below: a
    # random one writes byte tokens whose text vLLM would tokenise into other ids
    Trainer(C.load_config(overrides={
        "method": "sft", "output_dir": str(root / "sft"), "model": {"path": str(root / "student")},
        "data": {"train": str(root / "train.jsonl"), "prompt": "{prompt}"},
        "optim": {"lr": 1e-2, "scheduler": "constant"},
        "train": {"batch_size": 8, "max_steps": 40, "resume": "never", "save_every": 0}})).train()
    with vllm_server(root / "teacher") as url:
        yield SimpleNamespace(root=root, url=url, teacher=root / "teacher", student=root / "sft" / "final",
                              manifest=root / "train.jsonl", rows=rows)


def test_vllm_teacher_scores_like_the_local_one(served):
    teacher, tok = load_model_and_processor(served.teacher)
    student, _ = load_model_and_processor(served.student)
    col = TextPromptCollator(tok, "{prompt}")
    batch = col.prompts(served.rows[:4])
    texts = [r["text"] for r in served.rows[:4]]
    ids, mask = tokenize_targets(tok, texts)
    comp = Completions(ids, mask, None, texts)
    ls = LocalTeacher(teacher, tok).score(batch, comp, top_k=K)
    with RemoteTeacher(served.url, tok, collator=col, student_model=student, model="teacher") as t:
        rs = t.score(batch, comp, top_k=K)
    assert rs.valid.all()
    m = mask.bool()
    assert (rs.logp[m] - ls.logp[m]).abs().max() < 1e-4
    assert (rs.topk_logp[m] - ls.topk_logp[m]).abs().max() < 1e-4
    assert torch.equal(rs.topk_ids[m], ls.topk_ids[m])


def _metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_opd_against_vllm_trains_like_the_local_teacher(served, tmp_path):
    def cfg(name, teacher):
        return C.load_config(overrides={
            "method": "opd", "output_dir": str(tmp_path / name), "model": {"path": str(served.student)},
            "teacher": teacher, "data": {"train": str(served.manifest), "prompt": "{prompt}"},
            "rollout": {"n": 2, "max_new_tokens": 6, "top_k": 3},
            "opd": {"form": "distribution", "support": "teacher_topk", "top_k": K},
            "optim": {"lr": 1e-2, "scheduler": "constant"},
            "train": {"batch_size": 4, "max_steps": 3, "seed": 0, "resume": "never", "save_every": 0}})
    Trainer(cfg("remote", {"kind": "remote", "url": served.url, "model": "teacher"})).train()
    Trainer(cfg("local", {"kind": "local", "path": str(served.teacher)})).train()
    rm, lm = _metrics(tmp_path / "remote"), _metrics(tmp_path / "local")
    assert len(rm) == len(lm) == 3
    for r, m in zip(rm, lm):
        assert r["aligned_share"] == 1.0 and r["unscored_samples"] == 0
        assert r["loss"] > 0 and abs(r["loss"] - m["loss"]) < 1e-4
