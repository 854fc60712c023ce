#!/usr/bin/env python3
"""Reference-based caption metrics: BLEU-1..4, ROUGE-L and CIDEr(-D) through pycocoevalcap,
METEOR and SPICE too when Java is on PATH.

    python local/caption_metrics.py --hyp exp/decode/x/hyp.jsonl --ref data/test.jsonl [--out scores.json]

Inputs: hypotheses written by ``python -m core.bin.decode`` (JSONL lines ``{"key", "text"}``) and
the test manifest, whose rows carry ``text``: a list of reference captions (a single string counts
as one reference). Every manifest key needs a hypothesis and every hypothesis a manifest row;
otherwise the error names the keys.

Tokenisation is pure Python (``core.rewards.normalize_text``: NFKC, lower case, punctuation
replaced by spaces, whitespace collapsed), because pycocoevalcap's ``PTBTokenizer`` runs the
Stanford tokenizer in Java. It differs from PTB on contractions and hyphens (``don't`` -> ``don t``,
PTB gives ``do n't``), so scores can differ slightly from the COCO toolkit's on such captions.
``Cider`` in pycocoevalcap is CIDEr-D (clipped n-gram counts, a Gaussian length penalty, x10),
with document frequencies from the references of the scored clips: it needs several clips (a
single clip scores 0). BLEU is corpus-level with the closest reference length, as in COCO.

An empty hypothesis (or one that is only punctuation) is scored as an empty caption, never
dropped, and counted in ``empty_hyps``. METEOR runs ``java -jar meteor-1.5.jar`` (bundled with
pycocoevalcap); SPICE runs ``spice-1.0.jar`` and needs the Stanford CoreNLP 3.6.0 jars in
pycocoevalcap's ``spice/lib`` (pycocoevalcap downloads them on first use; this script never
downloads anything). A metric that cannot run is left out and named with the reason under
``skipped``.

Output (``--out``, JSON; also what ``score_captions`` returns)::

    {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr", ["METEOR"], ["SPICE"]: float,
     "n": clips scored, "empty_hyps": int, "skipped": {metric: reason},
     "per_clip": {"ROUGE_L" | "CIDEr": {key: score}}, "ci95": {"ROUGE_L" | "CIDEr": [lo, hi]}}

ROUGE-L and CIDEr are means of per-clip scores (CIDEr's document frequencies from all the scored
clips' references); ``per_clip`` keeps those, and ``ci95`` is their 95% bootstrap interval over
the clips (``tools/bootstrap.py``; the document frequencies stay those of the whole set).

Left out: intervals of BLEU (corpus-level, not a mean of clips) and the Java metrics, FENSE /
SPIDEr-FL and other model-based caption metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence


from core.rewards import normalize_text
from tools.bootstrap import ratio_ci

log = logging.getLogger("caption_metrics")

BASE_METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr")
JAVA_METRICS = ("METEOR", "SPICE")


def _preview(keys, limit: int = 10) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _check(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> None:
    """ValueError listing every problem: keys on one side only, empty or non-string references,
    non-string hypotheses."""
    if not hyps:
        raise ValueError("caption scoring: no hypotheses to score")
    problems = []
    no_ref, no_hyp = set(hyps) - set(refs), set(refs) - set(hyps)
    if no_ref:
        problems.append(f"{len(no_ref)} hypothesis key(s) have no references: {_preview(no_ref)}")
    if no_hyp:
        problems.append(f"{len(no_hyp)} reference key(s) have no hypothesis: {_preview(no_hyp)}")
    for k in sorted(set(hyps) & set(refs)):
        if not isinstance(hyps[k], str):
            problems.append(f"key {k!r}: hypothesis must be a string, got {type(hyps[k]).__name__}")
        r = refs[k]
        if isinstance(r, str) or not isinstance(r, Sequence):
            problems.append(f"key {k!r}: references must be a list of strings, got {type(r).__name__}")
        elif len(r) == 0:
            problems.append(f"key {k!r}: empty list of references")
        else:
            bad = [i for i, t in enumerate(r) if not isinstance(t, str) or not normalize_text(t)]
            if bad:
                problems.append(f"key {k!r}: reference(s) {bad} are empty after lower-casing and removing "
                                "punctuation")
    if problems:
        raise ValueError("caption scoring: " + "; ".join(problems))


def _java_skips(java_metrics: bool | str) -> dict[str, str]:
    """Reasons for the Java metrics that cannot run here (empty: both can)."""
    if java_metrics is False:
        return {m: "not asked for" for m in JAVA_METRICS}
    if shutil.which("java") is None:
        return {m: "needs Java (no 'java' on PATH)" for m in JAVA_METRICS}
    import pycocoevalcap.spice.get_stanford_models as gsm

    skips = {}
    corenlp = Path(gsm.SPICEDIR) / gsm.SPICELIB / f"{gsm.JAR}.jar"
    if not corenlp.is_file():
        skips["SPICE"] = (f"needs the Stanford CoreNLP jar {corenlp} (pycocoevalcap's get_stanford_models "
                          "downloads it; nothing is downloaded here)")
    return skips


def score_captions(hyps: Mapping[str, str], refs: Mapping[str, Sequence[str]], *,
                   java_metrics: bool | str = "auto") -> dict:
    """Corpus-level caption metrics of ``hyps`` (``{key: caption}``) against ``refs``
    (``{key: [reference, ...]}``); the output's keys are in the module docstring.

    ``java_metrics``: ``"auto"`` runs METEOR (and SPICE when its CoreNLP jars are present) when
    ``java`` is on PATH; ``False`` never runs them. A Java metric that fails is left out with its
    error under ``skipped`` (and a warning); BLEU, ROUGE-L and CIDEr never are.

    Raises:
        ValueError: no hypotheses, a hypothesis key without references or a reference key without a hypothesis,
            an empty reference list, a reference that is empty after normalisation.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check(hyps, refs)
    keys = sorted(hyps)
    res = {k: [normalize_text(hyps[k])] for k in keys}
    gts = {k: [normalize_text(r) for r in refs[k]] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out: dict = {f"BLEU_{i + 1}": float(b) for i, b in enumerate(bleu)}
    rouge, rouge_clips = Rouge().compute_score(gts, res)
    cider, cider_clips = Cider().compute_score(gts, res)
    out["ROUGE_L"], out["CIDEr"] = float(rouge), float(cider)
    out["per_clip"] = {"ROUGE_L": {k: float(v) for k, v in zip(keys, rouge_clips)},
                       "CIDEr": {k: float(v) for k, v in zip(keys, cider_clips)}}
    out["ci95"] = {m: ratio_ci(list(v.values()))["ci95"] for m, v in out["per_clip"].items()}
    skipped = _java_skips(java_metrics)
    for name in JAVA_METRICS:
        if name in skipped:
            continue
        try:
            out[name] = _run_java_metric(name, gts, res)
        except Exception as e:  # noqa: BLE001  reported under "skipped", never as a zero
            log.warning("%s failed, left out: %s", name, e)
            skipped[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    out["n"] = len(keys)
    out["empty_hyps"] = sum(1 for k in keys if not res[k][0])
    out["skipped"] = skipped
    return out


def _run_java_metric(name: str, gts: dict, res: dict) -> float:
    if name == "METEOR":
        from pycocoevalcap.meteor.meteor import Meteor
        m = Meteor()
        try:
            return float(m.compute_score(gts, res)[0])
        finally:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
    from pycocoevalcap.spice.spice import Spice
    return float(Spice().compute_score(gts, res)[0])


# ----------------------------------------------------------------------------- files

def read_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """``{key: [references]}`` from a caption manifest (``text``: a list or one string);
    ``core.data.manifest.ManifestError`` naming ``file:line`` for a row without ``text``."""
    from core.data.manifest import read_manifest

    rows = read_manifest(path, require=("text",), check_media=False, require_media=False)
    return {r["key"]: [r["text"]] if isinstance(r["text"], str) else list(r["text"]) for r in rows}


def format_scores(s: dict) -> str:
    names = [m for m in BASE_METRICS + JAVA_METRICS if m in s]
    line = "  ".join(f"{m} {s[m]:.4f}" for m in names)
    extra = f" | {s['n']} clips, {s['empty_hyps']} empty hypotheses"
    skipped = "".join(f"\n  {m} skipped: {why}" for m, why in s["skipped"].items())
    return line + extra + skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hyp", required=True, help="hypotheses from core.bin.decode (JSONL key/text)")
    ap.add_argument("--ref", required=True, help="caption manifest (JSONL; text = list of references)")
    ap.add_argument("--out", help="scores JSON")
    ap.add_argument("--no_java", action="store_true", help="skip METEOR and SPICE even when Java is present")
    args = ap.parse_args(argv)

    from tools.compute_wer import read_transcripts
    try:
        hyps = read_transcripts(args.hyp)
        refs = read_references(args.ref)
        scores = score_captions(hyps, refs, java_metrics=False if args.no_java else "auto")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{args.out}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)
            f.write("\n")
        os.replace(tmp, args.out)
    print(format_scores(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
