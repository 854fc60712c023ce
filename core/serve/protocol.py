"""What the teacher server and its client share: the wire format's small pieces.

- ``vocab_fingerprint``: a SHA-256 of a tokenizer's token -> id map, published by the server in
  ``/v1/models`` so that a client can check the vocabulary before the first batch.
- ``encode_wav`` / ``decode_audio``: audio as it travels in a request (a WAV file, base64 in
  JSON); float32 WAV by default, so a waveform arrives bit for bit as it was sent.
- ``error_body`` / ``error_message``: vLLM's error JSON (``{"error": {"message", "type",
  "param", "code"}}``), and reading a message out of either of vLLM's two error shapes.

It imports neither FastAPI nor torch, so the client side stays light.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json

import numpy as np

__all__ = ["vocab_fingerprint", "encode_wav", "wav_base64", "decode_audio", "decode_base64",
           "BadAudio", "error_body", "error_message"]


class BadAudio(ValueError):
    """Audio bytes that cannot be decoded into a waveform."""


def vocab_fingerprint(tokenizer) -> str:
    """SHA-256 (hex) of the tokenizer's vocabulary: every (token, id) pair, sorted, specials included."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    items = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


def encode_wav(wave, sample_rate: int, subtype: str = "FLOAT") -> bytes:
    """A mono waveform as the bytes of a WAV file (``FLOAT``: lossless for float32 input; ``PCM_16``: half the size)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(wave, dtype=np.float32).reshape(-1), int(sample_rate), format="WAV", subtype=subtype)
    return buf.getvalue()


def wav_base64(wave, sample_rate: int, subtype: str = "FLOAT") -> str:
    return base64.b64encode(encode_wav(wave, sample_rate, subtype)).decode("ascii")


def decode_base64(data: str, what: str = "data") -> bytes:
    """Strict base64 (standard alphabet, whitespace tolerated); ``BadAudio`` naming ``what`` otherwise."""
    if not isinstance(data, str) or not data:
        raise BadAudio(f"{what}: expected a non-empty base64 string")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadAudio(f"{what}: not valid base64 ({e})") from None


MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000  # as core.data.audio
MAX_AUDIO_SECONDS = 3600.0


def decode_audio(raw: bytes, sample_rate: int | None = 16000, what: str = "audio",
                 max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Bytes of an audio file (WAV, FLAC, OGG: what libsndfile reads) -> float32 mono at ``sample_rate``.

    The header is checked before anything is decoded: a sample rate outside 1 kHz..768 kHz or a
    clip longer than ``max_seconds`` is refused (a small file claiming 1 Hz would otherwise grow
    16000-fold when resampled)."""
    import soundfile as sf

    if not raw:
        raise BadAudio(f"{what}: empty audio file (0 bytes)")
    try:
        info = sf.info(io.BytesIO(raw))
    except Exception as e:  # libsndfile: LibsndfileError / RuntimeError / TypeError
        reason = getattr(e, "error_string", None) or str(e) or type(e).__name__
        raise BadAudio(f"{what}: not a readable audio file (WAV, FLAC or OGG expected): {reason}") from None
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise BadAudio(f"{what}: implausible sample rate {info.samplerate} Hz (expected {MIN_SAMPLE_RATE} to "
                       f"{MAX_SAMPLE_RATE} Hz)")
    if info.frames > max_seconds * info.samplerate:
        raise BadAudio(f"{what}: {info.frames / info.samplerate:.0f} s of audio is longer than the {max_seconds:g} s "
                       "accepted")
    try:
        data, sr = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile: LibsndfileError / RuntimeError / TypeError
        reason = getattr(e, "error_string", None) or str(e) or type(e).__name__
        raise BadAudio(f"{what}: not a readable audio file (WAV, FLAC or OGG expected): {reason}") from None
    if data.shape[0] == 0:
        raise BadAudio(f"{what}: the audio file holds no samples")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sr != sample_rate:
        import soxr

        wav = soxr.resample(wav, sr, sample_rate, quality="HQ")
        if wav.shape[0] == 0:
            raise BadAudio(f"{what}: too short to resample from {sr} Hz")
    if not np.isfinite(wav).all():
        raise BadAudio(f"{what}: the audio holds NaN or infinite samples")
    return np.ascontiguousarray(wav, dtype=np.float32)


_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowed", 413: "RequestTooLarge", 422: "BadRequestError", 500: "InternalServerError",
          503: "ServiceUnavailable"}


def error_body(status: int, message: str, *, type: str | None = None, param: str | None = None) -> dict:
    """vLLM's (newer) error JSON for HTTP ``status``."""
    return {"error": {"message": message, "type": type or _TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def error_message(payload, limit: int = 1000) -> str:
    """The message of an error response: ``{"error": {"message"}}``, the flat ``{"message"}``, or the text."""
    if isinstance(payload, (bytes, bytearray)):
        payload = payload.decode("utf-8", "replace")
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return payload.strip()[:limit] or "(empty body)"
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:limit]
        if isinstance(err, str):
            return err[:limit]
        if payload.get("message"):
            return str(payload["message"])[:limit]
        if payload.get("detail"):
            return str(payload["detail"])[:limit]
    return json.dumps(payload)[:limit]
