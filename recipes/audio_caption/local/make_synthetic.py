#!/usr/bin/env python3
"""Make the audio_caption recipe's synthetic corpus: one spoken word and one sound event per
clip, five reference captions and three multiple-choice questions per clip.

Each clip (16 kHz mono wav, at most ``--max_seconds`` = 3 s, the tiny models' audio chunk) holds

  speech      one word of ten (red green blue yellow cat dog bird fish hello stop) spoken by an
              English espeak-ng voice with a male (m1..m7) or female (f1..f4) variant, loud
              (peak 0.7) or quiet (peak 0.1); espeak-ng's silences are trimmed off
  background  a sox event at a fixed level: a steady tone, high (1600-2200 Hz) or low
              (180-260 Hz); a hiss (white noise high-passed above 2-3.5 kHz); or 1-3 short beeps
              (800-1200 Hz, 0.12 s each)
  order       speech_first (the word, a pause, the sound), sound_first, or overlap (the word
              spoken over the sound)

so everything a caption says is really in the audio, with few and coarse distinctions that a
tiny model can learn in minutes. Captions are written from these parameters with a small
grammar (about 85 words with the questions): ``text[0]`` is always the canonical form ("a woman says red quietly,
then two beeps"), ``text[1:]`` four other paraphrases ("two beeps follow a soft female voice
saying red", ...). ``questions`` holds three multiple-choice questions answerable from any of the
captions, drawn from: who speaks, which word, which other sound, how many beeps (beeps only),
high or low tone (tone only), what comes first, loud or quiet; each is
``{"type", "question", "choices" (3-4, shuffled), "answer"}`` with ``answer`` one of ``choices``.

Written under ``--out_dir`` (audio under ``wav/``, paths relative to the manifests):

  teacher_train.jsonl         the teacher's captioned set
  student_labelled.jsonl      the student's small captioned set
  unlabelled.jsonl            the student's unlabelled audio: key, audio, task, duration only
                              (no text, questions or content metadata)
  unlabelled_reference.jsonl  the unlabelled clips' text, questions and metadata, for analysis only
  dev.jsonl, test.jsonl       held-out evaluation sets
  text_corpus.txt             for tokenizer training: the prompt strings, the grammar's words, and
                              every caption, question, choice and answer of the two captioned
                              training sets (dev, test and unlabelled text is left out)
  stats.json                  counts per split and attribute, durations, generation seconds

A captioned row is ``{"key", "audio", "task": "caption", "text": [5 captions], "questions",
"word", "gender", "loudness", "background", "tone_pitch", "beep_count", "order", "voice",
"variant", "speed", "pitch", "duration"}`` (``tone_pitch`` / ``beep_count`` are null when the
background is not a tone / beeps). Every clip has its own wav, so no audio is shared between
splits; parameter tuples do repeat (there are only 10 x 2 x 2 x 6 x 3 coarse combinations).
The output depends only on ``--seed`` and the counts (each split has its own random stream;
sox runs in its repeatable mode, so even the dither is the same).

Left out: real recordings, reverberation, several words or several events per clip, music, and
any check of the caption grammar against a tokenizer (``text_corpus.txt`` is what to train on).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from tools.synth.pool import run_pool
from tools.synth.sound import Segment, SoundError, render_many
from tools.synth.speech import SynthesisError, SynthJob, list_voices, synthesize_many

SPLITS = ("teacher_train", "student_labelled", "unlabelled", "dev", "test")
DEFAULT_COUNTS = {"teacher_train": 1200, "student_labelled": 100, "unlabelled": 1200, "dev": 100, "test": 200}
SMOKE_COUNTS = {"teacher_train": 48, "student_labelled": 16, "unlabelled": 32, "dev": 8, "test": 16}
LABELLED = ("teacher_train", "student_labelled", "dev", "test")

#: The captioning prompt and the cascade's template words, for the tokenizer.
DESCRIBE = "Describe the audio."
PROMPT_STRINGS = (DESCRIBE, "Caption:", "Question:", "Choices:", "Answer:")

WORDS = ("red", "green", "blue", "yellow", "cat", "dog", "bird", "fish", "hello", "stop")
MALE, FEMALE = ("m1", "m2", "m3", "m4", "m5", "m6", "m7"), ("f1", "f2", "f3", "f4")
GENDERS, LOUDNESS = ("male", "female"), ("loud", "quiet")
BACKGROUNDS, PITCHES, ORDERS = ("tone", "hiss", "beeps"), ("high", "low"), ("speech_first", "sound_first", "overlap")
NUM = {1: "one", 2: "two", 3: "three", 4: "four"}

SR = 16000
SPEECH_PEAK = {"loud": 0.7, "quiet": 0.1}
TONE_VOL, BEEP_VOL, HISS_VOL = 0.25, 0.3, 0.3
BEEP_SECONDS = 0.12
RENDER_LEAD = 0.1  # tools/synth/sound.render's default leading silence, cut off before mixing
TAIL = 0.1         # silence at the end of every clip


# ----------------------------------------------------------------------------- captions

def _speech_forms(gender: str, word: str, loudness: str) -> tuple[list[str], list[str]]:
    """(clauses like "a man says red loudly", noun phrases like "a loud male voice saying red")."""
    nouns = ["a man", "a male voice", "a male speaker"] if gender == "male" else \
        ["a woman", "a female voice", "a female speaker"]
    voice = "a {} male voice" if gender == "male" else "a {} female voice"
    advs = ["loudly"] if loudness == "loud" else ["quietly", "softly"]
    adjs = ["loud"] if loudness == "loud" else ["quiet", "soft"]
    clauses, phrases = [], []
    for n in nouns:
        for adv in advs:
            clauses += [f"{n} says {word} {adv}", f"{n} {adv} says {word}"]
            phrases.append(f"{n} saying {word} {adv}")
    for adj in adjs:
        clauses.append(f"{voice.format(adj)} says {word}")
        phrases.append(f"{voice.format(adj)} saying {word}")
    return clauses, phrases


def _sound_forms(background: str, tone_pitch: str | None, beep_count: int | None) -> tuple[list[str], bool]:
    """(noun phrases for the sound, whether they are plural)."""
    if background == "tone":
        return [f"a {tone_pitch} tone", f"a {tone_pitch} pitched tone", f"a steady {tone_pitch} tone"], False
    if background == "hiss":
        return ["a hiss", "a hissing noise", "static noise"], False
    if beep_count == 1:
        return ["one beep", "a beep", "a single beep", "one short beep"], False
    return [f"{NUM[beep_count]} beeps", f"{NUM[beep_count]} short beeps"], True


def canonical_caption(m: dict) -> str:
    """The fixed-template caption (``text[0]``)."""
    who = "a man" if m["gender"] == "male" else "a woman"
    speech = f"{who} says {m['word']} {'loudly' if m['loudness'] == 'loud' else 'quietly'}"
    sound = _sound_forms(m["background"], m["tone_pitch"], m["beep_count"])[0][0]
    if m["order"] == "speech_first":
        return f"{speech}, then {sound}"
    if m["order"] == "sound_first":
        return f"{sound}, then {speech}"
    return f"{speech} over {sound}"


def all_captions(m: dict) -> list[str]:
    """Every caption the grammar writes for a clip's parameters (the canonical one included)."""
    clauses, phrases = _speech_forms(m["gender"], m["word"], m["loudness"])
    sounds, plural = _sound_forms(m["background"], m["tone_pitch"], m["beep_count"])
    s_ = "" if plural else "s"
    out = []
    for c, p, b in itertools.product(clauses, phrases, sounds):
        if m["order"] == "speech_first":
            out += [f"{c}, then {b}", f"{c}, followed by {b}", f"{c} before {b}",
                    f"{b} follow{s_} {p}"]
        elif m["order"] == "sound_first":
            out += [f"{b}, then {c}", f"after {b}, {c}", f"{c} after {b}",
                    f"{b} {'are' if plural else 'is'} followed by {p}"]
        else:
            out += [f"{c} over {b}", f"{c} while {b} play{s_}", f"{p} over {b}",
                    f"{c} with {b} in the background"]
    return sorted(set(out))


