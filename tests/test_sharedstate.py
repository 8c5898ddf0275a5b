"""The workers' shared counters: batches, what a scrape waits for, and what it may miss."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from polykit_cache.flusher import Flusher
from polykit_cache.metrics import Metrics
from polykit_cache.sharedstate import SharedState
from support import ROOT


def metrics_of(state: SharedState) -> Metrics:
    return Metrics(lambda: (0, 0, 0), shared=state)


def test_counts_reach_the_shared_totals_in_batches_and_a_scrape_writes_its_own_first(tmp_path):
    state = SharedState.create(tmp_path)
    state.join(0)
    one, other = metrics_of(state), metrics_of(SharedState(state.path))
    one.request("GET", 200, 0.001)
    one.lookup(True, 10)
    assert SharedState(state.path).totals() == {}  # nothing written per request
    one.flush()
    assert other.stats()["hits"] == 1 and other.stats()["requests"] == 1
    one.request("HEAD", 404, 0.001)
    assert one.stats()["requests"] == 2  # the worker answering a scrape adds its own counts first


class FailingOnce(SharedState):
    """The shared database refusing one write (a full disk), as SQLite reports it."""

    failed = False

    def add(self, deltas, taken=None):
        if not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        super().add(deltas, taken)


def test_a_batch_that_cannot_be_written_is_kept_for_the_next(tmp_path, caplog):
    SharedState.create(tmp_path).close()
    state = FailingOnce(tmp_path / "server-state.sqlite3")
    metrics = metrics_of(state)
    metrics.request("GET", 200, 0.001)
    flusher = Flusher([metrics.flush])
    flusher.run_once()
    assert "could not write to the workers' shared database (database or disk is full)" in caplog.text
    metrics.request("GET", 200, 0.001)
    flusher.run_once()
    assert SharedState(state.path).totals()[("requests", "polykit", "GET", 200)] == 2


WORKER = """
import sys, time
from polykit_cache.sharedstate import SharedState
state = SharedState(sys.argv[1])
state.join(1)
joined = time.monotonic()
print("joined", flush=True)
while not state.wanted(joined):  # its timer, as flusher.py runs it
    time.sleep(0.01)
state.add({("hits",): 7}, time.monotonic())
time.sleep(60)
"""


def test_a_scrape_waits_for_a_live_workers_batch_and_never_for_a_dead_one(tmp_path):
    state = SharedState.create(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(state.path)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert worker.stdout.readline() == b"joined\n"
        with sqlite3.connect(state.path) as db:  # a worker killed before it wrote its last batch
            db.execute("INSERT INTO workers VALUES (2, ?, 0)", (dead.pid,))
        began = time.monotonic()
        assert state.settle(began, seconds=30) == []
        assert state.totals() == {("hits",): 7}
        assert state.settle(began - 1, seconds=30) == []  # an earlier scrape: nothing more to wait for
    finally:
        worker.kill()
        worker.wait()


def test_a_scrape_answers_without_a_silent_workers_latest_counts_after_the_bound(tmp_path):
    state = SharedState.create(tmp_path)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with sqlite3.connect(state.path) as db:
            db.execute("INSERT INTO workers VALUES (1, ?, 0)", (silent.pid,))
        assert state.settle(time.monotonic(), seconds=0.05) == [1]
    finally:
        silent.kill()
        silent.wait()


def test_a_stopping_worker_leaves_and_is_no_longer_waited_for(tmp_path):
    state = SharedState.create(tmp_path)
    state.join(3)
    with sqlite3.connect(state.path) as db:
        assert db.execute("SELECT slot FROM workers").fetchall() == [(3,)]
    state.leave()
    with sqlite3.connect(state.path) as db:
        assert db.execute("SELECT slot FROM workers").fetchall() == []
