"""The teacher server's HTTP API fuzzed with hypothesis on 127.0.0.1, a bounded number of requests
per test: malformed chat requests (a valid request with keys dropped, replaced by arbitrary JSON,
messages and content parts rewritten), arbitrary bytes under arbitrary content types, nested
JSON, multipart transcription forms, arbitrary paths and methods, and arbitrary Authorization
headers. No request gets a 5xx, every 4xx carries a JSON error message, and the server still
answers a valid request correctly afterwards.

Also: the bearer key is compared with ``hmac.compare_digest`` (constant time) whatever is sent;
bodies over the limit are refused with 413 (with or without Content-Length) before the model
sees them, whatever their size around the limit; a WAV claiming an absurd sample rate is refused
before it is resampled; a ``chat_template`` in a request is refused unless the server allows it;
and a trainer whose ``teacher.api_key`` is wrong gets 401 at start-up and stops with a clear
``error:`` naming ``teacher.api_key`` (exit 1), having trained and written nothing.
"""
from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import REPO
from core import config as C
from core.bin.train import main as train_main
from core.serve.app import ServerThread, create_app
from core.serve.engine import TeacherEngine

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "fuzz-key-0123456789"
LIMIT = 256 << 10
AUTH = {"Authorization": f"Bearer {KEY}"}
FUZZ = settings(max_examples=120, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TRIED = {}  # requests sent per test, for the summary
STATUS = {}  # name -> {HTTP status: count}


@pytest.fixture(scope="module")
def engine(tiny, one_thread):
    eng = TeacherEngine(tiny.teacher, device="cpu", max_new_tokens=4)
    yield eng
    eng.executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def server(engine):
    s = ServerThread(create_app(engine=engine, api_key=KEY, max_request_bytes=LIMIT, batch_wait_ms=1)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


OK_WAV = (REPO / "tests" / "resources" / "bad" / "media" / "ok.wav").read_bytes()


def valid_body(engine) -> dict:
    return {"model": engine.name,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(OK_WAV).decode(), "format": "wav"}},
                {"type": "text", "text": "Transcribe the audio."}]},
                {"role": "assistant", "content": "hello world"}],
            "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 1,
            "prompt_logprobs": 3, "return_token_ids": True}


def check(r: httpx.Response, name: str) -> None:
    TRIED[name] = TRIED.get(name, 0) + 1
    STATUS.setdefault(name, {}).setdefault(r.status_code, 0)
    STATUS[name][r.status_code] += 1
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["code"] == r.status_code


def still_serving(client, engine) -> None:
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/v1/chat/completions", json=valid_body(engine), headers=AUTH)
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(r.json()["prompt_token_ids"])


# ----------------------------------------------------------------------------- strategies
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.integers(-3, 30),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
anything = st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
                        max_leaves=16)
KEYS = ["model", "messages", "add_generation_prompt", "continue_final_message", "max_tokens", "max_completion_tokens",
        "prompt_logprobs", "return_token_ids", "logprobs", "top_logprobs", "n", "stream", "temperature",
        "chat_template", "chat_template_kwargs"]
part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "input_audio", "audio_url", "image_url", "video"])},
                          optional={"text": anything, "input_audio": anything, "audio_url": anything}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries(
        {"data": st.one_of(st.text(max_size=50), st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()),
                           st.just(base64.b64encode(OK_WAV[:60]).decode())),
         "format": st.sampled_from(["wav", "mp3", "flac", ""])})}),
    anything)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                                           "content": st.one_of(st.text(max_size=40), st.lists(part, max_size=3),
                                                                anything)}), anything)


SPECIAL = ["<|im_end|>", "<|im_start|>", "<|AUDIO|>", "<|audio_bos|>", "<|endoftext|>", "{{", "{%"]
texts = st.one_of(st.text(max_size=30), st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(max_size=8)),
                                                 max_size=5).map("".join))


