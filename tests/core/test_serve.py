"""The teacher server (core/serve) on the tiny Qwen2-Audio teacher, over real HTTP on 127.0.0.1.

Checks vLLM's response shapes (``prompt_logprobs``: ``null`` first, dicts keyed by token id
strings with logprob / rank / decoded_token, values equal to a forward written out here),
``/v1/models`` and ``/health``, transcription in json and text, bearer auth (401), the body limit
(413), a 4xx with a clear message for every malformed request, a 500 that leaves the server
serving, concurrent requests batched into fewer forwards with the results of one-by-one calls,
the CLI, and the web page in headless Chromium (skipped when no Chromium is installed).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from core.data.collate import AudioPromptCollator
from core.models import special_token_ids
from core.sampling import generate_completions
from core.serve.app import ServerThread, create_app
from core.serve.engine import TeacherEngine
from core.serve.protocol import vocab_fingerprint

from conftest import QWEN2_AUDIO_4X_TEMPLATE

REPO = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(tiny, one_thread):
    eng = TeacherEngine(tiny.teacher, device="cpu", max_new_tokens=8)
    yield eng
    eng.executor.shutdown(wait=True)


@pytest.fixture(scope="module")
def server(engine):
    """Open server (no key)."""
    s = ServerThread(create_app(engine=engine, batch_wait_ms=2)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(engine):
    """Server with an API key and a 1 MB body limit."""
    s = ServerThread(create_app(engine=engine, api_key=KEY, max_request_bytes=1 << 20, batch_wait_ms=1)).start()
    yield s
    s.stop()


def b64_file(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def chat_body(tiny, i: int = 0, prefill: str = "the cat sat<|im_end|>", k: int = 3, **extra) -> dict:
    body = {"model": str(tiny.teacher),
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": b64_file(tiny.rows[i]["audio"]), "format": "wav"}},
                {"type": "text", "text": "Transcribe the audio."}]},
                {"role": "assistant", "content": prefill}],
            "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 1,
            "temperature": 0, "prompt_logprobs": k, "return_token_ids": True}
    body.update(extra)
    return body


def post(server, path, **kw):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        return c.post(path, **kw)


# ----------------------------------------------------------------------------- models, health
def test_models_and_health(server, engine, tiny):
    with httpx.Client(base_url=server.url) as c:
        h = c.get("/health")
        m = c.get("/v1/models")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert m.status_code == 200
    body = m.json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == str(tiny.teacher) and card["object"] == "model"
    assert card["vocab_size"] == engine.model.get_output_embeddings().weight.shape[0]
    assert card["tokenizer_size"] == len(tiny.tokenizer.get_vocab())
    assert card["tokenizer_sha256"] == vocab_fingerprint(tiny.tokenizer)
    assert card["max_logprobs"] == 20 and card["max_model_len"] == 512


# ----------------------------------------------------------------------------- chat / prompt_logprobs
def _reference_logp(engine, tiny, i, prefill):
    """log_softmax of a plain forward of the teacher on the prompt the server should build."""
    proc = engine.processor
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]},
            {"role": "assistant", "content": prefill}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    wav, _ = sf.read(tiny.rows[i]["audio"], dtype="float32")
    enc = proc(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        logits = engine.model(**{k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}).logits[0]
    return enc["input_ids"][0].tolist(), torch.log_softmax(logits.float(), -1)


def test_chat_prompt_logprobs_shape_and_values(server, engine, tiny):
    prefill = "the cat sat<|im_end|>"
    r = post(server, "/v1/chat/completions", json=chat_body(tiny, 0, prefill, k=3, logprobs=True, top_logprobs=2))
    assert r.status_code == 200, r.text
    j = r.json()
    plp, ids = j["prompt_logprobs"], j["prompt_token_ids"]
    assert j["object"] == "chat.completion" and j["model"] == str(tiny.teacher)
    assert len(plp) == len(ids) == j["usage"]["prompt_tokens"]
    assert plp[0] is None
    want_ids, logp = _reference_logp(engine, tiny, 0, prefill)
    assert ids == want_ids
    tail = tiny.tokenizer(prefill, add_special_tokens=False)["input_ids"]
    assert ids[-len(tail):] == tail  # the prefill is the end of the prompt, EOS included
    for pos in range(1, len(plp)):
        entry = plp[pos]
        keys = list(entry)
        assert all(isinstance(key, str) and key.isdigit() for key in keys)
        assert keys[0] == str(ids[pos])  # the actual token first
        assert len(entry) in (3, 4)
        for key, v in entry.items():
            assert set(v) == {"logprob", "rank", "decoded_token"}
            assert v["logprob"] == pytest.approx(float(logp[pos - 1, int(key)]), abs=1e-5)
            assert v["decoded_token"] == tiny.tokenizer.decode([int(key)])
        ranked = sorted((v["rank"] for key, v in entry.items() if v["rank"] <= 3))
        assert ranked == [1, 2, 3]
        act = entry[str(ids[pos])]
        assert act["rank"] == int((logp[pos - 1] >= logp[pos - 1, ids[pos]]).sum())
    choice = j["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    nxt = int(logp[-1].argmax())
    assert choice["message"]["content"] == tiny.tokenizer.decode([nxt])
    top = choice["logprobs"]["content"][0]["top_logprobs"]
    assert len(top) == 2 and top[0]["logprob"] == pytest.approx(float(logp[-1].max()), abs=1e-5)


def test_chat_k0_and_without_token_ids(server, tiny):
    body = chat_body(tiny, 1, "one two<|im_end|>", k=0)
    del body["return_token_ids"]
    j = post(server, "/v1/chat/completions", json=body).json()
    assert "prompt_token_ids" not in j
    assert j["prompt_logprobs"][0] is None
    assert all(len(e) == 1 for e in j["prompt_logprobs"][1:])


def test_chat_closed_turn_and_text_only_messages(server, tiny):
    # continue_final_message false + add_generation_prompt false: the closed turn is scored
    body = chat_body(tiny, 0, "hello world", continue_final_message=False)
    j = post(server, "/v1/chat/completions", json=body).json()
    eos = tiny.tokenizer.eos_token_id
    assert eos in j["prompt_token_ids"][-3:]
    # a prompt with no audio part at all is fine for an audio model
    body = chat_body(tiny, 0, "hello world")
    body["messages"][0]["content"] = "say hello"
    assert post(server, "/v1/chat/completions", json=body).status_code == 200


# ----------------------------------------------------------------------------- transcription
def _greedy(engine, tiny, i, prompt="Transcribe the audio."):
    proc = engine.processor
    batch = AudioPromptCollator(proc, prompt).prompts([tiny.rows[i]])
    _, comp = generate_completions(engine.model, batch, proc.tokenizer, do_sample=False, max_new_tokens=8,
                                   suppress_ids=special_token_ids(proc), eos_ids=[proc.tokenizer.eos_token_id],
                                   return_logp=False)
    return comp.texts[0]


def test_transcription_json_and_text(server, engine, tiny):
    path = tiny.rows[2]["audio"]
    want = _greedy(engine, tiny, 2)
    r = post(server, "/v1/audio/transcriptions", files={"file": ("a.wav", Path(path).read_bytes(), "audio/wav")},
             data={"model": str(tiny.teacher)})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"text": want}
    r = post(server, "/v1/audio/transcriptions", files={"file": ("a.wav", Path(path).read_bytes())},
             data={"response_format": "text"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert r.text == want
    # the instruction comes from the request's prompt
    r = post(server, "/v1/audio/transcriptions", files={"file": ("a.wav", Path(path).read_bytes())},
             data={"prompt": "Describe the sound."})
    assert r.status_code == 200 and r.json()["text"] == _greedy(engine, tiny, 2, "Describe the sound.")
    # a FLAC at 8 kHz stereo is decoded and resampled
    wav, sr = sf.read(path, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, np.stack([wav[::2], wav[::2]], 1), sr // 2, format="FLAC")
    r = post(server, "/v1/audio/transcriptions", files={"file": ("a.flac", buf.getvalue())})
    assert r.status_code == 200 and isinstance(r.json()["text"], str)


# ----------------------------------------------------------------------------- auth, limits
def test_auth(keyed, tiny):
    with httpx.Client(base_url=keyed.url) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                r = c.request(method, path, headers=headers, json=chat_body(tiny))
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["code"] == 401 and "API key" in r.json()["error"]["message"]
        ok = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.post("/v1/chat/completions", headers=ok, json=chat_body(tiny)).status_code == 200
        assert c.get("/health").status_code == 200  # open, as vLLM's


def test_request_too_large(keyed, tiny):
    ok = {"Authorization": f"Bearer {KEY}"}
    big = chat_body(tiny)
    big["messages"][1]["content"] = "x" * (1 << 20)
    r = post(keyed, "/v1/chat/completions", json=big, headers=ok)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    # a chunked body without Content-Length is cut at the limit too
    payload = json.dumps(big).encode()
    chunks = (payload[i: i + 65536] for i in range(0, len(payload), 65536))
    r = post(keyed, "/v1/chat/completions", content=chunks, headers={**ok, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = post(keyed, "/v1/audio/transcriptions", files={"file": ("a.wav", b"\0" * (2 << 20))}, headers=ok)
    assert r.status_code == 413
    assert post(keyed, "/v1/chat/completions", json=chat_body(tiny), headers=ok).status_code == 200


def _bad_cases(tiny):
    good = chat_body(tiny)

    def with_(**kw):
        b = json.loads(json.dumps(good))
        b.update(kw)
        return b

    def msg(content, role="user"):
        return with_(messages=[{"role": role, "content": content}, good["messages"][1]])

    def audio(data, fmt="wav"):
        return msg([{"type": "input_audio", "input_audio": {"data": data, "format": fmt}}])

    no_prefill = with_(messages=good["messages"][:1], continue_final_message=False, add_generation_prompt=True)
    default_gen = with_()
    del default_gen["add_generation_prompt"]
    no_plp = with_()
    del no_plp["prompt_logprobs"]
    return [
        ("not json", b"{not json", 400, "not valid JSON"),
        ("a list", [1, 2], 400, "JSON object"),
        ("no messages", with_(messages=None), 400, "messages"),
        ("messages not a list", with_(messages="hi"), 400, "messages"),
        ("message not an object", with_(messages=["hi"]), 400, "messages[0]"),
        ("bad role", msg("x", role="robot"), 400, "role"),
        ("content a number", msg(5), 400, "content"),
        ("part without type", msg([{"text": "x"}]), 400, "type"),
        ("unknown part type", msg([{"type": "image_url", "image_url": {"url": "x"}}]), 400, "not supported"),
        ("text not a string", msg([{"type": "text", "text": 3}]), 400, "text must be a string"),
        ("bad base64", audio("@@not base64@@"), 400, "base64"),
        ("not a wav", audio(base64.b64encode(b"hello, not audio").decode()), 400, "not a readable audio file"),
        ("input_audio not an object", msg([{"type": "input_audio", "input_audio": "abc"}]), 400, "input_audio"),
        ("http audio url", msg([{"type": "audio_url", "audio_url": {"url": "http://x/a.wav"}}]), 400, "data: URL"),
        ("missing prefill", no_prefill, 400, "assistant prefill"),
        ("generation prompt default", default_gen, 400, "add_generation_prompt"),
        ("both flags", with_(add_generation_prompt=True), 400, "Cannot set both"),
        ("prompt_logprobs missing", no_plp, 400, "prompt_logprobs"),
        ("prompt_logprobs too large", with_(prompt_logprobs=21), 400, "greater than max allowed: 20"),
        ("prompt_logprobs a string", with_(prompt_logprobs="5"), 400, "integer"),
        ("prompt_logprobs negative", with_(prompt_logprobs=-3), 400, ">= 0"),
        ("prompt_logprobs bool", with_(prompt_logprobs=True), 400, "integer"),
        ("max_tokens 16", with_(max_tokens=16), 400, "max_tokens"),
        ("max_tokens 0", with_(max_tokens=0), 400, "at least 1"),
        ("stream", with_(stream=True), 400, "stream"),
        ("flag not bool", with_(continue_final_message="yes"), 400, "boolean"),
        ("top_logprobs without logprobs", with_(top_logprobs=2), 400, "logprobs"),
        ("unknown model", with_(model="gpt-9"), 404, "does not exist"),
    ]


def test_malformed_chat_requests_get_clear_4xx(server, tiny):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name, body, status, phrase in _bad_cases(tiny):
            if isinstance(body, bytes):
                r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            else:
                r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert phrase in err["message"], (name, err)
            assert err["code"] == status
        r = c.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        r = c.get("/v1/nothing-here")
        assert r.status_code == 404 and "error" in r.json()
        assert c.get("/health").status_code == 200


def test_malformed_transcriptions_get_clear_4xx(server, tiny):
    wav = Path(tiny.rows[0]["audio"]).read_bytes()
    cases = [
        ("json body", dict(json={"file": "x"}), 400, "multipart"),
        ("no file", dict(data={"model": "m"}, files={"other": ("a.txt", b"x")}), 400, "'file'"),
        ("file as text", dict(data={"file": "abc"}, files={"other": ("a.txt", b"x")}), 400, "'file'"),
        ("not audio", dict(files={"file": ("a.wav", b"RIFF....junk")}), 400, "not a readable audio file"),
        ("empty file", dict(files={"file": ("a.wav", b"")}), 400, "empty"),
        ("srt", dict(files={"file": ("a.wav", wav)}, data={"response_format": "srt"}), 400, "response_format"),
        ("temperature", dict(files={"file": ("a.wav", wav)}, data={"temperature": "hot"}), 400, "temperature"),
        ("model", dict(files={"file": ("a.wav", wav)}, data={"model": "whisper-9"}), 404, "does not exist"),
    ]
    for name, kw, status, phrase in cases:
        r = post(server, "/v1/audio/transcriptions", **kw)
        assert r.status_code == status, (name, r.text)
        assert phrase in r.json()["error"]["message"], (name, r.json())


def test_internal_error_is_a_500_and_the_server_goes_on(server, engine, tiny, monkeypatch):
    def boom(items):
        raise RuntimeError("simulated failure in the model")

    monkeypatch.setattr(engine, "_score_batch", boom)
    r = post(server, "/v1/chat/completions", json=chat_body(tiny))
    assert r.status_code == 500
    assert "simulated failure" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert post(server, "/v1/chat/completions", json=chat_body(tiny)).status_code == 200


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_with_unbatched_results(server, engine, tiny):
    prefills = ["the cat<|im_end|>", "a dog ran in the park<|im_end|>", "red", "one two three four<|im_end|>",
                "hello", "open the door please<|im_end|>"]
    bodies = [chat_body(tiny, i, p, k=4) for i, p in enumerate(prefills)]
    alone = [post(server, "/v1/chat/completions", json=b).json() for b in bodies]
    # a server whose first request waits up to 300 ms for others (batches of up to 8)
    with ServerThread(create_app(engine=engine, max_batch=8, batch_wait_ms=300)) as batching:
        before = engine.forward_calls
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = [r.json() for r in pool.map(lambda b: post(batching, "/v1/chat/completions", json=b), bodies)]
        calls = engine.forward_calls - before
    assert 1 <= calls < len(bodies), calls
    for a, t in zip(alone, together):
        assert a["prompt_token_ids"] == t["prompt_token_ids"]
        for ea, et in zip(a["prompt_logprobs"][1:], t["prompt_logprobs"][1:]):
            assert list(ea) == list(et) or set(ea) == set(et)
            for key in ea:
                assert et[key]["logprob"] == pytest.approx(ea[key]["logprob"], abs=1e-5)


# ----------------------------------------------------------------------------- CLI
def test_cli_help():
    p = subprocess.run([sys.executable, "-m", "core.bin.serve_teacher", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--model", "--port", "--host", "--api-key", "--max-logprobs", "--max-batch"):
        assert flag in p.stdout


def test_cli_serves_until_terminated(tiny):
    from conftest import cpu_env, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core.bin.serve_teacher", "--model", str(tiny.teacher),
                             "--port", str(port), "--api-key", KEY, "--log-level", "warning"],
                            cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() - t0 < 120, "the server did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", json=chat_body(tiny), timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["prompt_logprobs"][0] is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- web page
def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_web_page_in_headless_chromium(server, engine, tiny, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine: apt-get install -y chromium (bash run.sh setup does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    clip = tiny.rows[2]["audio"]
    want = _greedy(engine, tiny, 2)
    args = ["--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={clip}"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('health').className === 'ok'", timeout=15000)
            assert "ready" in page.inner_text("#health") and str(tiny.teacher) in page.inner_text("#health")
            # upload: decoded and re-encoded in the page, the same transcript as the API's
            page.set_input_files("#file", clip)
            page.wait_for_function("document.getElementById('result').dataset.done === '1'", timeout=30000)
            assert page.evaluate("document.getElementById('result').textContent") == want
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(tmp_path / "upload.png"))
            # record from the (fake) microphone, stop, get a transcript back
            page.evaluate("document.getElementById('result').dataset.done = ''")
            page.click("#record")
            page.wait_for_function("document.getElementById('state').textContent.startsWith('recording')")
            page.wait_for_timeout(1200)
            page.click("#stop")
            page.wait_for_function("document.getElementById('result').dataset.done === '1' || "
                                   "document.getElementById('error').textContent !== ''", timeout=30000)
            assert page.inner_text("#error") == ""
            assert isinstance(page.evaluate("document.getElementById('result').textContent"), str)
            assert not errors, errors
        finally:
            browser.close()




def test_a_transformers_4x_chat_template_gets_its_audio(tiny, tmp_path, one_thread):
    """A Qwen2-Audio folder with the 4.x template: the server renders the audio placeholder (it
    answered 400, "Found total 0 <|AUDIO|> tokens and 1 audio inputs", before) and scores."""
    from transformers import AutoProcessor
    folder = tmp_path / "qwen2_audio_4x"
    shutil.copytree(tiny.teacher, folder)
    proc = AutoProcessor.from_pretrained(folder)
    proc.chat_template = QWEN2_AUDIO_4X_TEMPLATE
    proc.tokenizer.chat_template = QWEN2_AUDIO_4X_TEMPLATE
    proc.save_pretrained(folder)
    eng = TeacherEngine(folder, device="cpu", max_new_tokens=8)
    try:
        with ServerThread(create_app(engine=eng, batch_wait_ms=1)) as s:
            body = chat_body(tiny, 0, k=2)
            body["model"] = str(folder)
            r = post(s, "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ids = r.json()["prompt_token_ids"]
        audio_id = tiny.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
        text = tiny.tokenizer.decode(ids)
        assert "Audio 1: <|audio_bos|>" in text and ids.count(audio_id) > 1  # expanded to the clip's frames
        assert len(r.json()["prompt_logprobs"]) == len(ids)
    finally:
        eng.executor.shutdown(wait=True)


def test_decode_with_url_equals_local_decode(server, tiny, tmp_path):
    """core.bin.decode --url: the server transcribes each row (its greedy output at its own length
    limit, 8 here) exactly as decoding the same model here does; a refused row names itself."""
    from core.bin.decode import decode, decode_remote, main as decode_main
    rows = tiny.rows[:4]
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = decode_remote(server.url, str(man), str(tmp_path / "remote.jsonl"), prompt="Transcribe the audio.",
                         as_manifest=True, concurrency=2)
    decode(str(tiny.teacher), str(man), str(tmp_path / "local.jsonl"), prompt="Transcribe the audio.",
           max_new_tokens=8, as_manifest=True, device="cpu")
    remote_rows = [json.loads(x) for x in (tmp_path / "remote.jsonl").read_text().splitlines()]
    local_rows = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    assert info["samples"] == 4 and [r["key"] for r in remote_rows] == [r["key"] for r in rows]
    assert [r["text"] for r in remote_rows] == [r["text"] for r in local_rows]
    assert any(r["text"] for r in remote_rows)
    # the CLI: an unreachable server is one error line, exit 1
    rc = decode_main(["--url", "http://127.0.0.1:9", "--manifest", str(man), "--out", str(tmp_path / "x.jsonl"),
                      "--prompt", "Transcribe the audio."])
    assert rc == 1
