#!/usr/bin/env python3
"""What it costs this disk to make one small upload durable, each way, single-threaded.

The server benchmark's floors (``bench_server.py --bare-durable``, ``--bare-journal``) measure
whole servers; this measures only the writes and syncs they make, one after another in one
thread, so that the disk's own cost of each way is seen without HTTP, threads or other uploads:

- ``new file``: what our store and the durable floor do: the body into a new unnamed file,
  ``fsync``, ``linkat`` to its name, ``fsync`` of its folder;
- ``log, fdatasync``: an entry written over a block of a preallocated, already-written log,
  then ``fdatasync`` (no metadata to write: the journal floor, with one upload at a time);
- ``log, O_DSYNC``: the same entry written through ``O_DSYNC``;
- ``log, sync_file_range``: the entry's range written out and waited for, then ``fdatasync``;
- ``append, fdatasync``: the entry appended to a log that grows (each sync also writes the
  file's size and a newly allocated block): what preallocating the log saves;
- ``flush alone``: ``fdatasync`` of the log with nothing written: the disk's cache flush and
  the system call.

    python scripts/bench_sync.py                  # 300 of each, 3 rounds, in a temporary folder of TMPDIR
    python scripts/bench_sync.py --count 1000 --tmp-dir /srv/cache  # on the disk the cache will use

Each round runs every way in turn, rotating which goes first; the figures are over all rounds
(median, 10th and 90th percentile, in ms), with each median's ratio to ``new file``. Whether a
flush reaches stable storage is the device's business: the line ``write cache`` says whether the
kernel sends flushes to it at all (``write through``: it does not, and syncs cost no flush).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from _bench import load_average, machine_line, run_in_workdir
from _journal import Journal, entry_size
from bench_server import SMALL_PAYLOAD, BareApp, filesystem_line, render_table

ENTRY = SMALL_PAYLOAD + 600  # about what a packed 4 KiB artifact weighs


def write_cache(path: Path) -> str:
    """The block device's write cache as the kernel sees it ('write back' means syncs send flushes)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for candidate in (base / "queue" / "write_cache", base.parent / "queue" / "write_cache"):
        try:
            return candidate.read_text().strip()
        except OSError:
            continue
    return "unknown"


def ways(workdir: Path, count: int, round_index: int) -> tuple[dict[str, Callable[[int], None]], Callable[[], None]]:
    """Each way of making the n-th entry durable, on fresh files of this round; and what closes them."""
    here = workdir / f"round-{round_index}"
    here.mkdir()
    body = os.urandom(ENTRY)
    keys = [hashlib.sha256(b"%d:%d" % (round_index, n)).digest() for n in range(count)]
    logs = {mode: Journal(here / f"{mode}.log", count * entry_size(ENTRY), mode) for mode in ("each", "dsync", "range")}
    (here / "index.json").write_text(json.dumps({}))
    (here / "files").mkdir()
    app = BareApp(here, here, here / "files")
    growing = os.open(here / "growing.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def new_file(n: int) -> None:
        app.store_durably({"CONTENT_LENGTH": str(ENTRY), "wsgi.input": io.BytesIO(body)}, keys[n].hex())

    def append(n: int) -> None:
        os.write(growing, body)
        os.fdatasync(growing)

    def close() -> None:
        for log in logs.values():
            log.close()
        os.close(growing)

    return {
        "new file": new_file,
        "log, fdatasync": lambda n: logs["each"].append(keys[n], body),
        "log, O_DSYNC": lambda n: logs["dsync"].append(keys[n], body),
        "log, sync_file_range": lambda n: logs["range"].append(keys[n], body),
        "append, fdatasync": append,
        "flush alone": lambda n: os.fdatasync(logs["each"].fd),
    }, close


def measure(workdir: Path, count: int, rounds: int) -> int:
    print(machine_line())
    print(filesystem_line(workdir))
    print(f"write cache: {write_cache(workdir)}; {count} entries of {ENTRY} bytes per way and round, {rounds} rounds")
    print(f"load: 1-minute load average {load_average()} at the start", flush=True)
    times: dict[str, list[float]] = {}
    for round_index in range(rounds):
        chosen, close = ways(workdir, count, round_index)
        names = list(chosen)
        shift = round_index % len(names)
        try:
            for name in names[shift:] + names[:shift]:
                run = chosen[name]
                spent = times.setdefault(name, [])
                for n in range(count):
                    started = time.perf_counter()
                    run(n)
                    spent.append(time.perf_counter() - started)
        finally:
            close()
    print(f"load: 1-minute load average {load_average()} at the end")
    reference = statistics.median(times["new file"])
    rows = []
    for name, spent in times.items():
        spent.sort()
        median = statistics.median(spent)
        rows.append([name, *(f"{x * 1000:.3f}" for x in (median, spent[len(spent) // 10], spent[len(spent) * 9 // 10])),
                     f"{median / reference:.2f}"])
    print()
    print(render_table(["way (single-threaded)", "median ms", "p10 ms", "p90 ms", "/ new file"], rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_sync.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="entries per way and round (default: 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, rotating which way goes first (default: 3)")
    parser.add_argument("--tmp-dir", help="where the temporary folder goes (put it on the disk to measure)")
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000 or not 1 <= args.rounds <= 20:
        parser.error("--count must be in 1..100000 and --rounds in 1..20")
    return run_in_workdir("polykit-sync-", args.tmp_dir, lambda workdir: measure(workdir, args.count, args.rounds))


if __name__ == "__main__":
    sys.exit(main())
