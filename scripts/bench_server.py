#!/usr/bin/env python3
"""Benchmark of the cache server's wire protocol, against a bare waitress baseline and the Node server.

By default the servers are measured back to back, on 127.0.0.1 and a fresh temporary storage
folder each: ours (``python -m polykit_cache``), a bare waitress application with the same
waitress tuning that verifies nothing (PUT reads the body into a temporary file and answers 201;
GET streams a file with ``wsgi.file_wrapper``), and, when it is installed, the Node server
turborepo-remote-cache 2 (``npm install --prefix DIR turborepo-remote-cache@2``, then
``--node-dir DIR``; the checkout's ``.ci/tools`` is looked in too), on its local storage. The
ratio ours/bare is what the verification, the fsyncs and the bookkeeping cost; ours/node is
where we stand against the server most turbo users run (it neither verifies nor fsyncs, and
buffers every upload whole in memory); the absolute figures only describe this machine. With
``--bare-durable`` a fourth column, ``durable``, is the bare app making each upload as durable
as ours does (a new file synced, linked, its folder synced) and nothing else: ours/durable is
what our own work costs beyond the syncs, durable/node what the syncs cost on this disk. With
``--bare-journal`` a column ``journal`` is the bare app making each upload of up to 64 KiB
durable the way a database would: an entry appended to one preallocated log, answered after an
``fdatasync`` that started after its write, one sync shared by every upload waiting (group
commit); ``--bare-journal group,each,dsync,range`` adds a column for each other way of syncing
(see ``_journal.py``), and ``files`` one whose uploads also go to a file each, unsynced.

Every server gets the same artifacts at the same path, turbo's ``/v8/artifacts/{hash}?teamId=bench``
with a bearer token that each of them checks (``--api polykit`` measures ours and bare on
``/v1/artifacts/{key}`` instead, where our server also verifies every archive: zstd, tar,
manifest). Under the figures, a table of targets gives each line its ratio to the Node server and
to the bare app beside the target it has, and says whether it is met.

    python scripts/bench_server.py                 # ours, bare (and Node when found), 3 s per measurement
    python scripts/bench_server.py --node-dir DIR --rounds 2  # with the Node server in DIR, 2 rotated rounds
    python scripts/bench_server.py --quick         # smoke run for CI (small sizes, 1 s each)
    python scripts/bench_server.py --bare          # the baseline alone
    python scripts/bench_server.py --bare-durable  # also the baseline that syncs each upload as ours must
    python scripts/bench_server.py --bare-journal group,dsync  # also baselines logging small uploads, synced
    python scripts/bench_server.py --compare-with ../old-checkout  # also ours as an earlier version has it
    python scripts/bench_server.py --workers-sweep # ours with 1, 2 and one worker per CPU, unpinned
    python scripts/bench_server.py --threads-sweep 4,8,16  # ours with each number of threads
    python scripts/bench_server.py --api polykit   # ours and bare on polykit's own verified path
    python scripts/bench_server.py --rounds 3      # each server 3 times, rotating who goes first
    python scripts/bench_server.py --only "GET 4 KiB,HEAD 4 KiB"  # just the lines whose label holds a word
    python scripts/bench_server.py --no-baseline   # ours alone
    python scripts/bench_server.py --url http://127.0.0.1:8080 --path-template /cache/{key}
    python scripts/bench_server.py --s3             # the S3 store (a local moto server) beside the disk store

With ``--s3``, our server runs twice: on a bucket of a moto server started on loopback (moto's
threaded server; install the test extras) with a fresh tier, then on the disk store; the ratio
column is s3/disk. Reads after the seeding uploads are tier hits, which is what most reads of
a warm server are; uploads go through the bucket.

Measured: PUT, GET and HEAD requests per second for 4 KiB artifacts at 1 and 8 connections,
MiB/s for 1 MiB artifacts at 4 connections, MiB/s for one big artifact each way, the server's
CPU use during each measurement, and its peak RSS. Every downloaded body is hashed and checked
against the X-Artifact-Hash header and against the artifact that was uploaded; every upload uses
a key of its own, so each PUT is a real store (201), never a conflict.

The load generator is plain Python: persistent HTTP/1.1 connections, one process per connection,
each measurement bounded in time and in count. With two or more CPUs the server is pinned to one
and the load generator to another, so the two never compete for a core. With ``--rounds N`` each
server runs N times, the order rotating each round so that none always goes first, and every
figure is the median round's; the 1-minute load average at the start and the end is printed.

Exit status: 0 when every answer was a success and every check passed, 1 when not (the failures
are listed under the tables), 2 on a usage or start-up error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import hmac
import http.client
import io
import ipaddress
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Sequence

# scripts/ is on sys.path when a script runs
from _bench import find_node_tool, load_average, machine_line, node_server_env, stop_process, usable_cpus
from _journal import MAX_ENTRY, MODES as JOURNAL_MODES, Journal, LogFull, entry_size

ROOT = Path(__file__).resolve().parent.parent
try:
    from polykit_client.artifact import hash_file, pack
except ImportError:  # run from a checkout without the project installed
    sys.path.insert(0, str(ROOT))
    from polykit_client.artifact import hash_file, pack

BLOCK = 256 * 1024
SMALL_PAYLOAD = 4 * 1024
MID_PAYLOAD = 1024 * 1024
MIB = 1024 * 1024
LOCALHOST = "127.0.0.1"
DEFAULT_TEMPLATE = "/v1/artifacts/{key}"
# The paths of the servers we start (``--api``): turbo's, which all three serve, or polykit's own.
TEAM = "bench"
API_TEMPLATES = {"turbo": f"/v8/artifacts/{{key}}?teamId={TEAM}", "polykit": DEFAULT_TEMPLATE}
# Every server we start checks this bearer token (RFC 6750) on every request.
TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NODE_PACKAGE = ("turborepo-remote-cache", "dist/cli.js")
NODE_BODY_LIMIT = 100 * 1024 * 1024  # the Node server's default BODY_LIMIT
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# The pools of unique upload keys are sized for these rates (per second of measuring), and the
# 1 MiB pool is also capped in count to bound disk use and packing time. A faster server only runs
# out of keys early; its rate is then keys / time taken, and the table marks it.
SMALL_PUT_C1_RATE = 8000
SMALL_PUT_C8_RATE = 10000
MID_PUT_MIBPS = 400
MID_PUT_MAX = 1024
QUICK_MAX_PUTS = 3000
LOADGEN_SATURATED = 90.0
OTHER_BUSY = 25.0
SMALL_READ_SET = 64
MID_READ_SET = 16
PACK_BATCH = 256
# The server's performance targets: (measurement, the server it is compared with, the least ratio
# of ours to it); {big} is the big artifact's size (512 MiB unless --big-mib says otherwise).
SIDE_BY_SIDE_TARGETS = [
    ("PUT 4 KiB, 8 connections", "node", 1.0),
    ("PUT 1 MiB, 4 connections", "node", 1.0),
    ("PUT one {big}", "node", 1.5),
    ("GET 4 KiB, 8 connections", "bare", 0.95),
    ("HEAD 4 KiB, 8 connections", "bare", 0.95),
    ("GET one {big}", "bare", 0.8),
]
# --workers-sweep: the least ratio of N workers to one, unpinned.
SWEEP_TARGETS = [("PUT 4 KiB, 8 connections", 1.5), ("GET 4 KiB, 8 connections", 1.5)]
MAX_RSS_MIB = 100.0  # peak RSS of any server process, whatever the artifact's size

_LIVE_PROCESSES: list[multiprocessing.process.BaseProcess] = []


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One pre-generated artifact: its key, where its bytes are, and the size and digest to match.

    Upload pools are concatenated in a few pool files (``offset`` > 0 for all but the first)
    rather than tens of thousands of small files: creating and deleting that many files slows
    down later file creation on some filesystems, which would skew the server's upload figures.
    """

    key: str
    path: str
    size: int
    sha256: str
    offset: int = 0


@dataclass
class Corpus:
    """Every artifact a run needs, packed before any timing starts."""

    put_c1: list[Item]
    put_c8: list[Item]
    small_read: list[Item]
    mid_put: list[Item]
    mid_read: list[Item]
    big: Item


@dataclass(frozen=True)
class Phase:
    """One measurement: a method, a number of connections, the artifacts, and its bounds.

    ``cycle`` reuses the artifacts (reads); otherwise each is used once (uploads need fresh keys),
    so the count of requests is bounded by the pool as well as by ``seconds``. A ``one_shot``
    phase is meant to be bounded by its count (one big transfer), not by time.
    """

    label: str
    unit: str
    method: str
    concurrency: int
    items: Sequence[Item]
    cycle: bool
    seconds: float
    timeout: float
    one_shot: bool = False


