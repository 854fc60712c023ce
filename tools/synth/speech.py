"""Speech synthesis with espeak-ng, for the recipes' synthetic corpora.

What it does:
  - ``list_voices(language)``: the espeak-ng voices of a language that this machine can actually
    speak (identifiers such as ``en-us``, ``en-gb-scotland``, ``en-gb-x-rp``); MBROLA voices are
    left out unless asked for, because they need the separate ``mbrola`` program and its voice files.
  - ``list_variants()``: the voice variants installed here (``m1``..``m8``, ``f1``..``f5``,
    ``klatt``, ``whisper`` ...), used as ``<voice>+<variant>``. ``DEFAULT_VARIANTS`` is a set of
    eleven clean-sounding ones (``m1``..``m7``, ``f1``..``f4``).
  - ``synthesize(text, out_wav, voice, speed, pitch, ...)``: one utterance, written as a mono
    16-bit PCM wav at ``sample_rate`` (16 kHz by default); returns its duration in seconds.
  - ``synthesize_many(jobs, workers=2)``: many utterances on a thread pool (each job runs its own
    espeak-ng process, so threads are enough) with a tqdm progress bar; durations come back in job
    order and every failure is reported together in one error.

espeak-ng silently falls back to a default when it is given an unknown variant or a voice whose
MBROLA data is missing; here both are checked first and raise ``SynthesisError`` instead, as does
a non-zero exit status, a message on stderr, or an empty output.

What it leaves out: SSML, phoneme input, trimming of the silences espeak-ng puts around speech,
noise or reverberation (mix those in afterwards with sox), and any check that a clip fits a
length limit (the caller decides what to do with a clip that is too long).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

try:
    from tools.synth.pool import run_pool
except ImportError:  # run as a script from its own folder
    from pool import run_pool  # type: ignore[no-redef]

__all__ = [
    "DEFAULT_VARIANTS",
    "SynthesisError",
    "SynthJob",
    "espeak_available",
    "list_voices",
    "list_variants",
    "voice_id",
    "synthesize",
    "synthesize_many",
]

ESPEAK = os.environ.get("ESPEAK_NG", "espeak-ng")

#: Eleven variants that keep speech intelligible: seven male, four female.
DEFAULT_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")

SPEED_RANGE = (80, 450)  # words per minute accepted by espeak-ng
PITCH_RANGE = (0, 99)
AMPLITUDE_RANGE = (0, 200)


class SynthesisError(RuntimeError):
    """espeak-ng is missing, was given an unusable voice, or failed to produce audio."""


@dataclasses.dataclass(frozen=True)
class SynthJob:
    """One utterance for ``synthesize_many``; fields mirror ``synthesize``'s arguments."""

    text: str
    out_wav: str | os.PathLike
    voice: str = "en-us"
    speed: int = 175
    pitch: int = 50
    amplitude: int = 100
    variant: str | None = None
    sample_rate: int = 16000


def espeak_available() -> bool:
    """True when the espeak-ng executable is on PATH."""
    return shutil.which(ESPEAK) is not None


def _espeak_exe() -> str:
    exe = shutil.which(ESPEAK)
    if exe is None:
        raise SynthesisError(
            f"'{ESPEAK}' was not found on PATH; install it (apt-get install espeak-ng) "
            "or point the ESPEAK_NG environment variable at it"
        )
    return exe


