"""Teachers score a student's completions, token by token.

``Teacher`` is the protocol every teacher follows: ``score(batch, completions, top_k=None,
return_logits=False)`` returns ``TeacherScores`` with the sampled tokens' log-probabilities and,
as asked, the teacher's top-k ids and log-probabilities or its full logits, all aligned with the
student's completion positions. ``valid`` marks the samples a teacher could score; a sample it
could not (a remote teacher that failed to align it) is excluded from the loss by the caller and
counted, never turned into a silent zero.

``LocalTeacher`` runs an in-process transformers model on the same prompt tensors as the student
(teacher and student share the processor). ``RemoteTeacher`` asks a server over HTTP (ours,
``python -m core.bin.serve_teacher``, or vLLM's OpenAI-compatible one) for ``prompt_logprobs`` of
the prompt with the completion as an assistant prefill, and aligns them by token ids; it gives
sampled-token log-probs and top-k, never full logits.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import httpx
import torch

from core.data.audio import load_audio
from core.data.collate import PromptBatch, make_collator
from core.forward import completion_logits
from core.sampling import Completions
from core.serve.protocol import error_message, vocab_fingerprint, wav_base64


@dataclass
class TeacherScores:
    logp: torch.Tensor                    # [B, T] teacher log-prob of each completion token
    valid: torch.Tensor                   # [B] bool: the sample was scored
    topk_ids: torch.Tensor | None = None  # [B, T, k]
    topk_logp: torch.Tensor | None = None  # [B, T, k]
    logits: torch.Tensor | None = None    # [B, T, V]

    def to(self, device) -> "TeacherScores":
        """Every tensor on ``device`` (a remote teacher's scores arrive on the CPU)."""
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        return TeacherScores(mv(self.logp), mv(self.valid), mv(self.topk_ids), mv(self.topk_logp), mv(self.logits))


@runtime_checkable
class Teacher(Protocol):
    def score(self, batch: PromptBatch, completions: Completions, top_k: int | None = None,
              return_logits: bool = False, temperature: float = 1.0) -> TeacherScores: ...


class LocalTeacher:
    """An in-process transformers model used as the teacher (frozen, eval mode, no grad).

    It scores through ``completion_logits``, so on the rollout's repeated batch its media encoders
    run once per distinct prompt, not once per completion (``core.forward.encoders_once``).
    """

    def __init__(self, model, processor=None, device: str | torch.device | None = None,
                 vocab_limit: int | None = None):
        """``vocab_limit``: score over the first rows only (a teacher whose embedding table is
        padded to another size than the student's: ``core.models.check_vocab_match``)."""
        self.vocab_limit = vocab_limit
        self.model = model.eval() if device is None else model.to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.device = None if device is None else torch.device(device)

    @torch.no_grad()
    def score(self, batch: PromptBatch, completions: Completions, top_k: int | None = None,
              return_logits: bool = False, temperature: float = 1.0) -> TeacherScores:
        if self.device is not None:  # scores come back on the teacher's device
            batch = batch.to(self.device)
        logits = completion_logits(self.model, batch, completions.ids, completions.mask, temperature)
        if self.vocab_limit is not None:
            logits = logits[..., :self.vocab_limit]
        # log-probs as logit - logsumexp: no [B, T, V] log-softmax copy of the logits
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        logp = logits.gather(-1, completions.ids.unsqueeze(-1).to(logits.device)) - lse
        logp = logp.squeeze(-1) * completions.mask.to(logp)
        out = TeacherScores(logp=logp, valid=torch.ones(logp.shape[0], dtype=torch.bool, device=logp.device))
        if top_k:
            k = min(int(top_k), logits.shape[-1])
            top_logits, out.topk_ids = logits.topk(k, dim=-1)
            out.topk_logp = top_logits - lse
        if return_logits:
            out.logits = logits
        return out


# --------------------------------------------------------------------------- remote teacher
class TeacherUnavailable(RuntimeError):
    """The teacher server could not be reached, or kept failing, after every retry."""


class TeacherRequestError(RuntimeError):
    """The teacher server refused a request (HTTP 4xx) or answered in a shape it should not."""


class VocabularyMismatch(ValueError):
    """The served teacher's vocabulary is not the student's."""


log = logging.getLogger("core.teacher")

_RETRY_STATUS = {408, 425, 429}


class RemoteTeacher:
    """A teacher behind HTTP: our ``core.bin.serve_teacher`` or a vLLM OpenAI-compatible server.

    For each sample ``score`` sends one ``POST /v1/chat/completions``: the sample's user turn
    (built by ``collator.messages(row)``, audio as base64 WAV of the waveform the student saw),
    the student's completion as an assistant prefill (its token ids decoded, EOS included, with
    ``continue_final_message: true, add_generation_prompt: false``), ``prompt_logprobs: k`` and
    ``max_tokens: 1``. The teacher's positions are aligned with the completion by token ids: the
    completion's ids must be the last ids of the teacher's prompt (``prompt_token_ids``, or the
    actual token of each ``prompt_logprobs`` entry). The request also carries the completion's ids
    as ``prefill_token_ids``: our server scores exactly those tokens; vLLM ignores the field and
    tokenises the text again, and a sample whose text re-tokenises differently there gets
    ``valid=False``, is logged with its key and left out of the loss by the caller; it never
    becomes a zero.

    Requests run ``concurrency`` at a time (a thread pool over one ``httpx.Client``), each with
    ``timeout`` seconds; connection errors, timeouts, 5xx, 408 and 429 are retried ``max_retries``
    times with exponential backoff (``backoff * 2**attempt`` s, capped at 30 s), then
    ``TeacherUnavailable`` names the URL and the last error. Any other 4xx (a wrong key, a too
    large ``prompt_logprobs``, ...) raises ``TeacherRequestError`` at once with the server's
    message. At construction ``GET /v1/models`` picks the served model and checks the vocabulary
    (``tokenizer_sha256`` / ``tokenizer_size`` / ``vocab_size`` from our server; for a server
    without them, such as vLLM, the first response's ``decoded_token`` strings are checked against
    the student's tokenizer); a mismatch raises ``VocabularyMismatch``.

    Only top-k is available remotely (``top_k`` capped at ``top_k_cap``, vLLM's ``--max-logprobs``,
    20 by default, and at the server's own ``max_logprobs``); ``return_logits=True`` and a
    temperature other than 1 raise ``ValueError``.
    """

    def __init__(self, url: str, processor=None, *, collator=None, prompt: str | None = None,
                 system: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, concurrency: int = 8,
                 top_k_cap: int = 20, student_model=None, audio_subtype: str = "FLOAT"):
        """``url``: the server's base URL (a trailing ``/v1`` is accepted). ``processor``: the student's.
        ``collator``: builds each sample's messages (default: an ``AudioPromptCollator`` with ``prompt``
        (required then) and ``system``, or a ``TextPromptCollator`` for a text model); it must be the student's, so the
        teacher sees the student's prompt. ``api_key``: bearer token (default ``$TEACHER_API_KEY``).
        ``model``: served model name (default: the first in ``/v1/models``). ``student_model``: its
        output size is checked against the server's ``vocab_size``. ``audio_subtype``: WAV sample
        format sent (``FLOAT``: the exact waveform; ``PCM_16``: half the bytes, rounded to 16 bits).
        """
        if collator is None and processor is None:
            raise ValueError("RemoteTeacher needs the student's processor (or a collator)")
        if collator is None:
            audio = getattr(processor, "feature_extractor", None) is not None
            collator = make_collator("audio" if audio else "text", processor, prompt=prompt or "", system=system)
        for name, v, lo in (("timeout", timeout, 1e-9), ("concurrency", concurrency, 1), ("top_k_cap", top_k_cap, 1)):
            if v is None or v < lo:
                raise ValueError(f"RemoteTeacher: {name} must be >= {lo}, got {v!r}")
        if max_retries < 0 or backoff < 0:
            raise ValueError(f"RemoteTeacher: max_retries and backoff must be >= 0, got {max_retries}, {backoff}")
        self.collator = collator
        self.processor = processor if processor is not None else collator.processor
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.sample_rate = getattr(collator, "sample_rate", 16000)
        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"RemoteTeacher: url must start with http:// or https://, got {url!r}")
        self.base = base[:-3] if base.endswith("/v1") else base
        api_key = api_key or os.environ.get("TEACHER_API_KEY") or None
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.max_retries, self.backoff = float(timeout), int(max_retries), float(backoff)
        self.concurrency, self.top_k_cap = int(concurrency), int(top_k_cap)
        self.audio_subtype = audio_subtype
        # requests sent, retries, requests that needed a retry, requests that failed for good, unscored samples
        self.stats = {"requests": 0, "retries": 0, "retried": 0, "failed": 0, "unscored": 0}
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout),
                                    limits=httpx.Limits(max_connections=self.concurrency,
                                                        max_keepalive_connections=self.concurrency))
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="remote-teacher")
        self._lock = threading.Lock()
        self._jitter = random.Random()
        self._capped_warned = False
        self.model = model or None
        self._verify_decoding = False
        try:
            self._check_server(student_model)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ HTTP
    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method: str, path: str, body: bytes | None = None, stop=None):
        """One request with retries; the parsed JSON answer."""


        url = self.base + path
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if stop is not None and stop.is_set():
                raise TeacherUnavailable(f"teacher at {url}: request abandoned (another request of the batch failed)")
            with self._lock:
                self.stats["requests"] += 1
            try:
                r = self._client.request(method, url, content=body, headers=headers)
            except httpx.TimeoutException as e:
                last = f"no answer within {self.timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    try:
                        return json.loads(r.content)
                    except ValueError:
                        last = f"HTTP {r.status_code} with a body that is not JSON: {r.text[:200]!r}"
                elif r.status_code >= 500 or r.status_code in _RETRY_STATUS:
                    last = f"HTTP {r.status_code}: {error_message(r.content)}"
                else:
                    msg = error_message(r.content)
                    hint = {401: " Check teacher.api_key (or $TEACHER_API_KEY) against the server's --api-key.",
                            403: " Check teacher.api_key (or $TEACHER_API_KEY) against the server's --api-key.",
                            404: " Check teacher.url and teacher.model (GET /v1/models lists the served names).",
                            413: " The request is larger than the server accepts (its --max-request-mb)."}
                    raise TeacherRequestError(f"teacher at {url} refused the request (HTTP {r.status_code}): {msg}."
                                              + hint.get(r.status_code, ""))
            if attempt < self.max_retries:
                delay = min(self.backoff * (2 ** attempt), 30.0)
                delay += self._jitter.uniform(0, 0.1 * delay)  # its own generator: the run's RNG states stay put
                with self._lock:
                    self.stats["retries"] += 1
                    self.stats["retried"] += attempt == 0
                log.warning("teacher at %s: %s; retry %d/%d in %.2f s", url, last, attempt + 1,
                                 self.max_retries, delay)
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
        with self._lock:
            self.stats["failed"] += 1
        raise TeacherUnavailable(
            f"teacher at {url} failed after {self.max_retries + 1} attempt(s): {last}. Is the server running "
            f"(python -m core.bin.serve_teacher, or vllm serve) and is teacher.url right? Retries and the "
            f"per-request limit are teacher.max_retries and teacher.timeout.")

    def _check_server(self, student_model) -> None:
        ans = self._call("GET", "/v1/models")
        cards = ans.get("data") if isinstance(ans, dict) else None
        if not isinstance(cards, list) or not cards or not all(isinstance(c, dict) for c in cards):
            raise TeacherRequestError(f"teacher at {self.base}/v1/models lists no model: {str(ans)[:300]}")
        ids = [c.get("id") for c in cards]
        if self.model is None:
            card = cards[0]
            self.model = card.get("id")
        else:
            card = next((c for c in cards if c.get("id") == self.model), None)
            if card is None:
                raise TeacherRequestError(f"teacher at {self.base} does not serve model {self.model!r} "
                                          f"(teacher.model); it serves {ids}")
        what = f"teacher at {self.base} (model {self.model!r})"
        problems = []
        vocab = self.tokenizer.get_vocab()
        fp, ts, vs = card.get("tokenizer_sha256"), card.get("tokenizer_size"), card.get("vocab_size")
        if ts is not None and ts != len(vocab):
            problems.append(f"tokenizer sizes differ: student {len(vocab)}, teacher {ts}")
        if fp is not None and fp != vocab_fingerprint(self.tokenizer):
            problems.append("the tokenizers map tokens to different ids (tokenizer_sha256 differs)")
        if vs is not None and student_model is not None and student_model.get_output_embeddings() is not None:
            sv = student_model.get_output_embeddings().weight.shape[0]
            n_tok = max(vocab.values(), default=-1) + 1
            # tables padded to other sizes are fine (top-k ids are token ids): not fewer rows than ids
            if sv != vs and (problems or min(sv, vs) < n_tok):
                problems.append(f"output vocabulary sizes differ: student {sv}, teacher {vs}")
        if problems:
            raise VocabularyMismatch(f"student/teacher vocabulary mismatch with the {what}: " + "; ".join(problems)
                                     + ". Distillation needs a shared tokenizer.")
        self._verify_decoding = fp is None and ts is None
        mlp = card.get("max_logprobs")
        if isinstance(mlp, int) and not isinstance(mlp, bool) and 0 < mlp < self.top_k_cap:
            log.info("%s accepts at most %d logprobs; top-k capped there", what, mlp)
            self.top_k_cap = mlp

    # ------------------------------------------------------------------ requests
    def _audio_b64(self, batch: PromptBatch, i: int, part: dict, cache: dict) -> str:
        wave = batch.audios[i] if i < len(batch.audios) and batch.audios[i] is not None else None
        if wave is None or isinstance(wave, (list, tuple)):
            row = batch.rows[i]
            path = part.get("audio") or row.get("audio")
            wave = load_audio(path, row.get("begin_time"), row.get("end_time"), sample_rate=self.sample_rate)
        key = id(wave)
        if key not in cache:
            cache[key] = (wave, wav_base64(wave, self.sample_rate, self.audio_subtype))
        return cache[key][1]

    def request_body(self, batch: PromptBatch, i: int, comp_ids: list[int], k: int, cache: dict | None = None) -> dict:
        """The chat request scoring sample ``i`` (completion ``comp_ids``) with ``prompt_logprobs: k``."""
        cache = {} if cache is None else cache
        msgs = []
        n_audio = 0
        for m in self.collator.messages(batch.rows[i]):
            content = m["content"]
            if isinstance(content, list):
                parts = []
                for p in content:
                    if p.get("type") == "text":
                        parts.append({"type": "text", "text": p["text"]})
                    elif p.get("type") == "audio" or "audio" in p:
                        if n_audio:
                            raise ValueError("RemoteTeacher sends one audio per sample; the prompt has several")
                        n_audio += 1
                        parts.append({"type": "input_audio", "input_audio": {
                            "data": self._audio_b64(batch, i, p, cache), "format": "wav"}})
                    else:
                        raise ValueError(f"RemoteTeacher sends text and audio only; the prompt of sample "
                                         f"{batch.rows[i].get('key')!r} has a {p.get('type')!r} part")
                content = parts
            msgs.append({"role": m["role"], "content": content})
        prefill = self.tokenizer.decode(comp_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        msgs.append({"role": "assistant", "content": prefill})
        return {"model": self.model, "messages": msgs, "add_generation_prompt": False,
                "continue_final_message": True, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(k),
                "return_token_ids": True, "prefill_token_ids": [int(t) for t in comp_ids]}

    @staticmethod
    def _actual_ids(plp: list, k: int) -> list:
        """Each prompt position's own token from ``prompt_logprobs`` alone (no ``prompt_token_ids``):
        the entry outside the top-k when there are k+1 entries, else the first key (vLLM V1's order)."""
        ids = [None]
        for e in plp[1:]:
            if not isinstance(e, dict) or not e:
                ids.append(None)
                continue
            if len(e) > k:
                ranks = {t: (v.get("rank") if isinstance(v, dict) else None) for t, v in e.items()}
                out = [t for t, r in ranks.items() if r is None or r > k]
                ids.append(int(out[0]) if out else int(next(iter(e))))
            else:
                ids.append(int(next(iter(e))))
        return ids

    def _check_decoding(self, plp: list, ids: list) -> None:
        """Without vocabulary metadata from the server: its ``decoded_token`` strings must be ours."""
        tok, V = self.tokenizer, len(self.tokenizer.get_vocab())
        bad, checked = [], 0
        for j in range(1, len(plp)):
            e, t = plp[j], ids[j]
            if t is None or not isinstance(e, dict):
                continue
            if t >= V:
                bad.append(f"id {t} is outside the student's vocabulary of {V}")
                continue
            s = (e.get(str(t)) or {}).get("decoded_token")
            if not isinstance(s, str) or not s or "\ufffd" in s:
                continue
            mine = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(t)])
            if "\ufffd" in mine:
                continue
            checked += 1
            if s != mine:
                bad.append(f"id {t}: teacher {s!r}, student {mine!r}")
        if bad:
            raise VocabularyMismatch(f"student/teacher vocabulary mismatch with the teacher at {self.base} (model "
                                     f"{self.model!r}): its tokens decode differently: {'; '.join(bad[:5])}. "
                                     "Distillation needs a shared tokenizer.")
        if checked:
            self._verify_decoding = False
        elif self._verify_decoding:
            log.warning("teacher at %s: no decoded tokens to check the vocabulary against yet", self.base)

    def _align(self, ans: dict, comp_ids: list[int], k: int):
        """``(logp [n], topk ids [n][k], topk logp [n][k])`` of the completion, or a string saying why not."""
        plp = ans.get("prompt_logprobs")
        if plp is None and isinstance(ans.get("choices"), list) and ans["choices"]:
            plp = (ans["choices"][0] or {}).get("prompt_logprobs")
        if not isinstance(plp, list) or not plp:
            raise TeacherRequestError(f"teacher at {self.base} answered without prompt_logprobs (is it a vLLM "
                                      f"OpenAI-compatible server, or ours?): {str(ans)[:300]}")
        ids = ans.get("prompt_token_ids")
        if not (isinstance(ids, list) and len(ids) == len(plp)):
            ids = self._actual_ids(plp, k)
        if self._verify_decoding:
            with self._lock:
                if self._verify_decoding:
                    self._check_decoding(plp, ids)
        n, L = len(comp_ids), len(ids)
        if n > L - 1:
            return f"the teacher's prompt ({L} tokens) is shorter than the completion ({n} tokens)"
        tail = ids[L - n:]
        if tail != comp_ids:
            def dec(xs):
                return self.tokenizer.decode([x for x in xs if x is not None], skip_special_tokens=False)
            return (f"the teacher's last {n} tokens are not the completion's (the text re-tokenises differently): "
                    f"teacher {tail} {dec(tail)!r}, student {comp_ids} {dec(comp_ids)!r}")
        logp, tk_ids, tk_lp = [], [], []
        for t, c in enumerate(comp_ids):
            e = plp[L - n + t]
            d = e.get(str(c)) if isinstance(e, dict) else None
            if not isinstance(d, dict) or not isinstance(d.get("logprob"), (int, float)):
                return f"prompt_logprobs entry {L - n + t} has no log-prob for token {c}"
            logp.append(float(d["logprob"]))
            if k:
                best = sorted(((float(v["logprob"]), int(key)) for key, v in e.items()
                               if isinstance(v, dict) and isinstance(v.get("logprob"), (int, float))),
                              key=lambda x: -x[0])[:k]
                tk_lp.append([x[0] for x in best])
                tk_ids.append([x[1] for x in best])
        return logp, tk_ids, tk_lp

    def _score_one(self, body: bytes, comp_ids: list[int], k: int, stop):
        ans = self._call("POST", "/v1/chat/completions", body, stop)
        if not isinstance(ans, dict):
            raise TeacherRequestError(f"teacher at {self.base}: the answer is not a JSON object: {str(ans)[:200]}")
        return self._align(ans, comp_ids, k)

    # ------------------------------------------------------------------ protocol
    def score(self, batch: PromptBatch, completions: Completions, top_k: int | None = None,
              return_logits: bool = False, temperature: float = 1.0) -> TeacherScores:

        if return_logits:
            raise ValueError("a remote teacher returns top-k log-probs, not full logits: use opd.support: "
                             "teacher_topk (with opd.top_k), or opd.form: sampled_token")
        if temperature != 1.0:
            raise ValueError(f"a remote teacher scores at temperature 1 (prompt_logprobs are log_softmax of the raw "
                             f"logits); temperature {temperature} is not available remotely")
        k = int(top_k or 0)
        if k > self.top_k_cap:
            if not self._capped_warned:
                log.warning("teacher top_k %d capped at %d (teacher.top_k_cap / the server's --max-logprobs)",
                                 k, self.top_k_cap)
                self._capped_warned = True
            k = self.top_k_cap
        ids, mask = completions.ids.cpu(), completions.mask.cpu()
        B, T = ids.shape
        comp = [ids[i][mask[i].bool()].tolist() for i in range(B)]
        cache: dict = {}
        bodies = [json.dumps(self.request_body(batch, i, comp[i], k, cache)).encode("utf-8") if comp[i] else None
                  for i in range(B)]
        stop = threading.Event()
        futs = {self._pool.submit(self._score_one, bodies[i], comp[i], k, stop): i for i in range(B) if comp[i]}
        done, _ = wait(futs, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            stop.set()
            for f in futs:
                f.cancel()
            wait(futs)
            raise failed[0].exception()
        logp = torch.zeros(B, T, dtype=torch.float32)
        valid = torch.ones(B, dtype=torch.bool)
        out = TeacherScores(logp=logp, valid=valid)
        if k:
            out.topk_ids = torch.zeros(B, T, k, dtype=torch.long)
            out.topk_logp = torch.full((B, T, k), float("-inf"), dtype=torch.float32)
        for f, i in futs.items():
            res = f.result()
            if isinstance(res, str):
                valid[i] = False
                with self._lock:
                    self.stats["unscored"] += 1
                log.warning("remote teacher: sample %r not scored: %s", batch.rows[i].get("key"), res)
                continue
            lp, tk_ids, tk_lp = res
            pos = mask[i].nonzero().squeeze(-1)
            logp[i, pos] = torch.tensor(lp, dtype=torch.float32)
            if k:
                for t, (ti, tl) in zip(pos.tolist(), zip(tk_ids, tk_lp)):
                    out.topk_ids[i, t, : len(ti)] = torch.tensor(ti, dtype=torch.long)
                    out.topk_logp[i, t, : len(tl)] = torch.tensor(tl, dtype=torch.float32)
        return out