@dataclass
class WorkerOutcome:
    """What one load-generating process saw; summed over the processes of a phase."""

    ok: int = 0
    nbytes: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    checked: int = 0
    bad: int = 0
    no_header: int = 0
    start: float = 0.0
    end: float = 0.0
    cpu: float = 0.0
    exhausted: bool = False


@dataclass
class PhaseResult:
    """One row of the report: the figure, what it cost each side in CPU, and what went wrong."""

    label: str
    unit: str
    value: float | None
    ok: int
    elapsed: float
    statuses: Counter
    errors: Counter
    checked: int
    bad: int
    no_header: int
    server_cpu: float | None
    loadgen_cpu: float
    other_cpu: float | None
    exhausted: bool

    @property
    def failures(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values()) + self.bad


@dataclass
class Target:
    """A server to measure: where it listens, the headers every request carries (its token), and
    its process when we know it."""

    name: str
    host: str
    port: int
    prefix: str
    template: str
    pid: int | None = None
    proc: subprocess.Popen | None = None
    storage: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def path(self, key: str) -> str:
        return self.prefix + self.template.format(key=key)


@dataclass
class TargetReport:
    name: str
    results: dict[str, PhaseResult]
    peak_rss_mib: float | None
    notes: list[str]


# --- machine ------------------------------------------------------------------------------------


def versions_line(node_cli: Path | None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    from polykit_client import zstd

    parts = []
    for dist in ("waitress", "zstandard"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} missing")
    text = "software: " + ", ".join(parts) + f", zstd backend {zstd.backend_name()}"
    if node_cli is not None:
        try:
            package = json.loads((node_cli.parent.parent / "package.json").read_text())["version"]
            node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, ValueError, KeyError, subprocess.SubprocessError):
            package = node = "unknown"
        text += f", {NODE_PACKAGE[0]} {package} on node {node}"
    return text


def filesystem_line(path: Path) -> str:
    """Which filesystem holds the storage: upload figures depend on it more than on the CPU."""
    try:
        dev = os.stat(path).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[2] != wanted:
                continue
            fstype, source = right.split()[:2]
            text = f"storage: {path} on {fstype} ({source}, mounted at {fields[4]})"
            journal = Path(f"/sys/fs/ext4/{Path(source).name}/journal_task")
            if fstype == "ext4" and journal.exists() and journal.read_text().strip() == "<none>":
                text += ("\n         ext4 without a journal: creating a file skips inodes freed in the last minutes,"
                         "\n         so upload figures drop after many deletions (such as a previous run's cleanup)")
            return text
    except (OSError, ValueError, IndexError):
        pass
    return f"storage: {path}"


def plan_cpus(enabled: bool) -> tuple[int | None, int | None]:
    """(server CPU, load generator CPU), or Nones when pinning is off or pointless."""
    if not enabled or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``kB`` figure of /proc/PID/status (VmHWM is the peak resident set size)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def machine_busy_seconds() -> float | None:
    """CPU time used by the whole machine (user, system, steal), from /proc/stat.

    Whatever the server and the load generator did not use of it was someone else's work: a
    figure measured while other programs ran is not a figure of the server.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, steal = (int(fields[i]) for i in (1, 2, 3, 8))
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The children of a process (our server's workers under ``--workers``)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def peak_rss_kib(pid: int) -> int | None:
    """The largest peak RSS of a server process and of its worker processes."""
    figures = [kib for p in (pid, *child_pids(pid)) if (kib := proc_status_kib(p, "VmHWM")) is not None]
    return max(figures) if figures else None


def proc_cpu_seconds(pid: int | None) -> float | None:
    """CPU time of a process and its worker processes, all threads."""
    if pid is None:
        return None
    figures = [_one_proc_cpu_seconds(p) for p in (pid, *child_pids(pid))]
    known = [f for f in figures if f is not None]
    return sum(known) if known else None


def _one_proc_cpu_seconds(pid: int) -> float | None:
    """CPU time of one process, all threads: a big transfer lasts only a few clock ticks, so the
    nanosecond figures of each thread's schedstat are used, and /proc/PID/stat where they lack."""
    try:
        total = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                total += int(Path(task.path, "schedstat").read_text().split()[0])
            except FileNotFoundError:
                continue  # a thread that just ended
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- corpus -------------------------------------------------------------------------------------


def cache_key(nonce: str, kind: str, index: int) -> str:
    """A fresh key per artifact and per run, so a persistent cache never answers 409."""
    return hashlib.sha256(f"polykit-bench:{nonce}:{kind}:{index}".encode()).hexdigest()


def write_random(path: Path, size: int) -> None:
    """An incompressible payload: zstd cannot shrink it, so the server moves every byte."""
    with open(path, "wb") as fh:
        left = size
        while left:
            step = min(left, 8 * MIB)
            fh.write(os.urandom(step))
            left -= step


def _ignore_sigint() -> None:
    """Child processes leave Ctrl-C to the parent, which stops them (SIGTERM) and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class FileSlice:
    """A read-only window on a file, so that http.client streams exactly one artifact."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._pos = offset
        self._left = size

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = os.pread(self._fd, want, self._pos)
        if not data:
            raise OSError(f"artifact file ends {self._left} bytes early")
        self._pos += len(data)
        self._left -= len(data)
        return data


def pack_batch(job: tuple[str, list[str], int, str, bool, bool]) -> list[Item]:
    """Pack artifacts of one payload size into ``out_dir`` (runs in a generator process).

    With ``fresh`` every artifact gets its own random payload; otherwise one random payload is
    shared by the batch (the server does not deduplicate, so only the keys need to differ).
    ``pooled`` artifacts go one after the other into a single pool file; the others get a file
    ``<key>.zst`` each, which the bare baseline can serve.
    """
    kind, keys, payload_size, out_dir, fresh, pooled = job
    work = Path(tempfile.mkdtemp(prefix=f"payload-{kind}-", dir=out_dir))
    try:
        if pooled:
            return _pack_pool(Path(out_dir) / f"pool-{kind}-{keys[0][:16]}.bin", work, kind, keys, payload_size, fresh)
        return _pack_files(Path(out_dir), work, kind, keys, payload_size, fresh)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pack_one(dest: BinaryIO, work: Path, kind: str, key: str, payload_size: int, new_payload: bool) -> None:
    if new_payload:
        write_random(work / "payload.bin", payload_size)
    pack(dest, work, ["payload.bin"], {"package": "bench", "task": kind, "command": "bench"}, cache_key=key)


def _pack_pool(pool_path: Path, work: Path, kind: str, keys: list[str], payload_size: int, fresh: bool) -> list[Item]:
    items: list[Item] = []
    with open(pool_path, "wb") as pool:
        for number, key in enumerate(keys):
            packed = io.BytesIO()
            _pack_one(packed, work, kind, key, payload_size, fresh or number == 0)
            data = packed.getvalue()
            items.append(Item(key, str(pool_path), len(data), hashlib.sha256(data).hexdigest(), pool.tell()))
            pool.write(data)
    return items


def _pack_files(out_dir: Path, work: Path, kind: str, keys: list[str], payload_size: int, fresh: bool) -> list[Item]:
    items: list[Item] = []
    for number, key in enumerate(keys):
        dest = out_dir / f"{key}.zst"
        with open(dest, "wb") as fh:
            _pack_one(fh, work, kind, key, payload_size, fresh or number == 0)
        sha, size = hash_file(dest)
        items.append(Item(key, str(dest), size, sha))
    return items


