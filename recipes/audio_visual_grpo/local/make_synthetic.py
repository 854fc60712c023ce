#!/usr/bin/env python3
"""Make the audio_visual_grpo recipe's synthetic corpus: tiny videos of coloured boxes with an
espeak-ng voice or a sox beep, and one four-choice question per clip that needs both the picture
and the sound.

Four tasks (the row's ``Type``), all on a black 64 x 64 picture, 8 fps, 2 or 3 s long, boxes of
28 x 28 pixels in the cells of a 2 x 2 grid (one cell per merged vision token, 2 x 2 patches of
14 pixels, once the processor resizes the frame to 56 x 56; with 12-pixel boxes in a 4 x 4 grid
a tiny thinker had not learnt to see them after 1500 warm-up steps):

  count            two of red / green / blue, one with 1 box and the other with 2 or 3 (or the
                   reverse; at most the 4 cells); a voice names a colour: "How many boxes of that colour are on screen?"
                   choices 0, 1, 2, 3 (0 when the named colour is not shown)
  colour_by_count  the same kind of picture; a voice says one, two or three: "Which colour has that
                   many boxes?" choices red, green, blue, none of them
  beep_colour      one box, then a box of another colour (first and second half of the clip); a
                   beep sounds during one of them: "What colour is the box on screen when the beep
                   sounds?" choices red, green, blue, yellow
  motion           two boxes of different colours crossing the picture in opposite directions
                   (left/right or up/down); a voice names one colour: "Which way does the box of
                   that colour move?" choices left, right, up, down

The picture alone or the sound alone leaves at least two answers possible. Choices are in that
fixed order unless ``--shuffle_choices`` (a fixed order lets a tiny model learn a task in minutes);
``answer`` is the letter of the right one. Voices: the English espeak-ng voices x eleven variants,
speed 140-200, pitch 30-70.

Rows: {"key", "video" (relative to the manifest), "task": "av_qa", "question", "choices" (4 strings,
no letters), "answer" (A-D), "answer_text", "Type", "duration" (s), "dataset": "synthetic",
"spoken" (the word said, or "beep"), "prompt" (``local/prompt.py``), "target":
"<think>short reasoning from the clip's parameters</think><answer>X</answer>", "description" (that
reasoning alone: what is seen and heard)}.

Written under ``--out_dir`` (videos under ``video/``):

  describe.jsonl  the warm-up's own clips (default 1500) with the task "Describe what you see and
                  hear." (``target`` = what is seen and heard, the reasoning of the clip's
                  question without the question or the answer)
  sft.jsonl       labelled questions of the warm-up (default 400; their own clips)
  base_sft.jsonl  describe + sft: the warm-up's first pass (it learns to look and listen, and
                  the question format); its second pass is sft.jsonl alone
  train.jsonl     GRPO prompts (default 2000), on clips the warm-up never saw: GRPO on the
                  warm-up's own clips learnt those clips (training accuracy up, test accuracy
                  down); fresh clips leave only what carries over
  dev.jsonl, test.jsonl   held-out clips (100, 300)
  text_corpus.txt every prompt, target and choice plus the format strings, for the tokenizer
  stats.json      counts per split, task, answer letter and duration; generation seconds

``--smoke``: describe 32, train 32, sft 16, dev 8, test 16. The output depends only on ``--seed``, the counts
and ``--shuffle_choices`` (which reorders choices and changes no clip). Left out: noise, real
footage, circles and other shapes, speech longer than one word, clips longer than 3 s.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from tools.local_module import load_sibling
from tools.synth.sound import Segment
from tools.synth.sound import render_many as render_sounds
from tools.synth.speech import DEFAULT_VARIANTS, SynthJob, list_voices, synthesize_many
from tools.synth.video import Box, VideoSpec
from tools.synth.video import render_many as render_videos

prompt = load_sibling(__file__, "prompt")

COLOURS = ("red", "green", "blue")
WORDS = {0: "zero", 1: "one", 2: "two", 3: "three"}
TASKS = ("count", "colour_by_count", "beep_colour", "motion")
CHOICES = {"count": ["0", "1", "2", "3"],
           "colour_by_count": ["red", "green", "blue", "none of them"],
           "beep_colour": ["red", "green", "blue", "yellow"],
           "motion": ["left", "right", "up", "down"]}
QUESTIONS = {"count": "The voice names a colour. How many boxes of that colour are on screen?",
             "colour_by_count": "The voice says a number. Which colour has that many boxes on screen?",
             "beep_colour": "What colour is the box on screen when the beep sounds?",
             "motion": "The voice names a colour. Which way does the box of that colour move?"}
SPLITS = ("describe", "train", "sft", "dev", "test")
DEFAULTS = {"describe": 1500, "train": 2000, "sft": 400, "dev": 100, "test": 300}
SMOKE = {"describe": 32, "train": 32, "sft": 16, "dev": 8, "test": 16}
QA_SPLITS = SPLITS[1:]   # written as question manifests; the describe clips only as describe.jsonl
SIZE, FPS, GRID, PAD = 64, 8, 2, 2
CELL = SIZE // GRID          # 32 px: one 28 x 28 merged vision token once the processor resizes to 56
BOX = CELL - 2 * PAD
DURATIONS = (2.0, 3.0)
BEEP_SECONDS, BEEP_HZ = 0.3, 1000
DESCRIBE = "Describe what you see and hear."


def _cell(i: int) -> tuple[int, int]:
    return (i % GRID) * CELL + PAD, (i // GRID) * CELL + PAD


def _static_scene(rng: random.Random) -> tuple[dict[str, int], list[Box]]:
    """Two colours with different counts (1 and 2-3) in distinct grid cells."""
    cols = rng.sample(COLOURS, 2)
    counts = dict(zip(cols, rng.choice(((1, 2), (2, 1), (1, 3), (3, 1)))))
    cells = rng.sample(range(GRID * GRID), sum(counts.values()))
    boxes, k = [], 0
    for c in cols:
        for _ in range(counts[c]):
            x, y = _cell(cells[k])
            boxes.append(Box(c, x, y, BOX))
            k += 1
    rng.shuffle(boxes)  # drawing order carries no information
    return counts, boxes


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {c}" for c, n in sorted(counts.items(), key=lambda kv: COLOURS.index(kv[0])))


def item_count(rng):
    counts, boxes = _static_scene(rng)
    named = rng.choice(COLOURS)
    n = counts.get(named, 0)
    why = f"voice: {named}. boxes: {_counts_text(counts)}. {named} boxes: {n}."
    return boxes, ("speech", named), str(n), why


def item_colour_by_count(rng):
    counts, boxes = _static_scene(rng)
    n = rng.choice((1, 2, 3))
    match = [c for c, k in counts.items() if k == n]
    ans = match[0] if match else "none of them"
    why = f"voice: {WORDS[n]}. boxes: {_counts_text(counts)}. {WORDS[n]} boxes: {ans}."
    return boxes, ("speech", WORDS[n]), ans, why


def item_beep_colour(rng, dur):
    c1, c2 = rng.sample(COLOURS, 2)
    half = dur / 2
    (x1, y1), (x2, y2) = (_cell(i) for i in rng.sample(range(GRID * GRID), 2))
    boxes = [Box(c1, x1, y1, BOX, start=0.0, end=half), Box(c2, x2, y2, BOX, start=half, end=dur)]
    second = rng.random() < 0.5
    lo = (half if second else 0.0) + 0.15
    start = round(rng.uniform(lo, lo + half - 0.3 - BEEP_SECONDS), 3)
    ans = c2 if second else c1
    why = f"first {c1}, then {c2}. beep in the {'second' if second else 'first'} half: {ans}."
    return boxes, ("beep", start), ans, why


def item_motion(rng):
    c1, c2 = rng.sample(COLOURS, 2)
    horizontal = rng.random() < 0.5
    d1 = rng.choice(("left", "right") if horizontal else ("up", "down"))
    d2 = {"left": "right", "right": "left", "up": "down", "down": "up"}[d1]
    lanes = rng.sample(range(GRID), 2)
    lo, hi = PAD, SIZE - BOX - PAD
    boxes = []
    for c, d, lane in ((c1, d1, lanes[0]), (c2, d2, lanes[1])):
        a, b = (lo, hi) if d in ("right", "down") else (hi, lo)
        p = lane * CELL + PAD
        boxes.append(Box(c, a, p, BOX, x_end=b) if horizontal else Box(c, p, a, BOX, y_end=b))
    named = rng.choice((c1, c2))
    ans = d1 if named == c1 else d2
    why = f"voice: {named}. {c1} moves {d1}, {c2} moves {d2}. {named}: {ans}."
    return boxes, ("speech", named), ans, why


def make_split(split: str, count: int, seed: int, voices, shuffle_choices: bool = False):
    """Rows (with prompt and target) and the media jobs of one split; renders nothing.

    Returns ``(rows, speech_jobs, beep_jobs, video_jobs)`` whose paths are relative to the output
    folder: speech jobs as SynthJob kwargs, beep jobs ``(start, wav)``, video jobs ``(VideoSpec
    kwargs, wav, mp4)``.
    """
    rng = random.Random(f"{seed}-{split}")
    crng = random.Random(f"{seed}-{split}-choices")  # its own stream: shuffling changes no clip
    rows, speech, beeps, videos = [], [], [], []
    for i in range(count):
        task = TASKS[rng.randrange(len(TASKS))]
        dur = rng.choice(DURATIONS)
        if task == "count":
            boxes, sound, ans, why = item_count(rng)
        elif task == "colour_by_count":
            boxes, sound, ans, why = item_colour_by_count(rng)
        elif task == "beep_colour":
            boxes, sound, ans, why = item_beep_colour(rng, dur)
        else:
            boxes, sound, ans, why = item_motion(rng)
        choices = list(CHOICES[task])
        if shuffle_choices:
            crng.shuffle(choices)
        key = f"{split}_{i:05d}"
        wav = f".audio_tmp/{key}.wav"
        if sound[0] == "speech":
            speech.append(dict(text=sound[1], out_wav=wav, voice=rng.choice(voices),
                               variant=rng.choice(DEFAULT_VARIANTS), speed=rng.randint(140, 200),
                               pitch=rng.randint(30, 70)))
            spoken = sound[1]
        else:
            beeps.append((sound[1], wav))
            spoken = "beep"
        video = f"video/{key}.mp4"
        videos.append((dict(boxes=tuple(boxes), duration=dur, size=SIZE, fps=FPS), wav, video))
        row = {"key": key, "video": video, "task": "av_qa", "question": QUESTIONS[task], "choices": choices,
               "answer": prompt.LETTERS[choices.index(ans)], "answer_text": ans, "Type": task,
               "duration": dur, "dataset": "synthetic", "spoken": spoken}
        row["prompt"] = prompt.render_prompt(row)
        row["target"] = prompt.render_target(row, why)
        row["description"] = why
        rows.append(row)
    return rows, speech, beeps, videos


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    for s in SPLITS:
        ap.add_argument(f"--{s}", type=int, default=DEFAULTS[s], help=f"clips in {s} (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help=f"tiny counts {SMOKE}, for tests")
    ap.add_argument("--shuffle_choices", action="store_true", help="put the four choices in random order")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    counts = dict(SMOKE) if args.smoke else {s: getattr(args, s) for s in SPLITS}
    bad = [s for s, n in counts.items() if n < 0 or (s != "sft" and n == 0)]
    if bad:
        ap.error(f"counts must be positive (sft may be 0): {', '.join(f'--{s} {counts[s]}' for s in bad)}")
    out = Path(args.out_dir)
    tmp = out / ".audio_tmp"
    (out / "video").mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    voices = list_voices("en")
    splits, speech, beeps, videos = {}, [], [], []
    for s in SPLITS:
        rows, sj, bj, vj = make_split(s, counts[s], args.seed, voices, args.shuffle_choices)
        splits[s] = rows
        speech += sj
        beeps += bj
        videos += vj
    speech_s = synthesize_many([SynthJob(**dict(j, out_wav=str(out / j["out_wav"]))) for j in speech],
                               workers=args.workers, desc="espeak-ng")
    too_long = [(j["out_wav"], d) for j, d in zip(speech, speech_s) if d > min(DURATIONS)]
    if too_long:
        raise SystemExit(f"{len(too_long)} spoken words are longer than the shortest clip "
                         f"({min(DURATIONS)} s): {too_long[:3]}")
    render_sounds([([Segment(BEEP_HZ, BEEP_SECONDS, 0.6)], str(out / wav), start) for start, wav in beeps],
                  workers=args.workers, desc="sox")
    render_videos([(VideoSpec(audio=str(out / wav), **spec), str(out / mp4)) for spec, wav, mp4 in videos],
                  workers=args.workers, desc="ffmpeg")
    shutil.rmtree(tmp)
    for s in QA_SPLITS:
        write_jsonl(out / f"{s}.jsonl", splits[s])
    # the warm-up: describe its own clips (what is seen and heard, no question and no answer),
    # plus the labelled questions of the sft clips
    describe = [{"key": r["key"], "video": r["video"], "task": "av_describe", "Type": "describe",
                 "duration": r["duration"], "prompt": DESCRIBE, "target": r["description"]}
                for r in splits["describe"]]
    write_jsonl(out / "describe.jsonl", describe)
    write_jsonl(out / "base_sft.jsonl", describe + splits["sft"])
    corpus = [x for s in QA_SPLITS for r in splits[s] for x in (r["prompt"], r["target"])] + [DESCRIBE]
    corpus += [r["description"] for r in splits["describe"]]
    corpus += sorted({c for ch in CHOICES.values() for c in ch}) + list(prompt.FORMAT_STRINGS)
    corpus += list(prompt.INSTRUCTIONS.values())
    (out / "text_corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    stats = {"counts": counts, "seed": args.seed, "shuffle_choices": args.shuffle_choices,
             "seconds": round(time.time() - t0, 1), "clips": len(videos),
             "video": {"size": SIZE, "fps": FPS, "durations": list(DURATIONS)}}
    for s in SPLITS:
        stats[s] = {"Type": dict(Counter(r["Type"] for r in splits[s])),
                    "answer": dict(sorted(Counter(r["answer"] for r in splits[s]).items())),
                    "duration": {f"{int(d)}s": n for d, n in sorted(Counter(r["duration"] for r in splits[s]).items())}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: stats[k] for k in ("counts", "clips", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
