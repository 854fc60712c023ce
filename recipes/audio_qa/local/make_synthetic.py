#!/usr/bin/env python3
"""Make the audio_qa recipe's synthetic MMAU-style corpus: espeak-ng speech and sox sounds,
with one multiple-choice question per clip.

Three categories, like MMAU's, each with three tasks (``sub_category``):

  speech  one word (colours, animals, digits) spoken by a male or female espeak-ng voice, fast
          or slow: "which word", "male or female voice", "fast or slow speech"
  sound   1-4 beeps, loud or quiet ("how many beeps", "loud or quiet"), or two tones, one high
          and one low ("which tone is higher")
  music   3-5 plucked notes going up or down, fast or slow ("ascending or descending",
          "fast or slow tempo", "how many notes")

Every question has 2 to 5 choices in random order, ``answer`` being the text of one of them;
``difficulty`` is easy (2 choices), medium (3) or hard (4-5). Each row also carries a
``description`` of what is heard ("a woman says seven slowly", "three quiet beeps"), written from
the clip's own parameters: it is the reasoning in the reference answer
``<think>description</think><answer>answer</answer>``, and the target of a "describe the audio"
task that teaches the models to hear before they answer. Choices are worded differently from
descriptions (digits against number words, "male" against "a man", "the second" against "a low
tone then a high tone"), so answering is a step beyond describing.

Written under ``--out_dir`` (audio under ``wav/``, paths relative to the manifests):

  train.jsonl      questions for GRPO / ReST / OPD / the SFT baseline (with answers)
  sft_mcq.jsonl    the first ``--sft_mcq`` questions of train: the labelled set of the base
  describe.jsonl   every train clip with the "describe the audio" task (``target`` = description;
                   keys end in ``_describe``)
  base_sft.jsonl   describe + sft_mcq: what the base policy and the teacher are SFT-warmed on
  dev.jsonl, test.jsonl   held-out questions on new clips
  text_corpus.txt  every prompt and target, for tokenizer training
  stats.json       counts per split, category, task and answer; generation seconds

The output depends only on ``--seed`` and the counts. Left out: noise, real recordings, long
clips (every clip is at most 3 s, the models' audio chunk).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

from tools.local_module import load_sibling
from tools.synth.sound import Segment, render_many
from tools.synth.speech import SynthJob, list_voices, synthesize_many

_prompt = load_sibling(__file__, "prompt")
DESCRIBE, add_prompts = _prompt.DESCRIBE, _prompt.add_prompts

WORDS = ("red", "green", "blue", "cat", "dog", "bird", "one", "three", "seven", "nine")
NUM = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
NOTES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5", "D5")
MALE, FEMALE = ("m1", "m2", "m3", "m4", "m5", "m6", "m7"), ("f1", "f2", "f3", "f4")
SPLITS = ("train", "dev", "test")
SMOKE = {"train": 48, "dev": 16, "test": 24}


def _choices(rng: random.Random, answer: str, pool: list[str], k: int) -> list[str]:
    others = [c for c in pool if c != answer]
    rng.shuffle(others)
    ch = [answer] + others[: k - 1]
    rng.shuffle(ch)
    return ch


def _binary(rng, answer, pair, distractors):
    k = rng.choice((2, 2, 3, 4))
    extra = list(distractors)
    rng.shuffle(extra)
    pool = list(pair) + extra[: k - 2]
    ch = [answer] + [c for c in pool if c != answer]
    rng.shuffle(ch)
    return ch


def speech_item(rng, voices):
    word, male, fast = rng.choice(WORDS), rng.random() < 0.5, rng.random() < 0.5
    variant = rng.choice(MALE if male else FEMALE)
    job = dict(text=word, voice=rng.choice(voices), variant=variant, speed=rng.randint(220, 260) if fast
               else rng.randint(95, 115), pitch=rng.randint(40, 60))
    desc = f"a {'man' if male else 'woman'} says {word} {'quickly' if fast else 'slowly'}"
    task = rng.choice(("which word", "male or female voice", "fast or slow speech"))
    if task == "which word":
        q, a = "Which word does the speaker say?", word
        ch = _choices(rng, a, list(WORDS), rng.randint(2, 5))
    elif task == "male or female voice":
        q, a = "Is the voice male or female?", "male" if male else "female"
        ch = _binary(rng, a, ("male", "female"), ("a child", "a robot"))
    else:
        q, a = "Is the speech fast or slow?", "fast" if fast else "slow"
        ch = _binary(rng, a, ("fast", "slow"), ("silent", "sung"))
    meta = {"word": word, "gender": "male" if male else "female", "rate": "fast" if fast else "slow"}
    return ("speech", task, q, ch, a, desc, ("speech", job), meta)


def sound_item(rng):
    if rng.random() < 2 / 3:
        n, loud = rng.randint(1, 4), rng.random() < 0.5
        vol = rng.uniform(0.6, 0.9) if loud else rng.uniform(0.03, 0.08)
        freq = rng.choice((800, 1000, 1200))
        segs = [Segment(freq, 0.12, vol, "sine", gap=0.18) for _ in range(n)]
        desc = f"{NUM[n]} {'loud' if loud else 'quiet'} beep{'s' if n > 1 else ''}"
        if rng.random() < 0.6:
            task, q, a = "how many beeps", "How many beeps are there?", str(n)
            ch = _choices(rng, a, [str(i) for i in range(1, 6)], rng.randint(3, 5))
        else:
            task, q, a = "loud or quiet", "Are the beeps loud or quiet?", "loud" if loud else "quiet"
            ch = _binary(rng, a, ("loud", "quiet"), ("silent", "music"))
        meta = {"count": n, "level": "loud" if loud else "quiet"}
    else:
        high_first = rng.random() < 0.5
        lo, hi = rng.randint(200, 330), rng.randint(700, 1000)
        f = (hi, lo) if high_first else (lo, hi)
        segs = [Segment(f[0], 0.4, 0.5, gap=0.2), Segment(f[1], 0.4, 0.5)]
        desc = "a high tone then a low tone" if high_first else "a low tone then a high tone"
        task, q, a = "which tone is higher", "Which tone is higher?", "the first" if high_first else "the second"
        ch = _binary(rng, a, ("the first", "the second"), ("they are equal", "neither"))
        meta = {"order": "high-low" if high_first else "low-high"}
    return ("sound", task, q, ch, a, desc, ("sound", segs), meta)


def music_item(rng):
    n, up, fast = rng.randint(3, 5), rng.random() < 0.5, rng.random() < 0.5
    start = rng.randint(0, len(NOTES) - n)
    notes = list(NOTES[start: start + n])
    if not up:
        notes.reverse()
    dur = rng.uniform(0.1, 0.14) if fast else rng.uniform(0.3, 0.38)
    segs = [Segment(x, dur, 0.5, "pluck", gap=0.04) for x in notes]
    desc = f"{NUM[n]} notes going {'up' if up else 'down'} {'quickly' if fast else 'slowly'}"
    task = rng.choice(("ascending or descending", "fast or slow tempo", "how many notes"))
    if task == "ascending or descending":
        q, a = "Do the notes go up or down?", "ascending" if up else "descending"
        ch = _binary(rng, a, ("ascending", "descending"), ("constant",))
    elif task == "fast or slow tempo":
        q, a = "Is the tempo fast or slow?", "fast" if fast else "slow"
        ch = _binary(rng, a, ("fast", "slow"), ("silent",))
    else:
        q, a = "How many notes are played?", str(n)
        ch = _choices(rng, a, ["2", "3", "4", "5", "6"], rng.randint(3, 5))
    meta = {"notes": notes, "direction": "up" if up else "down", "tempo": "fast" if fast else "slow"}
    return ("music", task, q, ch, a, desc, ("sound", segs), meta)


def make_split(split: str, count: int, seed: int, out_dir: Path, voices) -> tuple[list[dict], list, list]:
    rng = random.Random(f"{seed}-{split}")
    rows, speech_jobs, sound_jobs = [], [], []
    for i in range(count):
        kind = rng.choice(("speech", "sound", "music"))
        item = speech_item(rng, voices) if kind == "speech" else sound_item(rng) if kind == "sound" else music_item(rng)
        cat, task, q, ch, a, desc, (how, spec), meta = item
        key = f"{split}_{i:05d}"
        wav = f"wav/{key}.wav"
        if how == "speech":
            speech_jobs.append(SynthJob(out_wav=str(out_dir / wav), **spec))
        else:
            sound_jobs.append((spec, str(out_dir / wav)))
        k = len(ch)
        rows.append({"key": key, "audio": wav, "task": "qa", "question": q, "choices": ch, "answer": a,
                     "category": cat, "sub_category": task,
                     "difficulty": "easy" if k == 2 else "medium" if k == 3 else "hard",
                     "dataset": "synthetic", "description": desc, **meta})
    return rows, speech_jobs, sound_jobs


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--train", type=int, default=2400, help="questions (clips) for training")
    ap.add_argument("--dev", type=int, default=200)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--sft_mcq", type=int, default=800, help="labelled questions for the base's SFT warm-up")
    ap.add_argument("--smoke", action="store_true", help=f"tiny counts {SMOKE}, for tests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    counts = dict(SMOKE) if args.smoke else {"train": args.train, "dev": args.dev, "test": args.test}
    sft_n = min(args.sft_mcq, 16 if args.smoke else args.sft_mcq, counts["train"])
    out = Path(args.out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    voices = list_voices("en")
    t0 = time.time()
    splits, speech_jobs, sound_jobs = {}, [], []
    for s in SPLITS:
        rows, sj, nj = make_split(s, counts[s], args.seed, out, voices)
        splits[s] = add_prompts(rows)
        speech_jobs += sj
        sound_jobs += nj
    durs = synthesize_many(speech_jobs, workers=args.workers, desc="espeak-ng")
    durs += render_many(sound_jobs, workers=args.workers, desc="sox")
    too_long = [str(p) for p, d in zip([j.out_wav for j in speech_jobs] + [p for _, p in sound_jobs], durs) if d > 3.0]
    if too_long:
        raise SystemExit(f"{len(too_long)} clips are longer than 3 s (the audio chunk): {too_long[:3]}")
    for s in SPLITS:
        write(out / f"{s}.jsonl", splits[s])
    write(out / "sft_mcq.jsonl", splits["train"][:sft_n])
    describe = [{**r, "key": f"{r['key']}_describe", "prompt": DESCRIBE, "target": r["description"],
                 "task": "caption"} for r in splits["train"]]
    write(out / "describe.jsonl", describe)
    write(out / "base_sft.jsonl", describe + splits["train"][:sft_n])
    corpus = [r["prompt"] for s in SPLITS for r in splits[s]] + [r["target"] for r in splits["train"]] + [DESCRIBE]
    (out / "text_corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    stats = {"counts": {**counts, "sft_mcq": sft_n}, "seconds": round(time.time() - t0, 1),
             "audio_seconds": round(sum(durs), 1), "max_clip_seconds": round(max(durs), 2)}
    for s in SPLITS:
        stats[s] = {"category": Counter(r["category"] for r in splits[s]),
                    "task": Counter(r["sub_category"] for r in splits[s]),
                    "difficulty": Counter(r["difficulty"] for r in splits[s])}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps({k: stats[k] for k in ("counts", "seconds", "audio_seconds", "max_clip_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
