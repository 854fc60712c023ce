"""Serve a teacher model over HTTP: ``python -m core.bin.serve_teacher --model DIR --port 8000``.

The server speaks vLLM's OpenAI-compatible shapes (``/v1/chat/completions`` with
``prompt_logprobs``, ``/v1/models``, ``/health``) plus ``/v1/audio/transcriptions`` and a small
web page at ``/``; a recipe points ``teacher.kind: remote`` / ``teacher.url`` at it. See
``core/serve/app.py`` for the request and response shapes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model directory (a save_pretrained folder)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $TEACHER_API_KEY, else none)")
    ap.add_argument("--served-model-name", default=None, help="model id in /v1/models and requests (default: --model)")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    ap.add_argument("--max-logprobs", type=int, default=20,
                    help="largest prompt_logprobs / top_logprobs accepted, as vLLM's flag (-1: the vocabulary)")
    ap.add_argument("--max-batch", type=int, default=8, help="concurrent requests scored in one forward")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long the first queued request waits for others to batch with")
    ap.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body (413 above it)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="transcription length limit")
    ap.add_argument("--trust-remote-code", action="store_true", help="run custom modelling code from --model (off)")
    ap.add_argument("--trust-request-chat-template", action="store_true",
                    help="accept a 'chat_template' sent in a request (off: such requests get 400)")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)

    try:
        import uvicorn

        from core.serve.app import create_app
    except ModuleNotFoundError as e:  # the server's packages are the 'serve' extra
        print(f"error: the teacher server needs the package '{e.name}': pip install 'audio-posttrain[serve]'",
              file=sys.stderr)
        return 2

    from core.models import check_model_type
    try:  # before the server starts: an unsupported or missing model is one line, exit 2
        check_model_type(args.model, args.trust_remote_code)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(args.model, api_key=args.api_key or os.environ.get("TEACHER_API_KEY") or None,
                     max_request_bytes=int(args.max_request_mb * (1 << 20)), max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, max_logprobs=args.max_logprobs,
                     served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
                     trust_remote_code=args.trust_remote_code, max_new_tokens=args.max_new_tokens,
                     trust_request_chat_template=args.trust_request_chat_template)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


if __name__ == "__main__":
    sys.exit(main())