def build_corpus(out_dir: Path, seconds: float, big_bytes: int, processes: int, max_puts: int | None) -> Corpus:
    """Pack every artifact of the run with the project's own packer, on every core, before timing."""
    nonce = os.urandom(8).hex()
    put1 = max(200, math.ceil(seconds * SMALL_PUT_C1_RATE))
    put8 = max(200, math.ceil(seconds * SMALL_PUT_C8_RATE))
    if max_puts is not None:
        put1, put8 = min(put1, max_puts), min(put8, max_puts)
    mid_put = min(MID_PUT_MAX, max(32, math.ceil(seconds * MID_PUT_MIBPS)))
    plan = [  # kind, count, payload size, a fresh payload each, pooled
        ("put1", put1, SMALL_PAYLOAD, True, True),
        ("put8", put8, SMALL_PAYLOAD, True, True),
        ("read", SMALL_READ_SET, SMALL_PAYLOAD, True, False),
        ("mid", mid_put, MID_PAYLOAD, False, True),
        ("midread", MID_READ_SET, MID_PAYLOAD, True, False),
    ]
    jobs: list[tuple[str, list[str], int, str, bool, bool]] = []
    for kind, count, size, fresh, pooled in plan:
        keys = [cache_key(nonce, kind, i) for i in range(count)]
        batch = PACK_BATCH if size <= SMALL_PAYLOAD else PACK_BATCH // 4
        for start in range(0, count, batch):
            jobs.append((kind, keys[start : start + batch], size, str(out_dir), fresh, pooled))
    jobs.insert(0, ("big", [cache_key(nonce, "big", 0)], big_bytes, str(out_dir), True, False))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes, initializer=_ignore_sigint) as pool:
        batches = pool.map(pack_batch, jobs, chunksize=1)
    by_kind: dict[str, list[Item]] = {}
    for job, batch in zip(jobs, batches):
        by_kind.setdefault(job[0], []).extend(batch)
    corpus = Corpus(
        put_c1=by_kind["put1"], put_c8=by_kind["put8"], small_read=by_kind["read"],
        mid_put=by_kind["mid"], mid_read=by_kind["midread"], big=by_kind["big"][0],
    )
    served = [*corpus.small_read, *corpus.mid_read, corpus.big]
    (out_dir / "index.json").write_text(json.dumps({item.key: [item.size, item.sha256] for item in served}))
    return corpus


# --- the bare baseline server --------------------------------------------------------------------


class BareApp:
    """The least a cache can do over waitress: check the token, and no verification, no fsync, no bookkeeping.

    PUT reads the body into a temporary file and answers 201; GET and HEAD answer from an
    in-memory index of the pre-generated artifacts and stream the file with wsgi.file_wrapper.
    It serves polykit's path and turbo's (whatever the team).

    With ``durable_dir`` (``--bare-durable``), PUT instead makes each upload durable the way our
    disk store must, and does nothing else: the body into a new unnamed file (``O_TMPFILE``),
    ``fsync``, ``linkat`` to ``<durable_dir>/<key[0:2]>/<key>`` (256 folders, as our blob
    layout), ``fsync`` of that folder, then 201. Its figures are the floor the syncs set on this
    disk: what ours loses to it is our own work; what it loses to the Node server is the disk's.

    With a ``journal`` as well (``--bare-journal``), an upload of up to 64 KiB is instead an
    entry of that one preallocated log, answered once a sync that started after its write has
    ended (see ``_journal.py``: a group commit by default); larger ones go to ``durable_dir`` as
    above. Its figures are the floor of a store that keeps small entries in a log.

    With ``files_too`` (``--bare-journal files``), such an upload is also written to its file as
    in ``durable`` but with no sync (the log makes it durable; a replay would rewrite the file):
    the floor of keeping the store's layout, with the log only making uploads durable.
    """

    def __init__(self, serve_dir: Path, spool_dir: Path, durable_dir: Path | None = None,
                 journal: Journal | None = None, files_too: bool = False) -> None:
        self.serve_dir = serve_dir
        self.spool_dir = spool_dir
        self.durable_dir = durable_dir
        self.journal = journal
        self.files_too = files_too
        self.local = threading.local()
        self.index: dict[str, list] = json.loads((serve_dir / "index.json").read_text())
        self.pattern = re.compile(r"/v[18]/artifacts/([0-9a-f]{64})")
        self.authorization = AUTH["Authorization"].encode()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            return self.answer(start_response, "200 OK", b'{"status":"ok"}\n')
        match = self.pattern.fullmatch(path)
        if match is None:
            return self.answer(start_response, "404 Not Found", b'{"error":"not_found"}\n')
        if not hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), self.authorization):
            return self.answer(start_response, "401 Unauthorized", b'{"error":"unauthorized"}\n')
        key = match.group(1)
        if method == "PUT":
            if self.journal is not None and int(environ.get("CONTENT_LENGTH") or 0) <= MAX_ENTRY:
                try:
                    self.log_durably(environ, key)
                except LogFull:
                    return self.answer(start_response, "507 Insufficient Storage", b'{"error":"log_full"}\n')
            elif self.durable_dir is not None:
                self.store_durably(environ, key)
            else:
                self.discard(environ)
            return self.answer(start_response, "201 Created", b'{"key":"%s"}\n' % key.encode())
        entry = self.index.get(key)
        if entry is None or method not in ("GET", "HEAD"):
            return self.answer(start_response, "404 Not Found", b'{"error":"not_found"}\n')
        size, sha = entry
        start_response("200 OK", [
            ("Content-Type", "application/zstd"), ("Content-Length", str(size)),
            ("X-Artifact-Hash", sha), ("ETag", f'"{sha}"'),
        ])
        if method == "HEAD":
            return []
        fh = open(self.serve_dir / f"{key}.zst", "rb")
        return environ["wsgi.file_wrapper"](fh, BLOCK)

    def discard(self, environ: dict) -> None:
        """Copy the body into this thread's spool file, emptied each time.

        One reused file per thread rather than a new one per upload: freeing thousands of inodes
        makes later file creation slower on some filesystems (ext4 without a journal skips
        recently freed inodes for minutes), which would slow down the server measured next.
        """
        out = getattr(self.local, "spool", None)
        if out is None:
            out = self.local.spool = tempfile.TemporaryFile(dir=self.spool_dir)
        out.seek(0)
        out.truncate()
        copy_body(environ, out.write)

    def log_durably(self, environ: dict, key: str) -> None:
        """The body as an entry of the log, returning once that entry is durable."""
        data = bytearray()
        copy_body(environ, data.extend)  # at most MAX_ENTRY bytes: the caller checked the length
        body = bytes(data)
        if self.files_too:  # its name first: the link decides which of two uploads is first
            self.store_durably({"CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}, key, sync=False)
        self.journal.append(bytes.fromhex(key), body)

    def store_durably(self, environ: dict, key: str, sync: bool = True) -> None:
        """The body as a new file, synced before its name appears, its folder synced after
        (``sync=False``: the file and its name alone, left to the kernel's writeback)."""
        folder = self.durable_dir / key[:2]
        fd = os.open(self.spool_dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644)
        try:
            copy_body(environ, lambda data: os.write(fd, data))
            if sync:
                os.fsync(fd)
            try:
                try:
                    os.link(f"/proc/self/fd/{fd}", folder / key, src_dir_fd=self.anchor, follow_symlinks=True)
                except FileNotFoundError:
                    folder.mkdir(parents=True, exist_ok=True)
                    os.link(f"/proc/self/fd/{fd}", folder / key, src_dir_fd=self.anchor, follow_symlinks=True)
            except FileExistsError:
                pass  # first write wins
        finally:
            os.close(fd)
        if not sync:
            return
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @property
    def anchor(self) -> int:
        """A folder fd, so that os.link calls linkat(2) and follows the /proc link."""
        fd = getattr(self.local, "anchor", None)
        if fd is None:
            fd = self.local.anchor = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return fd

    @staticmethod
    def answer(start_response: Callable, status: str, body: bytes) -> list[bytes]:
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def copy_body(environ: dict, write: Callable[[bytes], object]) -> None:
    """Hand the request body to ``write`` in blocks, up to its declared length."""
    left = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"]
    while left > 0:
        data = body.read(min(left, BLOCK))
        if not data:
            break
        write(data)
        left -= len(data)


def serve_bare(argv: Sequence[str]) -> int:
    """Entry of the baseline server process: our waitress settings around :class:`BareApp`."""
    from waitress.server import create_server

    from polykit_cache.config import Config
    from polykit_cache.server import waitress_settings

    parser = argparse.ArgumentParser(prog="bench_server.py _bare")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--serve-dir", type=Path, required=True)
    parser.add_argument("--spool-dir", type=Path, required=True)
    parser.add_argument("--durable-dir", type=Path)
    parser.add_argument("--journal-mode", choices=JOURNAL_MODES)
    parser.add_argument("--files-too", action="store_true")
    parser.add_argument("--journal-bytes", type=int, default=0)
    args = parser.parse_args(list(argv))
    config = Config(bind=LOCALHOST, port=args.port, threads=args.threads, max_artifact_size=1 << 40)
    journal = None
    if args.journal_mode:  # written in full before the server listens, so before any timing
        journal = Journal(args.durable_dir / "journal.log", args.journal_bytes, args.journal_mode)
    app = BareApp(args.serve_dir, args.spool_dir, args.durable_dir, journal, args.files_too)
    server = create_server(app, **waitress_settings(config))
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    try:
        server.run()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.close()
    return 0


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


# --- server processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """Pin the server before it starts any thread, and have it stop if this process dies."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def setup() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if libc is not None:
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def start_server(name: str, cmd: list[str], port: int, workdir: Path, cpu: int | None, storage: Path | None,
                 template: str, env: dict[str, str] | None = None, health: str = "/healthz", code: Path = ROOT) -> Target:
    """Start a server process, wait until it answers ``health`` with 200, and describe it as a target.

    ``code``: the checkout whose modules it runs (this one, or another version's for ``--compare-with``).
    """
    spool = workdir / f"spool-{name}"
    spool.mkdir()
    env = dict(env or os.environ, TMPDIR=str(spool), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code), env.get("PYTHONPATH", "")]))
    log = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_child_setup(cpu), cwd=workdir)
    log.close()
    target = Target(name, LOCALHOST, port, "", template, proc.pid, proc, storage, dict(AUTH))
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        conn = http.client.HTTPConnection(LOCALHOST, port, timeout=1)
        try:
            conn.request("GET", health, headers=target.headers)
            if conn.getresponse().status == 200:
                return target
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
        finally:
            conn.close()
    stop_server(target)
    tail = (workdir / f"{name}.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the {name} server did not start on port {port}:\n{tail}")


