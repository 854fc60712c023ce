"""RemoteTeacher against the teacher server on 127.0.0.1: equal to LocalTeacher, and its failures.

The student here is the tiny student made to say words only (``word_student``): a random tiny
model samples byte tokens and splits words in ways that do not survive decoding to text and
re-tokenising, which a remote teacher must do (vLLM takes the prefill as text), so nearly none of
its samples could be aligned. The word student's completions re-tokenise to themselves, so every
sample aligns and the remote scores can be compared with the local ones exactly.

Checks: sampled-token log-probs and the teacher_topk distillation loss equal to LocalTeacher's
within 1e-5; server down, slow, failing with 500s (transient and persistent), a wrong key, a
vocabulary mismatch (from /v1/models, and from decoded tokens for a server without metadata, as
vLLM), an unalignable sample (valid False, counted by OPD); two OPD steps through the Trainer with
``teacher.kind: remote`` matching the same run with the local teacher.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from core import config as C
from core import losses as L
from core.data.collate import AudioPromptCollator
from core.models import load_model_and_processor, save_model, special_token_ids, train_tokenizer
from core.forward import completion_logits
from core.sampling import Completions, generate_completions
from core.serve.app import ServerThread, create_app
from core.serve.engine import TeacherEngine
from core.teacher import (LocalTeacher, RemoteTeacher, TeacherRequestError, TeacherUnavailable,
                          VocabularyMismatch)
from core.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
KEY = "teacher-key"
FAST = dict(backoff=0.01, timeout=30.0, prompt="Transcribe the audio.")


# ----------------------------------------------------------------------------- fixtures
def word_tokens(tok) -> list[int]:
    """Tokens that are a space and ASCII letters and that encode back to themselves alone."""
    out = []
    for t in range(len(tok)):
        s = tok.decode([t])
        if len(s) > 1 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and \
                tok(s, add_special_tokens=False)["input_ids"] == [t]:
            out.append(t)
    return out


@pytest.fixture(scope="module")
def word_student(tiny, tmp_path_factory):
    """The tiny student with one residual dimension held at 1 for text tokens (embedding column set
    to 1, never written by attention or MLP) and an LM head column that adds +-3 times it: word
    tokens and EOS are favoured by ~30 nats over everything else."""
    model, proc = load_model_and_processor(tiny.student)
    tok = proc.tokenizer
    allowed = word_tokens(tok) + [tok.eos_token_id]
    assert len(allowed) > 8
    d = model.get_input_embeddings().weight.shape[1] - 1
    with torch.no_grad():
        model.get_input_embeddings().weight[:, d] = 1.0
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight[d, :] = 0
            layer.mlp.down_proj.weight[d, :] = 0
        head = model.get_output_embeddings().weight
        head[:, d] = -3.0
        head[allowed, d] = 3.0
    out = tmp_path_factory.mktemp("word_student") / "model"
    save_model(model, proc, out)
    return out


@pytest.fixture(scope="module")
def student(word_student):
    model, proc = load_model_and_processor(word_student)
    return model.eval(), proc


@pytest.fixture(scope="module")
def engine(tiny, one_thread):
    eng = TeacherEngine(tiny.teacher, device="cpu")
    yield eng
    eng.executor.shutdown(wait=True)


class Faults:
    """ASGI wrapper of the real app injecting faults into chosen routes (settable between requests)."""

    def __init__(self, app):
        self.app = app
        self.reset()

    def reset(self):
        self.fail_next = 0          # chat requests answered 500 before the real app sees them
        self.delay = 0.0            # seconds before a chat request is handled
        self.strip_models = False   # /v1/models without our vocabulary metadata (as vLLM's)
        self.models_patch = {}      # fields replaced in the /v1/models card
        self.corrupt_decoded = False  # decoded_token strings rewritten (another tokenizer)
        self.chat_calls = 0
        self.models_calls = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/v1/chat/completions":
            self.chat_calls += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_next > 0:
                self.fail_next -= 1
                body = json.dumps({"error": {"message": "injected failure", "type": "InternalServerError",
                                             "code": 500}}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
            if self.corrupt_decoded:
                return await self._rewrite(scope, receive, send, self._corrupt)
        if path == "/v1/models":
            self.models_calls += 1
            if self.strip_models or self.models_patch:
                return await self._rewrite(scope, receive, send, self._patch_models)
        return await self.app(scope, receive, send)

    def _patch_models(self, j):
        for card in j["data"]:
            if self.strip_models:
                for key in ("vocab_size", "tokenizer_size", "tokenizer_sha256", "max_logprobs"):
                    card.pop(key, None)
            card.update(self.models_patch)
        return j

    @staticmethod
    def _corrupt(j):
        for e in j["prompt_logprobs"][1:]:
            for v in e.values():
                v["decoded_token"] = "~" + v["decoded_token"] + "~"
        return j

    async def _rewrite(self, scope, receive, send, fn):
        start, chunks = {}, []

        async def grab(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
            else:
                chunks.append(msg.get("body", b""))

        await self.app(scope, receive, grab)
        body = b"".join(chunks)
        if start.get("status") == 200:
            body = json.dumps(fn(json.loads(body))).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": start.get("status", 500), "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def served(engine):
    faults = Faults(create_app(engine=engine, batch_wait_ms=2))
    s = ServerThread(faults).start()
    s.faults = faults
    yield s
    s.stop()


@pytest.fixture
def server(served):
    served.faults.reset()
    yield served
    served.faults.reset()


@pytest.fixture(scope="module")
def keyed(engine):
    s = ServerThread(create_app(engine=engine, api_key=KEY, batch_wait_ms=2)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rollout(tiny, student):
    """A rollout of the word student: 4 prompts x 2 samples, some ending in EOS before the limit."""
    model, proc = student
    tok = proc.tokenizer
    batch = AudioPromptCollator(proc, "Transcribe the audio.").prompts(tiny.rows[:4])
    rep, comp = generate_completions(model, batch, tok, n=2, max_new_tokens=8, suppress_ids=special_token_ids(proc),
                                     eos_ids=[tok.eos_token_id], seed=0)
    lens = comp.mask.sum(1)
    assert (lens < 8).any() and (lens > 1).any(), lens
    return rep, comp


@pytest.fixture(scope="module")
def local_scores(tiny, rollout):
    tm, tp = load_model_and_processor(tiny.teacher)
    rep, comp = rollout
    return LocalTeacher(tm, tp).score(rep, comp, top_k=K)


def remote(server, student, **kw):
    model, proc = student
    return RemoteTeacher(server.url, proc, student_model=model, **{**FAST, **kw})


def topk_loss(student_model, rep, comp, scores):
    logits = completion_logits(student_model, rep, comp.ids, comp.mask)
    mask = comp.mask.float() * scores.valid.float()[:, None]
    loss, _ = L.distill_loss(logits, teacher_topk_ids=scores.topk_ids, teacher_topk_logp=scores.topk_logp,
                             mask=mask, divergence="reverse_kl", support="teacher_topk", top_k=K)
    return loss


# ----------------------------------------------------------------------------- equality
def test_remote_equals_local(server, student, rollout, local_scores):
    rep, comp = rollout
    with remote(server, student) as t:
        rs = t.score(rep, comp, top_k=K)
    ls = local_scores
    assert rs.valid.all()
    mask = comp.mask.bool()
    assert torch.allclose(rs.logp[mask], ls.logp[mask], atol=1e-5)
    assert (rs.logp[~mask] == 0).all()
    assert torch.allclose(rs.topk_logp[mask], ls.topk_logp[mask], atol=1e-5)
    assert torch.equal(rs.topk_ids[mask].sort(-1).values, ls.topk_ids[mask].sort(-1).values)
    model, _ = student
    with torch.no_grad():
        lr, ll = topk_loss(model, rep, comp, rs), topk_loss(model, rep, comp, ls)
    assert float(ll) > 0
    assert abs(float(lr) - float(ll)) < 1e-5
    assert server.faults.chat_calls == len(comp.texts)


def test_reference_completions_with_eos_align(server, student, tiny, local_scores):
    """Canonical token ids (the transcripts + EOS) through the same path."""
    model, proc = student
    col = AudioPromptCollator(proc, "Transcribe the audio.")
    batch = col.prompts(tiny.rows[4:7])
    ids, mask = col.targets([r["text"] for r in tiny.rows[4:7]])
    comp = Completions(ids, mask, None, [r["text"] for r in tiny.rows[4:7]])
    tm, tp = load_model_and_processor(tiny.teacher)
    ls = LocalTeacher(tm, tp).score(batch, comp, top_k=K)
    with remote(server, student) as t:
        rs = t.score(batch, comp, top_k=K)
    assert rs.valid.all()
    m = mask.bool()
    assert torch.allclose(rs.logp[m], ls.logp[m], atol=1e-5)


def test_text_model_remote_equals_local(tiny, tmp_path):
    """A text-only causal LM served and scored the same way (string content, no audio)."""
    from core.data.collate import TextPromptCollator, tokenize_targets
    from core.models import build_tiny_causal_lm

    build_tiny_causal_lm(tiny.tokenizer, hidden=32, layers=1, heads=2, seed=3, out_dir=tmp_path / "lm")
    model, tok = load_model_and_processor(tmp_path / "lm")
    col = TextPromptCollator(tok, "{question}")
    batch = col.prompts([{"key": "a", "question": "hello world"}, {"key": "b", "question": "the cat sat"}])
    ids, mask = tokenize_targets(tok, ["one two", "red green and blue"])
    comp = Completions(ids, mask, None, ["one two", "red green and blue"])
    ls = LocalTeacher(model, tok).score(batch, comp, top_k=K)
    with ServerThread(create_app(tmp_path / "lm", device="cpu")) as s:
        with RemoteTeacher(s.url, tok, collator=col, student_model=model, **FAST) as t:
            rs = t.score(batch, comp, top_k=K)
    assert rs.valid.all()
    m = mask.bool()
    assert torch.allclose(rs.logp[m], ls.logp[m], atol=1e-5)
    assert torch.allclose(rs.topk_logp[m], ls.topk_logp[m], atol=1e-5)


def test_request_body(server, student, rollout):
    rep, comp = rollout
    with remote(server, student) as t:
        ids = comp.ids[0][comp.mask[0].bool()].tolist()
        body = t.request_body(rep, 0, ids, K)
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["prompt_logprobs"] == K and body["max_tokens"] == 1
    user, asst = body["messages"]
    assert asst["role"] == "assistant"
    assert asst["content"] == student[1].tokenizer.decode(ids, skip_special_tokens=False)
    audio = next(p for p in user["content"] if p["type"] == "input_audio")
    wav, sr = sf.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])), dtype="float32")
    assert sr == 16000 and np.array_equal(wav, rep.audios[0])  # exactly the waveform the student saw
    assert user["content"][-1] == {"type": "text", "text": "Transcribe the audio."}


def test_full_logits_and_temperature_are_refused(server, student, rollout):
    rep, comp = rollout
    with remote(server, student) as t:
        with pytest.raises(ValueError, match="opd.support: teacher_topk"):
            t.score(rep, comp, top_k=K, return_logits=True)
        with pytest.raises(ValueError, match="temperature"):
            t.score(rep, comp, top_k=K, temperature=2.0)


def test_top_k_is_capped(server, student, rollout, caplog):
    rep, comp = rollout
    with remote(server, student, top_k_cap=3) as t, caplog.at_level(logging.WARNING, "core.teacher"):
        rs = t.score(rep.select([0]), comp.select([0]), top_k=50)
    assert rs.topk_ids.shape[-1] == 3 and "capped" in caplog.text


# ----------------------------------------------------------------------------- faults
def test_server_down_retries_then_clear_error(student, caplog):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, "core.teacher"), pytest.raises(TeacherUnavailable) as e:
        RemoteTeacher(url, student[1], max_retries=2, backoff=0.01, timeout=2, prompt="Transcribe the audio.")
    msg = str(e.value)
    assert url in msg and "3 attempt" in msg and "ConnectError" in msg
    assert caplog.text.count("retry") == 2


def test_server_goes_down_after_start(engine, student, rollout):
    rep, comp = rollout
    s = ServerThread(create_app(engine=engine)).start()
    try:
        t = remote(s, student, max_retries=1)
    finally:
        s.stop()
    with t, pytest.raises(TeacherUnavailable, match=s.url):
        t.score(rep, comp, top_k=K)


def test_slow_server_times_out_and_retries(server, student, rollout):
    rep, comp = rollout
    with remote(server, student, timeout=0.3, max_retries=1, concurrency=1) as t:
        server.faults.delay = 1.0
        with pytest.raises(TeacherUnavailable) as e:
            t.score(rep.select([0]), comp.select([0]), top_k=K)
    assert "no answer within 0.3 s" in str(e.value)
    assert server.faults.chat_calls == 2  # one try, one retry


def test_transient_500s_are_retried(server, student, rollout, local_scores):
    rep, comp = rollout
    with remote(server, student, max_retries=3, concurrency=1) as t:
        server.faults.fail_next = 2
        rs = t.score(rep, comp, top_k=K)
        assert t.stats["retries"] == 2
    assert rs.valid.all()
    mask = comp.mask.bool()
    assert torch.allclose(rs.logp[mask], local_scores.logp[mask], atol=1e-5)
    assert server.faults.chat_calls == len(comp.texts) + 2


def test_persistent_500s_give_a_clear_error(server, student, rollout):
    rep, comp = rollout
    with remote(server, student, max_retries=2) as t:
        server.faults.fail_next = 10 ** 6
        with pytest.raises(TeacherUnavailable) as e:
            t.score(rep, comp, top_k=K)
    assert "HTTP 500: injected failure" in str(e.value) and server.url in str(e.value)


def test_wrong_key_fails_at_once(keyed, student, rollout, caplog):
    with caplog.at_level(logging.WARNING, "core.teacher"):
        for key in (None, "wrong"):
            with pytest.raises(TeacherRequestError, match="HTTP 401.*teacher.api_key"):
                RemoteTeacher(keyed.url, student[1], api_key=key, max_retries=5, backoff=10,
                              prompt="Transcribe the audio.")
    assert "retry" not in caplog.text
    rep, comp = rollout
    with RemoteTeacher(keyed.url + "/v1", student[1], api_key=KEY, prompt="Transcribe the audio.") as t:  # a trailing /v1 is fine
        assert t.score(rep.select([1]), comp.select([1]), top_k=K).valid.all()


def test_other_4xx_fails_at_once(server, student, rollout):
    rep, comp = rollout
    server.faults.strip_models = True  # as vLLM: the client does not know the server's cap
    with remote(server, student, top_k_cap=40, max_retries=5, backoff=10) as t:
        with pytest.raises(TeacherRequestError, match="greater than max allowed: 20"):
            t.score(rep.select([0]), comp.select([0]), top_k=30)
    with pytest.raises(TeacherRequestError, match="does not serve model 'nope'"):
        remote(server, student, model="nope")


def test_vocabulary_mismatch_at_construction(server, student, tiny):
    other = train_tokenizer(["zebra quartz jump vexing", "a different corpus"], 280)
    with pytest.raises(VocabularyMismatch, match="tokenizer sizes differ"):
        RemoteTeacher(server.url, other, **FAST)
    server.faults.models_patch = {"tokenizer_sha256": "0" * 64}
    with pytest.raises(VocabularyMismatch, match="tokenizer_sha256"):
        remote(server, student)
    # a teacher whose table is padded to another size, same tokenizer: accepted (top-k ids are tokens)
    server.faults.models_patch = {"vocab_size": 1000}
    remote(server, student).close()
    # fewer rows than the tokenizer has ids: refused
    server.faults.models_patch = {"vocab_size": 100}
    with pytest.raises(VocabularyMismatch, match="output vocabulary sizes differ: student 300, teacher 100"):
        remote(server, student)


def test_server_without_metadata_checks_decoded_tokens(server, student, rollout, local_scores):
    """As against vLLM: no vocabulary fields in /v1/models, the first answer's tokens are checked."""
    rep, comp = rollout
    server.faults.strip_models = True
    with remote(server, student) as t:
        assert t._verify_decoding
        rs = t.score(rep, comp, top_k=K)
        assert not t._verify_decoding
    assert rs.valid.all()
    assert torch.allclose(rs.logp[comp.mask.bool()], local_scores.logp[comp.mask.bool()], atol=1e-5)
    server.faults.corrupt_decoded = True
    with remote(server, student) as t:
        with pytest.raises(VocabularyMismatch, match="decode differently"):
            t.score(rep.select([0]), comp.select([0]), top_k=K)


