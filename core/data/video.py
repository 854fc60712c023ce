"""Video loading for manifests: decord in, sampled RGB frames and the audio track out.

`load_video(path, num_frames=8, sample_rate=16000)` returns a `VideoClip`:

- ``frames``: ``num_frames`` uint8 RGB frames ``[T, H, W, 3]`` sampled uniformly over the clip (or
  the ``begin_time`` / ``end_time`` segment): frame ``i`` is the one shown at the centre of the
  ``i``-th of ``T`` equal slices of the clip. A clip with fewer frames than asked repeats frames,
  so ``T`` is always ``num_frames``;
- ``fps``: the rate of the sampled frames, ``num_frames / duration``, which is what the Qwen2-VL /
  Qwen2.5-Omni video processors need as ``fps`` to place the frames in time;
- ``audio``: the video's own audio track, float32 mono at ``sample_rate`` (decord's
  ``AudioReader``), cut to the clip and trimmed or zero-padded to exactly
  ``round(duration * sample_rate)`` samples (AAC adds a few ms of padding; a track shorter than
  the picture ends in silence);
- ``duration``: seconds of the clip or segment, from the frames' time stamps.

A video without an audio track raises `VideoError` unless ``missing_audio="silence"`` (the training
config's ``data.missing_audio: silence``), which returns zeros of the clip's length and
``has_audio=False``. Every failure (missing, empty or corrupt file, no frames, a segment outside
the video, an unreadable audio track) raises `VideoError`, whose message starts with the path, in
the words `core.data.manifest` uses for the same problems.

Left out: resizing and normalisation (the model's processor does those), hardware decoding,
caching, reading a separate audio file (see `audio.py`), and any network paths.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .audio import SEGMENT_TOLERANCE_S

__all__ = ["VideoError", "VideoClip", "load_video", "MISSING_AUDIO", "MISSING_AUDIO_HINT"]

MISSING_AUDIO = ("error", "silence")
MISSING_AUDIO_HINT = ("give the video an audio track, or set data.missing_audio: silence to use "
                      "silence of the clip's length instead")


class VideoError(ValueError):
    """A video file or segment that cannot be used; the message starts with the file's path."""


@dataclass(frozen=True)
class VideoClip:
    """Frames and sound of one clip (see the module docstring for each field's meaning)."""

    path: str
    frames: np.ndarray        # uint8 [T, H, W, 3]
    fps: float                # T / duration
    audio: np.ndarray         # float32 [round(duration * sample_rate)]
    sample_rate: int
    duration: float           # seconds
    begin_time: float         # start of the clip in the file, seconds
    frame_times: np.ndarray   # float64 [T]: time in the file of each sampled frame's start
    has_audio: bool           # False when the file has no audio track and silence was substituted


def _short(e: BaseException) -> str:
    """The last line of an exception's message (decord puts a C++ trace before it), cut short."""
    text = str(e).strip()
    line = text.splitlines()[-1].strip() if text else type(e).__name__
    return line[:200]


def _decord():
    try:
        import decord
    except ImportError as e:  # pragma: no cover - the project's setup installs it
        raise ImportError("decord is needed to read videos (bash run.sh setup installs it; "
                          "or pip install 'audio-posttrain[video]')") from e
    return decord


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such video file")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file (0 bytes)")


def _is_unset(t) -> bool:
    return t is None or t == -1


def _segment(path: str, total: float, begin_time, end_time) -> tuple[float, float]:
    for name, v in (("begin_time", begin_time), ("end_time", end_time)):
        if _is_unset(v):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise VideoError(f"{path}: {name} must be a number of seconds >= 0 (or -1 / None for the "
                             f"whole file), got {v!r}")
    b = 0.0 if _is_unset(begin_time) else float(begin_time)
    e = total if _is_unset(end_time) else float(end_time)
    if b >= total:
        raise VideoError(f"{path}: begin_time {b} is not before the end of the video (duration {total:.3f} s)")
    if e > total + SEGMENT_TOLERANCE_S:
        raise VideoError(f"{path}: end_time {e} is past the end of the video (duration {total:.3f} s)")
    e = min(e, total)
    if e <= b:
        raise VideoError(f"{path}: end_time {e} must be greater than begin_time {b}")
    return b, e


