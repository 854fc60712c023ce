"""Audio + video prompts through the vLLM engine (used by tests/core/test_vllm_engine.py, in a child
process): a tiny Qwen2.5-Omni thinker saved alone (head size 32 in the text model and both
encoders) in the folder given, two short mp4 clips with a sine track collated by
``AVPromptCollator`` (a video item, then its audio as its own item), 2 samples each; then the
trainer's weights moved, synced into the engine, and the same prompts sampled again. Prints one
JSON line: the rows, the sampled tokens, whether a suppressed token was drawn, the largest gap
between the engine's log-probs and a trainer forward with the same suppression (before and after
the sync), and how far the trainer's log-probs move when the media are blanked (so that agreement
means vLLM encoded the same audio and frames, at the same positions)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from core.data.collate import AVPromptCollator
from core.forward import completion_logits, token_logp
from core.models import build_tiny_omni_thinker, load_model_and_processor, special_token_ids, train_tokenizer
from core.vllm_engine import VLLMEngine

MEDIA = ("pixel_values_videos", "input_features")


def _mp4(path: Path, seconds: float, freq: int) -> str:
    """A 64x64, 8 fps test pattern of ``seconds`` with a sine track at ``freq`` Hz (AAC, 16 kHz)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc=size=64x64:rate=8:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency={freq}:sample_rate=16000:duration={seconds}", "-c:a", "aac", "-shortest",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, capture_output=True)
    return str(path)


def _trainer_logp(model, rep, comp, suppress) -> torch.Tensor:
    with torch.no_grad():
        logits = completion_logits(model, rep, comp.ids, comp.mask)
    lp = token_logp(logits.index_fill(-1, torch.tensor(suppress), float("-inf")), comp.ids)
    return torch.where(comp.mask.bool(), lp, torch.zeros_like(lp))   # padding is a suppressed token


def main(root: Path) -> None:
    tok = train_tokenizer(["what do you see", "a red square", "two beeps", "one low tone"] * 8, vocab_size=300,
                          omni=True)
    build_tiny_omni_thinker(tok, hidden=64, layers=2, heads=2, audio_hidden=64, audio_layers=1, audio_heads=2,
                            vision_hidden=64, vision_depth=1, vision_heads=2, max_position_embeddings=1024, seed=0,
                            out_dir=root / "m")
    model, proc = load_model_and_processor(root / "m")
    model.eval()
    rows = [{"key": str(i), "video": _mp4(root / f"{i}.mp4", s, f), "text": "x"}
            for i, (s, f) in enumerate(((1, 440), (2, 880)))]
    batch = AVPromptCollator(proc, "What do you see and hear?").prompts(rows)
    suppress = special_token_ids(proc)
    kw = dict(n=2, max_new_tokens=6, suppress_ids=suppress, eos_ids=[proc.tokenizer.eos_token_id], seed=3)
    eng = VLLMEngine(str(root / "m"), seed=0, max_model_len=512)
    try:
        rep, comp = eng.generate(batch, proc.tokenizer, **kw)
        lp = _trainer_logp(model, rep, comp, suppress)
        blank = dataclasses.replace(rep, inputs={k: v.mul(0) if k in MEDIA else v for k, v in rep.inputs.items()})
        media_effect = float((_trainer_logp(model, blank, comp, suppress) - lp).abs().max())
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        eng.sync(model, version=1)
        rep2, comp2 = eng.generate(batch, proc.tokenizer, **kw)
        lp2 = _trainer_logp(model, rep2, comp2, suppress)
    finally:
        eng.close()
    drawn = set(comp.ids[comp.mask.bool()].tolist()) | set(comp2.ids[comp2.mask.bool()].tolist())
    print(json.dumps({"rows": int(comp.ids.shape[0]), "tokens": int(comp.mask.sum()),
                      "prompt_tokens": batch.inputs["attention_mask"].sum(1).tolist(),
                      "suppressed_drawn": sorted(drawn & (set(suppress) - {proc.tokenizer.eos_token_id})),
                      "max_abs_diff": float((lp - comp.logp).abs().max()),
                      "max_abs_diff_after_sync": float((lp2 - comp2.logp).abs().max()),
                      "media_effect": media_effect}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
