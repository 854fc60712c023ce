"""Audio loading for manifests: soundfile in, float32 mono at the model's rate out.

`load_audio` reads only the requested segment from disk (frames computed from
`begin_time` / `end_time` in seconds), downmixes to mono by averaging the
channels and resamples with soxr when the file's rate differs from the target.
Every failure (missing file, unreadable or corrupt file, zero frames, empty or
out-of-range segment) raises `AudioError`, whose message starts with the path.

Left out: feature extraction (log-mel etc. belongs to the model's processor),
decoding formats libsndfile cannot read (m4a/aac: convert them with ffmpeg
first), the audio track of videos (see `video.py`), and any caching.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf

__all__ = ["AudioError", "AudioInfo", "audio_info", "audio_duration", "load_audio",
           "SEGMENT_TOLERANCE_S", "MIN_SAMPLE_RATE", "MAX_SAMPLE_RATE"]

# A segment may end this many seconds past the end of the file (rounding in
# corpora's time stamps); the excess is clipped. Further past it is an error.
SEGMENT_TOLERANCE_S = 0.05
# Sample rates outside this range are a wrong header, not audio: resampling a file that claims
# 1 Hz to 16 kHz would multiply its length by 16000.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000


class AudioError(ValueError):
    """An audio file or segment that cannot be used; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    path: str
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header information of an audio file; raises `AudioError` for a missing,
    unreadable or empty (0 frames) file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"{path}: no such audio file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError
        raise AudioError(f"{path}: unreadable or corrupt audio ({_short(e)})") from e
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: implausible sample rate {info.samplerate} Hz in the header (expected "
                         f"{MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz); the file is probably damaged")
    if info.frames <= 0:
        raise AudioError(f"{path}: empty audio (0 frames)")
    return AudioInfo(path=path, frames=int(info.frames), sample_rate=int(info.samplerate),
                     channels=int(info.channels))


def audio_duration(path: str | os.PathLike) -> float:
    """Duration of an audio file in seconds (from its header)."""
    return audio_info(path).duration


def _is_unset(t) -> bool:
    return t is None or t == -1


def segment_frames(info: AudioInfo, begin_time: float | None = None,
                   end_time: float | None = None) -> tuple[int, int]:
    """Frame range [start, stop) of a segment; None or -1 means the file's start/end.

    Raises `AudioError` for negative times (other than -1), a segment that starts
    after the file ends, ends more than `SEGMENT_TOLERANCE_S` past it, or is empty.
    """
    for name, t in (("begin_time", begin_time), ("end_time", end_time)):
        if _is_unset(t):
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise AudioError(f"{info.path}: {name} must be a finite number, got {t!r}")
        if t < 0:
            raise AudioError(f"{info.path}: {name} must be >= 0 or -1 (whole file), got {t!r}")
    sr = info.sample_rate
    start = 0 if _is_unset(begin_time) else int(round(begin_time * sr))
    stop = info.frames if _is_unset(end_time) else int(round(end_time * sr))
    if not _is_unset(end_time) and end_time > info.duration + SEGMENT_TOLERANCE_S:
        raise AudioError(f"{info.path}: end_time {end_time} is past the end of the file "
                         f"(duration {info.duration:.3f} s)")
    stop = min(stop, info.frames)
    if start >= stop:
        raise AudioError(f"{info.path}: empty segment [{begin_time}, {end_time}) "
                         f"(file duration {info.duration:.3f} s)")
    return start, stop


def load_audio(path: str | os.PathLike, begin_time: float | None = None,
               end_time: float | None = None, sample_rate: int | None = 16000) -> np.ndarray:
    """Read `path` (or its [begin_time, end_time) segment, in seconds) as float32 mono.

    None or -1 for a time means the start / end of the file. `sample_rate=None`
    keeps the file's own rate. Returns a 1-D contiguous float32 array in [-1, 1]
    (for integer PCM files). Raises `AudioError` naming the file on any problem.
    """
    info = audio_info(path)
    start, stop = segment_frames(info, begin_time, end_time)
    try:
        data, sr = sf.read(info.path, start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{info.path}: failed to decode frames [{start}, {stop}) "
                         f"({_short(e)})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{info.path}: no samples decoded for frames [{start}, {stop})")
    wav = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and sr != sample_rate:
        if sample_rate <= 0:
            raise AudioError(f"{info.path}: invalid target sample rate {sample_rate}")
        import soxr

        wav = soxr.resample(wav, sr, sample_rate, quality="HQ")
        if wav.shape[0] == 0:
            raise AudioError(f"{info.path}: segment too short to resample "
                             f"({stop - start} frames at {sr} Hz)")
    return np.ascontiguousarray(wav, dtype=np.float32)


def _short(e: Exception, limit: int = 200) -> str:
    # libsndfile errors carry the bare reason in `error_string`; str(e) repeats the path.
    msg = getattr(e, "error_string", None) or str(e)
    msg = str(msg).strip().replace("\n", " ") or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit] + "..."
