"""The teacher server: a transformers model behind vLLM's OpenAI-compatible scoring API.

``create_app(model_dir, api_key=None, ...)`` builds the FastAPI app (``core/serve/app.py``);
``python -m core.bin.serve_teacher --model DIR --port P`` runs it with uvicorn. The model side
(batched prompt log-probabilities, transcription) is ``core/serve/engine.py``; the pieces the
client shares (vocabulary fingerprint, WAV encoding, error JSON) are ``core/serve/protocol.py``,
which imports neither FastAPI nor torch.
"""
from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name):
    if name == "create_app":  # FastAPI only when the server is wanted
        from core.serve.app import create_app
        return create_app
    raise AttributeError(f"module 'core.serve' has no attribute {name!r}")
