"""What the recipes' corpus prep scripts share (``local/prepare_*.py``: MMAU, MMSU, AudioCaps,
Clotho, Daily-Omni, IntentBench).

- ``PrepError``: every problem of a corpus copy, reported at once;
- ``add_bad``: records one bad item's problems and its side-file entry;
- ``write_outputs``: the end of a ``prepare()``: raise on problems, or write the bad items to
  ``<out>.bad.jsonl`` (``--skip_bad``), then the manifest;
- ``make_parser`` / ``add_bad_args`` / ``run_cli``: the common parts of the command lines.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from core.data.manifest import write_manifest


class PrepError(ValueError):
    """Problems of a corpus copy; the message lists all of them, ``.problems`` holds them."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s):\n" + "\n".join(problems))


def nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def add_bad(problems: list[str], bad: list[dict], source, index: int, ident, errs: list[tuple[str, str]],
            item) -> None:
    """Appends ``source: item N (id X): field: problem`` lines to ``problems`` and the item with its
    reasons to ``bad`` (the side file's rows)."""
    problems += [f"{source}: item {index} (id {ident}): {f}: {m}" for f, m in errs]
    bad.append({"index": index, "id": ident, "reasons": [f"{f}: {m}" for f, m in errs], "item": item})


def write_outputs(out: str, rows: list[dict], problems: list[str], bad: list[dict], *, skip_bad: bool,
                  bad_out: str | None, none_left: str) -> str | None:
    """Raises PrepError on ``problems`` unless ``skip_bad``; else writes ``bad`` (if any) to ``bad_out``
    (default ``<out>.bad.jsonl``) and ``rows`` to ``out``. Returns the side file's path or None.
    With no row left, raises PrepError with the problems and ``none_left`` (after the side file)."""
    if problems and not skip_bad:
        raise PrepError(problems)
    bad_file = None
    if bad:
        bad_file = bad_out or out + ".bad.jsonl"
        write_manifest(bad_file, bad)
    if not rows:
        raise PrepError(problems + [none_left])
    write_manifest(out, rows)
    return bad_file


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_bad_args(ap: argparse.ArgumentParser, what: str) -> None:
    """``--skip_bad`` and ``--bad_out``; ``what`` names the bad units ("items", "records")."""
    ap.add_argument("--skip_bad", action="store_true",
                    help=f"write bad {what} with reasons to a side file instead of failing")
    ap.add_argument("--bad_out", help="side file for --skip_bad (default: <out>.bad.jsonl)")


def skipped_note(st: dict, what: str) -> str:
    """`` | skipped N bad <what>(s), listed with reasons in FILE`` when items were skipped, else ""."""
    if not st["bad"]:
        return ""
    return f" | skipped {st['bad']} bad {what}(s), listed with reasons in {st['bad_file']}"


def run_cli(prepare: Callable[[], dict], summary: Callable[[dict], str]) -> int:
    """Runs ``prepare()``: prints ``summary`` of its result (0), or ``error: ...`` to stderr (1)."""
    try:
        st = prepare()
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(st))
    return 0
