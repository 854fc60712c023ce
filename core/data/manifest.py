"""JSONL manifests: read and validate them up front, write them atomically.

A manifest holds one JSON object per line (blank lines are ignored):

    key                    unique id (non-empty string), required
    audio / video          media path; relative paths resolve against the manifest's folder
    begin_time, end_time   optional seconds of a segment; -1, null or absent = start / end of file
    task                   asr | caption | qa | av_qa | ... (any non-empty string)
    text                   transcript or caption: a non-empty string or a non-empty list of them
    question               MCQ / QA question (non-empty string)
    choices, answer        MCQ: choices is a list of >= 2 non-empty strings, answer one of them
    anything else          kept untouched as metadata (category, difficulty, speaker, ...)

`read_manifest` checks every line before returning anything and raises one
`ManifestError` listing every problem of the file, one per line of the message
as `path:line: field: problem`. With `skip_bad=True` bad lines are dropped
instead, but never silently: each is written with its reasons to a side file
(`<manifest>.bad.jsonl` by default) and the count is logged as a warning.

Returned rows are the parsed dicts with `audio` / `video` replaced by absolute
paths; JSON null counts as absent for optional fields. Rows carry no line
number (rows are identified by their unique `key`, and extra private fields
would reach reward functions as keyword arguments).

With `check_media=True` (the default) every audio file is opened with
soundfile's header reader (existence, readability, > 0 frames, segment inside
the file); video files are checked to exist and be non-empty and, for a row
without its own `audio`, to have an audio track (opened with decord when it is
installed), since the audio-visual input takes the video's sound. Left out:
decoding samples, tokenisation, filtering by duration, sharding, and any
network paths or URLs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .audio import SEGMENT_TOLERANCE_S, AudioError, AudioInfo, audio_info

__all__ = ["ManifestError", "Problem", "read_manifest", "write_manifest",
           "load_manifest_dataset", "MEDIA_FIELDS"]

logger = logging.getLogger(__name__)

MEDIA_FIELDS = ("audio", "video")
# The message of a ManifestError lists at most this many problems (all of them
# stay in `.problems`); a wrong corpus path can otherwise print 100k lines.
MAX_LISTED_PROBLEMS = 1000


@dataclass(frozen=True)
class Problem:
    """One problem of a manifest: `path:line: field: message` (line None = whole file)."""

    path: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.field}: {self.message}"


class ManifestError(ValueError):
    """Invalid manifest; the message lists all problems, `.problems` holds them as `Problem`s."""

    def __init__(self, path: str, problems: list[Problem], note: str = ""):
        self.path = path
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{path}: {n} problem{'s' if n != 1 else ''} in manifest"
        lines = [str(p) for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {n - MAX_LISTED_PROBLEMS} more (all in ManifestError.problems; "
                         f"skip_bad=True writes every bad line with its reasons to a side file)")
        if note:
            lines.append(note)
        super().__init__(head + ":\n" + "\n".join(lines))


# ----------------------------------------------------------------------------- checks

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_empty(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return not v.strip()
    if isinstance(v, (list, tuple, dict)):
        return len(v) == 0
    return False


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _describe(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


def _check_text(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v.strip() else "empty text"
    if isinstance(v, list):
        if not v:
            return "empty list of texts"
        bad = [i for i, t in enumerate(v) if not _nonempty_str(t)]
        if bad:
            return f"list item(s) {bad} must be non-empty strings"
        return None
    return f"must be a non-empty string or list of strings, got {type(v).__name__}"


def _check_times(row: dict, errs: list[tuple[str, str]]) -> tuple[float | None, float | None]:
    """Validates begin_time / end_time; returns them with unset values as None."""
    out: dict[str, float | None] = {}
    for name in ("begin_time", "end_time"):
        v = row.get(name)
        out[name] = None
        if v is None:
            continue
        if not _is_number(v) or not math.isfinite(v):
            errs.append((name, f"must be a number of seconds (or -1), got {_describe(v)}"))
        elif v == -1:
            continue
        elif v < 0:
            errs.append((name, f"must be >= 0, or -1 for the whole file, got {v}"))
        else:
            out[name] = float(v)
    b, e = out["begin_time"], out["end_time"]
    if b is not None and e is not None and e <= b:
        errs.append(("end_time", f"end_time {e} must be greater than begin_time {b}"))
        return None, None
    return b, e


def _check_mcq(row: dict, errs: list[tuple[str, str]]) -> None:
    q = row.get("question")
    if q is not None and not _nonempty_str(q):
        errs.append(("question", f"must be a non-empty string, got {_describe(q)}"))
    choices, answer = row.get("choices"), row.get("answer")
    choices_ok = False
    if choices is not None:
        if not isinstance(choices, list):
            errs.append(("choices", f"must be a list of strings, got {type(choices).__name__}"))
        elif len(choices) < 2:
            errs.append(("choices", f"needs at least 2 choices, got {len(choices)}"))
        elif not all(_nonempty_str(c) for c in choices):
            bad = [i for i, c in enumerate(choices) if not _nonempty_str(c)]
            errs.append(("choices", f"choice(s) {bad} must be non-empty strings"))
        else:
            choices_ok = True
    if answer is None:
        return
    if not _nonempty_str(answer):
        errs.append(("answer", f"must be a non-empty string, got {_describe(answer)}"))
    elif choices_ok and answer not in choices and not _is_letter_answer(answer, len(choices)):
        errs.append(("answer", f"{_describe(answer)} is neither one of choices {_describe(choices, 200)} nor "
                               f"their letter(s) A-{chr(ord('A') + len(choices) - 1)}"))


def _is_letter_answer(answer: str, n: int) -> bool:
    """``"B"``, or a comma-separated set such as ``"A,C"`` (IntentBench's ``emer_ov_mc``): letters of
    the first ``n`` choices (the audio-visual recipe answers with the letter of a lettered choice)."""
    parts = [p.strip() for p in answer.split(",")]
    return all(len(p) == 1 and "A" <= p <= chr(ord("A") + n - 1) for p in parts)


def _resolve(p: str, base: str) -> str:
    p = os.path.expanduser(p)
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(base, p))


NO_AUDIO_TRACK = "the video has no audio track (give the row an 'audio' path, or a video with sound)"


class _MediaChecker:
    """Caches header checks so that many segments of one recording open it once."""

    def __init__(self):
        self._audio: dict[str, AudioInfo | AudioError] = {}
        self._video: dict[str, str | None] = {}
        self._video_audio: dict[str, str | None] = {}

    def audio(self, path: str) -> AudioInfo:
        if path not in self._audio:
            try:
                self._audio[path] = audio_info(path)
            except AudioError as e:
                self._audio[path] = e
        got = self._audio[path]
        if isinstance(got, AudioError):
            raise got
        return got

    def video(self, path: str) -> str | None:
        if path not in self._video:
            if not os.path.exists(path):
                msg = f"{path}: no such video file"
            elif not os.path.isfile(path):
                msg = f"{path}: not a regular file"
            elif os.path.getsize(path) == 0:
                msg = f"{path}: empty file (0 bytes)"
            else:
                msg = None
            self._video[path] = msg
        return self._video[path]

    def video_audio(self, path: str) -> str | None:
        """A problem with the audio track of an existing video, or None (also when decord is absent)."""
        if path not in self._video_audio:
            try:
                import decord
            except ImportError:
                return None
            msg = None
            try:
                decord.AudioReader(path, ctx=decord.cpu(0), sample_rate=-1, mono=True)
            except Exception as e:  # decord.DECORDError
                text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                msg = (f"{path}: {NO_AUDIO_TRACK}" if "audio stream" in text.lower()
                       else f"{path}: unreadable video ({text[:200]})")
            self._video_audio[path] = msg
        return self._video_audio[path]


def _check_row(row: dict, base: str, require: tuple[str, ...], require_media: bool,
               media: _MediaChecker | None, seen: dict[str, int], lineno: int, silent_video_ok: bool = False
               ) -> list[tuple[str, str]]:
    """Validates one parsed row in place (media paths made absolute); returns (field, problem)s."""
    errs: list[tuple[str, str]] = []

    key = row.get("key")
    if key is None:
        errs.append(("key", "missing (every row needs a unique key)"))
    elif not _nonempty_str(key):
        errs.append(("key", f"must be a non-empty string, got {_describe(key)}"))
    elif key in seen:
        errs.append(("key", f"duplicate key {key!r} (first on line {seen[key]})"))
    else:
        seen[key] = lineno

    for name in require:
        if name not in row or row[name] is None:
            errs.append((name, "required field is missing"))
        elif _is_empty(row[name]):
            errs.append((name, "required field is empty"))

    resolved: dict[str, str] = {}
    for name in MEDIA_FIELDS:
        v = row.get(name)
        if v is None:
            continue
        if not _nonempty_str(v):
            if not (name in require and _is_empty(v)):  # else reported above
                errs.append((name, f"must be a non-empty path string, got {_describe(v)}"))
            continue
        resolved[name] = row[name] = _resolve(v, base)
    if require_media and all(row.get(n) is None for n in MEDIA_FIELDS):
        errs.append(("audio", "no 'audio' or 'video' path in this row"))

    for name in ("task",):
        v = row.get(name)
        if v is not None and not _nonempty_str(v):
            errs.append((name, f"must be a non-empty string, got {_describe(v)}"))
    text = row.get("text")
    if text is not None and not ("text" in require and _is_empty(text)):  # else reported above
        msg = _check_text(text)
        if msg:
            errs.append(("text", msg))
    begin, end = _check_times(row, errs)
    _check_mcq(row, errs)

    if media is not None:
        if "audio" in resolved:
            try:
                info = media.audio(resolved["audio"])
            except AudioError as e:
                errs.append(("audio", str(e)))
            else:
                dur = info.duration
                if begin is not None and begin >= dur:
                    errs.append(("begin_time", f"begin_time {begin} is not before the end of "
                                               f"{info.path} (duration {dur:.3f} s)"))
                if end is not None and end > dur + SEGMENT_TOLERANCE_S:
                    errs.append(("end_time", f"end_time {end} is past the end of "
                                             f"{info.path} (duration {dur:.3f} s)"))
        if "video" in resolved:
            msg = media.video(resolved["video"])
            if not msg and "audio" not in resolved:
                msg = media.video_audio(resolved["video"])
                if msg and silent_video_ok and msg.endswith(NO_AUDIO_TRACK):
                    msg = None
            if msg:
                errs.append(("video", msg))
    return errs


# ----------------------------------------------------------------------------- read

def read_manifest(path: str | os.PathLike, *, require: Iterable[str] = (), check_media: bool = True,
                  skip_bad: bool = False, bad_lines_out: str | os.PathLike | None = None,
                  require_media: bool = True, allow_empty: bool = False,
                  silent_video_ok: bool = False) -> list[dict]:
    """Reads and validates a JSONL manifest; returns its rows (media paths made absolute).

    Args:
        path: the manifest (UTF-8 JSONL).
        require: fields every row must have, present and non-empty (e.g. ("text",)).
        check_media: open every audio file's header (exists, readable, > 0 frames,
            segment inside the file) and check video files exist.
        skip_bad: drop bad lines instead of raising; they are written with their
            reasons to `bad_lines_out` and counted in a logged warning.
        bad_lines_out: side file for skipped lines (default `<manifest>.bad.jsonl`);
            only written when a line was skipped.
        require_media: every row needs an `audio` or a `video` path.
        allow_empty: return [] for a manifest without samples instead of raising.
        silent_video_ok: a video without an audio track (and no `audio` path) is accepted
            (the caller gives it silence); an unreadable video is still a problem.

    Raises:
        FileNotFoundError: the manifest itself does not exist.
        ManifestError: listing every problem as `path:line: field: problem`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such manifest file")
    base = os.path.dirname(os.path.abspath(path))
    require = tuple(require)
    media = _MediaChecker() if check_media else None
    seen: dict[str, int] = {}
    rows: list[dict] = []
    problems: list[Problem] = []
    bad: list[dict] = []
    n_lines = 0

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            errs: list[tuple[str, str]] = []
            row = None
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                text = raw.decode("utf-8", errors="replace")
                errs.append(("encoding", f"not valid UTF-8 ({e.reason} at byte {e.start})"))
            if not text.strip():
                continue
            n_lines += 1
            if not errs:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    errs.append(("json", f"malformed JSON ({e.msg} at column {e.colno})"))
                else:
                    if not isinstance(row, dict):
                        errs.append(("json", f"expected a JSON object, got {type(row).__name__}"))
                        row = None
            if row is not None:
                errs = _check_row(row, base, require, require_media, media, seen, lineno, silent_video_ok)
            if errs:
                problems.extend(Problem(path, lineno, fld, msg) for fld, msg in errs)
                bad.append({"manifest": os.path.abspath(path), "line": lineno,
                            "key": row.get("key") if row is not None else None,
                            "reasons": [f"{fld}: {msg}" for fld, msg in errs],
                            "raw": text.rstrip("\r\n")})
            else:
                rows.append(row)

    if problems and not skip_bad:
        raise ManifestError(path, problems)
    note = ""
    if bad:
        out = os.fspath(bad_lines_out) if bad_lines_out is not None else path + ".bad.jsonl"
        write_manifest(out, bad)
        logger.warning("%s: skipped %d bad line(s) of %d; lines and reasons written to %s",
                       path, len(bad), n_lines, out)
        note = f"{len(bad)} bad line(s) written with reasons to {out}"
    if not rows and not allow_empty:
        what = "no valid samples left after skipping bad lines" if bad else "no samples"
        raise ManifestError(path, problems or [Problem(path, None, "manifest", what)],
                            note=note if problems else "")
    return rows


