"""``polykit build --summary FILE``: the run as one JSON document (Turborepo's ``--summarize`` is the model).

Per task: its key, what happened (hit, miss, failed, skipped) and where a hit came from, when it
started and how long it took, the bytes it moved to and from the remote cache, and the build
time a hit saved (the ``duration_ms`` its artifact recorded); then the totals of the run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from .graph import Node

SUMMARY_VERSION = 1


class Timings:
    """When each task started and how long it took, taken around the scheduler's work function."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: dict[Node, float] = {}
        self.elapsed_ms: dict[Node, int] = {}

    def wrap(self, work: Callable[[Node], bool]) -> Callable[[Node], bool]:
        def timed(node: Node) -> bool:
            wall, began = time.time(), time.monotonic()
            try:
                return work(node)
            finally:
                with self._lock:
                    self.started[node] = wall
                    self.elapsed_ms[node] = int((time.monotonic() - began) * 1000)
        return timed


def _status(text: str) -> tuple[str, str | None]:
    """("hit", "local") from "hit (local)"; ("failed", None) from "failed (exit 1)"."""
    word, _, rest = text.partition(" (")
    if word == "hit":
        return "hit", rest.rstrip(")") or None
    return word, None


def document(order: list[Node], keys: Mapping[Node, str], deps: Mapping[Node, list[Node]],
             outcome: Mapping[Node, str], statuses: Mapping[Node, str], saved_ms: Mapping[Node, int],
             moved: Mapping[Node, dict], timings: Timings, *, command: str, started: float,
             elapsed_ms: int) -> dict:
    """The summary of one run as a JSON-ready dict."""
    tasks = []
    totals = {"tasks": len(order), "hits": 0, "local_hits": 0, "remote_hits": 0, "misses": 0, "failed": 0,
              "skipped": 0, "bytes_down": 0, "bytes_up": 0, "saved_ms": 0}
    for node in order:
        text = statuses.get(node) or ("skipped" if outcome.get(node) == "skipped" else outcome.get(node, "skipped"))
        status, source = _status(text)
        if status not in ("hit", "miss", "failed", "skipped"):
            status = "failed" if outcome.get(node) == "failed" else status
        bytes_moved = moved.get(node, {})
        entry = {
            "task": str(node), "package": node.package, "name": node.task, "key": keys[node],
            "status": status, "source": source,
            "dependencies": [str(d) for d in sorted(deps.get(node, []))],
            "started_at": round(timings.started[node], 3) if node in timings.started else None,
            "duration_ms": timings.elapsed_ms.get(node),
            "saved_ms": saved_ms.get(node, 0) if status == "hit" else 0,
            "bytes_down": bytes_moved.get("down", 0), "bytes_up": bytes_moved.get("up", 0),
        }
        tasks.append(entry)
        if status == "hit":
            totals["hits"] += 1
            totals["local_hits" if source == "local" else "remote_hits"] += 1
        elif status == "miss":
            totals["misses"] += 1
        elif status == "failed":
            totals["failed"] += 1
        else:
            totals["skipped"] += 1
        totals["bytes_down"] += entry["bytes_down"]
        totals["bytes_up"] += entry["bytes_up"]
        totals["saved_ms"] += entry["saved_ms"]
    totals["duration_ms"] = elapsed_ms
    return {"version": SUMMARY_VERSION, "command": command, "started_at": round(started, 3), "tasks": tasks,
            "totals": totals}


def write(path: Path, summary: dict) -> None:
    """Write the summary to ``path`` whole or not at all (a temporary file renamed over it); raises OSError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
