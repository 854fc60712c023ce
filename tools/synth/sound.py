"""Tone, beep and note sequences made with sox, for the recipes' synthetic corpora.

What it does:
  - ``Segment(freq, seconds, volume, wave, gap)``: one sound (``freq`` in Hz or a note name such
    as ``C4``; ``wave`` one of sox's ``synth`` types: sine, square, triangle, sawtooth, pluck)
    followed by ``gap`` seconds of silence.
  - ``render(segments, out_wav, lead=0.1)``: the segments in order, after ``lead`` seconds of
    silence, as a 16 kHz mono 16-bit wav (one ``sox`` process, each segment piped from its own
    ``sox -n ... synth``); returns the duration in seconds.
  - ``render_many(jobs, workers=2)``: many clips on a thread pool with a tqdm bar; every failure
    is reported together in one ``SoundError``.

Volumes are linear gains (1.0 = full scale); sox clips nothing at <= 1. A failing sox (missing
program, bad argument, empty output) raises ``SoundError`` with the command line.
Every sox runs in repeatable mode (``-R``): the same segments give the same bytes on every run.

What it leaves out: noise beds, mixing with speech (use ``sox -m``), reverberation, and anything
that needs a sound font or real instruments.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import soundfile as sf

try:
    from tools.synth.pool import run_pool
except ImportError:  # run as a script from its own folder
    from pool import run_pool  # type: ignore[no-redef]

SAMPLE_RATE = 16000
WAVES = ("sine", "square", "triangle", "sawtooth", "pluck")


class SoundError(RuntimeError):
    """sox is missing or failed to produce a clip."""


@dataclass(frozen=True)
class Segment:
    freq: float | str
    seconds: float
    volume: float = 0.5
    wave: str = "sine"
    gap: float = 0.0


def _sox() -> str:
    exe = shutil.which("sox")
    if exe is None:
        raise SoundError("'sox' was not found on PATH; install it (apt-get install sox)")
    return exe


def _segment_cmd(sox: str, s: Segment) -> str:
    if s.wave not in WAVES:
        raise SoundError(f"unknown wave {s.wave!r}; one of {', '.join(WAVES)}")
    if s.seconds <= 0 or s.gap < 0 or not (0 < s.volume <= 1.0):
        raise SoundError(f"bad segment {s}: seconds > 0, gap >= 0 and 0 < volume <= 1 are required")
    return (f"|{sox} -R -n -r {SAMPLE_RATE} -c 1 -b 16 -p synth {s.seconds:.3f} {s.wave} {s.freq} "
            f"vol {s.volume:.3f} pad 0 {s.gap:.3f}")


def render(segments: Sequence[Segment], out_wav: str | os.PathLike, lead: float = 0.1) -> float:
    """Write ``segments`` (after ``lead`` s of silence) to ``out_wav``; return its duration (s)."""
    if not segments:
        raise SoundError(f"no segments for {out_wav}")
    sox = _sox()
    out_wav = Path(out_wav)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    inputs = [f"|{sox} -R -n -r {SAMPLE_RATE} -c 1 -b 16 -p trim 0 {lead:.3f}"] if lead > 0 else []
    inputs += [_segment_cmd(sox, s) for s in segments]
    fd, tmp = tempfile.mkstemp(prefix=f".{out_wav.stem}.", suffix=".wav", dir=out_wav.parent)
    os.close(fd)
    # -R (repeatable): sox seeds its dither with a fixed number, so a clip is the same bytes on
    # every run (without it the 16-bit output's dither noise differs from run to run)
    cmd = [sox, "-R", *inputs, "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SoundError(f"sox failed (exit {proc.returncode}): {' '.join(cmd)}: {proc.stderr.strip()}")
        info = sf.info(tmp)
        if info.frames == 0:
            raise SoundError(f"sox wrote an empty clip: {' '.join(cmd)}")
        os.replace(tmp, out_wav)
        return info.frames / info.samplerate
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def render_many(jobs: Sequence[tuple[Sequence[Segment], str | os.PathLike]], workers: int = 2,
                progress: bool = True, desc: str = "sox") -> list[float]:
    """``render`` every ``(segments, out_wav)`` job on ``workers`` threads; durations in job order."""
    if not jobs:
        return []
    _sox()
    return [float(d) for d in run_pool(lambda i: render(*jobs[i]), len(jobs), lambda i: str(jobs[i][1]), workers,
                                       progress, desc, SoundError)]
