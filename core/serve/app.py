"""The teacher server's HTTP side: a FastAPI app speaking vLLM's OpenAI-compatible shapes.

Endpoints (``create_app``):

- ``POST /v1/chat/completions``: scores a prompt, the way a distilling student asks vLLM. Messages
  may hold ``input_audio`` parts (base64 WAV/FLAC/OGG) or ``audio_url`` data URLs and text parts;
  the last message is the assistant prefill (the student's completion) with
  ``continue_final_message: true, add_generation_prompt: false`` (or ``false, false``: the closed
  turn); ``prompt_logprobs: k`` (required, ``0 <= k <= max_logprobs``); ``max_tokens`` 1.
  The response is vLLM's: top-level ``prompt_logprobs`` (one entry per prompt token, ``null``
  first, then ``{token_id: {"logprob", "rank", "decoded_token"}}`` with the actual token first
  and the top-k), ``prompt_token_ids`` when ``return_token_ids: true``, and ``choices[0]`` with
  the greedy next token (``logprobs``/``top_logprobs`` as in OpenAI's API). Our extension,
  ``prefill_token_ids`` (a list of ids; vLLM ignores the field): the prefill is scored as exactly
  these tokens, appended to the prompt rendered up to the assistant turn (generation prompt on),
  instead of re-tokenising the assistant message's text; so a student's sample that does not
  survive a text round trip (half a UTF-8 character) is still scored token for token.
- ``POST /v1/audio/transcriptions``: OpenAI's multipart form (``file``, ``model``, ``prompt``,
  ``response_format`` json | text, ``temperature``); ``prompt`` is the instruction given to the
  model (default ``Transcribe the audio.``). ``json`` answers ``{"text": ...}``, ``text`` plain text.
- ``GET /v1/models`` (with ``vocab_size``, ``tokenizer_size``, ``tokenizer_sha256``,
  ``max_logprobs`` beside vLLM's fields), ``GET /health``, and a small web page at ``/``.

Concurrent requests of one kind are batched (``MicroBatcher``: up to ``max_batch`` requests
collected for ``batch_wait_ms``, one padded forward). With ``api_key`` set, every ``/v1/``
route needs ``Authorization: Bearer <key>`` (401 otherwise; ``/health`` and the page stay open);
request bodies over ``max_request_bytes`` get 413; a ``chat_template`` sent in a request is refused
unless ``trust_request_chat_template`` (vLLM's ``--trust-request-chat-template``). Bad input gets a
4xx whose JSON names the field; an internal error a 500 with its message, and the server goes on serving. Errors use
vLLM's shape ``{"error": {"message", "type", "param", "code"}}``.

What it leaves out: text generation beyond one token, streaming, tools, images and video.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.serve.batching import MicroBatcher
from core.serve.engine import BadInput, ScoreItem, TeacherEngine, TranscribeItem
from core.serve.protocol import BadAudio, decode_audio, decode_base64, encode_wav, error_body

log = logging.getLogger("core.serve")

STATIC = Path(__file__).with_name("static")
DEFAULT_TRANSCRIBE_PROMPT = "Transcribe the audio."


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _json_error(status: int, message: str, *, param: str | None = None, type: str | None = None,
                headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, type=type), status_code=status, headers=headers)


# ---------------------------------------------------------------------------- middleware
class _TooLarge(Exception):
    pass


class GuardMiddleware:
    """Bearer auth on ``/v1/`` routes and a request body limit, before any body is parsed."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.max = int(max_request_bytes)

    async def _send_error(self, send, status: int, message: str, headers: dict | None = None):
        body = json.dumps(error_body(status, message)).encode("utf-8")
        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key is not None and scope.get("path", "").startswith("/v1/"):
            auth = headers.get("authorization", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8"), self.key):
                msg = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                       else "invalid API key")
                return await self._send_error(send, 401, msg, {"www-authenticate": "Bearer"})
        limit_msg = f"request body larger than the server's limit of {self.max} bytes"
        cl = headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > self.max:
                    return await self._send_error(send, 413, limit_msg)
            except ValueError:
                return await self._send_error(send, 400, "bad Content-Length header")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._send_error(send, 413, limit_msg)


