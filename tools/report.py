"""Small helpers the recipes share for reporting results.

``write_results(exp, text, readme=None, smoke=False)``: what the last stage of every recipe calls
with its results table: writes ``<exp>/RESULTS.md`` (beside ``results.json``) and, only when asked
(``run.sh --update_readme true`` passes ``--readme README.md``; never for a smoke run), refreshes
the README's results section too, so that a user's run leaves the repository's files as they were.
``update_readme(readme, text)``: replace what lies between the ``<!-- results:start -->`` and
``<!-- results:end -->`` markers of a README with ``text`` (append the markers and the text when
they are missing). ``refresh_stage_seconds(exp)``: copy ``<exp>/stage_seconds.json`` (the
seconds ``run.sh`` recorded per stage) into ``<exp>/results.json`` with their total, once the last
stage's own time is known. Left out: any formatting of the table itself (each recipe knows its
columns).
"""
from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: str | Path, text: str, tag: str = "results") -> None:
    """``tag``: the section's markers, ``<!-- TAG:start -->`` and ``<!-- TAG:end -->``."""
    readme = Path(readme)
    if not readme.is_file():
        return
    s = readme.read_text()
    start, end = f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"
    if start in s and end in s:
        a, b = s.index(start) + len(start), s.index(end)
        s = s[:a] + "\n" + text + "\n" + s[b:]
    else:
        s += f"\n{start}\n{text}\n{end}\n"
    readme.write_text(s)


def write_results(exp: str | Path, text: str, readme: str | Path | None = None, smoke: bool = False,
                  title: str = "Results") -> Path:
    """Write ``text`` (a Markdown table and its notes) to ``<exp>/RESULTS.md``; with ``readme``, also
    into that README between the results markers, unless ``smoke``. Returns RESULTS.md's path."""
    exp = Path(exp)
    exp.mkdir(parents=True, exist_ok=True)
    out = exp / "RESULTS.md"
    out.write_text(f"# {title}\n\n{text.strip()}\n", encoding="utf-8")
    print(f"results table written to {out}")
    if readme:
        if smoke:
            print(f"smoke run: {readme} left as it is")
        elif not Path(readme).is_file():
            raise SystemExit(f"--readme {readme}: no such file")
        else:
            update_readme(readme, text)
            print(f"results table written into {readme}")
    return out


def refresh_stage_seconds(exp: str | Path) -> int:
    """Put ``stage_seconds`` and ``total_seconds`` into ``<exp>/results.json``; print them."""
    exp = Path(exp)
    res_path, times_path = exp / "results.json", exp / "stage_seconds.json"
    if not res_path.is_file():
        raise SystemExit(f"{res_path} not found")
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    r = json.loads(res_path.read_text())
    r["stage_seconds"] = times
    r["total_seconds"] = round(sum(times.values()), 1)
    res_path.write_text(json.dumps(r, indent=2, ensure_ascii=False))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f" | total {r['total_seconds']:.0f}")
    return 0