def test_actual_ids_without_prompt_token_ids():
    """Old servers: the actual token is the first key (V1), or the one ranked past k (k+1 entries)."""
    plp = [None,
           {"7": {"logprob": -1.0, "rank": 1}, "3": {"logprob": -2.0, "rank": 2}},
           {"3": {"logprob": -0.5, "rank": 1}, "4": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -6.0, "rank": 40}}]
    assert RemoteTeacher._actual_ids(plp, 2) == [None, 7, 9]


def _split_the(student, comp):
    """The rollout's completions with sample 3 replaced by ' the' spelt ' t' 'h' 'e' + EOS."""
    tok = student[1].tokenizer
    split = tok.convert_tokens_to_ids(["Ġt", "h", "e"]) + [tok.eos_token_id]
    assert tok(" the", add_special_tokens=False)["input_ids"] != split[:3]
    ids, mask = comp.ids.clone(), comp.mask.clone()
    ids[3], mask[3] = tok.pad_token_id, 0
    ids[3, :4], mask[3, :4] = torch.tensor(split), 1
    return Completions(ids, mask, comp.logp, list(comp.texts))


def test_prefill_token_ids_score_what_text_cannot(server, student, rollout, tiny):
    """Our server scores the ids sent as ``prefill_token_ids``: a completion that does not survive
    a text round trip is scored token for token, equal to LocalTeacher on the same ids."""
    rep, comp = rollout
    bad = _split_the(student, comp)
    tm, tp = load_model_and_processor(tiny.teacher)
    ls = LocalTeacher(tm, tp).score(rep, bad, top_k=K)
    with remote(server, student) as t:
        body = t.request_body(rep, 3, bad.ids[3][bad.mask[3].bool()].tolist(), K)
        assert body["prefill_token_ids"] == bad.ids[3, :4].tolist()
        rs = t.score(rep, bad, top_k=K)
        assert t.stats["unscored"] == 0
    assert rs.valid.all()
    m = bad.mask.bool()
    assert torch.allclose(rs.logp[m], ls.logp[m], atol=1e-5)
    assert torch.allclose(rs.topk_logp[m], ls.topk_logp[m], atol=1e-5)


