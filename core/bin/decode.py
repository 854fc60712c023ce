"""Greedy (or sampled) decoding of a manifest: ``python -m core.bin.decode --model DIR --manifest in.jsonl --out hyp.jsonl``.

Writes one JSON line per sample (``key``, ``text``: the hypothesis, plus ``ref`` when the
manifest has the target field); ``--as_manifest`` writes the input rows with the hypothesis in
the target field instead, ready for SFT (sequence-level knowledge distillation).

Audio-in models (Qwen2-Audio, Qwen3-ASR, the Omni thinker) read each row's ``audio`` with
``--prompt`` as the text of the user turn (``AudioPromptCollator``; Qwen3-ASR's chat template
renders only the audio there, and the log says so once); the Omni thinker with a manifest of
``video`` rows reads ``--num_frames`` frames and the sound track of each video
(``AVPromptCollator``, modality ``av``; ``--missing_audio silence`` for videos without sound).
Text-only causal LMs (any ``AutoModelForCausalLM``) get ``TextPromptCollator``: the prompt is
``--prompt`` formatted with the row's fields when it names one (``"{question}"``), else the row's
own ``prompt`` field (then ``question``), so a text manifest needs no ``--prompt``.
``--modality auto`` (the default) picks as the trainer does for ``data.modality: auto``: text for
a model without an audio encoder, or for an audio model when no row of the manifest has an
``audio``/``video`` path; av for a model with a vision encoder and rows with ``video``; else audio.

Rows are decoded longest first in batches of similar length (audio seconds, else a video row's
``duration`` field, else the prompt's characters; ``--no_sort`` keeps the manifest's order), so
short clips are not padded to long ones and a batch stops generating with its longest answer;
the output keeps the manifest's order. With ``--temperature`` > 0 a row's sample depends on the
batch it lands in (the seed is per batch), so sorting changes sampled outputs, not greedy ones.

``--url URL`` decodes with a model served elsewhere instead of ``--model``: each audio row is
sent to the server's ``/v1/audio/transcriptions`` (OpenAI's multipart form: the clip as ``file``,
the row's prompt as ``prompt``, ``temperature``), as our teacher server answers for any audio model
and vLLM for its transcription models; the output is the same JSONL. The server's own limit sets
the length (our server: ``--max-new-tokens``). Requests run ``--concurrency`` at a time and are
retried on connection errors; a row the server refuses stops the run naming the row and the answer.

What it leaves out: beam search, and scoring (``tools/compute_wer.py`` and the recipes' ``local/`` scorers do that).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

log = logging.getLogger("core.bin.decode")

MODALITIES = ("auto", "audio", "text", "av")


def decode_modality(model, manifest: str, modality: str = "auto") -> str:
    """``audio``, ``av`` or ``text`` for decoding ``manifest`` with ``model``: the trainer's
    ``resolve_modality`` rule (``data.modality``), so decoding formats prompts as training did."""
    from core import config as C
    from core.trainer import has_audio_encoder, resolve_modality

    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if modality == "audio" and not has_audio_encoder(model):
        raise ValueError(f"--modality audio: the model ({type(model).__name__}) has no audio encoder; "
                         "use --modality text (or auto)")
    return resolve_modality(C.TrainConfig(data=C.DataConfig(train=str(manifest), modality=modality)), model)


def length_order(rows: list[dict]) -> list[int]:
    """Indices of ``rows``, longest first (``core.data.manifest.length_keys``)."""
    from core.data.manifest import length_keys

    keys = length_keys(rows)
    return sorted(range(len(rows)), key=lambda i: keys[i], reverse=True)


def decode(model_dir: str, manifest: str, out: str, *, prompt: str = "", batch_size: int = 32,
           max_new_tokens: int = 32, target_field: str = "text", as_manifest: bool = False,
           temperature: float = 0.0, seed: int = 0, modality: str = "auto", num_frames: int = 8,
           missing_audio: str = "error", sort_by_length: bool = True, device: str = "auto") -> dict:
    from core import config as C
    from core.data.collate import make_collator
    from core.trainer import read_rows
    from core.models import load_model_and_processor, special_token_ids
    from core.sampling import generate_completions
    from core.utils.dist import device as pick_device
    from core.utils.logging import setup_console

    setup_console()
    dev = pick_device(device)  # a ValueError naming the choice before the model is loaded
    model, proc = load_model_and_processor(model_dir, device=str(dev))
    model.eval()
    tok = getattr(proc, "tokenizer", proc)
    mode = decode_modality(model, manifest, modality)
    if mode != "text" and not prompt:
        raise ValueError(f"--prompt is required for {mode} prompts: the user turn's text after the media, formatted "
                         "with each row's fields (e.g. 'Transcribe the audio.', '{question}')")
    data = C.DataConfig(train=str(manifest), prompt=prompt, num_frames=num_frames, missing_audio=missing_audio)
    rows = read_rows(str(manifest), C.TrainConfig(data=data), mode, key="--manifest")
    col = make_collator(mode, proc, data)
    order = length_order(rows) if sort_by_length else list(range(len(rows)))
    hyps: list[str] = [""] * len(rows)
    t0 = time.time()
    for i in tqdm(range(0, len(rows), batch_size), desc=f"decode {Path(manifest).name}", leave=False):
        idx = order[i: i + batch_size]
        chunk = [rows[j] for j in idx]
        with torch.no_grad():  # not set_grad_enabled(False): a caller may train in this process afterwards
            _, comp = generate_completions(model, col.prompts(chunk).to(dev), tok, do_sample=temperature > 0,
                                           temperature=temperature or 1.0, max_new_tokens=max_new_tokens,
                                           suppress_ids=special_token_ids(proc), eos_ids=[tok.eos_token_id],
                                           seed=seed + i, return_logp=False)
        for j, h in zip(idx, comp.texts):
            hyps[j] = h
    secs = time.time() - t0
    write_hypotheses(out, rows, hyps, target_field, as_manifest)
    return {"samples": len(rows), "seconds": round(secs, 2), "empty": sum(1 for h in hyps if not h),
            "modality": mode}


def write_hypotheses(out: str, rows: list[dict], hyps: list[str], target_field: str = "text",
                     as_manifest: bool = False) -> None:
    """``key``/``text`` (+ ``ref``) JSON lines, or with ``as_manifest`` the rows with the hypothesis
    as their ``target_field``. A manifest for training has no empty targets: rows whose hypothesis
    is empty are left out, and their number and first keys are logged (all empty: an error)."""
    from core.data.manifest import write_manifest
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if as_manifest:
        kept = [{**r, target_field: h} for r, h in zip(rows, hyps) if h.strip()]
        empty = [r["key"] for r, h in zip(rows, hyps) if not h.strip()]
        if rows and not kept:
            raise SystemExit(f"error: {out}: all {len(rows)} outputs are empty; there is nothing to train on "
                             "(is the model that decoded them trained?)")
        if empty:
            log.warning("%s: %d of %d outputs are empty and left out of the manifest (e.g. %s)", out, len(empty),
                        len(rows), ", ".join(empty[:5]))
        write_manifest(out, kept)
        return
    with open(out, "w") as f:
        for r, h in zip(rows, hyps):
            rec = {"key": r["key"], "text": h}
            if r.get(target_field) is not None:
                rec["ref"] = r[target_field]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def decode_remote(url: str, manifest: str, out: str, *, prompt: str, target_field: str = "text",
                  as_manifest: bool = False, temperature: float = 0.0, served_model: str | None = None,
                  api_key: str | None = None, concurrency: int = 8, timeout: float = 300.0,
                  retries: int = 3) -> dict:
    """Each audio row of ``manifest`` transcribed (captioned ...) by the server at ``url``
    (``/v1/audio/transcriptions``) with its formatted ``prompt``; written as ``decode`` writes."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from core import config as C
    from core.trainer import read_rows

    if not prompt:
        raise ValueError("--prompt is required with --url: the instruction sent with each clip")
    base = url.rstrip("/").removesuffix("/v1")
    data = C.DataConfig(train=str(manifest), prompt=prompt)
    rows = read_rows(str(manifest), C.TrainConfig(data=data), "audio", key="--manifest")
    if not rows:
        raise ValueError(f"{manifest}: no rows")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(row: dict) -> str:
        try:
            text = prompt.format(**row)
        except (KeyError, IndexError) as e:
            raise ValueError(f"--prompt {prompt!r} names a field row {row['key']!r} lacks: {e}") from None
        form = {"prompt": text, "response_format": "json", "temperature": str(temperature)}
        if served_model:
            form["model"] = served_model
        audio = Path(row["audio"])
        for attempt in range(retries + 1):
            try:
                with open(audio, "rb") as f:
                    r = httpx.post(f"{base}/v1/audio/transcriptions", data=form, headers=headers, timeout=timeout,
                                   files={"file": (audio.name, f, "application/octet-stream")})
                break
            except httpx.TransportError as e:
                if attempt == retries:
                    raise RuntimeError(f"{base}/v1/audio/transcriptions unreachable after {retries + 1} tries "
                                       f"({type(e).__name__}: {e})") from None
                time.sleep(min(2.0 ** attempt, 10.0))
        if r.status_code != 200:
            raise RuntimeError(f"{base}/v1/audio/transcriptions answered {r.status_code} for row {row['key']!r} "
                               f"({audio}): {r.text[:300]}")
        return str(r.json().get("text", ""))

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        hyps = list(tqdm(pool.map(one, rows), total=len(rows), desc=f"decode {Path(manifest).name} @ {base}",
                         leave=False))
    secs = time.time() - t0
    write_hypotheses(out, rows, hyps, target_field, as_manifest)
    return {"samples": len(rows), "seconds": round(secs, 2), "empty": sum(1 for h in hyps if not h),
            "modality": "audio", "url": base}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory (save_pretrained folder)")
    src.add_argument("--url", help="a server to decode with instead (our teacher server, or vLLM for its "
                                   "transcription models): /v1/audio/transcriptions per audio row")
    ap.add_argument("--manifest", required=True, help="input manifest (JSONL)")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--prompt", default="",
                    help="audio / audio-visual models (required): the user turn's text after the media, formatted "
                         "with the row's fields, e.g. 'Transcribe the audio.'; text models: used only when it names "
                         "a field, else each row's 'prompt' (or 'question') field")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--target_field", default="text")
    ap.add_argument("--as_manifest", action="store_true", help="write input rows with the hypothesis as target")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--modality", choices=MODALITIES, default="auto",
                    help="auto: text for a model without an audio encoder or a manifest without media, av for a "
                         "model with a vision encoder and video rows, else audio")
    ap.add_argument("--num_frames", type=int, default=8, help="av: frames sampled uniformly from each video")
    ap.add_argument("--no_sort", action="store_true",
                    help="batch rows in the manifest's order instead of longest first (the output order is the same)")
    ap.add_argument("--missing_audio", choices=("error", "silence"), default="error",
                    help="av: a video without a sound track is an error, or gets silence")
    ap.add_argument("--device", default="auto",
                    help="auto (this process's GPU when there is one, else the CPU) | cpu | cuda | cuda:N")
    ap.add_argument("--served_model", default=None, help="--url: the model name the server expects")
    ap.add_argument("--api_key", default=None, help="--url: bearer token (default: $TEACHER_API_KEY when set)")
    ap.add_argument("--concurrency", type=int, default=8, help="--url: requests in flight")
    args = ap.parse_args(argv)
    if args.url:
        import os
        try:
            info = decode_remote(args.url, args.manifest, args.out, prompt=args.prompt, target_field=args.target_field,
                                 as_manifest=args.as_manifest, temperature=args.temperature,
                                 served_model=args.served_model, concurrency=args.concurrency,
                                 api_key=args.api_key or os.environ.get("TEACHER_API_KEY") or None)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(json.dumps(info))
        return 0
    try:
        info = decode(args.model, args.manifest, args.out, prompt=args.prompt, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, target_field=args.target_field,
                      as_manifest=args.as_manifest, temperature=args.temperature, modality=args.modality,
                      num_frames=args.num_frames, missing_audio=args.missing_audio,
                      sort_by_length=not args.no_sort, device=args.device)
    except (FileNotFoundError, ValueError) as e:  # a missing model or manifest, a bad manifest line (file:line): ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