def ours_env() -> dict[str, str]:
    """Our server's environment: the benchmark's token, read-write."""
    return dict(os.environ, POLYKIT_CACHE_TOKENS=f"read-write {TOKEN}")


def start_ours(workdir: Path, cpu: int | None, threads: int, log_level: str, big_bytes: int, template: str,
               workers: int = 1, name: str = "ours", code: Path = ROOT) -> Target:
    storage = workdir / f"storage-{name}"
    port = free_port()
    cmd = [sys.executable, "-m", "polykit_cache", "serve", "--bind", LOCALHOST, "--port", str(port),
           "--storage-dir", str(storage), "--threads", str(threads), "--log-level", log_level,
           "--workers", str(workers)]
    if big_bytes > 1 << 30:
        cmd += ["--max-artifact-size", str(big_bytes)]
    return start_server(name, cmd, port, workdir, cpu, storage, template, ours_env(), code=code)


def start_node(workdir: Path, cpu: int | None, cli: Path, big_bytes: int, template: str) -> Target:
    """turborepo-remote-cache on its local storage, with a body limit that lets the big artifact in."""
    storage = workdir / "storage-node"
    port = free_port()
    env = node_server_env(port, storage, TOKEN, max(NODE_BODY_LIMIT, big_bytes + MIB))
    return start_server("node", ["node", str(cli)], port, workdir, cpu, storage, template, env,
                        health="/v8/artifacts/status")


# Helper processes (the moto server) stopped by cleanup().
_HELPERS: list[subprocess.Popen] = []
S3_BUCKET = "bench"


def serve_moto(argv: Sequence[str]) -> int:
    """The ``_moto`` subcommand: moto's S3 on loopback, threaded, for --s3."""
    parser = argparse.ArgumentParser(prog="bench_server.py _moto")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(list(argv))
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    signal.signal(signal.SIGTERM, _raise_exit)
    server = make_server(LOCALHOST, args.port, DomainDispatcherApplication(create_backend_app), threaded=True)
    try:
        server.serve_forever()
    except SystemExit:
        pass
    return 0


def start_s3(workdir: Path, cpu: int | None, threads: int, log_level: str, big_bytes: int, template: str) -> Target:
    """A moto server with one bucket, and our server on it (its tier in the work folder)."""
    import importlib.util

    if importlib.util.find_spec("moto") is None:  # checked here: the moto process imports it
        raise RuntimeError("--s3 needs moto: install the test extras (pip install -e '.[test]')")
    from polykit_cache.s3client import Endpoint, S3Client, S3Error
    from polykit_cache.sigv4 import Credentials
    from polykit_cache.store import StorageUnavailable

    moto_port = free_port()
    log = open(workdir / "moto.log", "wb")
    moto_proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_moto", "--port", str(moto_port)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                 preexec_fn=_child_setup(None))
    log.close()
    _HELPERS.append(moto_proc)
    url = f"http://{LOCALHOST}:{moto_port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        client = S3Client(Endpoint.make(url, "us-east-1", S3_BUCKET, "path"), Credentials("bench", "bench"), deadline=1)
        try:
            client.request("PUT", "")  # create the bucket
            break
        except (S3Error, StorageUnavailable) as exc:  # moto still starting
            if time.monotonic() > deadline or moto_proc.poll() is not None:
                raise RuntimeError(f"moto did not start: {exc}") from None
            time.sleep(0.2)
        finally:
            client.close()
    env = dict(ours_env(), AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    storage = workdir / "tier-s3"
    port = free_port()
    cmd = [sys.executable, "-m", "polykit_cache", "serve", "--bind", LOCALHOST, "--port", str(port),
           "--storage-dir", str(storage), "--threads", str(threads), "--log-level", log_level,
           "--storage", f"s3://{S3_BUCKET}/cache", "--s3-endpoint", url]
    if big_bytes > 1 << 30:
        cmd += ["--max-artifact-size", str(big_bytes)]
    return start_server("s3", cmd, port, workdir, cpu, storage, template, env)


# --bare-journal's choices: a way of syncing the log (see _journal.py), or "files": the group
# commit with every upload also written to its file, unsynced.
JOURNAL_FLOORS = (*JOURNAL_MODES, "files")


def journal_kind(floor: str) -> str:
    """The column of a journal floor: ``journal`` for the group commit, ``journal-FLOOR`` for the others."""
    return "journal" if floor == "group" else f"journal-{floor}"


def journal_floor(kind: str) -> str | None:
    """Which journal floor a server kind is, None when it is not one."""
    return next((floor for floor in JOURNAL_FLOORS if journal_kind(floor) == kind), None)


def start_bare(workdir: Path, serve_dir: Path, cpu: int | None, threads: int, template: str,
               name: str = "bare", journal_bytes: int = 0) -> Target:
    """The bare baseline; named ``durable`` it stores every upload durably, named as a journal floor
    it logs small ones in a log of ``journal_bytes`` (see BareApp)."""
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_bare", "--port", str(port), "--threads", str(threads),
           "--serve-dir", str(serve_dir), "--spool-dir", str(workdir / f"spool-{name}")]
    storage = None
    floor = journal_floor(name)
    if name == "durable" or floor is not None:
        storage = workdir / f"storage-{name}"
        storage.mkdir()
        cmd += ["--durable-dir", str(storage)]
    if floor is not None:
        mode = floor if floor in JOURNAL_MODES else "group"
        cmd += ["--journal-mode", mode, "--journal-bytes", str(journal_bytes)]
        if floor == "files":
            cmd.append("--files-too")
    return start_server(name, cmd, port, workdir, cpu, storage, template)


def journal_bytes_needed(corpus: Corpus, seconds: float, only: Sequence[str]) -> int:
    """A log with room for every small upload the chosen measurements can make (each at most once)."""
    items = {item.key: item for _, phase in phases(corpus, seconds, "", only) if phase.method == "PUT"
             for item in phase.items if item.size <= MAX_ENTRY}
    return max(MIB, sum(entry_size(item.size) for item in items.values()))


def stop_server(target: Target) -> None:
    stop_process(target.proc, STOP_TIMEOUT)


def start_kind(kind: str, args: argparse.Namespace, workdir: Path, artifacts: Path, cpu: int | None,
               big_bytes: int, journal_bytes: int = 0) -> Target:
    """Start one of the servers chosen_servers() names."""
    template = API_TEMPLATES[args.api]
    if kind == "ours":
        return start_ours(workdir, cpu, args.threads, args.server_log_level, big_bytes, template, args.workers)
    if kind == "before":
        return start_ours(workdir, cpu, args.threads, args.server_log_level, big_bytes, template, args.workers,
                          kind, args.compare_with)
    if kind.startswith("ours-t"):
        return start_ours(workdir, cpu, int(kind[len("ours-t"):]), args.server_log_level, big_bytes, template,
                          args.workers, kind)
    if kind.startswith("ours-w"):
        return start_ours(workdir, cpu, args.threads, args.server_log_level, big_bytes, template,
                          int(kind[len("ours-w"):]), kind)
    if kind == "s3":
        return start_s3(workdir, cpu, args.threads, args.server_log_level, big_bytes, template)
    if kind == "node":
        return start_node(workdir, cpu, args.node_cli, big_bytes, template)
    return start_bare(workdir, artifacts, cpu, args.threads, template, kind, journal_bytes)


