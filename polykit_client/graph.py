"""The task graph: which tasks a command needs, in what order, and running them in parallel.

A task depends on the tasks named in its ``depends_on`` and on the same task of each of its
package's internal dependencies, so a change upstream reaches every task downstream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from .workspace import ConfigError, Workspace


@dataclass(frozen=True, order=True)
class Node:
    package: str
    task: str

    def __str__(self) -> str:
        return f"{self.package}:{self.task}"


class GraphError(Exception):
    """A cycle, or a request for a package or task that does not exist."""


def task_deps(ws: Workspace, node: Node) -> list[Node]:
    """The nodes ``node`` waits for."""
    pkg = ws.packages[node.package]
    task = pkg.tasks[node.task]
    out = [Node(pkg.name, dep) for dep in task.depends_on]
    out += [Node(dep, node.task) for dep in pkg.internal_deps if node.task in ws.packages[dep].tasks]
    return out


def package_cycle(ws: Workspace) -> list[str] | None:
    """A cycle among internal dependencies, as the names along it, or None."""
    edges = {name: list(pkg.internal_deps) for name, pkg in ws.packages.items()}
    return _find_cycle(sorted(edges), lambda n: edges[n])


def _find_cycle(starts: Iterable, edges: Callable) -> list | None:
    state: dict = {}
    stack: list = []

    def visit(node) -> list | None:
        state[node] = "active"
        stack.append(node)
        for nxt in edges(node):
            if state.get(nxt) == "active":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for start in starts:
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def plan(ws: Workspace, task: str, packages: Iterable[str] = ()) -> tuple[list[Node], dict[Node, list[Node]]]:
    """The nodes needed to run ``task`` in ``packages`` (all that have it when empty), in dependency order."""
    cycle = package_cycle(ws)
    if cycle:
        raise GraphError("dependency cycle between packages: " + " -> ".join(cycle))
    wanted = list(packages)
    for name in wanted:
        if name not in ws.packages:
            raise GraphError(f"unknown package {name!r} (packages: {', '.join(ws.packages) or 'none'})")
        if task not in ws.packages[name].tasks:
            have = ", ".join(sorted(ws.packages[name].tasks)) or "no tasks"
            raise GraphError(f"package {name!r} has no task {task!r} (it has: {have})")
    if not wanted:
        wanted = [name for name, pkg in ws.packages.items() if task in pkg.tasks]
        if not wanted:
            known = sorted({t for pkg in ws.packages.values() for t in pkg.tasks})
            raise GraphError(f"no package has a task {task!r} (tasks: {', '.join(known) or 'none'})")
    deps: dict[Node, list[Node]] = {}
    todo = [Node(name, task) for name in wanted]
    while todo:
        node = todo.pop()
        if node in deps:
            continue
        deps[node] = task_deps(ws, node)
        todo.extend(deps[node])
    cycle = _find_cycle(sorted(deps), lambda n: deps[n])
    if cycle:
        raise GraphError("task cycle: " + " -> ".join(map(str, cycle)))
    return topological(deps), deps


def topological(deps: Mapping[Node, list[Node]]) -> list[Node]:
    """Dependencies first; ties broken by name so the order is stable."""
    order: list[Node] = []
    done: set[Node] = set()

    def visit(node: Node) -> None:
        if node in done:
            return
        done.add(node)
        for dep in sorted(deps[node]):
            visit(dep)
        order.append(node)

    for node in sorted(deps):
        visit(node)
    return order


def run_graph(
    order: list[Node],
    deps: Mapping[Node, list[Node]],
    work: Callable[[Node], bool],
    parallel: int,
    continue_on_error: bool = False,
    quick: Callable[[Node], bool] | None = None,
    before_wait: Callable[[], None] | None = None,
) -> dict[Node, str]:
    """Run ``work`` for each node once its dependencies succeeded, ``parallel`` at a time.

    ``quick(node)``, when given, is tried first on this (the scheduler's) thread as each node
    becomes ready: True means the node is done and succeeded (a local hit whose outputs are
    already in place: a look at a few files and its log line), False hands it to ``work`` on a
    pool thread. Handing such a node to a thread and its result back cost more than the node
    itself: every hand-over is a wake-up and a contended exchange of the interpreter lock (a
    run of 500 hits made some 58,000 futex calls on 10 threads). ``quick`` must be fast and
    must not raise. ``before_wait()``, when given, is called whenever the scheduler is about to wait
    for a pool thread, and once at the end (the runner writes out what its quick nodes printed).

    Returns each node's outcome: "ok", "failed", or "skipped" (a dependency failed, or an
    earlier failure stopped the run without ``continue_on_error``).
    """
    import heapq
    import queue

    waiting = {node: set(deps[node]) for node in order}
    dependents: dict[Node, list[Node]] = {node: [] for node in order}
    for node in order:
        for dep in deps[node]:
            dependents[dep].append(node)
    outcome: dict[Node, str] = {}
    stop = threading.Event()
    # Nodes whose dependencies are all done, by their place in ``order`` (the first ready one
    # starts first), and the finished ones as their threads report them: each step costs a heap
    # operation, not a pass over every node (500 tasks made that pass a quarter of a build of hits).
    position = {node: index for index, node in enumerate(order)}
    ready = [position[node] for node in order if not waiting[node]]
    heapq.heapify(ready)
    finished: queue.SimpleQueue = queue.SimpleQueue()

    def skip_downstream(node: Node) -> None:
        for child in dependents[node]:
            if child not in outcome:
                outcome[child] = "skipped"
                skip_downstream(child)

    def settle(node: Node, ok: bool) -> None:
        outcome[node] = "ok" if ok else "failed"
        if ok:
            for child in dependents[node]:
                waiting[child].discard(node)
                if not waiting[child]:
                    heapq.heappush(ready, position[child])
        else:
            skip_downstream(node)
            if not continue_on_error:
                stop.set()

    # Ready nodes that ``quick`` could not finish, waiting for a pool thread (by place in ``order``).
    for_pool: list[int] = []
    # Made for the first node that ``quick`` cannot finish: a run of such nodes alone never imports
    # ``concurrent.futures`` (and the ``logging`` it brings), a tenth of such a run's imports.
    pool = None
    try:
        running = 0

        def launch() -> None:
            nonlocal running, pool
            while ready and not stop.is_set():
                index = heapq.heappop(ready)
                node = order[index]
                if node in outcome:
                    continue  # skipped after a failure
                if quick is not None and quick(node):
                    settle(node, True)  # its dependents join ``ready`` and are tried in this same loop
                else:
                    heapq.heappush(for_pool, index)
            while for_pool and running < parallel and not stop.is_set():
                node = order[heapq.heappop(for_pool)]
                if pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
                future = pool.submit(work, node)
                future.add_done_callback(lambda done, node=node: finished.put((node, done)))
                running += 1

        launch()
        while running:
            if before_wait is not None:
                before_wait()
            node, future = finished.get()
            running -= 1
            settle(node, bool(future.result()))  # work() reports failure by returning False
            launch()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if before_wait is not None:
        before_wait()
    for node in order:
        outcome.setdefault(node, "skipped")
    return outcome


__all__ = ["ConfigError", "GraphError", "Node", "plan", "run_graph", "topological", "package_cycle"]
