#!/usr/bin/env python3
"""Make the ASR recipe's synthetic English corpus with espeak-ng.

A small grammar (44 words: the digits "zero".."nine", short commands such as "turn on the light",
"go left three steps", "set the volume to seven", colours) gives utterances of 2-6 words. Each one
is spoken by a voice drawn from every English espeak-ng voice here crossed with eleven variants
(m1..m7, f1..f4), at 140-200 words per minute and pitch 30-70, and saved as a 16 kHz mono
16-bit wav. A clip must last at most ``--max_seconds`` (3 s, the model's audio chunk): a longer
one is spoken again faster (up to ``--max_speed``) and, if still too long, replaced by a shorter
utterance of the grammar. Audio is never cut.

Splits, written under ``--out_dir`` as manifests in the project's JSONL format
(``key``, ``audio`` = ``wav/<key>.wav`` relative to the manifest, ``task: "asr"``, ``text``, and
metadata ``voice``, ``variant``, ``speed``, ``pitch``, ``duration``):

  teacher_train.jsonl        the teacher's labelled training set
  student_labelled.jsonl     the student's small labelled set
  unlabelled.jsonl           the student's unlabelled audio: no ``text`` field
  unlabelled_reference.jsonl ``{"key", "text"}`` for the unlabelled clips, for analysis only
  dev.jsonl, test.jsonl      held-out evaluation sets
  text_corpus.txt            every training transcript (teacher_train + student_labelled), one a
                             line, for tokenizer training
  stats.json                 counts, seconds, voices, regenerations, generation speed

Every clip belongs to exactly one split, and no two clips anywhere share the same
(text, voice, variant, speed, pitch), so no audio is repeated across splits. Texts do repeat (a
44-word grammar has few distinct commands) and all splits draw from the same voices, so the task
is learnable and test measures generalisation to new renderings. The output depends only on
``--seed`` and the counts; each split has its own random stream, so changing one split's count
leaves the other splits unchanged.

Left out: noise, reverberation, any real recordings, and other languages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from tools.synth.speech import (
    DEFAULT_VARIANTS,
    SynthesisError,
    SynthJob,
    list_variants,
    list_voices,
    synthesize_many,
)

SPLITS = ("teacher_train", "student_labelled", "unlabelled", "dev", "test")
SMOKE_COUNTS = {"teacher_train": 64, "student_labelled": 16, "unlabelled": 48, "dev": 16, "test": 16}

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
DIRECTIONS = ("left", "right", "up", "down", "forward", "back")
SWITCHED = ("light", "fan")
OPENED = ("door", "window")


def _digits(rng: random.Random, k: int) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(k)]


# Each template: (name, weight, fewest words, function(rng, max_words) -> words).
def _t_digits(rng, m):
    return _digits(rng, rng.randint(2, min(6, m)))


def _t_dial(rng, m):
    return ["dial"] + _digits(rng, rng.randint(1, min(5, m - 1)))


def _t_turn(rng, m):
    colour = [rng.choice(COLOURS)] if m >= 5 and rng.random() < 0.5 else []
    return ["turn", rng.choice(("on", "off")), "the"] + colour + [rng.choice(SWITCHED)]


def _t_open(rng, m):
    colour = [rng.choice(COLOURS)] if m >= 4 and rng.random() < 0.5 else []
    return [rng.choice(("open", "close")), "the"] + colour + [rng.choice(OPENED)]


def _t_go(rng, m):
    steps = [rng.choice(DIGITS), "steps"] if m >= 4 and rng.random() < 0.4 else []
    return [rng.choice(("go", "move")), rng.choice(DIRECTIONS)] + steps


def _t_music(rng, m):
    return [rng.choice(("play", "stop")), "the", "music"]


def _t_volume(rng, m):
    return ["set", "the", "volume", "to"] + _digits(rng, 2 if m >= 6 and rng.random() < 0.3 else 1)


def _t_show(rng, m):
    return ["show", "me", "the", rng.choice(COLOURS), rng.choice(SWITCHED + OPENED)]


TEMPLATES = (
    ("digits", 0.30, 2, _t_digits),
    ("dial", 0.10, 2, _t_dial),
    ("turn", 0.12, 4, _t_turn),
    ("open", 0.12, 3, _t_open),
    ("go", 0.12, 2, _t_go),
    ("music", 0.08, 3, _t_music),
    ("volume", 0.08, 5, _t_volume),
    ("show", 0.08, 5, _t_show),
)

CONNECTORS = ("and", "then")
VOCABULARY = tuple(sorted(
    set(DIGITS) | set(COLOURS) | set(DIRECTIONS) | set(SWITCHED) | set(OPENED) | set(CONNECTORS)
    | {"dial", "turn", "on", "off", "the", "open", "close", "go", "move", "steps", "play", "stop",
       "music", "set", "volume", "to", "show", "me"}
))
assert 36 <= len(VOCABULARY) <= 50, len(VOCABULARY)
# --task: the words an utterance may have (commands: one command; sentences: two or three
# commands joined by "and" / "then", for outputs long enough for a student's mistakes to compound)
MAX_WORDS = {"commands": 6, "sentences": 18}


def sample_text(rng: random.Random, max_words: int = 6) -> tuple[str, str]:
    """One command of at most ``max_words`` (>= 2) words: (text, template name)."""
    if max_words < 2:
        raise ValueError(f"max_words must be >= 2, got {max_words}")
    usable = [t for t in TEMPLATES if t[2] <= max_words]
    name, _, _, fn = rng.choices(usable, weights=[t[1] for t in usable], k=1)[0]
    words = fn(rng, min(max_words, MAX_WORDS["commands"]))
    assert 2 <= len(words) <= max_words and all(w in VOCABULARY for w in words), words
    return " ".join(words), name


def sample_sentence(rng: random.Random, max_words: int = MAX_WORDS["sentences"]) -> tuple[str, str]:
    """Two or three commands joined by "and" / "then", at most ``max_words`` words in all; one command
    where two would not fit. The template name is the commands' names joined by "+"."""
    if max_words < 5:  # two commands of two words and a connector
        return sample_text(rng, max_words)
    want = rng.choice((2, 3))
    words: list[str] = []
    names = []
    for _ in range(want):
        room = max_words - len(words) - (1 if words else 0)
        if room < 2:
            break
        text, name = sample_text(rng, min(room, MAX_WORDS["commands"]))
        if words:
            words.append(rng.choice(CONNECTORS))
        words += text.split()
        names.append(name)
    assert len(words) <= max_words and all(w in VOCABULARY for w in words), words
    return " ".join(words), "+".join(names)