# ---------------------------------------------------------------------------- request parsing
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _opt_bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be a boolean, got {v!r}", key)
    return v


def _audio_of_part(part: dict, where: str, sample_rate: int):
    typ = part.get("type")
    if typ == "input_audio":
        ia = part.get("input_audio")
        if not isinstance(ia, dict):
            raise _bad(f"{where}.input_audio must be an object {{'data': <base64>, 'format': 'wav'}}", where)
        fmt = ia.get("format", "wav")
        if not isinstance(fmt, str):
            raise _bad(f"{where}.input_audio.format must be a string such as 'wav'", where)
        raw = decode_base64(ia.get("data"), f"{where}.input_audio.data")
        return decode_audio(raw, sample_rate, f"{where}.input_audio (format {fmt!r})")
    au = part.get("audio_url")
    url = au.get("url") if isinstance(au, dict) else au
    if not isinstance(url, str):
        raise _bad(f"{where}.audio_url must be {{'url': 'data:audio/wav;base64,...'}}", where)
    if not url.startswith("data:"):
        raise _bad(f"{where}.audio_url: only data: URLs are accepted (this server fetches nothing)", where)
    head, sep, data = url.partition(",")
    if not sep or ";base64" not in head:
        raise _bad(f"{where}.audio_url: expected a base64 data URL 'data:audio/wav;base64,...'", where)
    return decode_audio(decode_base64(data, f"{where}.audio_url"), sample_rate, f"{where}.audio_url")


