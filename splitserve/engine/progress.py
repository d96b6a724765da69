"""A dependency-free progress bar on stderr for long work (model load, benchmarks)."""

from __future__ import annotations

import sys
import time


def progress(items, desc: str, stream=None, enabled: bool = True):
    """Yield from ``items`` while drawing ``desc [#####     ] i/n  t s`` on stderr."""
    stream = stream or sys.stderr
    items = list(items)
    total, start = len(items), time.perf_counter()
    if not enabled or total == 0:
        yield from items
        return
    for i, item in enumerate(items, 1):
        yield item
        if i == total or i % max(1, total // 10) == 0:
            done = int(30 * i / total)
            stream.write(f"\r{desc} [{'#' * done}{' ' * (30 - done)}] {i}/{total} "
                         f"{time.perf_counter() - start:.1f}s")
            stream.flush()
    stream.write("\n")
    stream.flush()