def discard_state(workdir: Path, target: Target) -> None:
    """Remove a stopped server's storage and spool, so the next round starts it afresh."""
    for folder in (target.storage, workdir / f"spool-{target.name}"):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def median_report(runs: list[TargetReport]) -> TargetReport:
    """One server's rounds as one report: each measurement's median round, the largest peak RSS."""
    if len(runs) == 1:
        return runs[0]
    results = {}
    for label in runs[0].results:
        ranked = sorted((r.results[label] for r in runs), key=lambda x: (x.value is None, x.value or 0))
        results[label] = ranked[(len(ranked) - 1) // 2]
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    notes = [f"round {i + 1}: {note}" for i, r in enumerate(runs) for note in r.notes]
    # A failure in any round fails the run, not only one in the median round.
    notes += [f"round {i + 1}: {label}: {describe_failures(x)}" for i, r in enumerate(runs)
              for label, x in r.results.items() if x.failures and x is not results[label]]
    return TargetReport(runs[0].name, results, max(rss) if rss else None, notes)


def external_target(url: str, template: str, pid: int | None) -> Target:
    """A server someone else started; refused unless it is on a loopback address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://HOST[:PORT][/PREFIX], not {url!r}")
    try:
        address = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError as exc:
        raise ValueError(f"cannot resolve {parts.hostname}: {exc}") from None
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"{url} is not a loopback address; this benchmark only loads the local machine")
    if "{key}" not in template:
        raise ValueError("--path-template must contain {key}")
    return Target("target", parts.hostname, parts.port or 80, parts.path.rstrip("/"), template, pid)


# --- load generation -----------------------------------------------------------------------------


def new_connection(target: Target, timeout: float) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout, blocksize=BLOCK)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def do_put(conn: http.client.HTTPConnection, path: str, item: Item, body: bytes | FileSlice, auth: dict[str, str]) -> int:
    """Upload one artifact; small bodies go from memory, large ones stream from their file.

    The Content-Type is turbo's (the Node server refuses any other with 415; ours ignores it).
    """
    headers = {"Content-Length": str(item.size), "Content-Type": "application/octet-stream", **auth}
    conn.request("PUT", path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def do_get(conn: http.client.HTTPConnection, path: str, item: Item, buf: bytearray, out: WorkerOutcome,
           auth: dict[str, str]) -> int:
    """Download one artifact and check its SHA-256 against X-Artifact-Hash and the upload."""
    conn.request("GET", path, headers=auth)
    resp = conn.getresponse()
    if resp.status != 200:
        resp.read()
        return resp.status
    digest = hashlib.sha256()
    view = memoryview(buf)
    got = 0
    while True:
        n = resp.readinto(buf)
        if not n:
            break
        digest.update(view[:n])
        got += n
    out.nbytes += got
    out.checked += 1
    header = resp.getheader("X-Artifact-Hash")
    body_sha = digest.hexdigest()
    if header is None:
        out.no_header += 1
    if got != item.size or body_sha != item.sha256 or (header is not None and header.strip() != body_sha):
        out.bad += 1
    return resp.status


def do_head(conn: http.client.HTTPConnection, path: str, item: Item, out: WorkerOutcome, auth: dict[str, str]) -> int:
    """HEAD announces the artifact's size and hash without a body; each that is announced is checked.

    (The Node server announces neither: its HEAD answers only whether the artifact is there.)
    """
    conn.request("HEAD", path, headers=auth)
    resp = conn.getresponse()
    resp.read()
    if resp.status == 200:
        out.checked += 1
        header = resp.getheader("X-Artifact-Hash")
        length = resp.getheader("Content-Length")
        if header is None:
            out.no_header += 1
        if (length is not None and length != str(item.size)) or (header is not None and header.strip() != item.sha256):
            out.bad += 1
    return resp.status


def worker_items(phase: Phase, worker: int) -> list[Item]:
    """Uploads: a disjoint stripe of the pool per worker. Reads: every item, from its own offset."""
    if not phase.cycle:
        return list(phase.items[worker :: phase.concurrency])
    shift = worker * len(phase.items) // phase.concurrency
    return list(phase.items[shift:]) + list(phase.items[:shift])


def run_worker(target: Target, phase: Phase, worker: int, barrier, queue) -> None:
    """One connection's loop, in its own process; reports a WorkerOutcome even when it fails."""
    _ignore_sigint()
    out = WorkerOutcome()
    try:
        items = worker_items(phase, worker)
        files: dict[str, int] = {}
        if phase.method == "PUT":
            for item in items:
                if item.path not in files:
                    files[item.path] = os.open(item.path, os.O_RDONLY)
            preload = [os.pread(files[i.path], i.size, i.offset) if i.size <= 64 * 1024 else None for i in items]
        buf = bytearray(BLOCK)
        conn = new_connection(target, phase.timeout)
        barrier.wait()
        out.start = time.monotonic()
        cpu0 = time.process_time()
        deadline = out.start + phase.seconds
        index = 0
        while time.monotonic() < deadline:
            if index >= len(items) and not phase.cycle:
                out.exhausted = bool(items)
                break
            item = items[index % len(items)]
            path = target.path(item.key)
            try:
                if phase.method == "PUT":
                    body = preload[index] or FileSlice(files[item.path], item.offset, item.size)
                    status = do_put(conn, path, item, body, target.headers)
                elif phase.method == "GET":
                    status = do_get(conn, path, item, buf, out, target.headers)
                else:
                    status = do_head(conn, path, item, out, target.headers)
            except (OSError, http.client.HTTPException) as exc:
                out.errors[type(exc).__name__] += 1
                conn.close()
                conn = new_connection(target, phase.timeout)
                status = 0
            index += 1
            if 200 <= status < 300:
                out.ok += 1
                if phase.method == "PUT":
                    out.nbytes += item.size
            elif status:
                out.statuses[status] += 1
        out.end = time.monotonic()
        out.cpu = time.process_time() - cpu0
        conn.close()
    except BaseException as exc:  # the parent must always hear back
        barrier.abort()  # release the others if this one never got to the start line
        out.errors[f"{type(exc).__name__}: {exc}"] += 1
        out.end = out.end or time.monotonic()
    queue.put(out)


def run_phase(target: Target, phase: Phase) -> PhaseResult:
    """Fork one process per connection, release them together, and sum what they report."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(phase.concurrency + 1)
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=run_worker, args=(target, phase, w, barrier, queue), daemon=True)
             for w in range(phase.concurrency)]
    _LIVE_PROCESSES.extend(procs)
    for proc in procs:
        proc.start()
    outcomes: list[WorkerOutcome] = []
    try:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass  # a worker failed to start; it and the others report why
        cpu0, busy0, own0 = proc_cpu_seconds(target.pid), machine_busy_seconds(), time.process_time()
        give_up = time.monotonic() + phase.seconds + phase.timeout + 30
        while len(outcomes) < len(procs):
            if not queue.empty():
                outcomes.append(queue.get())
            elif not any(p.is_alive() for p in procs) and queue.empty():
                raise RuntimeError(f"{phase.label}: a load generator process died without reporting")
            elif time.monotonic() > give_up:
                raise RuntimeError(f"{phase.label}: the load generator did not finish in time")
            else:
                time.sleep(0.005)
        cpu1, busy1, own1 = proc_cpu_seconds(target.pid), machine_busy_seconds(), time.process_time()
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            _LIVE_PROCESSES.remove(proc)
    server = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    busy = None if busy0 is None or busy1 is None else busy1 - busy0 - (own1 - own0)
    return summarise(phase, outcomes, server, busy)


def summarise(phase: Phase, outcomes: list[WorkerOutcome], server: float | None, busy: float | None) -> PhaseResult:
    """Sum the workers' outcomes; CPU figures become % of one core over the phase's wall time."""
    started = [o.start for o in outcomes if o.start]
    elapsed = max(o.end for o in outcomes) - min(started) if started else 0.0
    total = WorkerOutcome()
    for o in outcomes:
        total.ok += o.ok
        total.nbytes += o.nbytes
        total.statuses.update(o.statuses)
        total.errors.update(o.errors)
        total.checked += o.checked
        total.bad += o.bad
        total.no_header += o.no_header
        total.cpu += o.cpu
        total.exhausted = total.exhausted or (o.exhausted and not phase.one_shot)
    value: float | None = None
    if elapsed > 0 and total.ok:
        value = total.ok / elapsed if phase.unit == "req/s" else total.nbytes / elapsed / MIB
    def percent(seconds: float | None) -> float | None:
        return None if seconds is None or elapsed <= 0 else max(0.0, seconds / elapsed * 100)

    other = None if busy is None else busy - (server or 0.0) - total.cpu
    return PhaseResult(
        phase.label, phase.unit, value, total.ok, elapsed, total.statuses, total.errors, total.checked,
        total.bad, total.no_header, percent(server), percent(total.cpu) or 0.0, percent(other), total.exhausted,
    )


# --- the measurements ----------------------------------------------------------------------------


def phases(corpus: Corpus, seconds: float, big_label: str, only: Sequence[str] = ()) -> list[tuple[bool, Phase]]:
    """Every measurement in order, each flagged as reported (True) or preparation (False).

    ``only``: words of the labels to keep (``--only``, case-insensitive); the reads' seeding
    uploads stay whenever a kept measurement reads.
    """
    small, mid, big = corpus.small_read, corpus.mid_read, corpus.big
    short, long = 30.0, max(120.0, big.size / (5 * MIB))
    every = [
        (True, Phase("PUT 4 KiB, 1 connection", "req/s", "PUT", 1, corpus.put_c1, False, seconds, short)),
        (True, Phase("PUT 4 KiB, 8 connections", "req/s", "PUT", 8, corpus.put_c8, False, seconds, short)),
        (False, Phase("seed reads", "req/s", "PUT", 1, small + mid, False, 600.0, short)),
        (True, Phase("GET 4 KiB, 1 connection", "req/s", "GET", 1, small, True, seconds, short)),
        (True, Phase("GET 4 KiB, 8 connections", "req/s", "GET", 8, small, True, seconds, short)),
        (True, Phase("HEAD 4 KiB, 1 connection", "req/s", "HEAD", 1, small, True, seconds, short)),
        (True, Phase("HEAD 4 KiB, 8 connections", "req/s", "HEAD", 8, small, True, seconds, short)),
        (True, Phase("PUT 1 MiB, 4 connections", "MiB/s", "PUT", 4, corpus.mid_put, False, seconds, short)),
        (True, Phase("GET 1 MiB, 4 connections", "MiB/s", "GET", 4, mid, True, seconds, short)),
        (True, Phase(f"PUT one {big_label}", "MiB/s", "PUT", 1, [big], False, long, long, one_shot=True)),
        (True, Phase(f"GET one {big_label}", "MiB/s", "GET", 1, [big], False, long, long, one_shot=True)),
    ]
    if not only:
        return every
    chosen = [(any(word.lower() in phase.label.lower() for word in only), phase) for reported, phase in every
              if reported]
    reads_small = any(keep and phase.cycle for keep, phase in chosen)
    reads_big = any(keep and phase.method == "GET" and not phase.cycle for keep, phase in chosen)
    kept: list[tuple[bool, Phase]] = []
    for reported, phase in every:
        if not reported:
            if reads_small:
                kept.append((False, phase))
            continue
        keep = any(word.lower() in phase.label.lower() for word in only)
        if keep or (reads_big and phase.one_shot and phase.method == "PUT"):
            kept.append((keep, phase))  # the big download needs the big upload first
    return kept


def measure(
    target: Target, corpus: Corpus, seconds: float, big_label: str, progress: Callable[[str], None],
    only: Sequence[str] = (),
) -> TargetReport:
    """Run every phase against one server and collect its peak RSS and consistency notes."""
    results: dict[str, PhaseResult] = {}
    notes: list[str] = []
    puts_ok = 0
    for reported, phase in phases(corpus, seconds, big_label, only):
        progress(f"{target.name}: {phase.label}")
        result = run_phase(target, phase)
        if phase.method == "PUT":
            puts_ok += result.ok
        if reported:
            results[phase.label] = result
        else:
            result.statuses.pop(409, None)  # already stored is fine for the read set
            if result.failures:
                notes.append(f"preparing reads: {describe_failures(result)}")
    rss = peak_rss_kib(target.pid) if target.pid else None
    if target.name.startswith("ours"):
        notes.extend(check_ours(target, puts_ok))
    return TargetReport(target.name, results, rss / 1024 if rss is not None else None, notes)


def check_ours(target: Target, puts_ok: int) -> list[str]:
    """Cross-check our server's own counters and storage against what the client saw."""
    notes: list[str] = []
    try:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
        conn.request("GET", "/v1/stats", headers=target.headers)
        stats = json.loads(conn.getresponse().read())
        conn.close()
        if stats.get("uploads") != puts_ok or stats.get("artifacts") != puts_ok:
            counted = f"uploads={stats.get('uploads')} artifacts={stats.get('artifacts')}"
            notes.append(f"server counted {counted}, the client got {puts_ok} successful PUTs")
        if stats.get("uploads_rejected"):
            notes.append(f"server rejected uploads: {stats['uploads_rejected']}")
    except (OSError, ValueError, http.client.HTTPException) as exc:
        notes.append(f"/v1/stats unreadable: {exc}")
    if target.storage is not None:
        leftovers = list((target.storage / "tmp").iterdir()) if (target.storage / "tmp").is_dir() else []
        if leftovers:
            notes.append(f"{len(leftovers)} temporary files left in storage tmp/")
    return notes


def describe_failures(result: PhaseResult) -> str:
    parts = []
    if result.statuses:
        parts.append("HTTP " + ", ".join(f"{s} x{n}" for s, n in sorted(result.statuses.items())))
    if result.errors:
        parts.append(", ".join(f"{e} x{n}" for e, n in result.errors.items()))
    if result.bad:
        parts.append(f"{result.bad} of {result.checked} checks failed")
    return "; ".join(parts)


# --- output -------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "req/s":
        return f"{value:,.0f}"
    if unit == "ms":
        return f"{value:.3f}"
    return f"{value:,.1f}"


def disturbed(result: PhaseResult) -> bool:
    """Other programs were busy during a measurement long enough for that to mean something."""
    return result.other_cpu is not None and result.other_cpu >= OTHER_BUSY and result.elapsed >= 0.5


def marks(result: PhaseResult) -> str:
    """Footnote marks: '*' bounded by count, '^' load generator saturated, '!' machine not quiet."""
    return (
        ("*" if result.exhausted else "")
        + ("^" if result.loadgen_cpu >= LOADGEN_SATURATED else "")
        + ("!" if disturbed(result) else "")
    )


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A pipe table: readable as plain text, and rendered as a table by Markdown."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def server_ms_per_request(result: PhaseResult) -> float | None:
    """The server's CPU time per answered request, in ms (None without the server's CPU figure)."""
    if result.server_cpu is None or not result.ok:
        return None
    return result.server_cpu / 100 * result.elapsed / result.ok * 1000


def report(reports: list[TargetReport], sweep: bool = False) -> tuple[str, bool]:
    """The results table, the CPU table and the checks; returns (text, every check passed).

    The first server gets its ratio to each later one (ours/node, ours/bare); a ``--workers``
    sweep gets each later server's ratio to the first (one worker).
    """
    labels = list(reports[0].results)
    pairs = [(r, reports[0]) for r in reports[1:]] if sweep else [(reports[0], r) for r in reports[1:]]
    headers = ["measurement", "unit", *(r.name for r in reports)] + [f"{a.name}/{b.name}" for a, b in pairs]
    rows = []
    for label in labels:
        results = [r.results[label] for r in reports]
        row = [label, results[0].unit, *(fmt(x.value, x.unit) + marks(x) for x in results)]
        for a, b in pairs:
            x, y = a.results[label].value, b.results[label].value
            row.append(f"{x / y:.2f}" if x and y else "n/a")
        rows.append(row)
    row = ["server peak RSS (VmHWM, largest process)", "MiB", *(fmt(r.peak_rss_mib, "MiB") for r in reports)]
    for a, b in pairs:
        row.append(f"{a.peak_rss_mib / b.peak_rss_mib:.2f}" if a.peak_rss_mib and b.peak_rss_mib else "n/a")
    rows.append(row)
    out = [render_table(headers, rows)]
    if any(x.exhausted for r in reports for x in r.results.values()):
        out.append("* used up its pre-generated upload keys before the time was up; the figure is count / time taken")
    if any(x.loadgen_cpu >= LOADGEN_SATURATED for r in reports for x in r.results.values()):
        out.append(f"^ the load generator used over {LOADGEN_SATURATED:.0f}% of its core: the server may be faster")
    if any(disturbed(x) for r in reports for x in r.results.values()):
        out.append(f"! other work used over {OTHER_BUSY:.0f}% of a core meanwhile (see 'other' below): measure again")

    cpu_headers = ["measurement", *(f"{r.name} {part}" for r in reports for part in ("server", "load gen", "other"))]
    cpu_rows = []
    for label in labels:
        results = [r.results[label] for r in reports]
        cells = [fmt(v, "%") for x in results for v in (x.server_cpu, x.loadgen_cpu, x.other_cpu)]
        cpu_rows.append([label, *cells])
    out += [
        "",
        "CPU use during each measurement, % of one core ('other': the rest of the machine, kernel threads included):",
        render_table(cpu_headers, cpu_rows),
    ]
    # What a request costs the server whatever else the machine does: the figure to compare
    # when other work disturbs the rates.
    per_request = [[label, *(fmt(server_ms_per_request(r.results[label]), "ms") for r in reports)]
                   for label in labels if reports[0].results[label].unit == "req/s"]
    out += ["", "Server CPU per request, ms (all its processes and threads):",
            render_table(["measurement", *(r.name for r in reports)], per_request)]

    passed = True
    out.append("")
    for r in reports:
        checked = sum(x.checked for x in r.results.values())
        bad = sum(x.bad for x in r.results.values())
        no_header = sum(x.no_header for x in r.results.values())
        requests = sum(x.ok for x in r.results.values())
        refused = sum(sum(x.statuses.values()) for x in r.results.values())
        errors = sum(sum(x.errors.values()) for x in r.results.values())
        line = (f"checks, {r.name}: {requests} successful requests, {refused} non-2xx answers, {errors} connection"
                f" errors; {checked} downloads/HEADs checked, {bad} mismatches")
        if no_header:
            line += f", {no_header} answers without X-Artifact-Hash (downloads checked against the upload)"
        out.append(line)
        for x in r.results.values():
            if x.failures:
                passed = False
                out.append(f"  {x.label}: {describe_failures(x)}")
        for note in r.notes:
            passed = False
            out.append(f"  {note}")
    return "\n".join(out), passed


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def verdict(value: float | None, target: float, at_most: bool = False) -> str:
    if value is None:
        return "n/a"
    return "met" if (value < target if at_most else value >= target) else "not met"


def target_table(reports: list[TargetReport], big_label: str, sweep: bool) -> str:
    """The targets of the server's performance, each beside the ratio it is measured by.

    Side by side: each line's ratio ours/node and ours/bare, the target (against the Node server
    or the bare app) and whether it is met; beside them the same ratios per second of the
    server's CPU time, which other work on the machine disturbs far less than the rates (a
    server that waits for its disk, as our fsyncs do, looks better by them than by its rate).
    A ``--workers`` sweep: each worker count's ratio to one worker. Peak RSS is held to an
    absolute bound (per worker process). Empty when the run has nothing to compare.
    """
    by_name = {r.name: r for r in reports}
    if sweep:
        one = reports[0]
        rows = []
        for label, least in SWEEP_TARGETS:
            for r in reports[1:]:
                if label not in one.results:
                    continue  # left out by --only
                value = ratio(r.results[label].value, one.results[label].value)
                rows.append([f"{label}: {r.name}/{one.name}", fmt_ratio(value), f">= {least:g}", verdict(value, least)])
        for r in reports:
            rows.append([f"peak RSS per worker: {r.name}", fmt(r.peak_rss_mib, "MiB") + " MiB",
                         f"< {MAX_RSS_MIB:g} MiB", verdict(r.peak_rss_mib, MAX_RSS_MIB, at_most=True)])
        return "Targets (unpinned):\n" + render_table(["line", "ratio", "target", "verdict"], rows)
    ours = by_name.get("ours")
    if ours is None or not ({"node", "bare"} & by_name.keys()):
        return ""
    others = [by_name.get("node"), by_name.get("bare")]
    rows = []
    for label, against, least in SIDE_BY_SIDE_TARGETS:
        label = label.format(big=big_label)
        if label not in ours.results:
            continue  # left out by --only
        rates = [ratio(ours.results[label].value, o.results[label].value) if o else None for o in others]
        per_cpu = [ratio(per_cpu_second(ours.results[label]), per_cpu_second(o.results[label])) if o else None
                   for o in others]
        rows.append([label, *map(fmt_ratio, rates), f">= {least:g} x {against}",
                     verdict(rates[0 if against == "node" else 1], least), *map(fmt_ratio, per_cpu)])
    rss = [ratio(ours.peak_rss_mib, o.peak_rss_mib) if o else None for o in others]
    rows.append([f"peak RSS (ours {fmt(ours.peak_rss_mib, 'MiB')} MiB)", *map(fmt_ratio, rss), f"< {MAX_RSS_MIB:g} MiB",
                 verdict(ours.peak_rss_mib, MAX_RSS_MIB, at_most=True), "", ""])
    headers = ["line", "ours/node", "ours/bare", "target", "verdict", "per CPU s: ours/node", "ours/bare"]
    return "Targets:\n" + render_table(headers, rows)


def per_cpu_second(result: PhaseResult) -> float | None:
    """A rate per second of the server's CPU time (requests or MiB per CPU-second)."""
    if result.value is None or not result.server_cpu:
        return None
    return result.value / (result.server_cpu / 100)


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --- main ---------------------------------------------------------------------------------------


def parse_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError(text)
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_server.py",
        description="Benchmark the cache server (beside a bare waitress baseline and the Node server) over loopback.",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--url", help="measure an already running server at this loopback base URL instead")
    which.add_argument("--bare", action="store_true", help="measure only the bare waitress baseline")
    which.add_argument("--no-baseline", action="store_true", help="measure only our server")
    parser.add_argument("--bare-durable", action="store_true",
                        help="also measure the bare baseline storing every upload durably as ours must (new file, "
                             "fsync, link, fsync of its folder) and nothing else: the floor the syncs set")
    parser.add_argument("--bare-journal", nargs="?", const=["group"], metavar="MODES",
                        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
                        help="also measure the bare baseline appending each upload up to 64 KiB to one preallocated "
                             "log, durable before its 201, as a database would: comma-separated modes of making it "
                             f"durable, of {', '.join(JOURNAL_FLOORS)} (default: group, one fdatasync for every "
                             "upload waiting; files: group, and each upload also in its own file, unsynced), "
                             "one column each")
    which.add_argument("--s3", action="store_true",
                       help="measure our server on the S3 store (a local moto bucket), then on the disk store")
    parser.add_argument("--compare-with", type=Path, metavar="CHECKOUT",
                        help="also measure our server as another checkout of the project has it (an earlier "
                             "version: git worktree add or git archive), as the column 'before', in the same rounds")
    parser.add_argument("--node-dir", metavar="DIR",
                        help="where 'npm install --prefix DIR turborepo-remote-cache@2' put the Node server, measured "
                             "beside ours and bare (default: the checkout's .ci/tools when it is there)")
    parser.add_argument("--api", choices=sorted(API_TEMPLATES), default="turbo",
                        help="the path of the servers started: turbo's /v8/artifacts/{hash}?teamId=bench, which all "
                             "serve (default), or polykit's /v1/artifacts/{key}, where ours verifies every archive "
                             "(not the Node server)")
    parser.add_argument("--path-template", default=DEFAULT_TEMPLATE,
                        help=f"artifact path under --url, with {{key}} (default: {DEFAULT_TEMPLATE})")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its CPU use and peak RSS")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each rate measurement (default: 3)")
    parser.add_argument("--big-mib", type=int, default=512, help="size of the single big artifact, MiB (default: 512)")
    parser.add_argument("--threads", type=int, default=4, help="server worker threads (default: 4, as the server)")
    parser.add_argument("--workers", type=int, default=1, help="our server's worker processes (default: 1)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every server this many times, rotating which goes first; report medians")
    parser.add_argument("--threads-sweep", type=lambda text: [parse_count(n) for n in text.split(",")], default=[],
                        metavar="N,N,...", help="our server alone with each of these --threads (pinned, in the same "
                        "rounds), and each one's ratio to the first")
    parser.add_argument("--workers-sweep", action="store_true",
                        help="our server alone with 1, 2 and one worker per CPU, unpinned, and each one's ratio to 1")
    parser.add_argument("--server-log-level", default="warning", help="log level of our server (default: warning)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator to CPUs")
    parser.add_argument("--tmp-dir", type=Path, help="where the temporary folder goes (put it on the disk to measure)")
    parser.add_argument("--max-puts", type=int, metavar="N",
                        help="most uploads per 4 KiB upload measurement (default: enough for 8000-10000 per second)")
    parser.add_argument("--only", type=lambda text: [w for w in text.split(",") if w.strip()], default=[],
                        metavar="WORDS", help="comma-separated words: measure only the lines whose label holds one "
                        "(e.g. 'GET 4 KiB,HEAD 4 KiB')")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 s per measurement, at most 3000 uploads each, a 16 MiB big artifact")
    args = parser.parse_args(list(argv))
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
        args.big_mib = min(args.big_mib, 16)
        args.max_puts = min(args.max_puts or QUICK_MAX_PUTS, QUICK_MAX_PUTS)
    if args.seconds <= 0 or args.seconds > 60 or args.big_mib < 1 or (args.max_puts is not None and args.max_puts < 8):
        parser.error("--seconds must be in (0, 60], --big-mib at least 1 and --max-puts at least 8")
    if args.workers < 1 or args.rounds < 1:
        parser.error("--workers and --rounds must be at least 1")
    if args.rounds > 1 and (args.url or args.s3):
        parser.error("--rounds starts each server afresh: not with --url or --s3")
    if args.workers_sweep and (args.url or args.bare):
        parser.error("--workers-sweep measures our server alone")
    if args.workers_sweep or args.workers > 1:
        args.no_pin = True  # one core cannot show what several workers do
    if args.pid is not None and not args.url:
        parser.error("--pid only goes with --url")
    args.node_cli = None
    if args.threads_sweep and (args.url or args.bare or args.workers_sweep):
        parser.error("--threads-sweep measures our server alone")
    side_by_side = not (args.url or args.bare or args.no_baseline or args.s3 or args.workers_sweep
                        or args.threads_sweep)
    if (args.bare_durable or args.bare_journal or args.compare_with) and not side_by_side:
        parser.error("--bare-durable, --bare-journal and --compare-with go with the side-by-side run")
    unknown = [m for m in args.bare_journal or [] if m not in JOURNAL_FLOORS]
    if unknown or args.bare_journal == []:
        parser.error(f"--bare-journal takes modes among {', '.join(JOURNAL_FLOORS)}, not {','.join(unknown)!r}")
    if args.compare_with and not (args.compare_with / "polykit_cache" / "__main__.py").is_file():
        parser.error(f"--compare-with: {args.compare_with} is not a checkout of this project")
    if args.node_dir and not side_by_side:
        parser.error("--node-dir goes with the side-by-side run (not with --url, --bare, --no-baseline, --s3 "
                     "or --workers-sweep)")
    if args.node_dir and args.api != "turbo":
        parser.error("the Node server speaks turbo's API only: --node-dir goes with --api turbo")
    if side_by_side and args.api == "turbo":
        args.node_cli = find_node_tool(args.node_dir, *NODE_PACKAGE)
        if args.node_dir and args.node_cli is None:
            parser.error(f"no {NODE_PACKAGE[0]} under {args.node_dir}: "
                         f"npm install --prefix {args.node_dir} {NODE_PACKAGE[0]}@2")
        if args.node_cli is not None and shutil.which("node") is None:
            parser.error(f"{NODE_PACKAGE[0]} is installed but node is not on PATH")
    return args