def test_prefill_token_ids_are_checked(server, student, rollout):
    import httpx
    rep, comp = rollout
    with remote(server, student) as t:
        body = t.request_body(rep, 0, comp.ids[0][comp.mask[0].bool()].tolist(), K)
    for bad, word in (([10 ** 9], "vocabulary"), ([], "non-empty"), (["a"], "token ids")):
        r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "prefill_token_ids": bad}, timeout=30)
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "prefill_token_ids"


def test_unalignable_sample_is_invalid_and_counted(server, student, rollout, tiny, caplog, monkeypatch):
    """With a server that tokenises the prefill text again (vLLM ignores ``prefill_token_ids``), a
    completion whose text re-tokenises differently is left out of the loss, logged and counted."""
    from core.methods import METHODS, Context

    rep, comp = rollout
    tok = student[1].tokenizer
    bad = _split_the(student, comp)
    as_vllm = RemoteTeacher.request_body

    def without_ids(self, *a, **kw):
        body = as_vllm(self, *a, **kw)
        body.pop("prefill_token_ids")
        return body
    monkeypatch.setattr(RemoteTeacher, "request_body", without_ids)
    with remote(server, student) as t, caplog.at_level(logging.WARNING, "core.teacher"):
        rs = t.score(rep, bad, top_k=K)
        assert t.stats["unscored"] == 1
    assert rs.valid.tolist() == [i != 3 for i in range(len(comp.texts))]
    assert (rs.logp[3] == 0).all() and torch.isinf(rs.topk_logp[3]).all()
    assert repr(rep.rows[3]["key"]) in caplog.text and "re-tokenises differently" in caplog.text
    # OPD leaves the sample out of its mask and counts it
    cfg = C.load_config(overrides={"method": "opd", "model": {"path": "x"}, "data": {"train": "x"},
                                   "teacher": {"kind": "remote", "url": server.url},
                                   "rollout": {"n": 2}, "opd": {"support": "teacher_topk", "top_k": K}})
    monkeypatch.setattr("core.methods._rollout", lambda ctx, rows, seed, n: (rep, bad))
    with remote(server, student) as t:
        ctx = Context(model=None, forward_model=None, processor=student[1], tokenizer=tok, collator=None, cfg=cfg,
                      teacher=t)
        exp = METHODS["opd"].experience(ctx, tiny.rows[:4], seed=0)
    assert exp.metrics["unscored_samples"] == 1.0
    assert exp.tensors["mask"][3].sum() == 0 and exp.tensors["mask"][2].sum() == bad.mask[2].sum()


