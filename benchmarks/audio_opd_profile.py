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

``encoder_once``: one OPD step's student forward + backward (``METHODS["opd"].loss`` +
``TorchEngine.backward``) and LocalTeacher scoring on the rollout's repeated batch, with the audio
encoder run once per distinct prompt (``completion_logits`` sharing it among the n copies, ours)
against once per sample (the same batch without its copy groups: the plain forward), in one
process, same weights and experience, order alternated; the encoder's item counts and the
losses / gradients of both are reported beside the times.

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

    import core.forward as R
    from core.data.collate import AudioPromptCollator

    vocab = 4096 if smoke else 32000
    batch_size, n, T = (2, 2, 8) if smoke else (8, 2, 32)
    repeat, warmup = (1, 1) if smoke else (7, 2)
    model, proc, _ = B.load_pair()
    model.resize_token_embeddings(vocab)
    model.train()
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(B.rows_for(batch_size)).repeat(n)
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

    secs, losses = B.alternate({"ours": lambda it: step(True), "full": lambda it: step(False)}, repeat, warmup)
    t_ours, t_full = secs["ours"], secs["full"]
    same = [abs(a - b) < 1e-4 for a, b in zip(losses["ours"], losses["full"])]
    ours, full = B.best(t_ours), B.best(t_full)
    seqs = len(batch)
    return {"ours_s": ours, "reference_s": full, "ratio": B.ratio(ours, full), "same_loss": all(same),
            "stat": "min over repeats", "ratio_of_medians": B.ratio(B.median(t_ours), B.median(t_full)),
            "logits_mb_ours": seqs * T * vocab * 4 / 2**20, "logits_mb_reference": seqs * (P + T) * vocab * 4 / 2**20,
            "setup": {"vocab": vocab, "sequences": seqs, "prompt_len": P, "completion_len": T,
                      "ours": "completion_logits (LM head on the T completion positions)",
                      "reference": "forward with logits over all P + T positions, sliced after"},
            "repeat": repeat, "warmup": warmup}


def run_encoder_once(smoke: bool = False) -> dict:
    """Student forward + backward of one OPD step (and the teacher's scoring) with the audio
    encoder shared among the n copies of each prompt (ours) against run on every copy (reference)."""
    import dataclasses

    import core.methods as M
    from core.forward import shared_encoders

    S = B.opd_setup(smoke)
    repeat, warmup = S.repeat, S.warmup
    ctx, engine, student, cfg = S.ctx, S.engine, S.student, S.cfg
    method = M.METHODS["opd"]
    student.train()
    exp = method.experience(ctx, S.rows, 3000)
    # the reference: the same experience without the record of which rows copy a prompt
    plain = dataclasses.replace(exp, batch=dataclasses.replace(exp.batch, groups=None))
    # the items (audios) the student's encoder ran on: a forward hook sees the inputs as cut
    items: list[int] = []
    hooks = [e.register_forward_hook(lambda m, a, k, o: items.append(int(a[0].shape[0])), with_kwargs=True)
             for e in shared_encoders(student)]

    def student_step(e):
        items.clear()
        loss, _ = method.loss(ctx, e)
        engine.backward(loss)
        grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
        student.zero_grad(set_to_none=True)  # no optimizer step: both variants see the same weights
        return float(loss.detach()), grads, list(items)

    def teacher_step(e):
        return ctx.teacher.score(e.batch, e.comp, return_logits=True).logits

    try:
        t, out = B.alternate({"ours": lambda it: student_step(exp), "teacher_ours": lambda it: teacher_step(exp),
                              "reference": lambda it: student_step(plain),
                              "teacher_reference": lambda it: teacher_step(plain)}, repeat, warmup)
    finally:
        for h in hooks:
            h.remove()
    res = {k: v[-1] for k, v in out.items()}
    (l_ours, g_ours, n_ours), (l_ref, g_ref, n_ref) = res["ours"], res["reference"]
    grad_diff = max(float((g_ours[k] - g_ref[k]).abs().max()) for k in g_ref)
    teacher_diff = float((res["teacher_ours"] - res["teacher_reference"]).abs().max())
    ours, ref = B.best(t["ours"]), B.best(t["reference"])
    t_ours, t_ref = B.best(t["teacher_ours"]), B.best(t["teacher_reference"])
    return {"ours_s": ours, "reference_s": ref, "ratio": B.ratio(ours, ref),
            "ratio_of_medians": B.ratio(B.median(t["ours"]), B.median(t["reference"])),
            "teacher_ours_s": t_ours, "teacher_reference_s": t_ref, "teacher_ratio": B.ratio(t_ours, t_ref),
            "encoder_items_ours": n_ours, "encoder_items_reference": n_ref,
            "same_loss": abs(l_ours - l_ref) <= 1e-5 * max(1.0, abs(l_ref)), "grad_max_abs_diff": grad_diff,
            "teacher_logits_max_abs_diff": teacher_diff, "stat": "min over repeats",
            "setup": {"prompts": S.batch_size, "n": S.n, "sequences": len(exp), "max_new_tokens": S.max_new,
                      "completion_tokens": int(exp.comp.mask.sum()), "form": cfg.opd.form,
                      "ours": "completion_logits with the audio encoder once per prompt",
                      "reference": "the same forward with the encoder on every one of the n copies"},
            "repeat": repeat, "warmup": warmup}


BENCHMARKS = {"audio_opd_profile": run_profile, "lm_head_slice": run_head_slice, "encoder_once": run_encoder_once}
