"""Timing helper shared by the benchmarks: medians, because this machine's figures are noisy."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_s(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_section(path: Path, title: str, section: str) -> None:
    """Replace (or append) the `title` section of a markdown file (docs/benchmarks.md): each
    section belongs to the command that measures it, the others stay as they are."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    section = section.rstrip() + "\n"
    start = text.find(title + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)
