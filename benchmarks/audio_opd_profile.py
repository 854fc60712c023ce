"""Where one OPD step of the tiny Qwen2-Audio pair spends its time ("audio_opd_profile").

Runs the trainer's own step (``METHODS["opd"].experience`` + ``.loss`` + ``TorchEngine.backward``
+ ``TorchEngine.step``) with timers wrapped around the calls it makes, so nothing is re-written:

- ``prompts``: ``AudioPromptCollator.prompts`` (audio decode, features, chat template, tokenise);
- ``rollout``: ``generate_completions`` (sampling + sampled-token log-probs + masks + texts);
- ``teacher``: ``LocalTeacher.score``;
- ``experience_other``: the rest of ``experience`` (masks, metrics);
- ``student_forward_backward``: ``METHODS["opd"].loss`` + ``TorchEngine.backward``;
- ``optimizer``: ``TorchEngine.step``.

Reports the split of the fastest of several steps (the machine is shared: a slow step is
mostly other work) and each part's share of it.

``lm_head_slice``: the student's forward + backward through ``completion_logits`` with a
real-sized vocabulary, LM head on the completion positions only against the head over the whole
prompt + completion (a plain Qwen2-Audio forward; it has no ``logits_to_keep``).

What it leaves out: the trainer's logging, checkpointing and evaluation (not per-step work).
"""
from __future__ import annotations

import time

from benchmarks import common as B


def run_profile(smoke: bool = False) -> dict:
    import core.methods as M

    S = B.opd_setup(smoke)
    batch_size, n, max_new, repeat, warmup = S.batch_size, S.n, S.max_new, S.repeat, S.warmup
    student, proc, teacher, cfg, ctx, engine, rows = S.student, S.proc, S.teacher, S.cfg, S.ctx, S.engine, S.rows
    method = M.METHODS["opd"]
    timer = B.Timer()

    def wrap(fn, name):
        def inner(*a, **k):
            with timer(name):
                return fn(*a, **k)
        return inner

    orig_gen, orig_prompts, orig_score = M.generate_completions, ctx.collator.prompts, ctx.teacher.score
    M.generate_completions = wrap(orig_gen, "rollout")
    ctx.collator.prompts = wrap(orig_prompts, "prompts")
    ctx.teacher.score = wrap(orig_score, "teacher")
    samples, totals, tokens = [], [], []
    try:
        for it in range(warmup + repeat):
            timer.t.clear()
            t_step = time.perf_counter()
            ctx.forward_model.train()
            with timer("experience"):
                exp = method.experience(ctx, rows, 3000 + it)
            with timer("student_forward_backward"):
                loss, _ = method.loss(ctx, exp)
                engine.backward(loss)
            with timer("optimizer"):
                engine.step()
            total = time.perf_counter() - t_step
            if it < warmup:
                continue
            t = dict(timer.t)
            t["experience_other"] = t.pop("experience") - t["prompts"] - t["rollout"] - t["teacher"]
            samples.append(t)
            totals.append(total)
            tokens.append(int(exp.comp.mask.sum()))
    finally:
        M.generate_completions = orig_gen
        del ctx.collator.prompts
        del ctx.teacher.score
    keys = ["prompts", "rollout", "teacher", "experience_other", "student_forward_backward", "optimizer"]
    i = min(range(len(totals)), key=totals.__getitem__)  # the least disturbed step
    secs = {k: samples[i][k] for k in keys}
    step = totals[i]
    return {
        "step_s": step, "seconds": secs, "shares": {k: v / step for k, v in secs.items()},
        "unaccounted_s": step - sum(secs.values()), "completion_tokens": B.median(tokens),
        "tokens_per_s": tokens[i] / step, "stat": "the fastest of the repeated steps (the machine is shared)",
        "median_step_s": B.median(totals),
        "setup": {"prompts": batch_size, "n": n, "sequences": batch_size * n, "max_new_tokens": max_new,
                  "form": cfg.opd.form, "divergence": cfg.opd.divergence, "support": cfg.opd.support},
        "repeat": repeat, "warmup": warmup,
    }


def run_head_slice(smoke: bool = False) -> dict:
    """Student forward + backward through ``completion_logits`` at a real-sized vocabulary, with
    the LM head on the completion positions only (ours) against the head over every prompt +
    completion position (what a plain forward of Qwen2-Audio does: it takes no ``logits_to_keep``).
    The tiny student's vocabulary is resized so the head's share looks like a real checkpoint's."""
    import torch

    import core.rollout as R
    from core.data.collate import AudioPromptCollator

    vocab = 4096 if smoke else 32000
    batch_size, n, T = (2, 2, 8) if smoke else (8, 2, 32)
    repeat, warmup = (1, 1) if smoke else (7, 2)
    model, proc, _ = B.load_pair()
    model.resize_token_embeddings(vocab)
    model.train()
    batch = AudioPromptCollator(proc).prompts(B.rows_for(batch_size)).repeat(n)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (len(batch), T), generator=g)
    mask = torch.ones_like(ids)
    P = batch.inputs["input_ids"].shape[1]
    orig = R._sliceable_head

    def step(sliced: bool):
        R._sliceable_head = orig if sliced else (lambda m: None)
        try:
            logits = R.completion_logits(model, batch, ids, mask)
            loss = -(R.token_logp(logits, ids) * mask).sum() / mask.sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())
        finally:
            R._sliceable_head = orig

    t_ours, t_full, same = [], [], []
    for it in range(warmup + repeat):
        res = {}
        for sliced in ((True, False) if it % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            loss = step(sliced)
            res[sliced] = (time.perf_counter() - t0, loss)
        if it < warmup:
            continue
        t_ours.append(res[True][0])
        t_full.append(res[False][0])
        same.append(abs(res[True][1] - res[False][1]) < 1e-4)
    ours, full = B.best(t_ours), B.best(t_full)
    seqs = len(batch)
    return {"ours_s": ours, "reference_s": full, "ratio": B.ratio(ours, full), "same_loss": all(same),
            "stat": "min over repeats", "ratio_of_medians": B.ratio(B.median(t_ours), B.median(t_full)),
            "logits_mb_ours": seqs * T * vocab * 4 / 2**20, "logits_mb_reference": seqs * (P + T) * vocab * 4 / 2**20,
            "setup": {"vocab": vocab, "sequences": seqs, "prompt_len": P, "completion_len": T,
                      "ours": "completion_logits (LM head on the T completion positions)",
                      "reference": "forward with logits over all P + T positions, sliced after"},
            "repeat": repeat, "warmup": warmup}


BENCHMARKS = {"audio_opd_profile": run_profile, "lm_head_slice": run_head_slice}
