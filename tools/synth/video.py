"""Tiny synthetic videos made with ffmpeg, for the recipes' audio-visual corpora.

What it does:
  - ``Box(color, x, y, size, x_end, y_end, start, end)``: a filled square of a colour
    (``COLOURS`` name or any ffmpeg colour such as ``0x808080``), its top-left corner at ``(x, y)``,
    on screen from ``start`` to ``end`` seconds (``end`` None: to the end of the clip); with
    ``x_end`` / ``y_end`` it moves in a straight line from ``(x, y)`` at ``start`` to
    ``(x_end, y_end)`` at ``end``.
  - ``VideoSpec(boxes, duration, audio, size, fps, background)``: the boxes (drawn in order, later
    ones on top) on a plain background, ``size`` x ``size`` pixels at ``fps`` frames per second,
    muxed with ``audio`` (a wav made elsewhere, e.g. by ``speech.py`` or ``sound.py``; padded with
    silence or cut to ``duration``), or without an audio track when ``audio`` is None.
  - ``render(spec, out_mp4)``: one mp4 (H.264 yuv420p + AAC 16 kHz mono) from ONE ffmpeg process
    (lavfi ``color`` sources and ``overlay`` filters whose ``x`` / ``y`` are expressions of ``t``);
    written to a temporary file and renamed, so a crash never leaves half a clip; returns the
    duration in seconds.
  - ``render_many(jobs, workers=2)``: many ``(spec, out_mp4)`` jobs on a thread pool
    (``tools.synth.pool.run_pool``), every failure reported together in one ``VideoSynthError``.

Positions are rounded down to even pixels (yuv420p stores colour at half resolution, so odd edges
bleed). A failing ffmpeg (missing program, bad argument, empty output) raises ``VideoSynthError``
with the command line.

What it leaves out: circles and other shapes, text, textures, noise, camera motion, and any check
of what the picture shows (the caller knows what it asked for).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

try:
    from tools.synth.pool import run_pool
except ImportError:  # run as a script from its own folder
    from pool import run_pool  # type: ignore[no-redef]

__all__ = ["COLOURS", "Box", "VideoSpec", "VideoSynthError", "filtergraph", "render", "render_many"]

#: Saturated colours that survive H.264's colour subsampling at tiny sizes.
COLOURS = {"red": "0xFF0000", "green": "0x00FF00", "blue": "0x0000FF", "yellow": "0xFFFF00",
           "white": "0xFFFFFF", "black": "0x000000", "grey": "0x808080"}
AUDIO_RATE = 16000


class VideoSynthError(RuntimeError):
    """ffmpeg is missing, was given an unusable spec, or failed to produce a clip."""


@dataclass(frozen=True)
class Box:
    color: str
    x: int
    y: int
    size: int = 12
    x_end: int | None = None
    y_end: int | None = None
    start: float = 0.0
    end: float | None = None


@dataclass(frozen=True)
class VideoSpec:
    boxes: tuple[Box, ...] = field(default_factory=tuple)
    duration: float = 2.0
    audio: str | os.PathLike | None = None
    size: int = 64
    fps: int = 8
    background: str = "black"


def _ffmpeg() -> str:
    exe = shutil.which(os.environ.get("FFMPEG", "ffmpeg"))
    if exe is None:
        raise VideoSynthError("'ffmpeg' was not found on PATH; install it (apt-get install ffmpeg)")
    return exe


def _colour(c: str) -> str:
    c = COLOURS.get(c, c)
    if not c or any(ch in c for ch in ":;,[]='\\ "):
        raise VideoSynthError(f"bad colour {c!r}: a name from {sorted(COLOURS)} or an ffmpeg colour like 0xRRGGBB")
    return c


def _even(v: float) -> int:
    return 2 * int(v // 2)


def _coord(a: int, b: int | None, start: float, end: float) -> str:
    """An overlay coordinate: a constant, or a linear move from a to b over [start, end], on even pixels."""
    a = _even(a)
    if b is None or _even(b) == a:
        return str(a)
    b = _even(b)
    frac = f"min(max((t-{start:.4f})/{max(end - start, 1e-3):.4f}\\,0)\\,1)"
    return f"{a}+2*floor(({b - a})*{frac}/2)"


def _check(spec: VideoSpec) -> None:
    if not (spec.duration > 0 and spec.fps > 0 and spec.size >= 16 and spec.size % 2 == 0):
        raise VideoSynthError(f"bad spec: duration > 0, fps > 0 and an even size >= 16 are required "
                              f"(got duration={spec.duration}, fps={spec.fps}, size={spec.size})")
    for i, b in enumerate(spec.boxes):
        end = spec.duration if b.end is None else b.end
        if not (2 <= b.size <= spec.size) or not (0 <= b.start < end <= spec.duration + 1e-6):
            raise VideoSynthError(f"bad box {i} {b}: 2 <= size <= {spec.size} and "
                                  f"0 <= start < end <= duration ({spec.duration}) are required")


def filtergraph(spec: VideoSpec) -> str:
    """The ``-filter_complex`` graph of a spec; its video output is labelled ``[v]``."""
    _check(spec)
    d, r, s = spec.duration, spec.fps, spec.size
    parts = [f"color=c={_colour(spec.background)}:s={s}x{s}:r={r}:d={d:.4f}[bg0]"]
    last = "bg0"
    for i, b in enumerate(spec.boxes):
        end = d if b.end is None else b.end
        sz = max(2, _even(b.size))
        parts.append(f"color=c={_colour(b.color)}:s={sz}x{sz}:r={r}:d={d:.4f}[box{i}]")
        enable = "" if (b.start <= 0 and end >= d) else f":enable='gte(t,{b.start:.4f})*lt(t,{end:.4f})'"
        parts.append(f"[{last}][box{i}]overlay=x='{_coord(b.x, b.x_end, b.start, end)}'"
                     f":y='{_coord(b.y, b.y_end, b.start, end)}'{enable}[bg{i + 1}]")
        last = f"bg{i + 1}"
    parts.append(f"[{last}]format=yuv420p[v]")
    return ";".join(parts)


def render(spec: VideoSpec, out_mp4: str | os.PathLike) -> float:
    """Write ``spec`` to ``out_mp4`` (H.264 + AAC mp4) with one ffmpeg process; return its duration (s)."""
    graph = filtergraph(spec)
    ffmpeg = _ffmpeg()
    if spec.audio is not None and not os.path.isfile(spec.audio):
        raise VideoSynthError(f"{spec.audio}: no such audio file for {out_mp4}")
    out_mp4 = Path(out_mp4)
    out_mp4.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_mp4.stem}.", suffix=".mp4", dir=out_mp4.parent)
    os.close(fd)
    cmd = [ffmpeg, "-nostdin", "-v", "error", "-y"]
    if spec.audio is not None:
        cmd += ["-i", os.fspath(spec.audio)]
    cmd += ["-filter_complex", graph, "-map", "[v]"]
    if spec.audio is not None:
        cmd += ["-map", "0:a:0", "-af", "apad", "-c:a", "aac", "-b:a", "32k", "-ar", str(AUDIO_RATE), "-ac", "1"]
    cmd += ["-t", f"{spec.duration:.4f}", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18",
            "-pix_fmt", "yuv420p", "-threads", "1", "-movflags", "+faststart", "-f", "mp4", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise VideoSynthError(f"ffmpeg timed out: {' '.join(cmd)}") from e
        if proc.returncode != 0:
            raise VideoSynthError(f"ffmpeg failed (exit {proc.returncode}): {' '.join(cmd)}: {proc.stderr.strip()}")
        if os.path.getsize(tmp) == 0:
            raise VideoSynthError(f"ffmpeg wrote an empty file: {' '.join(cmd)}")
        os.replace(tmp, out_mp4)
        return float(spec.duration)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def render_many(jobs: Sequence[tuple[VideoSpec, str | os.PathLike]], workers: int = 2, progress: bool = True,
                desc: str = "ffmpeg") -> list[float]:
    """``render`` every ``(spec, out_mp4)`` job on ``workers`` threads; durations in job order."""
    if not jobs:
        return []
    _ffmpeg()
    return [float(d) for d in run_pool(lambda i: render(*jobs[i]), len(jobs), lambda i: str(jobs[i][1]), workers,
                                       progress, desc, VideoSynthError)]
