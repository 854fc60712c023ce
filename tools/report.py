"""Small helpers the recipes share for reporting results.

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


def update_readme(readme: str | Path, text: str) -> None:
    readme = Path(readme)
    if not readme.is_file():
        return
    s = readme.read_text()
    if START in s and END in s:
        a, b = s.index(START) + len(START), s.index(END)
        s = s[:a] + "\n" + text + "\n" + s[b:]
    else:
        s += f"\n{START}\n{text}\n{END}\n"
    readme.write_text(s)


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