def _as_numpy(batch) -> np.ndarray:
    """decord's NDArray (native bridge) or a tensor (another bridge set globally) as numpy."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if hasattr(batch, "numpy"):
        return batch.numpy()
    return np.asarray(batch)


def _read_audio(decord, path: str, sample_rate: int) -> np.ndarray | None:
    """The whole audio track, float32 mono; None when the file has no audio stream."""
    try:
        ar = decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    except Exception as e:  # decord.DECORDError and RuntimeError
        msg = _short(e)
        if "audio stream" in msg.lower():
            return None
        raise VideoError(f"{path}: unreadable audio track ({msg})") from e
    try:
        samples = _as_numpy(ar[:])
    except Exception as e:
        raise VideoError(f"{path}: unreadable audio track ({_short(e)})") from e
    return np.asarray(samples, dtype=np.float32).reshape(-1)


def load_video(path: str | os.PathLike, num_frames: int = 8, sample_rate: int = 16000, *,
               missing_audio: str = "error", begin_time: float | None = None,
               end_time: float | None = None) -> VideoClip:
    """Reads ``num_frames`` frames and the audio track of a video (or of a segment of it).

    Args:
        path: the video file (anything decord / ffmpeg reads: mp4, mkv, webm, avi ...).
        num_frames: frames to sample uniformly over the clip (>= 1).
        sample_rate: rate of the returned audio in Hz (decord resamples and downmixes to mono).
        missing_audio: ``"error"`` (default): a video without an audio track raises VideoError;
            ``"silence"``: return zeros of the clip's length instead (``has_audio=False``).
        begin_time, end_time: optional segment in seconds; None or -1 = start / end of the file.
            An end up to 0.05 s past the end of the video is clipped.

    Raises:
        VideoError: naming the file, for a missing, empty or corrupt file, a video without frames,
            a bad segment, an unreadable audio track, or no audio track with ``missing_audio="error"``.
        ValueError: a bad ``num_frames``, ``sample_rate`` or ``missing_audio``.
    """
    path = os.fspath(path)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    if missing_audio not in MISSING_AUDIO:
        raise ValueError(f"missing_audio must be one of {', '.join(MISSING_AUDIO)}, got {missing_audio!r}")
    _check_file(path)
    decord = _decord()
    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    except Exception as e:  # RuntimeError / DECORDError
        raise VideoError(f"{path}: unreadable or corrupt video ({_short(e)})") from e
    n = len(vr)
    if n == 0:
        raise VideoError(f"{path}: the video has no frames")
    try:
        stamps = np.asarray(vr.get_frame_timestamp(list(range(n))), dtype=np.float64).reshape(n, 2)
    except Exception as e:
        raise VideoError(f"{path}: unreadable frame time stamps ({_short(e)})") from e
    starts = stamps[:, 0]
    total = float(stamps[-1, 1])
    if not (np.all(np.isfinite(stamps)) and total > 0 and np.all(np.diff(starts) >= 0)):
        fps = float(vr.get_avg_fps() or 0.0)
        if not (math.isfinite(fps) and fps > 0):
            raise VideoError(f"{path}: neither frame time stamps nor a frame rate to place frames in time")
        starts = np.arange(n, dtype=np.float64) / fps
        total = n / fps
    b, e = _segment(path, total, begin_time, end_time)
    duration = e - b

    # frames shown during the segment: those starting before its end and ending after its start
    ends = np.append(starts[1:], total)
    inside = np.nonzero((starts < e) & (ends > b))[0]
    if inside.size == 0:  # cannot happen for b < e <= total; kept as a clear error
        raise VideoError(f"{path}: no frame between {b:.3f} and {e:.3f} s")
    # frame i of T: the one on screen at the centre of the i-th of T equal slices of the segment
    centres = b + (np.arange(num_frames) + 0.5) * duration / num_frames
    idx = inside[np.clip(np.searchsorted(starts[inside], centres, side="right") - 1, 0, inside.size - 1)]
    try:
        frames = _as_numpy(vr.get_batch(idx.tolist()))
    except Exception as e:
        raise VideoError(f"{path}: could not decode frames ({_short(e)})") from e
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        raise VideoError(f"{path}: decoded frames have shape {frames.shape}, expected [{num_frames}, H, W, 3]")

    want = int(round(duration * sample_rate))
    track = _read_audio(decord, path, sample_rate)
    if track is None:
        if missing_audio == "error":
            raise VideoError(f"{path}: the video has no audio track ({MISSING_AUDIO_HINT})")
        audio = np.zeros(want, dtype=np.float32)
    else:
        start = int(round(b * sample_rate))
        audio = track[start: start + want]
        if audio.size < want:
            audio = np.concatenate([audio, np.zeros(want - audio.size, dtype=np.float32)])
        audio = np.ascontiguousarray(audio, dtype=np.float32)
    return VideoClip(path=path, frames=frames, fps=num_frames / duration, audio=audio,
                     sample_rate=sample_rate, duration=duration, begin_time=b,
                     frame_times=starts[idx].copy(), has_audio=track is not None)
