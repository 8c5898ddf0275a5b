"""Maintenance of a store, through the storage interface: verify, gc and stats."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from polykit_client.artifact import ArtifactError, HashingReader, Limits, verify_stream

from .storage import Storage
from .store import SPACES, Stat, Store, namespace_of

log = logging.getLogger("polykit_cache.maintenance")


def check_artifact(store: Store, stat: Stat, limits: Limits) -> str | None:
    """Why the stored artifact is corrupt, or None when its bytes and its contents both verify."""
    opened = store.open("polykit", stat.name, use=False)
    if opened is None:
        # Still listed yet not readable: a store refuses to hand out bytes that fail their SHA-256.
        return "unreadable, or its bytes fail the recorded sha256" if store.stat("polykit", stat.name) else None
    info, fh = opened
    try:
        with fh:
            reader = HashingReader(fh)
            verify_stream(reader, expected_key=stat.name.rpartition("/")[2], limits=limits)
            while reader.read(1 << 20):
                pass
    except ArtifactError as exc:
        return str(exc)
    if reader.size != info.size or reader.digest.hexdigest() != info.sha256:
        return "stored bytes differ from the recorded size or sha256"
    return None


def verify_storage(store: Store, limits: Limits = Limits()) -> int:
    """Verify every artifact and every blob that can be checked; take corrupt ones aside. Exit status 0 or 1."""
    checked = bad = 0
    for stat in list(store.scan("polykit")):
        checked += 1
        problem = check_artifact(store, stat, limits)
        if problem is None:
            continue
        bad += 1
        store.quarantine("polykit", stat.name)
        log.error("quarantined %s: %s", stat.name, problem)
    # Bazel CAS blobs are named by their SHA-256; other blobs are checked against the SHA-256
    # recorded when they were stored (blobs of versions that recorded none cannot be checked).
    cas = verify_blobs(store, ("bazel-cas",), lambda stat: stat.name.rpartition("/")[2])
    others = verify_blobs(store, tuple(s for s in SPACES if s not in ("polykit", "bazel-cas")), lambda stat: stat.sha256)
    print(f"verified {checked} artifacts: {checked - bad} good, {bad} quarantined")
    for (blobs_checked, blobs_bad), what in ((cas, "content-addressed blobs"), (others, "other blobs")):
        if blobs_checked:
            print(f"verified {blobs_checked} {what}: {blobs_checked - blobs_bad} good, {blobs_bad} quarantined")
    return 1 if bad or cas[1] or others[1] else 0


def verify_blobs(store: Store, spaces: tuple[str, ...], expected_of) -> tuple[int, int]:
    """Rehash the blobs of ``spaces`` against ``expected_of(stat)`` (None: nothing to check); take bad ones aside."""
    checked = bad = 0
    for space in spaces:
        for stat in sorted(store.scan(space), key=lambda s: s.name):
            expected = expected_of(stat)
            if expected is None:
                continue
            opened = store.open(space, stat.name, use=False)
            if opened is None and store.stat(space, stat.name) is None:  # evicted meanwhile
                continue
            checked += 1
            if opened is not None:
                _, fh = opened
                with fh:
                    reader = HashingReader(fh)
                    while reader.read(1 << 20):
                        pass
                if reader.digest.hexdigest() == expected:
                    continue
            bad += 1
            store.quarantine(space, stat.name)
            log.error("quarantined %s blob %s: its content no longer matches its SHA-256", space, stat.name)
    return checked, bad


def collect(store: Store, max_age: float | None = None) -> int:
    """Trim the store: entries older than ``max_age`` seconds go, then (on disk) down to ``max_storage``,
    least recently used first.

    On disk only beside no server: a live one keeps its own totals and order, which a second
    process removing entries would make wrong, so this takes the server's lock or refuses
    (StorageBusy). A bucket is shared by live servers by design: there only age counts.
    """
    if isinstance(store, Storage):
        store.lock()
        store.migrate_legacy_blobs()
    removed = 0
    if max_age is not None:
        cutoff = time.time() - max_age
        for space in SPACES:
            for stat in list(store.scan(space)):
                if stat.created < cutoff and store.delete(space, stat.name):
                    removed += 1
    if isinstance(store, Storage):
        store.load_index(cleanup=True)  # counts what is stored and evicts down to the bound
    else:
        store.refresh()
    count, size, evicted = store.usage()
    print(f"evicted {evicted + removed} entries; {count} entries, {size} bytes remain")
    return 0


def show_stats(store: Store, as_json: bool) -> int:
    """What the store holds, from sizes and last-use times, and the entries' names (no artifact is read)."""
    store.refresh()
    count, size, _ = store.usage()
    uses = store.use_range()
    figures = {
        "storage_dir": store.describe(),
        "artifacts": count,
        "bytes": size,
        "least_recent_use": uses[0] if uses else None,
        "most_recent_use": uses[1] if uses else None,
        "quarantined": store.quarantined(),
        "namespaces": namespaces(store, count),
    }
    if as_json:
        print(json.dumps(figures))
        return 0
    print(f"{figures['artifacts']} artifacts, {figures['bytes']} bytes in {figures['storage_dir']}")
    if uses:
        fmt = "%Y-%m-%d %H:%M:%S"
        print(f"last used between {time.strftime(fmt, time.localtime(uses[0]))} and {time.strftime(fmt, time.localtime(uses[1]))}")
    print(f"{figures['quarantined']} quarantined")
    listed = ", ".join(f"{label} ({n} entries)" for label, n in figures["namespaces"].items())
    print(f"namespaces: {listed or 'none'}")
    return 0


def namespaces(store: Store, count: int) -> dict[str, int]:
    """Entries per URL namespace, named as URL prefixes (``/`` for none), from the entries' names."""
    counted: Counter[str] = Counter()
    for space in SPACES:
        for stat in store.scan(space, "@"):
            counted["/" + namespace_of(stat.name)] += 1
    root = count - sum(counted.values())
    return dict(sorted({**counted, **({"/": root} if root else {})}.items()))
