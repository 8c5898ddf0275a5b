"""Counters for /metrics (Prometheus text format 0.0.4) and /v1/stats (JSON).

Counters are plain integers behind one lock: a request touches it a few times, far less than
the cost of the request itself, and the figures stay consistent with each other.

Every label takes its values from a fixed set, never from the request: a made-up method is
counted as ``OTHER``, a path no route owns as protocol ``none``, a status outside 100-599 as
``0``, and refusal reasons come from :mod:`outcomes`. So no client can add a series.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from http import HTTPMethod
from typing import Callable

from polykit_client import __version__

from .history import History

# Request duration buckets, in seconds: from a cached HEAD to a large upload.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# The methods of RFC 9110 and RFC 5789 (PATCH) keep their name as a label; any other is OTHER.
METHODS = frozenset(m.value for m in HTTPMethod)
PROTOCOLS = frozenset({"polykit", "turbo", "nx", "bazel", "kv"})
# Namespaces come from the URL, so any client can name new ones: the first this many each get
# their own label, the rest are counted together as "other", so the series stay bounded.
MAX_NAMESPACE_LABELS = 100


def namespace_label(namespace: str) -> str:
    """A namespace as the URL prefix that names it: ``/`` for none, ``/cache-v2`` for ``cache-v2``."""
    return "/" + namespace


def method_label(method: str) -> str:
    """The ``method`` label of a request: a known method's name, else ``OTHER``."""
    return method if method in METHODS else "OTHER"