def parse_messages(messages, engine: TeacherEngine) -> tuple[list[dict], list]:
    """Request messages -> (messages for the chat template, decoded audios in order)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of message objects", "messages")
    out, audios = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object with 'role' and 'content'", "messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where}.role must be one of system, user, assistant; got {role!r}", "messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of content parts", "messages")
        parts, texts_only = [], True
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{pw} must be an object with a 'type'", "messages")
            typ = part["type"]
            if typ == "text":
                if not isinstance(part.get("text"), str):
                    raise _bad(f"{pw}.text must be a string", "messages")
                parts.append({"type": "text", "text": part["text"]})
            elif typ in ("input_audio", "audio_url"):
                if role == "assistant":
                    raise _bad(f"{pw}: audio in an assistant message is not supported", "messages")
                if not engine.has_audio:
                    raise _bad(f"{pw}: model {engine.name} takes no audio input", "messages")
                try:
                    audios.append(_audio_of_part(part, pw, engine.sample_rate))
                except BadAudio as e:
                    raise _bad(str(e), "messages") from None
                # the "audio" key too: templates saved by transformers 4.x (Qwen2-Audio's released
                # checkpoints) test `'audio' in content`, today's test the type
                parts.append({"type": "audio", "audio": f"audio_{len(audios)}"})
                texts_only = False
            else:
                raise _bad(f"{pw}: content part type {typ!r} is not supported (text, input_audio, audio_url)",
                           "messages")
        if texts_only and (role == "assistant" or not engine.has_audio):
            out.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out, audios


# apply_chat_template's own arguments: a request's chat_template_kwargs may only add template variables
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "chat_template", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "processor_kwargs", "images", "videos", "audio", "text",
    "load_audio_from_video", "num_frames", "video_fps", "sampling_rate"})


def parse_chat(body, engine: TeacherEngine, max_logprobs: int, trust_request_chat_template: bool = False) -> dict:
    """Validate a chat request; returns what scoring needs. ``APIError`` names the bad field.

    A ``chat_template`` in the request (a Jinja program the server would run) is refused unless
    ``trust_request_chat_template``, as vLLM's ``--trust-request-chat-template``; ``chat_template_kwargs``
    may add template variables but not set ``apply_chat_template``'s own arguments."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != engine.name:
        raise APIError(404, f"The model `{model}` does not exist.", param="model")
    if _opt_bool(body, "stream", False):
        raise _bad("streaming is not supported by this scoring server; send stream: false", "stream")
    for key in ("n",):
        if body.get(key) not in (None, 1):
            raise _bad(f"'{key}' must be 1", key)
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise _bad(f"'{key}' must be an integer, got {v!r}", key)
        if v < 1:
            raise _bad(f"max_tokens must be at least 1, got {v}.", key)
        if v > 1:
            raise _bad(f"'{key}' must be 1: this server scores prompts (prompt_logprobs) and generates one token",
                       key)
    cap = max_logprobs if max_logprobs >= 0 else engine.vocab_size
    k = body.get("prompt_logprobs")
    if k is None:
        raise _bad("'prompt_logprobs' is required: the number of top log-probabilities to return for every "
                   "prompt token (0 = the prompt token's own only)", "prompt_logprobs")
    if not _is_int(k):
        raise _bad(f"'prompt_logprobs' must be an integer, got {k!r}", "prompt_logprobs")
    if k == -1:
        k = engine.vocab_size
    if k < 0:
        raise _bad(f"'prompt_logprobs' must be >= 0 (or -1 for the whole vocabulary), got {k}", "prompt_logprobs")
    if k > cap:
        raise _bad(f"Requested prompt logprobs of {k}, which is greater than max allowed: {cap}", "prompt_logprobs")
    want_lp = _opt_bool(body, "logprobs", False)
    top_lp = body.get("top_logprobs", 0) or 0
    if not _is_int(top_lp) or top_lp < 0:
        raise _bad(f"'top_logprobs' must be a non-negative integer, got {top_lp!r}", "top_logprobs")
    if top_lp > 0 and not want_lp:
        raise _bad("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
    if top_lp > cap:
        raise _bad(f"Requested sample logprobs of {top_lp}, which is greater than max allowed: {cap}", "top_logprobs")
    cont = _opt_bool(body, "continue_final_message", False)
    gen = _opt_bool(body, "add_generation_prompt", True)
    if cont and gen:
        raise _bad("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                   "continue_final_message")
    messages, audios = parse_messages(body.get("messages"), engine)
    if messages[-1]["role"] != "assistant":
        raise _bad("the last message must be the assistant prefill (the completion to score), with "
                   "continue_final_message: true and add_generation_prompt: false", "messages")
    if gen:
        raise _bad("the last message is an assistant prefill: send add_generation_prompt: false (it defaults to "
                   "true) and continue_final_message: true", "add_generation_prompt")
    tmpl = body.get("chat_template")
    if tmpl is not None and not isinstance(tmpl, str):
        raise _bad("'chat_template' must be a string", "chat_template")
    if tmpl is not None and not trust_request_chat_template:
        raise _bad("'chat_template' in a request is refused: this server renders the model's own template (start it "
                   "with --trust-request-chat-template to accept templates from clients)", "chat_template")
    tkw = body.get("chat_template_kwargs")
    if tkw is not None and not isinstance(tkw, dict):
        raise _bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    reserved = sorted(set(tkw or {}) & _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise _bad(f"'chat_template_kwargs' may add template variables only; it may not set {reserved}",
                   "chat_template_kwargs")
    prefill_ids = body.get("prefill_token_ids")
    if prefill_ids is not None:
        if (not isinstance(prefill_ids, list) or not prefill_ids
                or not all(_is_int(t) and 0 <= t < engine.vocab_size for t in prefill_ids)):
            raise _bad(f"'prefill_token_ids' must be a non-empty list of token ids below the vocabulary size "
                       f"{engine.vocab_size}", "prefill_token_ids")
        if not cont:
            raise _bad("'prefill_token_ids' continue the assistant prefill: send continue_final_message: true",
                       "prefill_token_ids")
    return dict(messages=messages, audios=audios, k=k, logprobs=want_lp, top_logprobs=top_lp,
                continue_final_message=cont, add_generation_prompt=gen, chat_template=tmpl,
                chat_template_kwargs=tkw, return_token_ids=_opt_bool(body, "return_token_ids", False),
                prefill_token_ids=prefill_ids)


def chat_response(engine: TeacherEngine, req: dict, res) -> dict:
    created = int(time.time())
    tok_text = engine.decoded(res.next_id)
    choice = {"index": 0, "message": {"role": "assistant", "content": tok_text, "refusal": None,
                                      "tool_calls": [], "reasoning_content": None},
              "logprobs": None, "finish_reason": "length", "stop_reason": None}
    if req["logprobs"]:
        def item(i, lp):
            t = engine.decoded(i)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
        choice["logprobs"] = {"content": [dict(item(res.next_id, res.next_logprob),
                                               top_logprobs=[item(i, lp) for i, lp in
                                                             res.next_top[: req["top_logprobs"]]])]}
    out = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created,
           "model": engine.name, "choices": [choice],
           "usage": {"prompt_tokens": len(res.token_ids), "completion_tokens": 1,
                     "total_tokens": len(res.token_ids) + 1, "prompt_tokens_details": None},
           "prompt_logprobs": res.prompt_logprobs}
    if req["return_token_ids"]:
        out["prompt_token_ids"] = res.token_ids
        choice["token_ids"] = [res.next_id]
    return out


def _form_str(form, key: str, default: str | None = None) -> str | None:
    v = form.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(f"form field '{key}' must be a text value, not a file", key)
    return v


# ---------------------------------------------------------------------------- the app
def create_app(model_dir: str | os.PathLike | None = None, api_key: str | None = None, *,
               engine: TeacherEngine | None = None, max_request_bytes: int = 64 << 20, max_batch: int = 8,
               batch_wait_ms: float = 5.0, max_logprobs: int = 20, served_model_name: str | None = None,
               dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False,
               max_new_tokens: int = 128, trust_request_chat_template: bool = False) -> FastAPI:
    """The teacher server's FastAPI app for the model in ``model_dir`` (or an already loaded ``engine``).

    ``max_logprobs``: the largest ``prompt_logprobs`` / ``top_logprobs`` accepted (vLLM's
    ``--max-logprobs``; -1 = the vocabulary size). ``max_batch`` / ``batch_wait_ms``: how many
    concurrent requests one forward takes and how long the first waits for company.
    ``trust_request_chat_template``: accept a ``chat_template`` sent in a request (off: 400).
    """
    if engine is None:
        if model_dir is None:
            raise ValueError("create_app needs model_dir or engine")
        engine = TeacherEngine(model_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               served_model_name=served_model_name, max_new_tokens=max_new_tokens)
    scorer = MicroBatcher(engine.score, engine.executor, max_batch=max_batch, wait_ms=batch_wait_ms, name="score")
    transcriber = MicroBatcher(engine.transcribe, engine.executor, max_batch=max_batch, wait_ms=batch_wait_ms,
                               name="transcribe")
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scorer.start()
        transcriber.start()
        log.info("teacher server ready: model %s (%s), vocab %d, max_logprobs %d, batches of <= %d",
                 engine.name, engine.device, engine.vocab_size, max_logprobs, max_batch)
        try:
            yield
        finally:
            await scorer.stop()
            await transcriber.stop()

    app = FastAPI(title="audio-posttrain teacher server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.scorer, app.state.transcriber = engine, scorer, transcriber
    app.add_middleware(GuardMiddleware, api_key=api_key, max_request_bytes=max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _json_error(e.status, e.message, param=e.param, type=e.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return _json_error(400, f"malformed request: {e.errors()}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _json_error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    async def guarded(fn):
        """Run a handler body: ``APIError`` as it is, bad input as 400, anything else a 500 with its message."""
        try:
            return await fn()
        except (APIError, _TooLarge, asyncio.CancelledError):
            raise
        except (BadInput, BadAudio) as e:
            raise _bad(str(e)) from None
        except Exception as e:
            log.exception("internal error")
            raise APIError(500, f"internal error: {type(e).__name__}: {e}") from None

    async def read_json(request: Request):
        raw = await request.body()
        if not raw:
            raise _bad("empty request body: expected a JSON object")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise _bad("the request body is nested too deeply") from None

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "device": str(engine.device),
                "audio": engine.has_audio, "uptime_s": round(time.time() - started, 1),
                "queued": scorer.pending + transcriber.pending, "forward_calls": engine.forward_calls,
                "auth": api_key is not None}

    @app.get("/v1/models")
    async def models():
        card = {"id": engine.name, "object": "model", "created": int(started), "owned_by": "audio-posttrain",
                "root": engine.model_dir, "parent": None, "max_model_len": engine.max_model_len,
                "permission": [{"id": f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, engine.name).hex}",
                                "object": "model_permission", "created": int(started),
                                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                                "organization": "*", "group": None, "is_blocking": False}],
                "vocab_size": engine.vocab_size, "tokenizer_size": engine.tokenizer_size,
                "tokenizer_sha256": engine.fingerprint,
                "max_logprobs": max_logprobs if max_logprobs >= 0 else engine.vocab_size,
                "modalities": ["text", "audio"] if engine.has_audio else ["text"]}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        async def body():
            req = parse_chat(await read_json(request), engine, max_logprobs, trust_request_chat_template)
            ids = req["prefill_token_ids"]
            if ids is None:
                text = engine.render(req["messages"], add_generation_prompt=req["add_generation_prompt"],
                                     continue_final_message=req["continue_final_message"],
                                     chat_template=req["chat_template"],
                                     chat_template_kwargs=req["chat_template_kwargs"])
            else:  # the prefill as token ids: the prompt up to the assistant turn, then exactly these ids
                text = engine.render(req["messages"][:-1], add_generation_prompt=True, continue_final_message=False,
                                     chat_template=req["chat_template"],
                                     chat_template_kwargs=req["chat_template_kwargs"])
            inputs = await run_in_threadpool(engine.encode, text, req["audios"], ids)
            res = await scorer.submit(ScoreItem(inputs, req["k"], req["top_logprobs"]))
            return JSONResponse(chat_response(engine, req, res))
        return await guarded(body)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        async def body():
            if not engine.has_audio:
                raise _bad(f"model {engine.name} takes no audio input")
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                raise _bad("send a multipart/form-data body with the audio in the 'file' field")
            try:
                form = await request.form(max_files=1, max_fields=32)
            except _TooLarge:
                raise
            except Exception as e:
                raise _bad(f"malformed multipart body: {e}") from None
            try:
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise _bad("form field 'file' (an audio file upload) is required", "file")
                model = _form_str(form, "model")
                if model and model != engine.name:
                    raise APIError(404, f"The model `{model}` does not exist.", param="model")
                prompt = _form_str(form, "prompt") or DEFAULT_TRANSCRIBE_PROMPT
                fmt = _form_str(form, "response_format", "json")
                if fmt not in ("json", "text"):
                    raise _bad(f"response_format {fmt!r} is not supported: json or text", "response_format")
                temp_s = _form_str(form, "temperature", "0") or "0"
                try:
                    temperature = float(temp_s)
                except ValueError:
                    raise _bad(f"temperature must be a number, got {temp_s!r}", "temperature") from None
                if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
                    raise _bad(f"temperature must be in [0, 2], got {temp_s}", "temperature")
                raw = await upload.read()
            finally:
                await form.close()
            wav = decode_audio(raw, engine.sample_rate, f"file {getattr(upload, 'filename', '') or ''}".strip())
            with tempfile.TemporaryDirectory(prefix="teacher-upload-") as tmp:
                path = os.path.join(tmp, "clip.wav")
                with open(path, "wb") as f:
                    f.write(encode_wav(wav, engine.sample_rate))
                text = await transcriber.submit(TranscribeItem(path, prompt, temperature))
            if fmt == "text":
                return PlainTextResponse(text)
            return JSONResponse({"text": text})
        return await guarded(body)

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread (tests, notebooks); ``port=0`` picks a free one.

    ``with ServerThread(app) as s: httpx.get(s.url + "/health")``; ``stop()`` asks uvicorn to
    exit and joins the thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        import threading

        self.thread = threading.Thread(target=self.server.run, name="teacher-server", daemon=True)
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread exited before it started (see the log)")
            if time.time() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
