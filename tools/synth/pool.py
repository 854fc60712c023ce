"""Run many independent media-making jobs on a thread pool, with a tqdm bar, and report every
failure together.

``run_pool(fn, n, label, workers=2, progress=True, desc="jobs", error=RuntimeError)`` calls
``fn(i)`` for ``i`` in ``range(n)`` (each call typically runs its own subprocess, so threads are
enough) and returns the results in job order. All jobs are attempted; if any failed, one
``error`` lists how many and the first five, each as ``job i (label(i)): message``.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, TypeVar

T = TypeVar("T")


def run_pool(fn: Callable[[int], T], n: int, label: Callable[[int], str], workers: int = 2, progress: bool = True,
             desc: str = "jobs", error: type[Exception] = RuntimeError) -> list[T]:
    out: list = [None] * n
    errors: list[tuple[int, str]] = []
    bar = None
    if progress and n:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=desc, unit="clip", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 10.0)
    try:
        with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
            futures = {pool.submit(fn, i): i for i in range(n)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    out[i] = fut.result()
                except Exception as e:  # collected and raised together below
                    errors.append((i, f"{type(e).__name__}: {e}"))
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if errors:
        errors.sort()
        shown = "\n  ".join(f"job {i} ({label(i)}): {m}" for i, m in errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise error(f"{len(errors)} of {n} {desc} jobs failed:\n  {shown}{more}")
    return out