def make_captions(rng: random.Random, m: dict, n: int = 5) -> list[str]:
    """The canonical caption, then ``n - 1`` other distinct paraphrases."""
    first = canonical_caption(m)
    others = [c for c in all_captions(m) if c != first]
    return [first] + rng.sample(others, n - 1)


def caption_vocabulary() -> list[str]:
    """Every word the caption and question grammar can write."""
    words: set[str] = set()
    for w, g, lo, (bg, tp, bc), o in itertools.product(
            WORDS, GENDERS, LOUDNESS, [("tone", "high", None), ("tone", "low", None), ("hiss", None, None)]
            + [("beeps", None, n) for n in (1, 2, 3)], ORDERS):
        m = dict(word=w, gender=g, loudness=lo, background=bg, tone_pitch=tp, beep_count=bc, order=o)
        for c in all_captions(m):
            words.update(c.replace(",", " ").split())
    for q, choices in QUESTION_TEXT.values():
        words.update(q.replace("?", " ").replace(",", " ").split())
        for c in choices:
            words.update(c.split())
    return sorted(words)


# ----------------------------------------------------------------------------- questions

QUESTION_TEXT = {
    "speaker": ("Who is speaking?", ("a man", "a woman", "a child", "a robot")),
    "word": ("Which word is spoken?", WORDS),
    "sound": ("What other sound is heard?", ("a tone", "a hiss", "beeping", "music")),
    "beep_count": ("How many beeps are there?", ("one", "two", "three", "four")),
    "tone_pitch": ("Is the tone high or low?", ("high", "low", "changing")),
    "order": ("Which comes first, the voice or the sound?", ("the voice", "the sound", "both at once")),
    "loudness": ("Is the voice loud or quiet?", ("loud", "quiet", "muffled")),
}