# ----------------------------------------------------------------------------- through the trainer
def _metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_trainer_opd_with_remote_teacher_matches_local(server, word_student, train_config):
    common = dict(method="opd", model={"path": str(word_student)}, rollout={"n": 2, "max_new_tokens": 6},
                  opd={"form": "distribution", "support": "teacher_topk", "top_k": K},
                  train={"batch_size": 2, "max_steps": 2, "seed": 0})
    remote_cfg = train_config("remote", teacher={"kind": "remote", "url": server.url, "retry_backoff": 0.01},
                              **common)
    local_cfg = train_config("local", **common)
    rt = Trainer(C.load_config(remote_cfg))
    assert isinstance(rt.teacher, RemoteTeacher)
    rt.train()
    Trainer(C.load_config(local_cfg)).train()
    rm, lm = _metrics(C.load_config(remote_cfg).output_dir), _metrics(C.load_config(local_cfg).output_dir)
    assert len(rm) == len(lm) == 2
    for r, m in zip(rm, lm):
        assert r["unscored_samples"] == 0 and r["aligned_share"] == 1.0
        assert r["loss"] > 0 and abs(r["loss"] - m["loss"]) < 1e-5
    assert server.faults.chat_calls == 2 * 2 * 2  # steps x prompts x samples


@pytest.mark.parametrize("opd, match", [
    ({"support": "full"}, "opd.support"),
    ({"support": "teacher_topk", "top_k": 64}, "teacher.top_k_cap"),
])
def test_trainer_refuses_what_a_remote_teacher_cannot_give(server, word_student, train_config, opd, match):
    cfg = train_config("bad", method="opd", model={"path": str(word_student)},
                       teacher={"kind": "remote", "url": server.url}, opd=opd)
    with pytest.raises(C.ConfigError, match=match):
        Trainer(C.load_config(cfg))