# ----------------------------------------------------------------------------- write

def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "tolist"):  # numpy scalars and arrays, torch tensors
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_manifest(path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Writes rows as JSONL atomically (temp file in the same folder + os.replace).

    Values are written as given (relative paths stay relative; note that they
    resolve against the folder of the file written). Returns the row count.
    Raises TypeError/ValueError naming the row index for a non-mapping row or a
    value JSON cannot hold (NaN, arbitrary objects); the target is then untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                if not isinstance(row, Mapping):
                    raise TypeError(f"{path}: row {i} is a {type(row).__name__}, not a mapping")
                try:
                    line = json.dumps(dict(row), ensure_ascii=False, allow_nan=False,
                                      default=_json_default)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"{path}: row {i}: {e}") from e
                f.write(line + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n


# ----------------------------------------------------------------------------- datasets

def load_manifest_dataset(path: str | os.PathLike, **options):
    """`read_manifest(path, **options)` as a `datasets.Dataset` (Arrow-backed).

    Columns are the union of all rows' fields (first-seen order); a field a row
    lacks is None there. A column mixing strings and lists of strings (e.g.
    captions with one or several references) is stored as lists of strings.
    A column whose values Arrow cannot hold in one type raises ManifestError
    naming the field.
    """
    import datasets

    path = os.fspath(path)
    rows = read_manifest(path, **options)
    columns: dict[str, list] = {}
    for row in rows:
        for k in row:
            columns.setdefault(k, [])
    for k, values in columns.items():
        values.extend(row.get(k) for row in rows)
        kinds = {type(v) for v in values if v is not None}
        if kinds == {str, list}:
            columns[k] = [[v] if isinstance(v, str) else v for v in values]
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as e:  # pyarrow.ArrowInvalid / ArrowTypeError
        problems = []
        for k, values in columns.items():
            try:
                datasets.Dataset.from_dict({k: values})
            except Exception as col_err:
                kinds = sorted({type(v).__name__ for v in values if v is not None})
                problems.append(Problem(path, None, k, f"values of types {kinds} cannot share one "
                                                       f"Arrow column ({col_err})"))
        if not problems:
            raise
        raise ManifestError(path, problems) from e


def length_keys(rows: list[dict]) -> list[tuple[float, int]]:
    """A sortable length per row: ``(audio seconds, prompt characters)``. The seconds are
    ``end_time - begin_time``, else the audio file's header, else a video row's ``duration``
    field (0 when none is known); the characters those of ``prompt``, ``question`` or ``text``."""
    import soundfile as sf

    def given(r: dict, name: str):  # None and -1 mean "from the start" / "to the end" (the manifest format)
        v = r.get(name)
        return None if v is None or float(v) < 0 else float(v)

    def seconds(r: dict) -> float:
        if r.get("audio"):
            begin, end = given(r, "begin_time") or 0.0, given(r, "end_time")
            if end is None:
                try:
                    end = float(sf.info(str(r["audio"])).duration)
                except (RuntimeError, OSError):  # already checked by the manifest reader; no reorder on a surprise
                    return 0.0
            return end - begin
        d = r.get("duration")
        return float(d) if isinstance(d, (int, float)) else 0.0

    def chars(r: dict) -> int:
        return len(str(r.get("prompt") or r.get("question") or r.get("text") or ""))

    return [(seconds(r), chars(r)) for r in rows]