def _answer(qtype: str, m: dict) -> str:
    return {
        "speaker": lambda: "a man" if m["gender"] == "male" else "a woman",
        "word": lambda: m["word"],
        "sound": lambda: {"tone": "a tone", "hiss": "a hiss", "beeps": "beeping"}[m["background"]],
        "beep_count": lambda: NUM[m["beep_count"]],
        "tone_pitch": lambda: m["tone_pitch"],
        "order": lambda: {"speech_first": "the voice", "sound_first": "the sound",
                          "overlap": "both at once"}[m["order"]],
        "loudness": lambda: m["loudness"],
    }[qtype]()


def make_questions(rng: random.Random, m: dict, n: int = 3) -> list[dict]:
    """``n`` questions of distinct types that apply to the clip, each with 3-4 shuffled choices."""
    types = ["speaker", "word", "sound", "order", "loudness"]
    if m["background"] == "beeps":
        types.append("beep_count")
    if m["background"] == "tone":
        types.append("tone_pitch")
    out = []
    for t in rng.sample(types, n):
        question, pool = QUESTION_TEXT[t]
        answer = _answer(t, m)
        others = [c for c in pool if c != answer]
        k = min(len(others), rng.choice((2, 3)))
        choices = [answer] + rng.sample(others, k)
        rng.shuffle(choices)
        out.append({"type": t, "question": question, "choices": choices, "answer": answer})
    return out


# ----------------------------------------------------------------------------- plan

@dataclass
class Clip:
    key: str
    split: str
    meta: dict            # word, gender, loudness, background, tone_pitch, beep_count, order
    speech: dict          # voice, variant, speed, pitch
    layout: dict          # lead, gap, offset (seconds)
    sound: dict           # tone/beep frequency, seconds, beep gap, hiss cutoff
    text: list[str]
    questions: list[dict]
    duration: float | None = None