@st.composite
def chat_bodies(draw, base: dict):
    """Half valid requests varied (k, flags, prompt and prefill text with special-token strings),
    half mutated into malformed ones."""
    body = copy.deepcopy(base)
    if draw(st.booleans()):
        body["prompt_logprobs"] = draw(st.integers(0, 20))
        body["return_token_ids"] = draw(st.booleans())
        if draw(st.booleans()):
            body["logprobs"], body["top_logprobs"] = True, draw(st.integers(0, 20))
        body["messages"][0]["content"][1]["text"] = draw(texts)
        body["messages"][1]["content"] = draw(texts)
        return body
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "set", "message", "messages"]))
        if op == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op == "set":
            body[draw(st.sampled_from(KEYS))] = draw(anything)
        elif op == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            i = draw(st.integers(0, len(body["messages"]) - 1))
            body["messages"][i] = draw(message)
        elif op == "messages":
            body["messages"] = draw(st.lists(message, max_size=3))
    return body


# ----------------------------------------------------------------------------- fuzz
def test_fuzz_chat_bodies(client, engine):
    @FUZZ
    @given(chat_bodies(valid_body(engine)))
    def run(body):
        check(client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                          headers={**AUTH, "Content-Type": "application/json"}), "chat JSON")

    run()
    still_serving(client, engine)


def test_fuzz_raw_bodies_and_content_types(client, engine):
    @FUZZ
    @given(st.binary(max_size=2000), st.sampled_from(["application/json", "text/plain", "multipart/form-data", "",
                                                      "multipart/form-data; boundary=x",
                                                      "application/x-www-form-urlencoded"]),
           st.sampled_from(["/v1/chat/completions", "/v1/audio/transcriptions"]), st.integers(0, 2000))
    def run(raw, ctype, path, depth):
        if depth > 1000:  # deeply nested JSON
            raw = b"[" * depth * 50 + b"]" * depth * 50
        check(client.post(path, content=raw, headers={**AUTH, "Content-Type": ctype}), "raw bytes")

    run()
    still_serving(client, engine)


