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
    blobs_checked, blobs_bad, spaced_checked, spaced_bad = verify_blobs(storage, quarantine, limits)
    checked, bad = checked + spaced_checked, bad + spaced_bad
    print(f"verified {checked} artifacts: {checked - bad} good, {bad} quarantined")
    if blobs_checked:
        print(f"verified {blobs_checked} content-addressed blobs: {blobs_checked - blobs_bad} good, {blobs_bad} quarantined")
    return 1 if bad or blobs_bad else 0


def check_blob(storage: Storage, name: str, path: Path, limits: Limits) -> str | None:
    """Why a blob we can check is corrupt, or None when it verifies.

    Two kinds carry what to check them against: a Bazel CAS blob, whose name ends in its
    SHA-256, and a polykit artifact stored in a URL namespace, verified like any artifact
    against its key and the SHA-256 recorded beside it.
    """
    parts = name.split("/")
    if parts[0] == "polykit":
        expected = storage.blob_meta(name).get("sha256")
        with open(path, "rb") as fh:
            reader = HashingReader(fh)
            try:
                verify_stream(reader, expected_key=parts[-1], limits=limits)
                while reader.read(1 << 20):
                    pass
            except ArtifactError as exc:
                return str(exc)
        return None if reader.digest.hexdigest() == expected else "bytes on disk differ from the recorded sha256"
    sha, _ = hash_file(path)
    return None if sha == parts[-1] else "its content no longer matches its SHA-256"


def verify_blobs(storage: Storage, quarantine: Path, limits: Limits) -> tuple[int, int, int, int]:
    """Check the blobs that can be checked (:func:`check_blob`); other tools' blobs cannot be.

    Returns (CAS blobs checked, quarantined, namespaced artifacts checked, quarantined).
    """
    counts = [0, 0, 0, 0]
    for name, path in sorted(storage.blobs()):
        parts = name.split("/")
        cas = parts[0] == "bazel" and len(parts) >= 4 and parts[-3] == "cas" and len(parts[-1]) == 64
        if not cas and parts[0] != "polykit":
            continue
        index = 0 if cas else 2
        try:
            problem = check_blob(storage, name, path, limits)
        except FileNotFoundError:  # evicted meanwhile
            continue
        counts[index] += 1
        if problem is None:
            continue
        counts[index + 1] += 1
        target = quarantine / OBJECTS / path.relative_to(storage.root / OBJECTS)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        log.error("quarantined blob %s: %s", name, problem)
    return counts[0], counts[1], counts[2], counts[3]


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
