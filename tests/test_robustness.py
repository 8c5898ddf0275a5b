"""Robustness of a real server under load: a soak under eviction pressure, SIGKILL at
random moments, slow clients and a full disk.

Every test talks to a ``python -m polykit_cache`` child process on 127.0.0.1 only; every loop is
bounded in count and in time, and every server, thread and socket stops by itself.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from polykit_cache.entryfile import read_meta

from support import ROOT, ServerProcess, call, key_for, new_app, pack_tree, request, sha

SOAK_SECONDS = float(os.environ.get("POLYKIT_SOAK_SECONDS", "20"))
MIB = 1 << 20


# --- shared helpers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[str, bytes]:
    """{key: artifact bytes}, packed once before any timed part: 300 small artifacts (1-16 KB of
    incompressible content) and 12 of about 1 MiB, about 15 MB in all."""
    root = tmp_path_factory.mktemp("pool")
    rng = random.Random(20240505)
    blobs = {}
    for i in range(300):
        key = key_for(f"robustness-small-{i}")
        blobs[key] = pack_tree(root, {"out.bin": rng.randbytes(rng.randint(1000, 16000))}, key=key)
    for i in range(12):
        key = key_for(f"robustness-big-{i}")
        blobs[key] = pack_tree(root, {"out.bin": rng.randbytes(MIB)}, key=key)
    return blobs


def path_of(key: str) -> str:
    return f"/v1/artifacts/{key}"


class Connection:
    """One client's keep-alive connection; reopened after the server closed it."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, str | None, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body)
            resp = self.conn.getresponse()
            data = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close:
            self.close()
        return resp.status, resp.getheader("X-Artifact-Hash"), data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_verify(store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polykit_cache", "verify", "--storage-dir", str(store)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def assert_verified(store: Path, context: str = "") -> None:
    result = run_verify(store)
    assert result.returncode == 0, f"{context}verify quarantined something:\n{result.stdout}\n{result.stderr}"
    assert " 0 quarantined" in result.stdout, result.stdout
    assert not (store / "quarantine").exists()


def stored_on_disk(store: Path) -> dict[str, int]:
    """{key: size of its .zst} of what the storage folder holds, after checking that every artifact
    has its metadata with the same size (nothing partial) and no metadata file is orphaned."""
    found = {}
    for zst in store.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.zst"):
        meta = read_meta(str(zst), str(zst.with_suffix(".json")))
        assert meta is not None, f"{zst.name} has no metadata"
        recorded = meta["size"]
        assert recorded == zst.stat().st_size, f"{zst.name}: {zst.stat().st_size} bytes on disk, {recorded} recorded"
        found[zst.stem] = recorded
    orphans = [m.name for m in store.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.json") if not m.with_suffix(".zst").exists()]
    assert not orphans, f"metadata without an artifact: {orphans}"
    return found


def check_everything_served(port: int, pool: dict[str, bytes], hashes: dict[str, str]) -> set[str]:
    """HEAD every key of the pool; every key that answers 200 must download whole, with its hash.
    Returns the keys stored."""
    stored = set()
    conn = Connection(port)
    try:
        for key in pool:
            status, claimed, _ = conn.send("HEAD", path_of(key))
            assert status in (200, 404), f"HEAD {key}: {status}"
            if status == 200:
                assert claimed == hashes[key], f"HEAD {key}: X-Artifact-Hash {claimed}"
                stored.add(key)
        for key in sorted(stored):
            status, claimed, body = conn.send("GET", path_of(key))
            assert status == 200, f"HEAD {key} said 200 but GET said {status}"
            assert sha(body) == claimed == hashes[key], f"GET {key}: the body is not the artifact uploaded"
    finally:
        conn.close()
    return stored


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- 1. soak ----------------------------------------------------------------------------------


def soak_client(port, pool, keys, rng, deadline, log, errors) -> None:
    """Random PUT/GET/HEAD on random keys of the pool until the deadline (and at most 200 000)."""
    conn = Connection(port)
    try:
        for _ in range(200_000):
            if time.monotonic() >= deadline:
                break
            key = rng.choice(keys)
            roll = rng.random()
            method = "PUT" if roll < 0.3 else "GET" if roll < 0.75 else "HEAD"
            started = time.monotonic()
            try:
                status, claimed, body = conn.send(method, path_of(key), pool[key] if method == "PUT" else None)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{method} {key}: {exc!r}")
                continue
            digest = sha(body) if method == "GET" and status == 200 else None
            log.append((started, time.monotonic(), method, key, status, claimed, digest))
    finally:
        conn.close()


def test_soak_under_eviction_pressure(tmp_path, pool):
    """Eight clients mix PUT/GET/HEAD against one server for POLYKIT_SOAK_SECONDS (default 20 s;
    ``POLYKIT_SOAK_SECONDS=60`` gives a full minute) with ``--max-storage`` about a
    quarter of the pool: no 5xx, no connection errors, every download is the artifact uploaded
    under its key, a 404 of a stored key only after its eviction, flat server RSS, evictions
    counted, and ``polykit-cache verify`` clean afterwards."""
    store = tmp_path / "store"
    max_storage = 4 * MIB
    assert sum(map(len, pool.values())) > 3 * max_storage
    hashes = {key: sha(blob) for key, blob in pool.items()}
    keys = sorted(pool)
    server = ServerProcess(store, tmp_path / "server.log", "--max-storage", str(max_storage), "--threads", "8")
    try:
        samples: list[tuple[float, int]] = []
        sampling = threading.Event()

        def sample_rss() -> None:
            for _ in range(3600):
                samples.append((time.monotonic(), vm_rss_kib(server.proc.pid)))
                if sampling.wait(1.0):
                    break

        sampler = threading.Thread(target=sample_rss, daemon=True)
        logs: list[list] = [[] for _ in range(8)]
        errors: list[str] = []
        begun = time.monotonic()
        deadline = begun + SOAK_SECONDS
        clients = [threading.Thread(target=soak_client, daemon=True,
                                    args=(server.port, pool, keys, random.Random(i), deadline, logs[i], errors))
                   for i in range(8)]
        sampler.start()
        for t in clients:
            t.start()
        for t in clients:
            t.join(SOAK_SECONDS + 120)
        sampling.set()
        sampler.join(10)
        assert not any(t.is_alive() for t in clients), "a client hung"
        assert not errors, f"{len(errors)} requests failed on the connection, e.g. {errors[:5]}"

        log = sorted(entry for client in logs for entry in client)
        by_status = defaultdict(int)
        for _, _, method, _, status, _, _ in log:
            by_status[method, status] += 1
        assert len(log) > 100 * SOAK_SECONDS / 20, f"too little traffic: {dict(by_status)}"
        unexpected = {k: n for k, n in by_status.items()
                      if k[1] not in {"PUT": (201, 409), "GET": (200, 404), "HEAD": (200, 404)}[k[0]]}
        assert not unexpected, f"unexpected answers (method, status): count = {unexpected}"
        assert by_status["PUT", 201] and by_status["GET", 200] and by_status["GET", 404], dict(by_status)

        # Every download is whole and is the artifact uploaded under its key.
        for _, _, method, key, status, claimed, digest in log:
            if method == "GET" and status == 200:
                assert digest == claimed == hashes[key], f"GET {key}: body {digest}, header {claimed}"
            if method == "HEAD" and status == 200:
                assert claimed == hashes[key], f"HEAD {key}: header {claimed}"

        # The end state: what HEAD says is stored downloads whole and is exactly what is counted.
        final = check_everything_served(server.port, pool, hashes)
        stats = json.loads(request(server.port, "GET", "/v1/stats")[2])
        assert stats["evictions"] > 0, stats
        assert not [s for s in stats["requests_by_status"] if s.startswith("5")], stats["requests_by_status"]
        assert stats["artifacts"] == len(final), (stats, len(final))
        assert stats["stored_bytes"] == sum(len(pool[k]) for k in final) <= max_storage, stats

        # A 404 for a key known to be stored when the request began means it was evicted since:
        # it is gone at the end or was uploaded again after that request began.
        proofs = defaultdict(list)  # key -> end times of answers showing it stored
        uploaded = defaultdict(list)  # key -> end times of 201s
        for started, ended, method, key, status, _, _ in log:
            if status in (200, 201):
                proofs[key].append(ended)
            if status == 201:
                uploaded[key].append(ended)
        unexplained = [
            (method, key) for started, _, method, key, status, _, _ in log
            if status == 404 and any(t < started for t in proofs[key])
            and key in final and not any(t > started for t in uploaded[key])
        ]
        assert not unexplained, f"404 for stored keys that were never evicted: {unexplained[:5]}"

        # Server memory is flat: after a warm-up the resident size does not keep growing.
        rss = [(t - begun, kib) for t, kib in samples]
        peak = max(kib for _, kib in rss)
        assert peak < 100 * 1024, f"server RSS reached {peak} KiB: {rss}"
        warm = [kib for t, kib in rss if t >= max(3.0, SOAK_SECONDS / 4)]
        if len(warm) >= 6:
            baseline, last = max(warm[:3]), statistics.median(warm[-3:])
            assert last <= baseline + 30 * 1024, f"server RSS grew from {baseline} to {last} KiB: {rss}"
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert set(stored_on_disk(store)) == final
    assert not any((store / "tmp").iterdir())
    assert_verified(store)


# --- 2. SIGKILL at random moments --------------------------------------------------------------

KILL_ROUNDS = 5


def writer(port, pool, smalls, bigs, rng, stop, statuses, errors) -> None:
    """Upload random artifacts (a third of them about 1 MiB) until told to stop (at most 10 000)."""
    conn = Connection(port, timeout=30)
    try:
        for _ in range(10_000):
            if stop.is_set():
                break
            key = rng.choice(bigs) if rng.random() < 0.35 else rng.choice(smalls)
            try:
                status, _, _ = conn.send("PUT", path_of(key), pool[key])
            except (OSError, http.client.HTTPException) as exc:
                errors.append((time.monotonic(), repr(exc)))
                break  # the server was killed (checked by the caller)
            statuses.append(status)
    finally:
        conn.close()


def test_sigkill_at_random_moments_under_load_leaves_no_corrupt_artifact(tmp_path, pool):
    """Rounds of: writers upload, the server is SIGKILLed after a random 0.2-1.5 s, restarted on the
    same storage: no temporary file survives, everything HEAD finds downloads with its hash, and
    ``polykit-cache verify`` quarantines nothing."""
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    hashes = {key: sha(blob) for key, blob in pool.items()}
    bigs = sorted(k for k, b in pool.items() if len(b) > MIB // 2)
    smalls = sorted(k for k in pool if k not in bigs)
    store = tmp_path / "store"
    options = ("--max-storage", str(6 * MIB), "--threads", "4")
    answered = 0
    for round_ in range(KILL_ROUNDS):
        context = f"seed {seed}, round {round_}: "
        server = ServerProcess(store, tmp_path / f"killed-{round_}.log", *options)
        stop = threading.Event()
        statuses: list[int] = []
        errors: list[tuple[float, str]] = []
        writers = [threading.Thread(target=writer, daemon=True,
                                    args=(server.port, pool, smalls, bigs, random.Random(rng.random()), stop, statuses, errors))
                   for _ in range(4)]
        for t in writers:
            t.start()
        time.sleep(rng.uniform(0.2, 1.5))
        killed_at = time.monotonic()
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(15)
        server.log.close()
        stop.set()
        for t in writers:
            t.join(60)
        assert not any(t.is_alive() for t in writers), context + "a writer hung"
        assert set(statuses) <= {201, 409}, context + f"answers before the kill: {sorted(set(statuses))}"
        answered += len(statuses)
        assert all(when >= killed_at for when, _ in errors), context + f"connection failed before the kill: {errors}"

        restarted = ServerProcess(store, tmp_path / f"restarted-{round_}.log", *options)
        try:
            leftovers = list((store / "tmp").iterdir())
            assert not leftovers, context + f"temporary files survived the restart: {leftovers}"
            stored = check_everything_served(restarted.port, pool, hashes)
        finally:
            restarted.stop()
        assert restarted.proc.returncode == 0
        assert set(stored_on_disk(store)) == stored, context
        assert_verified(store, context)
    assert answered, "no upload was answered before any kill"


# --- 3. slow clients --------------------------------------------------------------------------

SLOW_SECONDS = 4.0
SLOW_STEP = 0.05
FAST_BOUND = 2.0  # seconds; a blocked request would wait for the slow clients, SLOW_SECONDS or more


def fast_client(port, pool, gets, puts, done, latencies, answers) -> None:
    """Fresh connections, one request each, cycling GET/HEAD/PUT until ``done`` (at most 10 000)."""
    for i in range(10_000):
        if done.is_set():
            break
        method, key = ("GET", "HEAD", "PUT")[i % 3], gets[i % len(gets)]
        if method == "PUT":
            try:
                key = puts.pop()  # a new key for every upload (list.pop is atomic)
            except IndexError:
                method = "HEAD"
        started = time.monotonic()
        try:
            status, headers, body = request(port, method, path_of(key), pool[key] if method == "PUT" else None,
                                            timeout=30)
        except (OSError, http.client.HTTPException) as exc:
            latencies.append(time.monotonic() - started)
            answers.append((method, key, repr(exc), None, None))
            break
        latencies.append(time.monotonic() - started)
        answers.append((method, key, status, headers.get("x-artifact-hash"), sha(body) if method == "GET" else None))


def test_slow_clients_do_not_block_the_others(tmp_path, pool):
    """With only two worker threads, three uploads trickling their bodies a byte every 50 ms and a
    request line sent as slowly hold no worker (waitress buffers requests in its I/O thread):
    ordinary GET/HEAD/PUT from other clients meanwhile each answer within FAST_BOUND."""
    store = tmp_path / "store"
    hashes = {key: sha(blob) for key, blob in pool.items()}
    keys = sorted(k for k, b in pool.items() if len(b) < MIB // 2)
    big = sorted(k for k in pool if k not in keys)[0]
    gets, slow_puts, puts = keys[:4] + [big], keys[4:7], keys[7:80]
    server = ServerProcess(store, tmp_path / "server.log", "--threads", "2")
    slow_socks: list[tuple[socket.socket, bytes]] = []
    try:
        for key in gets:
            assert request(server.port, "PUT", path_of(key), pool[key])[0] == 201
        for key in slow_puts:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            sock.sendall(f"PUT {path_of(key)} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(pool[key])}\r\n"
                         "Connection: close\r\n\r\n".encode())
            slow_socks.append((sock, pool[key]))
        line = f"GET {path_of(gets[0])} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        slow_socks.append((sock, line))
        steps = int(SLOW_SECONDS / SLOW_STEP)
        assert all(len(data) > steps for _, data in slow_socks)  # none of them completes while trickling

        done = threading.Event()
        trickle_errors: list[str] = []

        def trickle() -> None:
            try:
                for step in range(steps):
                    for s, data in slow_socks:
                        s.sendall(data[step:step + 1])
                    time.sleep(SLOW_STEP)
            except OSError as exc:  # the server dropped a slow client
                trickle_errors.append(repr(exc))
            finally:
                done.set()

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(0.3)  # the slow requests are in the server before the others come
        latencies: list[float] = []
        answers: list[tuple] = []
        fast = [threading.Thread(target=fast_client, daemon=True,
                                 args=(server.port, pool, gets, puts, done, latencies, answers)) for _ in range(3)]
        for t in fast:
            t.start()
        trickler.join(SLOW_SECONDS + 60)
        done.set()
        for t in fast:
            t.join(120)
        assert not trickler.is_alive() and not any(t.is_alive() for t in fast)
        assert not trickle_errors, trickle_errors
        assert latencies and max(latencies) < FAST_BOUND, (
            f"an ordinary request took {max(latencies):.2f} s while slow clients trickled "
            f"(median {statistics.median(latencies) * 1000:.1f} ms over {len(latencies)} requests)")
        assert len(latencies) >= 30, f"only {len(latencies)} ordinary requests were answered"
        for method, key, status, claimed, digest in answers:
            assert status == {"GET": 200, "HEAD": 200, "PUT": 201}[method], (method, key, status)
            if method == "GET":
                assert digest == claimed == hashes[key]

        # The slow clients were really being served all along: one upload and the slow request
        # line complete once their remaining bytes arrive.
        (put_sock, put_body), (get_sock, get_line) = slow_socks[0], slow_socks[-1]
        put_sock.sendall(put_body[steps:])
        get_sock.sendall(get_line[steps:])
        put_reply, get_reply = read_until_closed(put_sock), read_until_closed(get_sock)
        assert put_reply.startswith(b"HTTP/1.1 201"), put_reply[:200]
        head, _, body = get_reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == pool[gets[0]], head

        # The abandoned uploads never reached the application: nothing stored, nothing left over.
        for s, _ in slow_socks:
            s.close()
        assert request(server.port, "HEAD", path_of(slow_puts[0]))[0] == 200
        for key in slow_puts[1:]:
            assert request(server.port, "HEAD", path_of(key))[0] == 404
    finally:
        for s, _ in slow_socks:
            s.close()
        server.stop()
    assert server.proc.returncode == 0
    assert not any((store / "tmp").iterdir())


def read_until_closed(sock: socket.socket, limit: int = 4 * MIB) -> bytes:
    data = b""
    for _ in range(10_000):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) <= limit
    return data


# --- 4. full disk -----------------------------------------------------------------------------


def test_a_full_disk_under_load_is_507_and_reads_go_on(tmp_path, small_tmpfs):
    """Three uploaders fill a 1 MiB tmpfs while a reader downloads what is stored: uploads end in
    507 (never 5xx otherwise), every stored artifact still downloads whole, nothing partial is
    left, and verify is clean."""
    store = small_tmpfs
    rng = random.Random(7)
    blobs = {}
    for i in range(24):  # about 2.4 MB for 1 MiB of disk
        key = key_for(f"full-disk-{i}")
        blobs[key] = pack_tree(tmp_path / "src", {"out.bin": rng.randbytes(rng.randint(60_000, 140_000))}, key=key)
    keys = sorted(blobs)
    server = ServerProcess(store, tmp_path / "server.log")
    try:
        stored: list[str] = []
        answers: list[tuple[str, str, int]] = []
        reads: list[tuple[str, int, bool]] = []
        uploading = threading.Event()
        uploading.set()

        def upload(mine: list[str]) -> None:
            conn = Connection(server.port)
            try:
                for key in mine:
                    status, _, _ = conn.send("PUT", path_of(key), blobs[key])
                    answers.append(("PUT", key, status))
                    if status == 201:
                        stored.append(key)
                    if status != 201:
                        break
            finally:
                conn.close()

        def read() -> None:
            conn = Connection(server.port)
            try:
                for i in range(10_000):
                    if not uploading.is_set() and len(reads) >= 20:
                        break
                    if not stored:
                        time.sleep(0.01)
                        continue
                    key = stored[i % len(stored)]
                    status, claimed, body = conn.send("GET", path_of(key))
                    reads.append((key, status, status == 200 and sha(body) == claimed == sha(blobs[key])))
            finally:
                conn.close()

        uploaders = [threading.Thread(target=upload, args=(keys[i::3],), daemon=True) for i in range(3)]
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        for t in uploaders:
            t.start()
        for t in uploaders:
            t.join(120)
        uploading.clear()
        reader.join(120)
        assert not reader.is_alive() and not any(t.is_alive() for t in uploaders)
        statuses = [status for _, _, status in answers]
        assert set(statuses) <= {201, 507}, answers
        assert 507 in statuses and 201 in statuses, answers
        assert all(ok for _, _, ok in reads), [r for r in reads if not r[2]]

        # The full server keeps answering reads, and a further upload is refused cleanly.
        for key in stored:
            status, headers, body = request(server.port, "GET", path_of(key))
            assert status == 200 and body == blobs[key] and headers["x-artifact-hash"] == sha(body)
        assert request(server.port, "GET", "/healthz")[0] == 200
        unsent = max((k for k in keys if k not in stored), key=lambda k: len(blobs[k]))
        status = request(server.port, "PUT", path_of(unsent), blobs[unsent])[0]
        assert status in (201, 507), status
        if status == 201:
            stored.append(unsent)
        assert not any((store / "tmp").iterdir()), list((store / "tmp").iterdir())
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert set(stored_on_disk(store)) == set(stored)
    assert_verified(store)


def test_a_small_upload_onto_a_full_disk_is_507_and_leaves_nothing(tmp_path, small_tmpfs):
    """A body small enough to stay in the temporary's buffer meets the full disk at its flush: the
    answer is the JSON 507 (the discarded temporary's close flushes again and fails again, which
    must not turn it into a 500), and once space is freed the same upload is stored."""
    app = new_app(small_tmpfs)
    key = key_for("small-onto-full")
    blob = pack_tree(tmp_path / "src", {"out.txt": os.urandom(1000)}, key=key)
    assert len(blob) < 4096  # within one buffer: nothing reaches the disk before the flush
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    reply = call(app, "PUT", f"/v1/artifacts/{key}", blob)
    assert reply.status == 507, reply
    assert json.loads(reply.body)["error"] == "storage_full"
    assert os.listdir(small_tmpfs / "tmp") == []
    filler.unlink()
    assert call(app, "PUT", f"/v1/artifacts/{key}", blob).status == 201
    assert call(app, "GET", f"/v1/artifacts/{key}").body == blob
