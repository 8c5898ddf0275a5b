"""Offline maintenance of a storage folder: rehash and reverify every artifact."""

from __future__ import annotations

import json
import logging
import time
import os
from collections import Counter
from pathlib import Path

from polykit_client.artifact import ArtifactError, HashingReader, Limits, hash_file, verify_stream

from .blobs import namespace_of
from .storage import OBJECTS, Storage

log = logging.getLogger("polykit_cache.maintenance")


def check_artifact(storage: Storage, key: str, path: Path, limits: Limits) -> str | None:
    """Why the stored artifact is corrupt, or None when its bytes and its contents both verify."""
    info = storage.lookup(key) or storage.repair_meta(key)  # lost metadata is rebuilt, not a corruption
    if info is None:
        return "unreadable artifact"
    try:
        with open(path, "rb") as fh:
            reader = HashingReader(fh)
            verify_stream(reader, expected_key=key, limits=limits)
            while reader.read(1 << 20):
                pass
    except ArtifactError as exc:
        return str(exc)
    if reader.size != info.size or reader.digest.hexdigest() != info.sha256:
        return "bytes on disk differ from the recorded size or sha256"
    return None


def verify_storage(storage: Storage, limits: Limits = Limits()) -> int:
    """Verify every artifact; move corrupt ones to ``quarantine/``. Exit status 0 or 1."""
    quarantine = storage.root / "quarantine"
    checked = bad = 0
    for key, path in list(storage.keys()):
        checked += 1
        problem = check_artifact(storage, key, path, limits)
        if problem is None:
            continue
        bad += 1
        quarantine.mkdir(exist_ok=True)
        for src in (path, path.with_suffix(".json")):
            if src.exists():
                os.replace(src, quarantine / src.name)
        log.error("quarantined %s: %s", key, problem)
    blobs_checked, blobs_bad = verify_content_addressed(storage, quarantine)
    print(f"verified {checked} artifacts: {checked - bad} good, {bad} quarantined")
    if blobs_checked:
        print(f"verified {blobs_checked} content-addressed blobs: {blobs_checked - blobs_bad} good, {blobs_bad} quarantined")
    return 1 if bad or blobs_bad else 0


def verify_content_addressed(storage: Storage, quarantine: Path) -> tuple[int, int]:
    """Rehash Bazel CAS blobs, whose name ends in their SHA-256; other tools' blobs cannot be checked."""
    checked = bad = 0
    for name, path in sorted(storage.blobs()):
        parts = name.split("/")
        if parts[0] != "bazel" or len(parts) < 4 or parts[-3] != "cas" or len(parts[-1]) != 64:
            continue
        checked += 1
        try:
            sha, _ = hash_file(path)
        except FileNotFoundError:  # evicted meanwhile
            continue
        if sha == parts[-1]:
            continue
        bad += 1
        target = quarantine / OBJECTS / path.relative_to(storage.root / OBJECTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.error("quarantined blob %s: its content no longer matches its SHA-256", name)
    return checked, bad


def collect(storage: Storage) -> int:
    """Trim the storage to its ``max_storage`` bound, least recently used first.

    Only beside no server: a live one keeps its own totals and order, which a second process
    removing entries would make wrong, so this takes the server's lock or refuses (StorageBusy).
    """
    storage.lock()
    storage.migrate_legacy_blobs()
    storage.load_index(cleanup=True)  # counts what is stored and evicts down to the bound
    count, size, evicted = storage.totals()
    print(f"evicted {evicted} entries; {count} entries, {size} bytes remain")
    return 0


def show_stats(storage: Storage, as_json: bool) -> int:
    """What the storage holds, from the files' sizes and last-use times, and the blobs' names (no artifact is read)."""
    storage.load_index()
    count, size, _ = storage.totals()
    uses = storage.use_range()
    figures = {
        "storage_dir": str(storage.root),
        "artifacts": count,
        "bytes": size,
        "least_recent_use": uses[0] if uses else None,
        "most_recent_use": uses[1] if uses else None,
        "quarantined": len(list((storage.root / "quarantine").glob("*.zst"))),
        "namespaces": namespaces(storage, count),
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


def namespaces(storage: Storage, count: int) -> dict[str, int]:
    """Entries per URL namespace, named as URL prefixes (``/`` for none), from the blobs' names."""
    counted: Counter[str] = Counter()
    for name, _ in storage.blobs():
        namespace = namespace_of(name)
        if namespace:
            counted["/" + namespace] += 1
    root = count - sum(counted.values())
    return dict(sorted({**counted, **({"/": root} if root else {})}.items()))