def _plan_clip(rng: random.Random, key: str, split: str, voices) -> Clip:
    gender = rng.choice(GENDERS)
    m = {"word": rng.choice(WORDS), "gender": gender, "loudness": rng.choice(LOUDNESS),
         "background": rng.choice(BACKGROUNDS), "tone_pitch": None, "beep_count": None,
         "order": rng.choice(ORDERS)}
    if m["background"] == "tone":
        m["tone_pitch"] = rng.choice(PITCHES)
    elif m["background"] == "beeps":
        m["beep_count"] = rng.randint(1, 3)
    speech = {"voice": rng.choice(voices), "variant": rng.choice(MALE if gender == "male" else FEMALE),
              "speed": rng.randint(150, 190), "pitch": rng.randint(35, 65)}
    overlap = m["order"] == "overlap"
    layout = {"lead": round(rng.uniform(0.05, 0.25), 3), "gap": round(rng.uniform(0.15, 0.4), 3),
              "offset": round(rng.uniform(0.1, 0.35), 3)}
    if m["background"] == "tone":
        lo, hi = (1600, 2200) if m["tone_pitch"] == "high" else (180, 260)
        sound = {"freq": rng.randint(lo, hi), "seconds": round(rng.uniform(1.2, 1.6) if overlap
                                                               else rng.uniform(0.6, 0.9), 3)}
    elif m["background"] == "hiss":
        sound = {"highpass": rng.randint(2000, 3500), "seconds": round(rng.uniform(1.2, 1.6) if overlap
                                                                       else rng.uniform(0.6, 0.9), 3)}
    else:
        sound = {"freq": rng.randint(800, 1200), "seconds": BEEP_SECONDS,
                 "beep_gap": round(rng.uniform(0.3, 0.45) if overlap else rng.uniform(0.15, 0.22), 3)}
    return Clip(key, split, m, speech, layout, sound, make_captions(rng, m), make_questions(rng, m))


def plan(counts: dict[str, int], seed: int, voices) -> list[Clip]:
    """Every clip's parameters, captions and questions; each split draws from its own stream."""
    clips = []
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        clips += [_plan_clip(rng, f"{split}_{i:05d}", split, voices) for i in range(counts[split])]
    return clips


# ----------------------------------------------------------------------------- audio

