"""The scheduler and the local cache's trimming, driven directly."""

import os
import threading
import time

from polykit_client.graph import Node, run_graph, topological
from polykit_client.localcache import LocalCache


def diamond():
    a, b, c, d = (Node(p, "build") for p in "abcd")
    return [a, b, c, d], {a: [], b: [a], c: [a], d: [b, c]}


def test_dependencies_run_first_and_independent_tasks_run_side_by_side():
    nodes, deps = diamond()
    started, running, peak = [], [0], [0]
    lock = threading.Lock()

    def work(node):
        with lock:
            started.append(node.package)
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return True

    outcome = run_graph(topological(deps), deps, work, parallel=4)
    assert outcome == {n: "ok" for n in nodes}
    assert started[0] == "a" and started[-1] == "d"
    assert peak[0] == 2  # b and c together, never more than the graph allows


def test_parallel_one_runs_one_at_a_time():
    nodes, deps = diamond()
    running, peak = [0], [0]

    def work(node):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        running[0] -= 1
        return True

    run_graph(topological(deps), deps, work, parallel=1)
    assert peak[0] == 1


def test_a_failure_skips_dependents_and_stops_the_rest_unless_told_to_continue():
    a, b, c = Node("a", "t"), Node("b", "t"), Node("c", "t")
    deps = {a: [], b: [a], c: []}
    order = [a, c, b]
    ran = []

    def work(node):
        ran.append(node)
        return node != a

    outcome = run_graph(order, deps, work, parallel=1)
    assert outcome[a] == "failed" and outcome[b] == "skipped" and outcome[c] == "skipped"
    ran.clear()
    outcome = run_graph(order, deps, work, parallel=1, continue_on_error=True)
    assert outcome == {a: "failed", b: "skipped", c: "ok"}


def test_local_cache_trims_least_recently_used_first(tmp_path):
    cache = LocalCache(tmp_path / "cache", max_size=2500)
    keys = [f"{i:064x}" for i in range(4)]
    for age, key in enumerate(keys):
        fh, temp = cache.new_temp()
        with fh:
            fh.write(b"x" * 1000)
        path = cache.put(key, temp)
        os.utime(path, (1000 + age, 1000 + age))
    assert cache.get(keys[0]) is not None  # a use refreshes it
    assert cache.trim() == 2000
    assert [cache.get(k) is not None for k in keys] == [True, False, False, True]


def test_quick_nodes_finish_on_the_scheduler_thread_in_dependency_order():
    # A node `quick` can finish (a hit whose outputs are in place) never reaches a pool thread;
    # its dependents become ready after it, whichever way they are then run.
    nodes, deps = diamond()
    a, b, c, d = nodes
    seen = []

    def quick(node):
        seen.append((node.package, threading.current_thread() is threading.main_thread()))
        return node != c

    def work(node):
        seen.append((node.package, threading.current_thread() is threading.main_thread()))
        return True

    outcome = run_graph(topological(deps), deps, work, parallel=4, quick=quick)
    assert outcome == {n: "ok" for n in nodes}
    assert seen[0] == ("a", True)
    assert ("c", False) in seen  # quick said no: a pool thread ran it
    assert [p for p, main in seen if not main] == ["c"]
    assert seen.index(("d", True)) > seen.index(("c", False))  # d waited for c, though b was quick


def test_a_failure_stops_quick_nodes_too():
    a, b, c = Node("a", "t"), Node("b", "t"), Node("c", "t")
    deps = {a: [], b: [a], c: [b]}
    tried = []

    def quick(node):
        tried.append(node)
        return node != a

    outcome = run_graph([a, b, c], deps, lambda node: False, parallel=2, quick=quick)
    assert outcome == {a: "failed", b: "skipped", c: "skipped"}
    assert tried == [a]


def test_before_wait_is_called_before_each_wait_and_at_the_end():
    nodes, deps = diamond()
    events = []

    def work(node):
        events.append(node.package)
        return True

    run_graph(topological(deps), deps, work, parallel=1, quick=lambda node: node.package in "bc",
              before_wait=lambda: events.append("wait"))
    # a goes to the pool (the scheduler waits for it), b and c are quick, d goes to the pool: two
    # waits, then the end; a pool thread may log its node before or after the scheduler's call
    assert events.count("wait") == 3 and events[-1] == "wait"
    assert [e for e in events if e != "wait"] == ["a", "d"]
