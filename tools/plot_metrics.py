#!/usr/bin/env python3
"""Draw training curves from metrics JSONL files as PNGs.

Input: one or more JSONL files, one JSON object per line, as the trainer logs them: ``step`` and
numeric fields (``loss``, ``kl``, ``reward``, ``reward/<name>``, ``completion_len``, ``lr``,
``grad_norm`` ...). Lines may carry different keys; nested objects are flattened with ``/``
(``{"reward": {"acc": 1}}`` becomes ``reward/acc``); strings, booleans, lists, null, NaN and inf
are ignored. A line without ``step`` is placed at the previous step + 1. A broken line is an
error naming ``file:line``, except a broken *last* line (a log still being written), which is
skipped with a warning on stderr.

Output (matplotlib, Agg backend, no display needed): one ``<key>.png`` per key with every run
overlaid (``/`` in a key becomes ``_`` in the file name) and a grid of all keys in
``metrics.png``. ``smooth=N`` draws the trailing N-point moving average over the raw curve,
which stays visible but faint.

Importable: ``load_metrics(path) -> dict[key, (steps, values)]`` and
``plot(files, keys=None, out_dir, labels=None, smooth=1) -> list of written paths``
(``keys=None``: every numeric key found).

Left out: TensorBoard event files, wall-clock x axes, log scales chosen automatically, and
interactive display.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["load_metrics", "plot", "main"]


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        elif math.isfinite(v):
            out[name] = float(v)
    return out


def load_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) from one metrics JSONL file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    series: dict[str, tuple[list[float], list[float]]] = {}
    problems = []
    step = -1.0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            msg = f"{path}:{i + 1}: {e}"
            if i == last:
                print(f"plot_metrics: skipping the unfinished last line {msg}", file=sys.stderr)
                continue
            problems.append(msg)
            continue
        s = obj.get("step")
        step = float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else step + 1
        for k, v in _flatten(obj).items():
            if k == "step":
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(step)
            ys.append(v)
    if problems:
        raise ValueError(f"{len(problems)} bad line(s):\n  " + "\n  ".join(problems[:20]))
    return series


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(y) < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - n, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _default_labels(files: Sequence[Path]) -> list[str]:
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    parents = [f"{f.parent.name}/{f.stem}" if f.parent.name else f.stem for f in files]
    if len(set(parents)) == len(parents):
        return parents
    return [str(f) for f in files]


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_") or "metric"


def _draw(ax, runs, key: str, smooth: int) -> bool:
    drawn = False
    for i, (label, series) in enumerate(runs):
        if key not in series:
            continue
        xs, ys = (np.asarray(v, dtype=float) for v in series[key])
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        color = f"C{i % 10}"
        if smooth > 1:
            ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(xs, _smooth(ys, smooth), color=color, linewidth=1.5, label=label)
        else:
            ax.plot(xs, ys, color=color, linewidth=1.2, label=label,
                    marker="o" if len(xs) == 1 else None)
        drawn = True
    ax.set_title(key + (f" (smooth {smooth})" if smooth > 1 else ""), fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if drawn and len(runs) > 1:
        ax.legend(fontsize=7)
    return drawn


def plot(files: Sequence[str | Path], keys: Sequence[str] | None = None, out_dir: str | Path = ".",
         labels: Sequence[str] | None = None, smooth: int = 1) -> list[Path]:
    """Write ``<key>.png`` per key and ``metrics.png`` into ``out_dir``; return the paths written.

    Keys missing from every file are warned about on stderr and skipped; if no requested key is
    found anywhere, ``ValueError``.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no metrics files given")
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"{len(labels)} labels for {len(files)} files")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    labels = list(labels) if labels is not None else _default_labels(files)
    runs = [(lab, load_metrics(f)) for lab, f in zip(labels, files)]
    found = []
    for _, s in runs:
        found.extend(k for k in s if k not in found)
    if keys is None or len(keys) == 0:
        keys = found
    else:
        absent = [k for k in keys if k not in found]
        if absent:
            print(f"plot_metrics: not in any file, skipped: {', '.join(absent)}", file=sys.stderr)
        keys = [k for k in keys if k in found]
    if not keys:
        raise ValueError(f"nothing to plot: no requested key found in {', '.join(map(str, files))}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    used_names: set[str] = set()
    for key in keys:
        name = _safe_name(key)
        while name in used_names or name == "metrics":
            name += "_"
        used_names.add(name)
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        _draw(fig.add_subplot(1, 1, 1), runs, key, smooth)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        written.append(path)

    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        _draw(fig.add_subplot(nrows, ncols, i + 1), runs, key, smooth)
    fig.tight_layout()
    path = out_dir / "metrics.png"
    fig.savefig(path)
    written.append(path)
    return written


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(
        description="Plot training metrics from JSONL logs (one object per line with 'step' and numeric "
                    "fields) into one PNG per key, runs overlaid, plus a grid of all keys in metrics.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--metrics", nargs="+", required=True, help="metrics JSONL files, one per run")
    p.add_argument("--labels", nargs="+", help="legend label per file (default: file names)")
    p.add_argument("--keys", nargs="+", help="keys to plot, e.g. loss kl reward/acc (default: every numeric key)")
    p.add_argument("--out_dir", required=True, help="folder for the PNGs (created)")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving-average window; 1 = raw values only")
    a = p.parse_args(argv)
    try:
        paths = plot(a.metrics, a.keys, a.out_dir, labels=a.labels, smooth=a.smooth)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        raise SystemExit(1)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