class Metrics:
    """All counters of one server; ``stored`` reports (artifacts, bytes, evictions) from the storage.

    Every event also goes to the ``history`` (time buckets kept across restarts), so the status
    page, ``/v1/stats`` and ``/metrics`` show one model.
    """

    def __init__(self, stored: Callable[[], tuple[int, int, int]], history: History | None = None,
                 max_storage: int | None = None) -> None:
        self._lock = threading.Lock()
        self._stored = stored
        self.history = history if history is not None else History(":memory:")
        self.max_storage = max_storage
        self.saved_ms = 0
        self.started = time.time()
        self.requests: Counter[tuple[str, str, int]] = Counter()  # (protocol, method, status)
        self.lookups: Counter[tuple[str, bool]] = Counter()  # (protocol, hit)
        self.namespaces: Counter[tuple[str, bool]] = Counter()  # (namespace label, hit)
        self._namespace_labels: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.hits = self.misses = 0
        self.bytes_in = self.bytes_out = 0
        self.uploads = 0
        self._bucket_counts = [0] * (len(BUCKETS) + 1)
        self._duration_sum = 0.0

    def request(self, method: str, status: int, seconds: float, protocol: str | None = "polykit") -> None:
        """Count one answer; ``protocol`` None is a path no route owns."""
        method = method_label(method)
        protocol = protocol if protocol in PROTOCOLS else "none"
        status = status if 100 <= status <= 599 else 0
        index = 0
        while index < len(BUCKETS) and seconds > BUCKETS[index]:
            index += 1
        with self._lock:
            self.requests[(protocol, method, status)] += 1
            self._bucket_counts[index] += 1
            self._duration_sum += seconds

    def lookup(self, hit: bool, bytes_out: int = 0, protocol: str = "polykit", namespace: str = "") -> None:
        label = namespace_label(namespace)
        with self._lock:
            if label not in self._namespace_labels:
                if len(self._namespace_labels) < MAX_NAMESPACE_LABELS:
                    self._namespace_labels.add(label)
                else:
                    label = "other"
            self.lookups[(protocol, hit)] += 1
            self.namespaces[(label, hit)] += 1
            if hit:
                self.hits += 1
                self.bytes_out += bytes_out
            else:
                self.misses += 1
        if hit:
            self.history.count(protocol, hits=1, bytes_out=bytes_out)
        else:
            self.history.count(protocol, misses=1)

    def upload(self, size: int, protocol: str = "polykit") -> None:
        with self._lock:
            self.uploads += 1
            self.bytes_in += size
        self.history.count(protocol, uploads=1, bytes_in=size)

    def reject(self, reason: str, size: int = 0, protocol: str | None = None) -> None:
        with self._lock:
            self.rejected[reason] += 1
            self.bytes_in += size
        self.history.count(protocol if protocol in PROTOCOLS else "none", rejected=1, bytes_in=size)

    def saved(self, ms: int) -> None:
        """A download that saved a build of ``ms`` milliseconds (the artifact's ``duration_ms``)."""
        if ms <= 0:
            return
        with self._lock:
            self.saved_ms += ms
        self.history.count("polykit", saved_ms=ms)

    def stats(self) -> dict:
        """The JSON figures of /v1/stats (since this server started, and ``history`` across restarts)."""
        count, size, evictions = self._stored()
        history = self.history.summary()
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "version": __version__,
                "started": round(self.started, 3),
                "uptime_seconds": round(time.time() - self.started, 3),
                "requests": sum(self.requests.values()),
                "requests_by_status": {str(k): v for k, v in sorted(self._by_status().items())},
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else None,
                "uploads": self.uploads,
                "uploads_rejected": dict(sorted(self.rejected.items())),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "evictions": evictions,
                "by_protocol": self._by_protocol(),
                "by_namespace": self._by_namespace(),
                "artifacts": count,
                "stored_bytes": size,
                "max_storage": self.max_storage,
                "saved_seconds": round(self.saved_ms / 1000, 3),
                "history": history,
            }

    def _by_status(self) -> Counter[int]:
        out: Counter[int] = Counter()
        for (_, _, status), n in self.requests.items():
            out[status] += n
        return out

    def _by_protocol(self) -> dict:
        out: dict = {}
        for (protocol, _, _), n in self.requests.items():
            out.setdefault(protocol, {"requests": 0, "hits": 0, "misses": 0})["requests"] += n
        for (protocol, hit), n in self.lookups.items():
            out.setdefault(protocol, {"requests": 0, "hits": 0, "misses": 0})["hits" if hit else "misses"] += n
        return dict(sorted(out.items()))

    def _by_namespace(self) -> dict:
        out: dict = {}
        for (label, hit), n in self.namespaces.items():
            out.setdefault(label, {"hits": 0, "misses": 0})["hits" if hit else "misses"] += n
        return dict(sorted(out.items()))

    def prometheus(self) -> str:
        """The text exposition of /metrics."""
        count, size, evictions = self._stored()
        windows = self.history.summary()["windows"]
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {value}")

        with self._lock:
            family(
                "polykit_cache_requests_total",
                "counter",
                "HTTP requests answered, by protocol, method and status.",
                [(f'{{protocol="{p}",method="{m}",status="{s}"}}', n) for (p, m, s), n in sorted(self.requests.items())],
            )
            cumulative = 0
            buckets = []
            for bound, n in zip(BUCKETS, self._bucket_counts):
                cumulative += n
                buckets.append((f'{{le="{bound}"}}', cumulative))
            total = cumulative + self._bucket_counts[-1]
            buckets.append(('{le="+Inf"}', total))
            lines.append("# HELP polykit_cache_request_duration_seconds Time to answer a request.")
            lines.append("# TYPE polykit_cache_request_duration_seconds histogram")
            lines.extend(f"polykit_cache_request_duration_seconds_bucket{lb} {v}" for lb, v in buckets)
            lines.append(f"polykit_cache_request_duration_seconds_sum {self._duration_sum:.6f}")
            lines.append(f"polykit_cache_request_duration_seconds_count {total}")
            family("polykit_cache_hits_total", "counter", "Lookups that found the key, by protocol.",
                   [(f'{{protocol="{p}"}}', n) for (p, hit), n in sorted(self.lookups.items()) if hit])
            family("polykit_cache_misses_total", "counter", "Lookups that did not, by protocol.",
                   [(f'{{protocol="{p}"}}', n) for (p, hit), n in sorted(self.lookups.items()) if not hit])
            family("polykit_cache_namespace_lookups_total", "counter",
                   f"Lookups by URL namespace (/ for none; past {MAX_NAMESPACE_LABELS} namespaces, other) and result.",
                   [(f'{{namespace="{ns}",result="{"hit" if hit else "miss"}"}}', n)
                    for (ns, hit), n in sorted(self.namespaces.items())])
            family("polykit_cache_uploads_total", "counter", "Artifacts verified and stored.", [("", self.uploads)])
            family(
                "polykit_cache_uploads_rejected_total",
                "counter",
                "Uploads refused, by reason.",
                [(f'{{reason="{r}"}}', n) for r, n in sorted(self.rejected.items())],
            )
            family("polykit_cache_received_bytes_total", "counter", "Upload body bytes read.", [("", self.bytes_in)])
            family("polykit_cache_sent_bytes_total", "counter", "Artifact bytes served.", [("", self.bytes_out)])
            family("polykit_cache_evictions_total", "counter", "Artifacts evicted to stay under the storage limit.", [("", evictions)])
            family("polykit_cache_saved_seconds_total", "counter",
                   "Build time saved: the duration_ms of every polykit artifact downloaded, in seconds.",
                   [("", round(self.saved_ms / 1000, 3))])
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
