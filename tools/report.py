"""Small helpers the recipes share for reporting results.

``update_readme(readme, text)``: replace what lies between the ``<!-- results:start -->`` and
``<!-- results:end -->`` markers of a README with ``text`` (append the markers and the text when
they are missing). Left out: any formatting of the table itself (each recipe knows its columns).
"""
from __future__ import annotations

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