@functools.lru_cache(maxsize=None)
def _voice_table(kind: str) -> tuple[tuple[str, str, str, str], ...]:
    """Rows (language, gender, name, file) of ``espeak-ng --voices=<kind>`` ('' means all)."""
    arg = f"--voices={kind}" if kind else "--voices"
    try:
        proc = subprocess.run([_espeak_exe(), arg], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        raise SynthesisError(f"'{ESPEAK} {arg}' timed out") from e
    if proc.returncode != 0:
        raise SynthesisError(f"'{ESPEAK} {arg}' failed ({proc.returncode}): {proc.stderr.strip()}")
    rows = []
    for line in proc.stdout.splitlines()[1:]:  # first line is the header
        parts = line.split()
        # Pty Language Age/Gender VoiceName File [Other languages...]; names have no spaces,
        # but a few variant file names do ("!v/Mr serious"): those are skipped.
        if len(parts) < 5:
            continue
        _, language, age_gender, name, file = parts[:5]
        if len(parts) > 5 and not parts[5].startswith("("):
            continue
        gender = age_gender.split("/")[-1]
        rows.append((language, gender, name, file))
    return tuple(rows)


@functools.lru_cache(maxsize=None)
def list_voices(language: str = "en", include_mbrola: bool = False) -> tuple[str, ...]:
    """Voice identifiers (the ``-v`` argument) whose language starts with ``language``.

    Example on Debian/Ubuntu's espeak-ng 1.51: ``('en-029', 'en-gb', 'en-gb-scotland',
    'en-gb-x-gbclan', 'en-gb-x-gbcwmd', 'en-gb-x-rp', 'en-us', 'en-us-nyc')``. Sorted, unique.
    MBROLA voices (file ``mb/...``) are left out unless ``include_mbrola``: they need the
    ``mbrola`` program and data that are usually not installed, and espeak-ng then falls back to a
    default voice without failing.
    """
    out = set()
    for lang, _gender, _name, file in _voice_table(language):
        if lang == "variant" or not lang.startswith(language):
            continue
        if file.startswith("mb/") and not include_mbrola:
            continue
        out.add(lang)
    return tuple(sorted(out))


@functools.lru_cache(maxsize=None)
def list_variants() -> tuple[str, ...]:
    """Variant identifiers usable as ``<voice>+<variant>`` (file names under ``voices/!v``)."""
    out = set()
    for lang, _gender, _name, file in _voice_table("variant"):
        if lang != "variant" or not file.startswith("!v/"):
            continue
        out.add(file[len("!v/"):])
    return tuple(sorted(out))


@functools.lru_cache(maxsize=None)
def _all_voice_ids() -> frozenset[str]:
    ids = set()
    for lang, _gender, name, file in _voice_table(""):
        if lang == "variant" or file.startswith("mb/"):
            continue
        ids.update((lang, name, file.split("/")[-1]))
    return frozenset(ids)


def voice_id(voice: str, variant: str | None = None) -> str:
    """The ``-v`` argument for a voice and an optional variant, e.g. ``en-gb-x-rp+f2``."""
    return f"{voice}+{variant}" if variant else voice


def _check_args(voice: str, variant: str | None, speed: int, pitch: int, amplitude: int,
                sample_rate: int) -> tuple[str, str | None]:
    if "+" in voice:
        if variant is not None:
            raise SynthesisError(f"voice {voice!r} already names a variant; do not also pass variant={variant!r}")
        voice, variant = voice.split("+", 1)
    if voice not in _all_voice_ids():
        raise SynthesisError(
            f"unknown or unusable espeak-ng voice {voice!r}; English voices here: {', '.join(list_voices('en'))}"
        )
    if variant is not None and variant not in list_variants():
        raise SynthesisError(f"unknown espeak-ng variant {variant!r}; available: {', '.join(list_variants())}")
    for name, value, (lo, hi) in (("speed", speed, SPEED_RANGE), ("pitch", pitch, PITCH_RANGE),
                                  ("amplitude", amplitude, AMPLITUDE_RANGE)):
        if not (lo <= int(value) <= hi):
            raise SynthesisError(f"{name}={value} is outside espeak-ng's range [{lo}, {hi}]")
    if sample_rate <= 0:
        raise SynthesisError(f"sample_rate must be positive, got {sample_rate}")
    return voice, variant


def synthesize(
    text: str,
    out_wav: str | os.PathLike,
    voice: str = "en-us",
    speed: int = 175,
    pitch: int = 50,
    amplitude: int = 100,
    sample_rate: int = 16000,
    variant: str | None = None,
) -> float:
    """Speak ``text`` into ``out_wav`` (mono, 16-bit PCM, ``sample_rate`` Hz); return seconds.

    Args:
        text: what to say (read from stdin by espeak-ng, so leading dashes are safe).
        out_wav: destination; parent folders are created. Written only when synthesis succeeded.
        voice: an identifier from ``list_voices()``; may carry a variant as ``en-us+m3``.
        speed: words per minute, 80-450 (``-s``).
        pitch: 0-99 (``-p``).
        amplitude: 0-200 (``-a``), 100 is espeak-ng's default.
        sample_rate: output rate; espeak-ng speaks at 22050 Hz and the audio is resampled with soxr.
        variant: a name from ``list_variants()`` such as ``m3`` or ``f2``.

    Raises:
        SynthesisError: with the command line and espeak-ng's message, on any failure.
    """
    if not isinstance(text, str) or not text.strip():
        raise SynthesisError(f"nothing to say: text={text!r}")
    voice, variant = _check_args(voice, variant, speed, pitch, amplitude, sample_rate)
    out_wav = Path(out_wav)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_wav.stem}.", suffix=".espeak.wav", dir=out_wav.parent)
    os.close(fd)
    cmd = [_espeak_exe(), "--stdin", "-v", voice_id(voice, variant), "-s", str(int(speed)),
           "-p", str(int(pitch)), "-a", str(int(amplitude)), "-w", tmp]
    try:
        try:
            proc = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise SynthesisError(f"espeak-ng timed out: {' '.join(cmd)} <<< {text!r}") from e
        msg = proc.stderr.strip()
        if proc.returncode != 0 or msg:
            raise SynthesisError(
                f"espeak-ng failed (exit {proc.returncode}) for {text!r}: {' '.join(cmd)}: {msg or 'no message'}"
            )
        try:
            audio, sr = sf.read(tmp, dtype="float32", always_2d=True)
        except Exception as e:  # a truncated or empty file
            raise SynthesisError(f"espeak-ng wrote an unreadable wav for {text!r}: {e}") from e
        audio = audio.mean(axis=1)
        if audio.size == 0 or not np.any(audio):
            raise SynthesisError(f"espeak-ng produced silence for {text!r}: {' '.join(cmd)}")
        if sr != sample_rate:
            audio = soxr.resample(audio, sr, sample_rate, quality="HQ")
        audio = np.clip(audio, -1.0, 1.0)
        # write then rename, so a crash never leaves a half-written clip under the final name
        sf.write(tmp, audio, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(tmp, out_wav)
        return float(len(audio)) / sample_rate
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _as_job(job: SynthJob | Mapping) -> SynthJob:
    if isinstance(job, SynthJob):
        return job
    if isinstance(job, Mapping):
        try:
            return SynthJob(**job)
        except TypeError as e:
            raise SynthesisError(f"bad synthesis job {dict(job)!r}: {e}") from e
    raise SynthesisError(f"a synthesis job must be a SynthJob or a dict, got {type(job).__name__}")


def synthesize_many(
    jobs: Iterable[SynthJob | Mapping],
    workers: int = 2,
    progress: bool = True,
    desc: str = "espeak-ng",
) -> list[float]:
    """Run ``synthesize`` for every job on ``workers`` threads; return durations in job order.

    Jobs are ``SynthJob`` objects or dicts with the same fields. All jobs are attempted; if any
    failed, one ``SynthesisError`` lists how many and the first few messages.
    """
    jobs_ = [_as_job(j) for j in jobs]
    if not jobs_:
        return []
    # warm the caches once, outside the threads
    list_variants()
    _all_voice_ids()

    def run(i: int) -> float:
        j = jobs_[i]
        return synthesize(j.text, j.out_wav, voice=j.voice, speed=j.speed, pitch=j.pitch,
                          amplitude=j.amplitude, sample_rate=j.sample_rate, variant=j.variant)

    return [float(d) for d in run_pool(run, len(jobs_), lambda i: str(jobs_[i].out_wav), workers, progress,
                                       desc, SynthesisError)]


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        description="Speak one phrase with espeak-ng into a 16 kHz mono 16-bit wav, or list the "
                    "voices and variants usable here."
    )
    p.add_argument("--list", action="store_true", help="print the English voices and the variants, then exit")
    p.add_argument("--text", help="the phrase to say")
    p.add_argument("--out", help="output wav path")
    p.add_argument("--voice", default="en-us", help="voice, optionally with a variant: en-gb+f2 (default en-us)")
    p.add_argument("--speed", type=int, default=175, help="words per minute, 80-450 (default 175)")
    p.add_argument("--pitch", type=int, default=50, help="0-99 (default 50)")
    p.add_argument("--amplitude", type=int, default=100, help="0-200 (default 100)")
    p.add_argument("--sample_rate", type=int, default=16000, help="output sample rate (default 16000)")
    a = p.parse_args(argv)
    if a.list:
        print("voices:", " ".join(list_voices("en")))
        print("variants:", " ".join(list_variants()))
        return
    if not a.text or not a.out:
        p.error("--text and --out are required unless --list is given")
    d = synthesize(a.text, a.out, voice=a.voice, speed=a.speed, pitch=a.pitch, amplitude=a.amplitude,
                   sample_rate=a.sample_rate)
    print(f"{a.out}: {d:.3f} s")


if __name__ == "__main__":
    _main()