SAMPLERS = {"commands": sample_text, "sentences": sample_sentence}


@dataclass
class Utt:
    key: str
    split: str
    text: str
    template: str
    voice: str
    variant: str
    speed: int
    pitch: int
    duration: float | None = None

    def spec(self) -> tuple:
        return (self.text, self.voice, self.variant, self.speed, self.pitch)


def plan(counts: dict[str, int], seed: int, voices, variants, speed_range, pitch_range,
         task: str = "commands") -> list[Utt]:
    """Draw every utterance's text and rendering; no two share (text, voice, variant, speed, pitch)."""
    seen: set[tuple] = set()
    utts = []
    sample = SAMPLERS[task]
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}" if task == "commands" else f"{seed}:{task}:{split}")
        for i in range(counts[split]):
            text, template = sample(rng)
            voice, variant = rng.choice(voices), rng.choice(variants)
            while True:
                u = Utt(f"{split}-{i:06d}", split, text, template, voice, variant,
                        rng.randint(*speed_range), rng.randint(*pitch_range))
                if u.spec() not in seen:
                    break
            seen.add(u.spec())
            utts.append(u)
    return utts


def render(utts: list[Utt], wav_dir: Path, args, seen: set[tuple]) -> dict:
    """Synthesize every clip; re-speak the ones longer than ``args.max_seconds``. Returns counters."""
    speed_raised: set[str] = set()
    shortened: set[str] = set()
    pending = list(utts)
    rounds = 0
    while pending:
        jobs = [SynthJob(text=u.text, out_wav=wav_dir / f"{u.key}.wav", voice=u.voice, variant=u.variant,
                         speed=u.speed, pitch=u.pitch, sample_rate=args.sample_rate) for u in pending]
        desc = "espeak-ng" if rounds == 0 else f"espeak-ng (too long, round {rounds})"
        durations = synthesize_many(jobs, workers=args.workers, progress=not args.quiet, desc=desc)
        for u, d in zip(pending, durations):
            u.duration = d
        too_long = [u for u in pending if u.duration > args.max_seconds + 1e-9]
        if not too_long:
            break
        rounds += 1
        if rounds > args.max_rounds:
            shown = ", ".join(f"{u.key} ({u.duration:.2f} s: {u.text!r} at {u.speed} wpm)" for u in too_long[:5])
            raise SystemExit(f"{len(too_long)} clips are still longer than {args.max_seconds} s after "
                             f"{args.max_rounds} rounds of re-speaking: {shown}")
        for u in too_long:
            seen.discard(u.spec())
            if u.speed < args.max_speed:
                # silences do not scale with speed, hence the 10% margin
                want = math.ceil(u.speed * u.duration / args.max_seconds * 1.1)
                u.speed = min(args.max_speed, max(u.speed + 10, want))
                speed_raised.add(u.key)
            else:
                n_words = len(u.text.split())
                if n_words <= 2:
                    raise SystemExit(f"{u.key}: {u.text!r} lasts {u.duration:.2f} s even at {u.speed} wpm; "
                                     f"raise --max_seconds or --max_speed")
                rng = random.Random(f"{args.seed}:{u.key}:shorten:{rounds}")
                u.text, u.template = SAMPLERS[args.task](rng, n_words - 1)
                shortened.add(u.key)
            while u.spec() in seen:  # keep renderings unique
                u.speed += 1
            seen.add(u.spec())
        pending = too_long
    return {"speed_raised": len(speed_raised), "text_shortened": len(shortened), "rounds": rounds}


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _row(u: Utt, with_text: bool = True) -> dict:
    r = {"key": u.key, "audio": f"wav/{u.key}.wav", "task": "asr"}
    if with_text:
        r["text"] = u.text
    r.update(voice=u.voice, variant=u.variant, speed=u.speed, pitch=u.pitch, duration=round(u.duration, 4))
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Writes teacher_train / student_labelled / unlabelled "
        "(without text, references in unlabelled_reference.jsonl) / dev / test manifests, wav/, "
        "text_corpus.txt and stats.json into --out_dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out_dir", required=True, help="output folder (created); wavs go to <out_dir>/wav")
    p.add_argument("--num_teacher", type=int, default=2400, help="clips in teacher_train.jsonl")
    p.add_argument("--num_student_labelled", type=int, default=300, help="clips in student_labelled.jsonl")
    p.add_argument("--num_unlabelled", type=int, default=2400, help="clips in unlabelled.jsonl")
    p.add_argument("--num_dev", type=int, default=100, help="clips in dev.jsonl")
    p.add_argument("--num_test", type=int, default=200, help="clips in test.jsonl")
    p.add_argument("--task", choices=sorted(SAMPLERS), default="commands",
                   help="commands: one command of 2-6 words a clip; sentences: two or three commands joined "
                   "by 'and' / 'then' (up to 18 words; use a longer --max_seconds, e.g. 6)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset for tests: 64/16/48/16/16 clips (overrides the five counts)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed and counts, same corpus")
    p.add_argument("--workers", type=int, default=2, help="parallel espeak-ng processes")
    p.add_argument("--voices", default="",
                   help="comma-separated espeak-ng voices (default: every English voice found here)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated voice variants")
    p.add_argument("--speed_range", type=int, nargs=2, default=(140, 200), metavar=("MIN", "MAX"),
                   help="speaking rate in words per minute, drawn uniformly")
    p.add_argument("--pitch_range", type=int, nargs=2, default=(30, 70), metavar=("MIN", "MAX"),
                   help="espeak-ng pitch (0-99), drawn uniformly")
    p.add_argument("--max_seconds", type=float, default=3.0,
                   help="longest clip allowed; longer ones are re-spoken faster or replaced by shorter text")
    p.add_argument("--max_speed", type=int, default=260, help="fastest rate used when re-speaking a long clip")
    p.add_argument("--max_rounds", type=int, default=8, help="re-speaking rounds before giving up with an error")
    p.add_argument("--sample_rate", type=int, default=16000, help="output sample rate")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    counts = dict(zip(SPLITS, (args.num_teacher, args.num_student_labelled, args.num_unlabelled,
                               args.num_dev, args.num_test)))
    if args.smoke:
        counts = dict(SMOKE_COUNTS)
    bad = [f"--num_{s}={n}" for s, n in counts.items() if n < 0]
    if bad:
        raise SystemExit(f"counts must be >= 0: {', '.join(bad)}")
    if args.speed_range[0] > args.speed_range[1] or args.pitch_range[0] > args.pitch_range[1]:
        raise SystemExit("--speed_range and --pitch_range take MIN MAX with MIN <= MAX")

    try:
        available_voices, available_variants = list_voices("en"), list_variants()
    except SynthesisError as e:
        raise SystemExit(str(e))
    voices = [v for v in args.voices.split(",") if v] or list(available_voices)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in voices if v not in available_voices] + [v for v in variants if v not in available_variants]
    if unknown:
        raise SystemExit(f"not available in this espeak-ng: {', '.join(unknown)}; voices: "
                         f"{', '.join(available_voices)}; variants: {', '.join(available_variants)}")
    if not voices or not variants:
        raise SystemExit("no voices or no variants to use")

    out_dir = Path(args.out_dir)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    utts = plan(counts, args.seed, voices, variants, tuple(args.speed_range), tuple(args.pitch_range), args.task)
    seen = {u.spec() for u in utts}
    try:
        regen = render(utts, wav_dir, args, seen)
    except SynthesisError as e:
        raise SystemExit(f"synthesis failed: {e}")
    wall = time.time() - t0

    by_split = {s: [u for u in utts if u.split == s] for s in SPLITS}
    for s in ("teacher_train", "student_labelled", "dev", "test"):
        _write_jsonl(out_dir / f"{s}.jsonl", (_row(u) for u in by_split[s]))
    _write_jsonl(out_dir / "unlabelled.jsonl", (_row(u, with_text=False) for u in by_split["unlabelled"]))
    _write_jsonl(out_dir / "unlabelled_reference.jsonl",
                 ({"key": u.key, "text": u.text} for u in by_split["unlabelled"]))
    corpus = [u.text for s in ("teacher_train", "student_labelled") for u in by_split[s]]
    tmp = out_dir / "text_corpus.txt.tmp"
    tmp.write_text("".join(t + "\n" for t in corpus), encoding="utf-8")
    os.replace(tmp, out_dir / "text_corpus.txt")

    def split_stats(us):
        secs = [u.duration for u in us]
        return {
            "num_utts": len(us),
            "seconds": round(sum(secs), 3),
            "mean_seconds": round(sum(secs) / len(secs), 3) if secs else 0.0,
            "max_seconds": round(max(secs), 3) if secs else 0.0,
            "num_words": sum(len(u.text.split()) for u in us),
            "num_distinct_texts": len({u.text for u in us}),
        }

    stats = {
        "seed": args.seed,
        "task": args.task,
        "sample_rate": args.sample_rate,
        "max_seconds_allowed": args.max_seconds,
        "voices": voices,
        "variants": variants,
        "speed_range": list(args.speed_range),
        "pitch_range": list(args.pitch_range),
        "vocabulary": list(VOCABULARY),
        "vocab_size": len(VOCABULARY),
        "splits": {s: split_stats(by_split[s]) for s in SPLITS},
        "total_utts": len(utts),
        "total_seconds": round(sum(u.duration for u in utts), 3),
        "respoken_faster": regen["speed_raised"],
        "text_shortened": regen["text_shortened"],
        "regeneration_rounds": regen["rounds"],
        "workers": args.workers,
        "wall_seconds": round(wall, 2),
        "clips_per_second": round(len(utts) / wall, 1) if wall > 0 else None,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(utts)} clips ({stats['total_seconds'] / 3600:.2f} h) to {out_dir} in {wall:.1f} s "
          f"({stats['clips_per_second']} clips/s, {args.workers} workers); "
          f"re-spoken faster: {regen['speed_raised']}, shortened: {regen['text_shortened']}")
    for s in SPLITS:
        st = stats["splits"][s]
        print(f"  {s:17s} {st['num_utts']:6d} clips {st['seconds']:9.1f} s  max {st['max_seconds']:.2f} s")
    return stats


if __name__ == "__main__":
    main()
