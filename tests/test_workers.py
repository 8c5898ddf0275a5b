"""``--workers N``: several processes serving one storage, each guarantee with 1 and with 2 workers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import sqlite3
import threading
import time

import pytest

from support import KEY, ServerProcess, key_for, pack_tree, race_uploads, request

ART = f"/v1/artifacts/{KEY}"
WORKERS = pytest.mark.parametrize("workers", [1, 2])


def start(tmp_path, workers: int, *args: str, log: str = "server.log") -> ServerProcess:
    """The server, once each of its workers serves."""
    server = ServerProcess(tmp_path / "store", tmp_path / log, "--workers", str(workers), *args)
    if workers > 1:
        wait_for(lambda: len(re.findall(r"worker \d+ \(pid \d+\) serving", server.log_path.read_text())) >= workers,
                 "every worker serves")
    return server


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """slot -> pid of the workers running now, from the supervisor's log."""
    text = server.log_path.read_text()
    pids = {int(slot): int(pid) for slot, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", text)}
    return {slot: pid for slot, pid in pids.items() if os.path.exists(f"/proc/{pid}")}


def wait_for(predicate, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def stats(port: int) -> dict:
    status, _, body = request(port, "GET", "/v1/stats")
    assert status == 200
    return json.loads(body)


@WORKERS
@pytest.mark.parametrize("size", [200_000, 700_000])  # kept in memory by waitress / written into the store as it comes
def test_concurrent_uploads_of_one_key_give_exactly_one_201(tmp_path, workers, size):
    blobs = [pack_tree(tmp_path / str(i), {"a": os.urandom(size)}) for i in range(8)]
    server = start(tmp_path, workers)
    try:
        statuses = race_uploads(server.port, ART, blobs)
        assert sorted(statuses) == [201] + [409] * 7
        winner = blobs[statuses.index(201)]
        for _ in range(6):  # fresh connections: any worker may answer
            assert request(server.port, "GET", ART)[2] == winner
    finally:
        assert server.stop() == 0


@WORKERS
def test_stats_and_metrics_count_every_workers_requests_whichever_answers(tmp_path, workers):
    blob = pack_tree(tmp_path, {"a": b"x" * 1000})
    server = start(tmp_path, workers)
    try:
        assert request(server.port, "PUT", ART, blob)[0] == 201
        for _ in range(20):  # each on a new connection, so both workers get some
            assert request(server.port, "GET", ART)[0] == 200
            assert request(server.port, "GET", f"/v1/artifacts/{key_for('none')}")[0] == 404
        for scrape in range(6):  # every scrape sees the same totals, whoever answers it
            figures = stats(server.port)
            assert figures["requests"] == 41 + 2 * scrape  # the stats requests before this one count too
            assert (figures["hits"], figures["misses"], figures["uploads"]) == (20, 20, 1)
            assert figures["bytes_out"] == 20 * len(blob) and figures["bytes_in"] == len(blob)
            assert (figures["artifacts"], figures["stored_bytes"]) == (1, len(blob))
            status, _, body = request(server.port, "GET", "/metrics")
            assert status == 200
            text = body.decode()
            assert 'polykit_cache_requests_total{protocol="polykit",method="GET",status="404"} 20' in text
            assert 'polykit_cache_hits_total{protocol="polykit"} 20' in text
            assert "polykit_cache_stored_artifacts 1\n" in text
    finally:
        assert server.stop() == 0


@WORKERS
def test_sighup_reloads_the_tokens_of_every_worker(tmp_path, workers):
    token_file = tmp_path / "tokens"
    token_file.write_text("read-write old-token-1111111\n")
    server = start(tmp_path, workers, "--token-file", str(token_file))
    try:
        old, new = {"Authorization": "Bearer old-token-1111111"}, {"Authorization": "Bearer new-token-2222222"}
        assert request(server.port, "HEAD", ART, headers=old)[0] == 404
        token_file.write_text("read-write new-token-2222222\n")
        before = server.log_path.read_text().count("reloaded 1 access tokens")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: server.log_path.read_text().count("reloaded 1 access tokens") == before + workers,
                 "every worker reloads its tokens")
        for _ in range(12):  # new connections, spread over the workers
            assert request(server.port, "HEAD", ART, headers=old)[0] == 401
            assert request(server.port, "HEAD", ART, headers=new)[0] == 404
    finally:
        assert server.stop() == 0


@WORKERS
def test_a_replaced_entry_is_never_answered_from_any_workers_memory(tmp_path, workers):
    path = f"/ac/{key_for('action')}"
    server = start(tmp_path, workers)
    try:
        for body in (b"first result", b"other result", b"third result"):  # one size: only the file tells
            assert request(server.port, "PUT", path, body)[0] == 200
            for _ in range(12):  # new connections, spread over the workers, each keeping what it read
                assert request(server.port, "GET", path)[2] == body
    finally:
        assert server.stop() == 0


@WORKERS
def test_sigterm_stops_every_worker_cleanly(tmp_path, workers):
    server = start(tmp_path, workers)
    assert request(server.port, "GET", "/healthz")[0] == 200
    pids = list(worker_pids(server).values()) if workers > 1 else []
    assert len(pids) == (workers if workers > 1 else 0)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    server.stop()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
    text = server.log_path.read_text()
    assert text.count("polykit_cache.server: stopped") == workers
    assert "Traceback" not in text


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(tmp_path):
    blob = pack_tree(tmp_path, {"a": os.urandom(50_000)})
    server = start(tmp_path, 2)
    try:
        assert request(server.port, "PUT", ART, blob)[0] == 201
        before = worker_pids(server)
        assert len(before) == 2
        stop = threading.Event()
        outcomes: list[object] = []
        lock = threading.Lock()

        def load() -> None:
            while not stop.is_set():
                try:
                    outcome: object = request(server.port, "GET", ART, timeout=30)[0]
                except (OSError, http.client.HTTPException) as exc:  # a connection the killed worker had
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(outcomes) >= 40, "requests are answered")
        with lock:
            answered = outcomes.count(200)
        counted = stats(server.port)["hits"]  # under load: every GET answered before the scrape
        assert counted >= answered
        os.kill(before[0], signal.SIGKILL)
        # One reading of the log per check: the killed worker stays listed until it is reaped.
        wait_for(lambda: worker_pids(server).get(0, before[0]) != before[0], "a new worker 0 starts")
        served = len(outcomes)
        wait_for(lambda: len(outcomes) >= served + 40, "requests go on after the restart")
        stop.set()
        for t in threads:
            t.join(60)
        # Only connections the killed worker held can fail: at most one per client thread.
        failures = [o for o in outcomes if o != 200]
        assert len(failures) <= len(threads), failures
        assert worker_pids(server)[1] == before[1]  # the other worker was never disturbed
        # The killed worker lost only what it counted since its last batch: what the scrape
        # before the kill counted stays counted, and so does every GET the live workers answered
        # after it (less one answer per client thread that may have left the killed worker
        # just before it died); nothing is counted twice. The killed worker may have counted,
        # and written in a batch, a GET whose answer it died before sending: one per failure.
        hits = stats(server.port)["hits"]
        assert counted + outcomes[served:].count(200) - len(threads) <= hits <= outcomes.count(200) + len(failures)
        assert "worker 0 (pid %d) was killed by SIGKILL; starting another" % before[0] in server.log_path.read_text()
    finally:
        assert server.stop() == 0


