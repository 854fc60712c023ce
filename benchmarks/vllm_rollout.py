"""Rollout engines ("rollout_vllm", "rollout_vllm_0.5b"): our sampling loop
(``core.sampling.generate_completions``, ``rollout.engine: hf``) against the in-process vLLM engine
(``core.vllm_engine.VLLMEngine``, ``rollout.engine: vllm``) on the same text model, prompts and
sampling settings, in tokens per second, plus vLLM's weight sync (``sync``: the trainer's
weights into the engine, and its prefix cache reset) per step.

Two sizes: the tiny text model of the tests (hidden 64, 2 layers, head size 32), and a randomly
initialised Qwen2 at the 0.5B configuration (hidden 896, 24 layers, 14 heads / 2 KV heads,
vocabulary 151,936), where a serving engine should pay. Each engine's tokens are counted up to
and including the first EOS of each row; the two engines alternate, the best run of each is the
headline (the machine is shared) and the ratio of medians is reported beside it. The engine's
start-up is reported apart (once per training run).

What it leaves out: a goal. Whichever engine wins is the measured result; the vLLM engine runs
on vLLM's CPU build here, ``--device cuda`` is not wired for it.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common as B

PROMPTS = ["count to three", "say hello", "name a pet", "name three colours", "where is the dog",
           "how is the weather", "what do fish do", "what do birds do"]


def _build(root: Path, size: str) -> Path:
    from core.models import build_tiny_causal_lm, save_model, train_tokenizer
    tok = train_tokenizer([p + " one two three the cat sat on the mat" for p in PROMPTS] * 8, vocab_size=300)
    if size == "tiny":
        build_tiny_causal_lm(tok, hidden=64, layers=2, heads=2, seed=0, out_dir=root / "m")
        return root / "m"
    import transformers
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=True, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    save_model(model, tok, root / "m")
    return root / "m"


def _run(size: str, smoke: bool) -> dict:
    from core.data.collate import make_collator
    from core.models import load_model_and_processor, special_token_ids
    from core.sampling import generate_completions
    from core.vllm_engine import VLLMEngine

    batch_size, n, max_new = (2, 2, 8) if smoke else (8, 4, 32)
    repeat, warmup = (1, 1) if smoke else (5, 1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        path = _build(Path(tmp), size)
        build_s = time.time() - t0
        model, tok = load_model_and_processor(path)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        batch = make_collator("text", tok).prompts([{"key": str(i), "prompt": p} for i, p in
                                                    enumerate((PROMPTS * 2)[:batch_size])])
        suppress, eos = special_token_ids(tok), [tok.eos_token_id]
        kw = dict(n=n, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new, suppress_ids=suppress,
                  eos_ids=eos)
        t0 = time.time()
        engine = VLLMEngine(str(path), seed=0, max_model_len=256, kv_cache_gb=2 if size != "tiny" else 1)
        start_s = time.time() - t0
        try:
            def ours(seed):
                return generate_completions(model, batch, tok, seed=seed, **kw)[1]

            def vllm(seed):
                return engine.generate(batch, tok, seed=seed, **kw)[1]

            secs, res = B.alternate({"ours": lambda it: ours(100 + it), "vllm": lambda it: vllm(100 + it)},
                                    repeat, warmup)
            sync = []
            for _ in range(max(1, repeat)):
                sync.append(engine.sync(model))
        finally:
            engine.close()
    tps = {k: [int(c.mask.sum()) / t for c, t in zip(res[k], secs[k])] for k in secs}
    best = {k: max(v) for k, v in tps.items()}
    return {
        "ours_tokens_per_s": best["ours"], "reference_tokens_per_s": best["vllm"],
        "ratio": B.ratio(best["ours"], best["vllm"]),
        "ratio_of_medians": B.ratio(B.median(tps["ours"]), B.median(tps["vllm"])),
        "vllm_over_ours": B.ratio(best["vllm"], best["ours"]),
        "vllm_start_s": start_s, "vllm_sync_s": B.best(sync), "vllm_sync_s_median": B.median(sync),
        "build_s": build_s, "stat": "best over repeats (the machine is shared)",
        "goal": "none: reported as measured", "met": None,
        "generated_tokens": {k: B.median([int(c.mask.sum()) for c in res[k]]) for k in res},
        "setup": {"model": f"Qwen2ForCausalLM {size}, {params / 1e6:.1f} M parameters, float32, random weights",
                  "prompts": batch_size, "n": n, "sequences": batch_size * n, "max_new_tokens": max_new,
                  "temperature": 1.0, "suppressed_ids": len(suppress), "device": "cpu",
                  "ours": "generate_completions: our KV-cached loop (rollout.engine: hf)",
                  "reference": "VLLMEngine.generate: in-process vLLM (rollout.engine: vllm), eager mode",
                  "sync": "VLLMEngine.sync: reload_weights from the model's tensors + prefix cache reset"},
        "repeat": repeat, "warmup": warmup,
    }


def run_tiny(smoke: bool = False) -> dict:
    return _run("tiny", smoke)


def run_half_b(smoke: bool = False) -> dict:
    if smoke:
        return {"skipped": "the 0.5B model is not built in a smoke run"}
    return _run("0.5b", smoke)


BENCHMARKS = {"rollout_vllm": run_tiny, "rollout_vllm_0.5b": run_half_b}
