"""Helpers shared by the fault-injection tests (not a test module).

``read_metrics`` / ``final_weights`` read a run's output; ``run_in_process`` trains with
``Trainer`` here; ``FaultyServer`` wraps the teacher server's ASGI app and injects faults per
request (500s, delays); ``word_student`` makes the tiny student say whole words only, so that every
sample a remote teacher scores aligns (see tests/core/test_remote_teacher.py for why).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from core import config as C
from core.trainer import Trainer


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_rows(out_dir) -> list[dict]:
    """Metrics rows of training steps (event rows such as a teacher failure left out)."""
    return [r for r in read_metrics(out_dir) if "event" not in r]


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ: {diff[:5]}"


def run_in_process(config_path, *overrides: str) -> tuple[Trainer, dict]:
    t = Trainer(C.load_config(config_path, overrides=list(overrides)))
    return t, t.train()


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


class FaultyServer:
    """ASGI wrapper of the teacher app injecting faults into chat requests (``chat_calls`` counts
    them; set the fields between requests): ``fail_next`` requests answered 500; after ``after``
    requests served normally, ``mode`` applies to every later one: ``"500"`` (answered 500),
    ``"slow"`` (``delay`` seconds before it is handled) or ``"misalign"`` (the answer's last prompt
    token id changed, so no completion aligns)."""

    def __init__(self, app):
        self.app = app
        self.reset()

    def reset(self):
        self.fail_next = 0
        self.after = None
        self.mode = None
        self.delay = 0.0
        self.chat_calls = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            self.chat_calls += 1
            on = self.after is not None and self.chat_calls > self.after
            if on and self.mode == "slow":
                await asyncio.sleep(self.delay)
            if on and self.mode == "misalign":
                return await self._misalign(scope, receive, send)
            if self.fail_next > 0 or (on and self.mode == "500"):
                self.fail_next = max(0, self.fail_next - 1)
                body = json.dumps({"error": {"message": "injected failure", "type": "InternalServerError",
                                             "code": 500}}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        return await self.app(scope, receive, send)

    async def _misalign(self, scope, receive, send):
        start, chunks = {}, []

        async def grab(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
            else:
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, grab)
        body = b"".join(chunks)
        if start.get("status") == 200:
            j = json.loads(body)
            j["prompt_token_ids"][-1] = j["prompt_token_ids"][-1] + 1
            body = json.dumps(j).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body})


def word_tokens(tok) -> list[int]:
    out = []
    for t in range(len(tok)):
        s = tok.decode([t])
        if len(s) > 1 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and \
                tok(s, add_special_tokens=False)["input_ids"] == [t]:
            out.append(t)
    return out


def make_word_student(student_dir, out_dir) -> Path:
    """The tiny student with one residual dimension held at 1 and an LM head column favouring
    word tokens and EOS by ~30 nats: its completions re-tokenise to themselves."""
    from core.models import load_model_and_processor, save_model

    model, proc = load_model_and_processor(student_dir)
    tok = proc.tokenizer
    allowed = word_tokens(tok) + [tok.eos_token_id]
    d = model.get_input_embeddings().weight.shape[1] - 1
    with torch.no_grad():
        model.get_input_embeddings().weight[:, d] = 1.0
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight[d, :] = 0
            layer.mlp.down_proj.weight[d, :] = 0
        head = model.get_output_embeddings().weight
        head[:, d] = -3.0
        head[allowed, d] = 3.0
    save_model(model, proc, out_dir)
    return Path(out_dir)