def test_a_scrape_waits_for_every_workers_counts_and_only_so_long_for_a_stopped_one(tmp_path):
    from polykit_cache.sharedstate import SETTLE_SECONDS

    server = start(tmp_path, 2)
    try:
        for _ in range(20):  # new connections: both workers answer some
            assert request(server.port, "HEAD", ART)[0] == 404
        assert stats(server.port)["misses"] == 20  # each worker wrote what it counted before the scrape
        victim = worker_pids(server)[0]
        for _ in range(20):
            assert request(server.port, "HEAD", ART)[0] == 404
        os.kill(victim, signal.SIGSTOP)  # it cannot write what it counted since its last batch
        try:
            misses = stats(server.port)["misses"]  # answered by the other worker, after SETTLE_SECONDS
            assert 20 <= misses <= 40
            assert (f"without the latest counts of worker 0, which did not write them in {SETTLE_SECONDS:.0f} s"
                    in server.log_path.read_text())
        finally:
            os.kill(victim, signal.SIGCONT)
        assert stats(server.port)["misses"] == 40  # nothing was lost, only late
    finally:
        assert server.stop() == 0


def test_workers_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYKIT_CACHE_WORKERS", "2")
    server = ServerProcess(tmp_path / "store", tmp_path / "server.log")
    try:
        assert "with 2 worker processes" in server.log_path.read_text()
        wait_for(lambda: len(worker_pids(server)) == 2, "two workers start")
    finally:
        assert server.stop() == 0


