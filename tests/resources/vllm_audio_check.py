"""Audio prompts through the vLLM engine (used by tests/core/test_vllm_engine.py, in a child
process): a tiny Qwen2-Audio with head size 32 and a 30 s feature chunk in the folder given,
two 1 s tones, 2 samples each; prints one JSON line: the rows, the sampled tokens and the
largest gap between the engine's log-probs and a trainer forward with the same suppression."""
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from core.data.collate import AudioPromptCollator
from core.forward import completion_logits, token_logp
from core.models import build_tiny_qwen2_audio, load_model_and_processor, special_token_ids, train_tokenizer
from core.vllm_engine import VLLMEngine


def main(root: Path) -> None:
    tok = train_tokenizer(["count to three one two three", "say hello hello world", "the cat sat on the mat"] * 8,
                          vocab_size=300)
    build_tiny_qwen2_audio(tok, hidden=64, layers=2, heads=2, audio_hidden=64, audio_layers=1, audio_heads=2,
                           chunk_seconds=30, max_position_embeddings=2048, seed=0, out_dir=root / "m")
    model, proc = load_model_and_processor(root / "m")
    rows = []
    for i, f0 in enumerate((220.0, 440.0)):
        t = np.arange(16000) / 16000
        sf.write(root / f"{i}.wav", (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), 16000)
        rows.append({"key": str(i), "audio": str(root / f"{i}.wav"), "text": "x"})
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(rows)
    suppress = special_token_ids(proc)
    eng = VLLMEngine(str(root / "m"), seed=0, max_model_len=2048)
    try:
        rep, comp = eng.generate(batch, proc.tokenizer, n=2, max_new_tokens=6, suppress_ids=suppress,
                                 eos_ids=[proc.tokenizer.eos_token_id], seed=3)
    finally:
        eng.close()
    with torch.no_grad():
        logits = completion_logits(model, rep, comp.ids, comp.mask)
        lp = token_logp(logits.index_fill(-1, torch.tensor(suppress), float("-inf")), comp.ids)
        lp = torch.where(comp.mask.bool(), lp, torch.zeros_like(lp))
    print(json.dumps({"rows": int(comp.ids.shape[0]), "tokens": int(comp.mask.sum()),
                      "max_abs_diff": float((lp - comp.logp).abs().max())}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
