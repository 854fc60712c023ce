"""A student and a teacher that share a tokenizer but pad their embedding tables to different sizes
(as Qwen2.5 up to 3B, 151,936 rows, and 7B, 152,064, for 151,665 tokens): accepted, and every
divergence compares the token rows only; a real tokenizer mismatch stays a clear error."""
from __future__ import annotations

import json
import math

import pytest
import torch

from core.data.collate import AudioPromptCollator
from core.models import (build_tiny_qwen2_audio, check_vocab_match, load_model_and_processor, save_model,
                         special_token_ids, train_tokenizer)
from core.sampling import generate_completions
from core.teacher import LocalTeacher
from core.trainer import Trainer
from core import config as C

pytestmark = pytest.mark.usefixtures("one_thread")


def _padded(src, out, rows: int, loud: bool = False):
    """``src`` with its embedding table and LM head padded to ``rows``; ``loud``: the padded rows of
    the head get large weights, so their logits would dominate any divergence that kept them."""
    model, proc = load_model_and_processor(src)
    n = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    if loud:
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head[n:] = 50.0 * torch.randn_like(head[n:])
    save_model(model, proc, out)
    return out


@pytest.fixture(scope="module")
def pair(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    n_tok = len(tiny.tokenizer.get_vocab())
    student = _padded(tiny.student, root / "student", n_tok + 4)
    teacher = _padded(tiny.teacher, root / "teacher", n_tok + 36, loud=True)
    return n_tok, student, teacher


def test_padded_tables_share_the_token_rows(pair, tiny, tmp_path):
    n_tok, student, teacher = pair
    sm, sp = load_model_and_processor(student)
    tm, tp = load_model_and_processor(teacher)
    assert check_vocab_match(sp, tp, student_model=sm, teacher_model=tm) == n_tok
    # a true mismatch (another tokenizer) is still refused, naming what differs
    other = train_tokenizer(["zebra quartz jump", "a vexing corpus"], 280)
    om, op = build_tiny_qwen2_audio(other, hidden=32, layers=1, heads=2, seed=3)
    with pytest.raises(ValueError, match="vocabulary mismatch: tokenizer sizes differ"):
        check_vocab_match(sp, op, student_model=sm, teacher_model=om)
    # a table with fewer rows than the tokenizer has ids is refused too
    short = _padded(tiny.teacher, tmp_path / "short", n_tok - 1)
    shm, shp = load_model_and_processor(short)
    with pytest.raises(ValueError, match="fewer rows than the tokenizer"):
        check_vocab_match(sp, shp, student_model=sm, teacher_model=shm)


def test_the_teacher_scores_over_the_token_rows(pair, tiny, tmp_path):
    """Scores of the padded teacher with ``vocab_limit`` equal those of the same teacher with its
    padded rows cut off, although those rows carry large logits."""
    n_tok, student, teacher = pair
    sm, sp = load_model_and_processor(student)
    tm, _ = load_model_and_processor(teacher)
    tm_cut, tp_cut = load_model_and_processor(teacher)
    tm_cut.resize_token_embeddings(n_tok, mean_resizing=False)
    coll = AudioPromptCollator(sp, "Transcribe the audio.")
    batch = coll.prompts(tiny.rows[:2])
    tok = sp.tokenizer
    _, comp = generate_completions(sm, batch, tok, n=1, max_new_tokens=5, temperature=1.0,
                                   suppress_ids=special_token_ids(sp), seed=0)
    a = LocalTeacher(tm, vocab_limit=n_tok).score(batch, comp, top_k=3, return_logits=True)
    b = LocalTeacher(tm_cut).score(batch, comp, top_k=3, return_logits=True)
    assert a.logits.shape[-1] == n_tok
    torch.testing.assert_close(a.logp, b.logp)
    torch.testing.assert_close(a.topk_logp, b.topk_logp)
    # without the limit the padded rows swamp the distribution: the scores differ a lot
    c = LocalTeacher(tm).score(batch, comp)
    assert float((c.logp - b.logp).abs().max()) > 1.0


@pytest.mark.parametrize("method, opd", [("opd", {"form": "distribution", "support": "full"}),
                                         ("opd", {"form": "distribution", "support": "teacher_topk", "top_k": 4}),
                                         ("opd", {"form": "sampled_token"}),
                                         ("calibrate", {})])
def test_opd_and_calibrate_run_on_a_padded_pair(pair, tiny, write_config, tmp_path, method, opd):
    n_tok, student, teacher = pair
    cfg = write_config(tmp_path, method, method=method, model={"path": str(student)},
                       teacher={"path": str(teacher)}, opd=opd, data={"dev": str(tiny.manifest)},
                       train={"batch_size": 2, "max_steps": 2, "seed": 0})
    tr = Trainer(C.load_config(str(cfg)))
    assert tr.teacher.vocab_limit == n_tok
    assert set(range(n_tok, n_tok + 4)) <= set(tr.ctx.suppress_ids)  # the student's padded rows
    res = tr.train()
    if method == "calibrate":
        assert math.isfinite(res["reverse_kl_per_token"]) and res["tokens"] > 0
    else:
        assert res["steps"] == 2 and res["skipped_steps"] == 0
        rows = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