def chosen_servers(args: argparse.Namespace) -> list[str]:
    """Which servers to measure, in order: by default ours, then the baseline."""
    if args.url:
        return ["target"]
    if args.bare:
        return ["bare"]
    if args.workers_sweep:
        return [f"ours-w{n}" for n in sorted({1, 2, usable_cpus()})]
    if args.threads_sweep:
        return [f"ours-t{n}" for n in args.threads_sweep]
    if args.no_baseline:
        return ["ours"]
    if args.s3:
        return ["s3", "ours"]
    kinds = ["ours", "node", "bare"] if args.node_cli is not None else ["ours", "bare"]
    if args.bare_durable:
        kinds.insert(-1, "durable")
    for mode in dict.fromkeys(args.bare_journal or []):
        kinds.insert(-1, journal_kind(mode))
    if args.compare_with:
        kinds.insert(1, "before")
    return kinds


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cleanup(targets: list[Target], workdir: Path | None) -> None:
    """Stop every child we started and remove the temporary folder, whatever happened."""
    for proc in list(_LIVE_PROCESSES):
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
    for target in targets:
        stop_server(target)
    for helper in _HELPERS:
        stop_process(helper, STOP_TIMEOUT)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        return serve_bare(argv[1:])
    if argv[:1] == ["_moto"]:
        return serve_moto(argv[1:])
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    server_cpu, load_cpu = plan_cpus(not args.no_pin)
    big_bytes = args.big_mib * MIB
    big_label = f"{args.big_mib} MiB" if args.big_mib < 1024 or args.big_mib % 1024 else f"{args.big_mib // 1024} GiB"
    targets: list[Target] = []
    workdir: Path | None = None

    def progress(text: str) -> None:
        print(f"  ... {text}", file=sys.stderr, flush=True)

    try:
        external = external_target(args.url, args.path_template, args.pid) if args.url else None
        workdir = Path(tempfile.mkdtemp(prefix="polykit-bench-", dir=args.tmp_dir))
        load_at_start = load_average()
        print(machine_line())
        print(versions_line(args.node_cli))
        progress("packing artifacts")
        started = time.monotonic()
        artifacts = workdir / "artifacts"
        artifacts.mkdir()
        corpus = build_corpus(artifacts, args.seconds, big_bytes, usable_cpus(), args.max_puts)
        progress(f"packed in {time.monotonic() - started:.1f} s")
        log_bytes = journal_bytes_needed(corpus, args.seconds, args.only) if args.bare_journal else 0
        if load_cpu is not None:
            os.sched_setaffinity(0, {load_cpu})
        runs: list[TargetReport] = []
        kinds = chosen_servers(args)
        for round_index in range(args.rounds):
            # Each round rotates which server goes first, so none always meets the disk and the
            # machine in the same state; with several rounds, each figure is the median.
            shift = round_index % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                target = external if kind == "target" else start_kind(kind, args, workdir, artifacts, server_cpu,
                                                                      big_bytes, log_bytes)
                targets.append(target)
                runs.append(measure(target, corpus, args.seconds, big_label, progress, args.only))
                if target is not external:
                    stop_server(target)
                    discard_state(workdir, target)
        reports = [median_report([r for r in runs if r.name == kind]) for kind in kinds]
        text, passed = report(reports, sweep=args.workers_sweep or bool(args.threads_sweep))
        print(describe_setup(args, corpus, server_cpu, load_cpu, external))
        if external is None:
            print(filesystem_line(workdir))
        print(f"load: 1-minute load average {load_at_start} at the start, {load_average()} at the end")
        print()
        print(text)
        verdicts = target_table(reports, big_label, args.workers_sweep)
        if verdicts:
            print()
            print(verdicts)
        return 0 if passed else 1
    except KeyboardInterrupt:
        print("interrupted; stopping the servers and removing temporary files", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup(targets, workdir)


def describe_setup(
    args: argparse.Namespace, corpus: Corpus, server_cpu: int | None, load_cpu: int | None, external: Target | None
) -> str:
    """The lines under the machine line that say how the figures were obtained."""
    small = corpus.small_read[0].size
    mid = corpus.mid_read[0].size
    if server_cpu is not None:
        pinning = f"server pinned to CPU {server_cpu}, load generator to CPU {load_cpu}"
        if external is not None:
            pinning = f"load generator pinned to CPU {load_cpu} (the external server is not pinned)"
    else:
        pinning = "no CPU pinning" + (" (--no-pin)" if args.no_pin else " (fewer than 2 CPUs)")
    lines = [
        f"setup: {pinning}; {args.seconds:g} s per rate measurement"
        + (f"; server threads {args.threads}" if external is None and not args.threads_sweep else "")
        + (f"; server threads {', '.join(map(str, args.threads_sweep))} (one server each)" if args.threads_sweep else "")
        + (f"; 'before' is our server from {args.compare_with}" if args.compare_with else "")
        + (f"; our server's workers {args.workers}" if external is None and args.workers > 1 else "")
        + (f"; {args.rounds} rounds, rotating which server goes first: medians" if args.rounds > 1 else "")
        + (f"; our server's log level {args.server_log_level}" if external is None and not args.bare else ""),
        f"artifacts: 4 KiB random payload = {small} bytes packed, 1 MiB = {mid} bytes, "
        f"big = {corpus.big.size} bytes; MiB/s counts artifact bytes (1 MiB = 1048576 bytes)",
        "load: Python http.client, one process per persistent HTTP/1.1 connection; every PUT has a fresh key;",
        *([f"      every server at {API_TEMPLATES[args.api]} with a bearer token it checks;"] if external is None else []),
        "      every GET body is hashed and checked against X-Artifact-Hash and the uploaded artifact",
    ]
    if external is not None:
        lines.insert(0, f"target: http://{external.host}:{external.port}{external.prefix}{external.template}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