def test_calibrate_against_a_remote_teacher(engine, tiny, tmp_path, write_config):
    """calibrate with a remote teacher: the sampled KL is the local one; the top-k KL over the
    whole vocabulary (a server answering every token, --max-logprobs -1) is the local full KL, and
    over the top 20 it is a smaller, finite number."""
    vocab = engine.vocab_size
    with ServerThread(create_app(engine=engine, max_logprobs=-1, batch_wait_ms=2)) as s:
        res = {}
        for name, teacher in (("local", {"path": str(tiny.teacher)}),
                              ("remote_all", {"kind": "remote", "url": s.url, "top_k_cap": vocab}),
                              ("remote_20", {"kind": "remote", "url": s.url, "top_k_cap": 20})):
            cfg = write_config(tmp_path, name, method="calibrate", teacher=teacher,
                               data={"dev": str(tiny.manifest)}, rollout={"n": 1, "max_new_tokens": 6},
                               train={"batch_size": 4, "seed": 0})
            res[name] = Trainer(C.load_config(str(cfg))).train()
    loc, full, top = res["local"], res["remote_all"], res["remote_20"]
    assert loc["kl_support"] == "full" and full["kl_support"] == f"teacher_top{vocab}"
    assert top["kl_support"] == "teacher_top20" and loc["tokens"] == full["tokens"] == top["tokens"] > 0
    for key in ("sampled_kl_per_token", "reverse_kl_per_token"):
        assert full[key] == pytest.approx(loc[key], rel=1e-4, abs=1e-5), key
    assert top["sampled_kl_per_token"] == pytest.approx(loc["sampled_kl_per_token"], rel=1e-4, abs=1e-5)
    assert 0.0 <= top["reverse_kl_per_token"] and top["reverse_kl_per_token"] != pytest.approx(loc["reverse_kl_per_token"])
