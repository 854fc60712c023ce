"""Rollout throughput ("rollout"): ``core.sampling.generate_completions`` against a plain
``model.generate`` call on the same model and batch.

Both sample with the same settings (temperature, top-p, top-k, special tokens suppressed, EOS,
``max_new_tokens``) and the same seed. Ours draws by inverse CDF (``core.sampling.draw``), the
same distribution as ``generate``'s ``torch.multinomial`` but other draws; a third variant,
``ours_multinomial``, runs our loop with ``multinomial`` and samples exactly ``generate``'s
tokens (checked: ``same_tokens_with_multinomial_draw``), which splits the gain between the loop
and the draw. Ours also returns the sampled-token log-probabilities, the EOS mask and the decoded
texts, as the trainer uses it. Throughput counts real generated tokens: up to and including the
first EOS of each row. The variants alternate; the best run of each is the headline (the machine
is shared), the ratio of medians is reported beside it.

On a GPU (``benchmarks.run --device cuda``): the model in ``RUN.dtype`` on the GPU, the batch
there too, each timed call waited for (``common.sync``).

What it leaves out: prompt collation (both get the same ready ``PromptBatch``).
"""
from __future__ import annotations

import torch

from benchmarks import common as B

GOAL = 0.95


def run_rollout(smoke: bool = False) -> dict:
    from core.data.collate import AudioPromptCollator
    from core.models import special_token_ids
    from core.sampling import eos_mask, generate_completions

    batch_size, n, max_new = (2, 2, 8) if smoke else (8, 4, 32)
    repeat, warmup = (1, 1) if smoke else (9, 2)
    temperature, top_p, top_k = 1.0, 0.95, 50
    model, proc, _ = B.load_pair()
    model.to(B.RUN.device, getattr(torch, B.RUN.dtype)).eval()
    tok = proc.tokenizer
    suppress, eos = special_token_ids(proc), [tok.eos_token_id]
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(B.rows_for(batch_size)).to(B.RUN.device)
    rep = batch.repeat(n)
    P = rep.inputs["input_ids"].shape[1]

    def ours(seed):
        _, comp = generate_completions(model, batch, tok, n=n, temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_new, suppress_ids=suppress, eos_ids=eos, seed=seed)
        return comp.ids, comp.mask

    def plain(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            seqs = model.generate(**rep.inputs, max_new_tokens=max_new, do_sample=True, temperature=temperature,
                                  top_p=top_p, top_k=top_k, suppress_tokens=suppress, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id, use_cache=True)
        ids = seqs[:, P:]
        mask = eos_mask(ids, eos)
        return torch.where(mask.bool(), ids, torch.full_like(ids, tok.pad_token_id)), mask

    def ours_multinomial(seed):
        with B.multinomial_draw():
            return ours(seed)

    secs, res = B.alternate({"ours": lambda it: ours(2000 + it), "plain": lambda it: plain(2000 + it),
                             "ours_multinomial": lambda it: ours_multinomial(2000 + it)}, repeat, warmup)
    t_ours, t_plain, t_mult = secs["ours"], secs["plain"], secs["ours_multinomial"]
    n_ours = [int(mask.sum()) for _, mask in res["ours"]]
    n_plain = [int(mask.sum()) for _, mask in res["plain"]]
    n_mult = [int(mask.sum()) for _, mask in res["ours_multinomial"]]
    same = [bool(torch.equal(a, b)) for (a, _), (b, _) in zip(res["ours_multinomial"], res["plain"])]
    tps_ours = max(k / t for k, t in zip(n_ours, t_ours))
    tps_plain = max(k / t for k, t in zip(n_plain, t_plain))
    tps_mult = max(k / t for k, t in zip(n_mult, t_mult))
    r = B.ratio(tps_ours, tps_plain)
    return {
        "ours_tokens_per_s": tps_ours, "reference_tokens_per_s": tps_plain, "ratio": r,
        "ours_multinomial_tokens_per_s": tps_mult, "ratio_multinomial": B.ratio(tps_mult, tps_plain),
        "goal": f">= {GOAL}x (not slower, within noise)", "met": bool(r >= GOAL),
        "stat": "best over repeats (the machine is shared)",
        "ratio_of_medians": B.ratio(B.median([k / t for k, t in zip(n_ours, t_ours)]),
                                    B.median([k / t for k, t in zip(n_plain, t_plain)])),
        "ours_s": B.best(t_ours), "reference_s": B.best(t_plain),
        "generated_tokens": B.median(n_ours), "same_tokens_with_multinomial_draw": all(same),
        "setup": {"prompts": batch_size, "n": n, "sequences": batch_size * n, "max_new_tokens": max_new,
                  "temperature": temperature, "top_p": top_p, "top_k": top_k, "suppressed_ids": len(suppress),
                  "model": "Qwen2Audio tiny student (hidden 48, 2+2 layers)", "device": B.RUN.device,
                  "dtype": B.RUN.dtype,
                  "ours": "generate_completions (ids, EOS mask, sampled-token logp, texts), inverse-CDF draw",
                  "ours_multinomial": "the same with torch.multinomial as the draw",
                  "reference": "model.generate(...) sequences only, EOS mask computed after"},
        "repeat": repeat, "warmup": warmup,
    }


BENCHMARKS = {"rollout": run_rollout}