def _hiss(out_wav: Path, seconds: float, highpass: int) -> float:
    sox = shutil.which("sox")
    if sox is None:
        raise SoundError("'sox' was not found on PATH; install it (apt-get install sox)")
    cmd = [sox, "-R", "-n", "-r", str(SR), "-c", "1", "-b", "16", str(out_wav), "synth", f"{seconds:.3f}",
           "whitenoise", "vol", f"{HISS_VOL}", "highpass", str(highpass), "fade", "q", "0.02", f"{seconds:.3f}",
           "0.02"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise SoundError(f"sox failed (exit {proc.returncode}): {' '.join(cmd)}: {proc.stderr.strip()}")
    return sf.info(str(out_wav)).duration


def _trim(x: np.ndarray, rel: float = 0.02, margin: float = 0.02) -> np.ndarray:
    """Cut the silence espeak-ng leaves around the word (samples under ``rel`` x peak)."""
    idx = np.flatnonzero(np.abs(x) > rel * np.abs(x).max())
    pad = int(margin * SR)
    return x[max(0, idx[0] - pad): idx[-1] + 1 + pad]


def _read(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if sr != SR:
        raise SoundError(f"{path}: expected {SR} Hz, got {sr}")
    return x.mean(axis=1)


def _mix(c: Clip, parts: Path, out_wav: Path, max_seconds: float) -> float:
    """Place the word and the sound as the clip's order says; write the clip; return seconds."""
    speech = _trim(_read(parts / f"{c.key}.speech.wav"))
    speech = speech * (SPEECH_PEAK[c.meta["loudness"]] / np.abs(speech).max())
    bg = _read(parts / f"{c.key}.sound.wav")
    if c.meta["background"] != "hiss":
        bg = bg[int(RENDER_LEAD * SR):]
    lead, gap, offset = (int(c.layout[k] * SR) for k in ("lead", "gap", "offset"))
    order = c.meta["order"]
    if order == "overlap":
        places = [(bg, lead), (speech, lead + offset)]
    elif order == "speech_first":
        places = [(speech, lead), (bg, lead + len(speech) + gap)]
    else:
        places = [(bg, lead), (speech, lead + len(bg) + gap)]
    n = max(start + len(x) for x, start in places) + int(TAIL * SR)
    if n > max_seconds * SR:
        raise SoundError(f"{c.key}: the clip would last {n / SR:.2f} s > {max_seconds} s "
                         f"(speech {len(speech) / SR:.2f} s, sound {len(bg) / SR:.2f} s, order {order})")
    y = np.zeros(n, dtype=np.float32)
    for x, start in places:
        y[start: start + len(x)] += x
    y = np.clip(y, -1.0, 1.0)
    out_wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_wav.with_name(f".{out_wav.name}.tmp.wav")
    sf.write(str(tmp), y, SR, subtype="PCM_16", format="WAV")
    os.replace(tmp, out_wav)
    return n / SR


def render_clips(clips: list[Clip], out_dir: Path, workers: int, progress: bool, max_seconds: float) -> None:
    """Speak every word, render every sound, mix them into ``out_dir/wav``; sets ``clip.duration``."""
    parts = out_dir / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    old_opts = os.environ.get("SOX_OPTS")
    os.environ["SOX_OPTS"] = f"-R {old_opts}" if old_opts else "-R"  # repeatable dither
    try:
        synthesize_many([SynthJob(text=c.meta["word"], out_wav=parts / f"{c.key}.speech.wav", **c.speech)
                         for c in clips], workers=workers, progress=progress, desc="espeak-ng")
        sox_jobs = []
        for c in clips:
            s = c.sound
            if c.meta["background"] == "tone":
                sox_jobs.append(([Segment(s["freq"], s["seconds"], TONE_VOL)], parts / f"{c.key}.sound.wav"))
            elif c.meta["background"] == "beeps":
                n = c.meta["beep_count"]
                segs = [Segment(s["freq"], s["seconds"], BEEP_VOL, gap=s["beep_gap"] if i < n - 1 else 0.0)
                        for i in range(n)]
                sox_jobs.append((segs, parts / f"{c.key}.sound.wav"))
        render_many(sox_jobs, workers=workers, progress=progress, desc="sox tones/beeps")
        hiss = [c for c in clips if c.meta["background"] == "hiss"]
        run_pool(lambda i: _hiss(parts / f"{hiss[i].key}.sound.wav", hiss[i].sound["seconds"],
                                 hiss[i].sound["highpass"]),
                 len(hiss), lambda i: hiss[i].key, workers, progress, "sox hiss", SoundError)
        durs = run_pool(lambda i: _mix(clips[i], parts, out_dir / "wav" / f"{clips[i].key}.wav", max_seconds),
                        len(clips), lambda i: clips[i].key, workers, progress, "mix", SoundError)
        for c, d in zip(clips, durs):
            c.duration = round(d, 4)
    finally:
        if old_opts is None:
            os.environ.pop("SOX_OPTS", None)
        else:
            os.environ["SOX_OPTS"] = old_opts
    shutil.rmtree(parts, ignore_errors=True)


# ----------------------------------------------------------------------------- output

def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def labelled_row(c: Clip) -> dict:
    return {"key": c.key, "audio": f"wav/{c.key}.wav", "task": "caption", "text": c.text,
            "questions": c.questions, **c.meta, **c.speech, "duration": c.duration}


def unlabelled_row(c: Clip) -> dict:
    return {"key": c.key, "audio": f"wav/{c.key}.wav", "task": "caption", "duration": c.duration}


def corpus_lines(rows: list[dict], extra: tuple[str, ...] = ()) -> list[str]:
    """The prompt strings, ``extra``, then every caption, question, choice and answer of ``rows``."""
    lines = list(PROMPT_STRINGS) + list(extra)
    for r in rows:
        text = r.get("text")
        lines += [text] if isinstance(text, str) else list(text or [])
        for q in r.get("questions") or []:
            lines += [q["question"], *q["choices"], q["answer"]]
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", required=True, help="output folder (created); wavs go to <out_dir>/wav")
    for s in SPLITS:
        p.add_argument(f"--{s}", type=int, default=DEFAULT_COUNTS[s], metavar="N", help=f"clips in {s}.jsonl")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset for tests: " + "/".join(str(SMOKE_COUNTS[s]) for s in SPLITS)
                        + " clips (overrides the five counts)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed and counts, same corpus")
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng / sox processes")
    p.add_argument("--max_seconds", type=float, default=3.0, help="longest clip allowed (the audio chunk)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    counts = dict(SMOKE_COUNTS) if args.smoke else {s: getattr(args, s) for s in SPLITS}
    bad = [f"--{s}={n}" for s, n in counts.items() if n < 0]
    if bad:
        raise SystemExit(f"counts must be >= 0: {', '.join(bad)}")
    try:
        voices = list(list_voices("en"))
    except SynthesisError as e:
        raise SystemExit(str(e))
    if not voices:
        raise SystemExit("espeak-ng has no English voice here")
    out_dir = Path(args.out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    clips = plan(counts, args.seed, voices)
    try:
        render_clips(clips, out_dir, args.workers, not args.quiet, args.max_seconds)
    except (SynthesisError, SoundError) as e:
        raise SystemExit(f"audio generation failed: {e}")
    wall = time.time() - t0

    by_split = {s: [c for c in clips if c.split == s] for s in SPLITS}
    for s in LABELLED:
        _write_jsonl(out_dir / f"{s}.jsonl", (labelled_row(c) for c in by_split[s]))
    _write_jsonl(out_dir / "unlabelled.jsonl", (unlabelled_row(c) for c in by_split["unlabelled"]))
    _write_jsonl(out_dir / "unlabelled_reference.jsonl",
                 ({k: v for k, v in labelled_row(c).items() if k not in ("audio", "task")}
                  for c in by_split["unlabelled"]))
    train_rows = [labelled_row(c) for s in ("teacher_train", "student_labelled") for c in by_split[s]]
    lines = corpus_lines(train_rows, extra=(" ".join(caption_vocabulary()),))
    tmp = out_dir / "text_corpus.txt.tmp"
    tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    os.replace(tmp, out_dir / "text_corpus.txt")

    def split_stats(cs: list[Clip]) -> dict:
        secs = [c.duration for c in cs]
        st = {"clips": len(cs), "seconds": round(sum(secs), 2),
              "max_seconds": round(max(secs), 3) if secs else 0.0}
        for k in ("word", "gender", "loudness", "background", "tone_pitch", "beep_count", "order"):
            st[k] = dict(sorted(Counter(str(c.meta[k]) for c in cs if c.meta[k] is not None).items()))
        st["question_types"] = dict(sorted(Counter(q["type"] for c in cs for q in c.questions).items()))
        return st

    vocab = caption_vocabulary()
    stats = {"seed": args.seed, "counts": counts, "sample_rate": SR, "max_seconds_allowed": args.max_seconds,
             "voices": voices, "splits": {s: split_stats(by_split[s]) for s in SPLITS},
             "total_clips": len(clips), "total_seconds": round(sum(c.duration for c in clips), 2),
             "caption_vocabulary_size": len(vocab), "text_corpus_lines": len(lines),
             "workers": args.workers, "generation_seconds": round(wall, 2),
             "clips_per_second": round(len(clips) / wall, 1) if wall > 0 else None}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(clips)} clips ({stats['total_seconds']:.0f} s of audio) to {out_dir} in {wall:.1f} s "
          f"({stats['clips_per_second']} clips/s, {args.workers} workers)")
    for s in SPLITS:
        st = stats["splits"][s]
        print(f"  {s:17s} {st['clips']:6d} clips {st['seconds']:8.1f} s  max {st['max_seconds']:.2f} s")
    return stats


if __name__ == "__main__":
    main()