@WORKERS
def test_one_max_storage_bound_and_one_use_order_over_every_worker(tmp_path, workers):
    from polykit_cache.storage import disk_cost

    blobs = {key_for(str(i)): pack_tree(tmp_path / str(i), {"a": os.urandom(1000)}, key=key_for(str(i)))
             for i in range(30)}
    keys = list(blobs)
    bound = 10 * disk_cost(max(len(b) for b in blobs.values()))
    server = start(tmp_path, workers, "--max-storage", str(bound))

    def last_use(key: str) -> int:
        """The use of an entry the workers' shared index holds (each worker writes its uses every tick)."""
        with sqlite3.connect(tmp_path / "store" / "server-state.sqlite3") as db:
            return db.execute("SELECT used FROM entries WHERE key = ?", (key,)).fetchone()[0]

    try:
        for key in keys:
            assert request(server.port, "PUT", f"/v1/artifacts/{key}", blobs[key])[0] == 201
            before = last_use(keys[0]) if workers > 1 else 0
            # The first key is read between uploads, over new connections (any worker): it stays.
            assert request(server.port, "HEAD", f"/v1/artifacts/{keys[0]}")[0] == 200
            if workers > 1:  # another worker's eviction counts the read once its worker wrote it
                wait_for(lambda: last_use(keys[0]) > before, "the read is written to the shared index")
        figures = stats(server.port)
        on_disk = sorted(p.stem for p in (tmp_path / "store").glob("??/??/*.zst"))
        assert figures["artifacts"] == len(on_disk) <= 10
        assert figures["evictions"] == 30 - len(on_disk)
        assert figures["stored_bytes"] == sum(len(blobs[k]) for k in on_disk)
        assert keys[0] in on_disk and keys[-1] in on_disk and keys[1] not in on_disk
    finally:
        assert server.stop() == 0


def test_a_worker_started_after_the_token_file_broke_keeps_the_tokens_in_force(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("read-write good-token-3333333\n")
    server = start(tmp_path, 2, "--token-file", str(token_file))
    try:
        token_file.write_text("good-token-3333333 read-write\n")  # swapped: not a valid file
        victim = worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker_pids(server).get(0) not in (None, victim), "worker 0 is replaced")
        wait_for(lambda: server.log_path.read_text().count("serving") >= 4, "the new worker serves")
        for _ in range(8):
            assert request(server.port, "HEAD", ART, headers={"Authorization": "Bearer good-token-3333333"})[0] == 404
    finally:
        assert server.stop() == 0
    assert "tokens not reloaded" in server.log_path.read_text()


def test_a_damaged_state_database_is_made_anew(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "server-state.sqlite3").write_bytes(b"not a database" * 100)
    server = start(tmp_path, 2)
    try:
        assert request(server.port, "GET", ART)[0] == 404
        assert stats(server.port)["misses"] == 1
    finally:
        assert server.stop() == 0


def test_the_status_history_counts_every_workers_requests(tmp_path):
    blob = pack_tree(tmp_path, {"a": b"y" * 800})
    server = start(tmp_path, 2)
    try:
        assert request(server.port, "PUT", ART, blob)[0] == 201
        for _ in range(10):  # new connections: both workers answer some
            assert request(server.port, "GET", ART)[0] == 200
            assert request(server.port, "HEAD", f"/v1/artifacts/{key_for('none')}")[0] == 404
    finally:
        assert server.stop() == 0  # each worker writes its last figures as it stops
    server = start(tmp_path, 1, log="again.log")
    try:
        history = stats(server.port)["history"]
        assert (history["all_time"]["hits"], history["all_time"]["misses"]) == (10, 10)
        assert history["all_time"]["uploads"] == 1
    finally:
        assert server.stop() == 0
