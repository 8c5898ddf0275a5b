"""Counters for /metrics (Prometheus text format 0.0.4) and /v1/stats (JSON).

Counters are plain numbers behind one lock: a request touches it a few times, far less than
the cost of the request itself, and the figures stay consistent with each other. With several
worker processes each one's counts are added up in a shared database in batches, and a scrape
waits for every worker's batch (see :mod:`.sharedstate`).

Every label takes its values from a fixed set, never from the request: a made-up method is
counted as ``OTHER``, a path no route owns as protocol ``none``, a status outside 100-599 as
``0``, and refusal reasons come from :mod:`outcomes`. So no client can add a series.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import Counter
from http import HTTPMethod
from typing import Callable

from polykit_client import __version__

from .history import History
from .sharedstate import SETTLE_SECONDS, SharedState

log = logging.getLogger("polykit_cache.metrics")

# Request duration buckets, in seconds: from a cached HEAD to a large upload.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# The methods of RFC 9110 and RFC 5789 (PATCH) keep their name as a label; any other is OTHER.
METHODS = frozenset(m.value for m in HTTPMethod)
PROTOCOLS = frozenset({"polykit", "turbo", "nx", "bazel", "kv"})
# Namespaces come from the URL, so any client can name new ones: the first this many each get
# their own label, the rest are counted together as "other", so the series stay bounded (each
# worker process keeps its own first ones: at most this many times --workers in all).
MAX_NAMESPACE_LABELS = 100


# Series every request or lookup counts, made once.
_DURATION, _HITS, _MISSES, _BYTES_OUT = ("duration",), ("hits",), ("misses",), ("bytes_out",)


class Metrics:
    """All counters of one server; ``stored`` reports (artifacts, bytes, evictions) from the storage.

    Every figure is a *series* (a tuple: its kind, then its labels) in one counter. With
    ``shared`` (``--workers N``), what this worker counted is added to the shared database by
    :meth:`flush` (on the worker's timer, see :mod:`.flusher`), and the figures shown are the
    totals of every worker once each has written what it counted before the scrape began
    (:mod:`.sharedstate`); alone, the counter in memory is the whole truth.

    Every event also goes to the ``history`` (time buckets kept across restarts), so the status
    page, ``/v1/stats`` and ``/metrics`` show one model. Each worker has its own connection to
    the one history file, whose flushes add up (see :mod:`.history`).
    """

    def __init__(self, stored: Callable[[], tuple[int, int, int]], history: History | None = None,
                 max_storage: int | None = None, shared: SharedState | None = None) -> None:
        self._lock = threading.Lock()
        self._stored = stored
        self.history = history if history is not None else History(":memory:")
        self.max_storage = max_storage
        self._shared = shared
        self.started = shared.started() if shared is not None else time.time()
        self._counts: Counter[tuple] = Counter()  # alone: everything; shared: not yet added
        self._namespace_labels: set[str] = set()
        # One batch at a time, from taking it to its commit: a batch recorded as taken later must
        # never be committed before an earlier one (a scrape would count on it, see settle()).
        self._flush_lock = threading.Lock()
        self._flushed = time.monotonic()  # when the last batch written was taken

    def request(self, method: str, status: int, seconds: float, protocol: str | None = "polykit") -> None:
        """Count one answer; ``protocol`` None is a path no route owns. The last count of a request."""
        method = method if method in METHODS else "OTHER"  # a bounded label: unknown methods are one
        protocol = protocol if protocol in PROTOCOLS else "none"
        status = status if 100 <= status <= 599 else 0
        bucket = ("bucket", bisect_left(BUCKETS, seconds))  # the first bound at or over the duration
        with self._lock:
            counts = self._counts
            counts[("requests", protocol, method, status)] += 1
            counts[bucket] += 1
            counts[_DURATION] += seconds

    def lookup(self, hit: bool, bytes_out: int = 0, protocol: str = "polykit", namespace: str = "") -> None:
        label = "/" + namespace  # the URL prefix that names it: "/" for none, "/cache-v2"
        with self._lock:
            if label not in self._namespace_labels:
                if len(self._namespace_labels) < MAX_NAMESPACE_LABELS:
                    self._namespace_labels.add(label)
                else:
                    label = "other"
            counts = self._counts
            counts[("lookups", protocol, hit)] += 1
            counts[("namespace", label, hit)] += 1
            if hit:
                counts[_HITS] += 1
                if bytes_out:
                    counts[_BYTES_OUT] += bytes_out
            else:
                counts[_MISSES] += 1
        self.history.lookup(protocol, hit, bytes_out)

    def upload(self, size: int, protocol: str = "polykit") -> None:
        with self._lock:
            self._counts[("uploads",)] += 1
            self._counts[("bytes_in",)] += size
        self.history.count(protocol, uploads=1, bytes_in=size)

    def reject(self, reason: str, size: int = 0, protocol: str | None = None) -> None:
        with self._lock:
            self._counts[("rejected", reason)] += 1
            self._counts[("bytes_in",)] += size
        self.history.count(protocol if protocol in PROTOCOLS else "none", rejected=1, bytes_in=size)

    def saved(self, ms: int) -> None:
        """A download that saved a build of ``ms`` milliseconds (the artifact's ``duration_ms``)."""
        if ms <= 0:
            return
        with self._lock:
            self._counts[("saved_ms",)] += ms
        self.history.count("polykit", saved_ms=ms)

    @property
    def saved_ms(self) -> int:
        """Build time saved since the server started, over every worker."""
        counts, _ = self._snapshot()
        return int(counts[("saved_ms",)])

    def flush(self) -> None:
        """Add what this worker counted since its last batch to the shared totals, in one transaction.

        With nothing counted, a batch is still written when a scrape waits for one (it tells
        the scrape that nothing is missing). A batch that cannot be written is kept for the next.
        """
        if self._shared is None:
            return
        with self._flush_lock:
            taken = time.monotonic()
            with self._lock:
                deltas = {series: n for series, n in self._counts.items() if n}
                self._counts.clear()
            if not deltas and not self._shared.wanted(self._flushed):
                return
            try:
                self._shared.add(deltas, taken)
            except BaseException:
                with self._lock:
                    self._counts.update(deltas)
                raise
            self._flushed = taken

    def _snapshot(self) -> tuple[Counter[tuple], tuple[int, int, int]]:
        """Every series, and the storage's (artifacts, bytes, evictions) (shared by the workers too)."""
        if self._shared is None:
            with self._lock:
                return Counter(self._counts), self._stored()
        began = time.monotonic()
        self.flush()
        missing = self._shared.settle(began)
        if missing:
            log.warning("answering a scrape without the latest counts of worker %s, which did not write them in %.0f s",
                        ", ".join(map(str, missing)), SETTLE_SECONDS)
        return Counter(self._shared.totals()), self._stored()

    @property
    def requests(self) -> Counter[tuple[str, str, int]]:
        """Requests answered by (protocol, method, status), over every worker."""
        counts, _ = self._snapshot()
        return Counter({s[1:]: int(n) for s, n in counts.items() if s[0] == "requests"})

    def stats(self) -> dict:
        """The JSON figures of /v1/stats (since this server started, and ``history`` across restarts)."""
        counts, (count, size, evictions) = self._snapshot()
        history = self.history.summary()
        hits, misses = int(counts[("hits",)]), int(counts[("misses",)])
        lookups = hits + misses
        return {
            "version": __version__,
            "started": round(self.started, 3),
            "uptime_seconds": round(time.time() - self.started, 3),
            "requests": int(sum(n for series, n in counts.items() if series[0] == "requests")),
            "requests_by_status": {str(k): v for k, v in sorted(_by_status(counts).items())},
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / lookups, 4) if lookups else None,
            "uploads": int(counts[("uploads",)]),
            "uploads_rejected": {s[1]: int(n) for s, n in sorted(counts.items()) if s[0] == "rejected"},
            "bytes_in": int(counts[("bytes_in",)]),
            "bytes_out": int(counts[("bytes_out",)]),
            "evictions": evictions,
            "by_protocol": _by_protocol(counts),
            "by_namespace": _by_namespace(counts),
            "artifacts": count,
            "stored_bytes": size,
            "max_storage": self.max_storage,
            "saved_seconds": round(counts[("saved_ms",)] / 1000, 3),
            "history": history,
        }

    def prometheus(self) -> str:
        """The text exposition of /metrics."""
        counts, (count, size, evictions) = self._snapshot()
        windows = self.history.summary()["windows"]
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        def series(kind: str) -> list[tuple[tuple, int]]:
            return sorted((s[1:], int(n)) for s, n in counts.items() if s[0] == kind)

        family(
            "polykit_cache_requests_total",
            "counter",
            "HTTP requests answered, by protocol, method and status.",
            [(f'{{protocol="{p}",method="{m}",status="{s}"}}', n) for (p, m, s), n in series("requests")],
        )
        cumulative = 0
        buckets = []
        for index, bound in enumerate(BUCKETS):
            cumulative += int(counts[("bucket", index)])
            buckets.append((f'{{le="{bound}"}}', cumulative))
        total = cumulative + int(counts[("bucket", len(BUCKETS))])
        buckets.append(('{le="+Inf"}', total))
        lines.append("# HELP polykit_cache_request_duration_seconds Time to answer a request.")
        lines.append("# TYPE polykit_cache_request_duration_seconds histogram")
        lines.extend(f"polykit_cache_request_duration_seconds_bucket{lb} {v}" for lb, v in buckets)
        lines.append(f"polykit_cache_request_duration_seconds_sum {counts[('duration',)]:.6f}")
        lines.append(f"polykit_cache_request_duration_seconds_count {total}")
        lookups = series("lookups")
        family("polykit_cache_hits_total", "counter", "Lookups that found the key, by protocol.",
               [(f'{{protocol="{p}"}}', n) for (p, hit), n in lookups if hit])
        family("polykit_cache_misses_total", "counter", "Lookups that did not, by protocol.",
               [(f'{{protocol="{p}"}}', n) for (p, hit), n in lookups if not hit])
        family("polykit_cache_namespace_lookups_total", "counter",
               f"Lookups by URL namespace (/ for none; past {MAX_NAMESPACE_LABELS} namespaces, other) and result.",
               [(f'{{namespace="{ns}",result="{"hit" if hit else "miss"}"}}', n) for (ns, hit), n in series("namespace")])
        family("polykit_cache_uploads_total", "counter", "Artifacts verified and stored.",
               [("", int(counts[("uploads",)]))])
        family(
            "polykit_cache_uploads_rejected_total",
            "counter",
            "Uploads refused, by reason.",
            [(f'{{reason="{r}"}}', n) for (r,), n in series("rejected")],
        )
        family("polykit_cache_received_bytes_total", "counter", "Upload body bytes read.",
               [("", int(counts[("bytes_in",)]))])
        family("polykit_cache_sent_bytes_total", "counter", "Artifact bytes served.", [("", int(counts[("bytes_out",)]))])
        family("polykit_cache_evictions_total", "counter", "Artifacts evicted to stay under the storage limit.", [("", evictions)])
        family("polykit_cache_saved_seconds_total", "counter",
               "Build time saved: the duration_ms of every polykit artifact downloaded, in seconds.",
               [("", round(counts[("saved_ms",)] / 1000, 3))])
        family("polykit_cache_hit_ratio", "gauge", "Hits over lookups in the last hour, day and 30 days (history).",
               [(f'{{window="{name}"}}', w["hit_rate"]) for name, w in windows.items() if w["hit_rate"] is not None])
        family("polykit_cache_window_saved_seconds", "gauge", "Build time saved in the last hour, day and 30 days.",
               [(f'{{window="{name}"}}', w["saved_seconds"]) for name, w in windows.items()])
        if self.max_storage is not None:
            family("polykit_cache_storage_limit_bytes", "gauge", "The --max-storage bound.", [("", self.max_storage)])
        family("polykit_cache_build_info", "gauge", "The server's version.", [(f'{{version="{__version__}"}}', 1)])
        family("polykit_cache_stored_artifacts", "gauge", "Artifacts in storage.", [("", count)])
        family("polykit_cache_stored_bytes", "gauge", "Bytes of artifacts in storage.", [("", size)])
        return "\n".join(lines) + "\n"


def _by_status(counts: Counter[tuple]) -> Counter[int]:
    out: Counter[int] = Counter()
    for series, n in counts.items():
        if series[0] == "requests":
            out[series[3]] += int(n)
    return out


def _by_protocol(counts: Counter[tuple]) -> dict:
    out: dict = {}
    for series, n in counts.items():
        if series[0] == "requests":
            out.setdefault(series[1], {"requests": 0, "hits": 0, "misses": 0})["requests"] += int(n)
        elif series[0] == "lookups":
            out.setdefault(series[1], {"requests": 0, "hits": 0, "misses": 0})["hits" if series[2] else "misses"] += int(n)
    return dict(sorted(out.items()))


def _by_namespace(counts: Counter[tuple]) -> dict:
    out: dict = {}
    for series, n in counts.items():
        if series[0] == "namespace":
            out.setdefault(series[1], {"hits": 0, "misses": 0})["hits" if series[2] else "misses"] += int(n)
    return dict(sorted(out.items()))
