"""Where a run's time goes: with ``POLYKIT_PROFILE=1`` each phase's time is printed at the end.

Phases are coarse (the workspace, the input listing, hashing, one task's restore), so that
measuring costs nothing worth mentioning, and off (the default) it is one flag test per phase.
A phase that runs on several threads at once (downloads, uploads, restores) is summed over
them, so such lines can add up to more than the wall time; the report says which ones are.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

ENABLED = os.environ.get("POLYKIT_PROFILE", "") not in ("", "0")
from . import STARTED  # when the package was first imported

_lock = threading.Lock()
_totals: dict[str, list] = {}  # phase -> [seconds, count, summed over threads]


def add(name: str, seconds: float, threads: bool = False) -> None:
    """Count ``seconds`` towards ``name``."""
    with _lock:
        entry = _totals.setdefault(name, [0.0, 0, threads])
        entry[0] += seconds
        entry[1] += 1


@contextmanager
def phase(name: str, threads: bool = False) -> Iterator[None]:
    """Time the block as ``name``; ``threads`` marks a phase that runs on several threads at once."""
    if not ENABLED:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        add(name, time.perf_counter() - started, threads)


def report(stream: TextIO | None = None) -> None:
    """One ``profile:`` line per phase, in the order phases first ran, then the total."""
    if not ENABLED:
        return
    stream = stream or sys.stderr
    with _lock:
        rows = list(_totals.items())
    for name, (seconds, count, threads) in rows:
        note = f" ({count} times" + (", summed over threads)" if threads else ")") if count > 1 or threads else ""
        stream.write(f"profile: {name:<34} {seconds * 1000:9.1f} ms{note}\n")
    stream.write(f"profile: {'total, from the first import':<34} {(time.perf_counter() - STARTED) * 1000:9.1f} ms\n")
    stream.flush()