def test_fuzz_transcription_forms(client, engine):
    files = st.one_of(st.binary(max_size=400), st.just(OK_WAV), st.just(OK_WAV[: len(OK_WAV) // 3]))
    fields = st.dictionaries(st.sampled_from(["model", "prompt", "response_format", "temperature", "language"]),
                             st.text(max_size=30), max_size=4)

    @settings(FUZZ, max_examples=40)
    @given(files, fields, st.booleans())
    def run(data, form, with_file):
        kw = {"files": {"file": ("clip.wav", data, "audio/wav")}} if with_file else {"files": {"other": ("x", b"1")}}
        check(client.post("/v1/audio/transcriptions", data=form, headers=AUTH, **kw), "transcription form")

    run()
    still_serving(client, engine)


def test_fuzz_paths_and_methods(client, engine):
    @FUZZ
    @given(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
           st.one_of(st.sampled_from(["/", "/health", "/v1/models", "/v1/chat/completions", "/v1/audio/transcriptions",
                                      "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/v1/",
                                      "/openapi.json", "/docs"]),
                     st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-%", max_size=40).map(lambda t: "/" + t)))
    def run(method, path):
        r = client.request(method, path, headers=AUTH)
        TRIED["paths"] = TRIED.get("paths", 0) + 1
        assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
        assert "root:" not in r.text  # no file outside the static folder is served

    run()
    still_serving(client, engine)


def test_fuzz_authorization_header(client, engine, monkeypatch):
    import core.serve.app as app_mod

    calls = []
    real = app_mod.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(app_mod.hmac, "compare_digest", spy)
    header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)

    @FUZZ
    @given(st.one_of(header_text, header_text.map(lambda t: "Bearer " + t), st.just("Bearer " + KEY[:-1]),
                     st.just("Bearer " + KEY + "x"), st.just("bearer " + KEY.upper()), st.just(f"bearer  {KEY}"),
                     st.just(KEY)).map(str.strip))  # a header value has no outer spaces on the wire
    def run(auth):
        n = len(calls)
        r = client.get("/v1/models", headers={"Authorization": auth})
        TRIED["auth"] = TRIED.get("auth", 0) + 1
        scheme, _, given = auth.partition(" ")
        ok = scheme.lower() == "bearer" and given.strip() == KEY
        assert r.status_code == (200 if ok else 401), (auth, r.status_code)
        if not ok:
            assert "API key" in r.json()["error"]["message"]
        if scheme.lower() == "bearer":  # every key given is compared in constant time
            assert len(calls) == n + 1

    run()
    assert calls and all(b == len(KEY) for _, b in calls)


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize("delta", [-1, 0, 1, 1 << 20])
@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_requests_are_refused_before_the_model(client, engine, delta, chunked):
    """A body of exactly ``LIMIT + delta`` bytes: refused with 413 above the limit, whether its size
    is announced (Content-Length) or not (chunked); at or below it, parsed as usual."""
    body = dict(valid_body(engine), user="")  # OpenAI's 'user' field, ignored: pads the body, not the prompt
    raw = json.dumps(body).encode()
    body["user"] = "x" * (LIMIT + delta - len(raw))
    raw = json.dumps(body).encode()
    assert len(raw) == LIMIT + delta
    calls = engine.forward_calls
    content = (raw[i: i + 65536] for i in range(0, len(raw), 65536)) if chunked else raw
    r = client.post("/v1/chat/completions", content=content, headers={**AUTH, "Content-Type": "application/json"})
    if delta > 0:
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert engine.forward_calls == calls
    else:
        assert r.status_code == 200, r.text[:300]


def test_absurd_sample_rate_is_refused_before_resampling(client, engine):
    buf = io.BytesIO()
    # 30000 samples said to be at 1 Hz: 120 kB that resampling to 16 kHz would make 1.9 GB
    sf.write(buf, np.zeros(30_000, dtype=np.float32), 1, format="WAV", subtype="FLOAT")
    body = valid_body(engine)
    body["messages"][0]["content"][0]["input_audio"]["data"] = base64.b64encode(buf.getvalue()).decode()
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and "implausible sample rate 1 Hz" in r.json()["error"]["message"]
    still_serving(client, engine)


def test_request_chat_templates_are_refused_unless_allowed(client, engine):
    body = dict(valid_body(engine), chat_template="{% for i in range(10**9) %}x{% endfor %}")
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and "--trust-request-chat-template" in r.json()["error"]["message"]
    body = dict(valid_body(engine), chat_template_kwargs={"chat_template": "{{ 7 * 7 }}"})
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and "may not set ['chat_template']" in r.json()["error"]["message"]
    body = dict(valid_body(engine), chat_template_kwargs={"enable_thinking": False})  # a template variable: fine
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200


# ----------------------------------------------------------------------------- the client side
def test_wrong_key_gets_401_and_a_clear_error_in_training(server, client, train_config, capsys):
    r = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    assert r.headers["www-authenticate"] == "Bearer"
    cfg = train_config("wrong_key", method="opd", teacher={"kind": "remote", "url": server.url, "api_key": "nope",
                                                           "max_retries": 5, "retry_backoff": 10},
                       opd={"support": "teacher_topk", "top_k": 3})
    assert train_main(["--config", str(cfg)]) == 1  # at once: a 401 is not retried
    err = capsys.readouterr().err
    assert f"error: teacher at {server.url}/v1/models refused the request (HTTP 401): invalid API key. " \
           "Check teacher.api_key" in err, err[-2000:]
    assert not Path(C.load_config(cfg).output_dir).exists()


def test_summary_of_requests_tried():
    """Runs last in this module: how many fuzzed requests were sent (none answered 5xx)."""
    if not TRIED:
        pytest.skip("runs after the fuzz tests of this module")
    print("fuzzed requests:", TRIED, "total", sum(TRIED.values()), "statuses:", STATUS)
    assert sum(TRIED.values()) >= 300
    assert STATUS["chat JSON"].get(200, 0) >= 20  # many requests reach the model
