"""Artifacts on local disk: a sharded layout, crash-safe publication, and the running totals.

Layout: ``<root>/<k[0:2]>/<k[2:4]>/<key>.zst``, whose metadata (size, sha256, created) is an
extended attribute of the file, or ``<key>.json`` beside it where the filesystem refuses one
(and in folders of earlier versions: both are read; see :mod:`polykit_cache.entryfile`);
temporary files only under ``<root>/tmp/``. An artifact exists when its ``.zst`` exists: it is
linked into place with ``os.link``, which is atomic and never replaces an existing name, so the
first writer wins and a reader never sees a partial file.

An upload is answered only once durable: its file (bytes and metadata attribute) is synced
before its name appears, so a power loss never leaves a name on a torn file, and its folder is
synced after, so the name itself survives. Each upload's thread syncs its own: concurrent
syncs on one filesystem already share a journal commit (ext4's jbd2, xfs's log), and measured
at 4 concurrent 4 KiB uploads, one thread syncing for all (``syncfs`` or one ``fsync`` after
another) served 40-70% fewer uploads per second than each thread syncing its own. The folder's
sync is about half of an upload's sync time (ext4 without a journal, 0.3 of 0.6 ms), but a
folder sync that starts after a link covers only the names of that folder: concurrent uploads
share a folder 1 time in 256 (blobs) or 65,536 (artifacts), so each syncs its own.

Other tools' blobs are named by paths (``kv/ccache/ab/cdef``) that clients choose; they are
stored under the SHA-256 of that name, ``<root>/objects/<protocol>/<h[0:2]>/<h>``, with the
name and the protocol's metadata as its attribute (or in ``<h>.json`` beside it). So no client
name becomes a folder: names cannot clash with each other's folders, and the folders on disk
are bounded (256 per protocol) whatever the names. Blobs of the former layout (``blobs/<name>``,
``blob-meta/<name>.json``) are moved into this one when a server starts.

``--max-storage`` bounds what entries cost on disk, not only their bytes: each counts its size
rounded up to whole blocks, plus a block for its metadata (an attribute outside the inode, or
a file) and the blocks of the folders it may have needed (:func:`disk_cost`). Folders left
empty by an eviction are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import stat as stat_module
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from polykit_client.artifact import hash_file, is_cache_key

from .entryfile import REFUSED, SETXATTR, UNSUPPORTED, EntryStaged, has_meta, read_meta, set_meta
from .http import READ_AT_ONCE
from .lru import PERSIST_USE_NS, MemoryIndex, SharedIndex
from .metacache import IdentityCache
from .store import REPLACEABLE, RESERVED_META, Staged, Stat, Store, StorageFull, Usage, check_space, is_disk_full

log = logging.getLogger("polykit_cache.storage")


class StorageBusy(Exception):
    """Another server holds the storage folder."""


class _Unpaired(Exception):
    """An entry's metadata file describes another file than the one read (see :func:`paired`)."""


# The field of a metadata file beside an entry that names the entry's file (its inode number).
INODE = "inode"


def paired(meta: dict, st: os.stat_result) -> bool:
    """Whether metadata read from a file beside an entry belongs to the entry's file seen as ``st``.

    A metadata file and its entry are two names, changed by two renames: a replace (Bazel's
    action cache) renames the new metadata file in, then the new entry, so a reader between or
    around the two can hold the old entry and the new metadata (or, having opened the entry
    first, the new metadata of a later one). The metadata file names the inode of its entry's
    file, and its size: a reader whose file differs reads again under the layout lock, where no
    change is half done. (An attribute is on the file itself and always pairs; so does a
    metadata file of an earlier version, which names no inode and is never replaced.)
    """
    inode = meta.get(INODE)
    return inode is None or (inode == st.st_ino and meta.get("size") == st.st_size)




@dataclass(frozen=True)
class ArtifactInfo:
    key: str
    size: int
    sha256: str
    created: float
    path: str
    meta: dict = field(default_factory=dict)  # fields other than size, sha256 and created


OBJECTS = "objects"
LEGACY_BLOBS, LEGACY_BLOB_META = "blobs", "blob-meta"

# What an entry costs beyond its bytes: sizes are counted in filesystem blocks, and each entry
# also has its metadata (a block at most) and may have made up to two folders (4 KiB each on
# ext4, xfs, btrfs).
BLOCK = 4096
ENTRY_OVERHEAD = 3 * BLOCK


def disk_cost(size: int) -> int:
    """What an entry of ``size`` bytes is counted as against ``--max-storage``."""
    return -(-size // BLOCK) * BLOCK + ENTRY_OVERHEAD


def blob_id(name: str) -> str:
    """Where a blob named ``name`` (``<protocol>/<path>``) is stored, relative to ``objects/``."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return f"{name.partition('/')[0]}/{digest[:2]}/{digest}"

class LayoutLock:
    """A lock held while entries appear or leave, across the threads and the worker processes
    of a server: a thread lock, then ``flock`` on a file opened by this process (an inherited
    descriptor would be the same lock for parent and child)."""

    def __init__(self, path: Path) -> None:
        self._thread_lock = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


def disk_name(space: str, name: str) -> str:
    """The blob name (``<tool>/<path>``) under which the disk layout keeps an object of a space.

    A namespace (``@ns/`` before the name, see :func:`store.entry_name`) follows the tool's part;
    an artifact in a namespace is a blob ``polykit/@ns/<key>``, with its size and SHA-256 beside it.
    """
    prefix = ""
    if name.startswith("@"):
        part, _, name = name.partition("/")
        prefix = part + "/"
    if space == "polykit":
        return f"polykit/{prefix}{name}"
    if space == "turbo":
        team, _, digest = name.rpartition("/")
        return f"turbo/{prefix}{team}/{digest[:2]}/{digest}"
    if space == "nx":
        return f"nx/{prefix}{name[:2]}/{name}"
    if space == "kv":
        return f"kv/{prefix}{name}"
    if space in ("bazel-ac", "bazel-cas"):
        # Without a namespace (a Bazel instance), entries keep the name they always had.
        return f"bazel/{prefix or '_/'}{space[6:]}/{name[:2]}/{name}"
    raise ValueError(f"no blob layout for space {space!r}")


def space_name(blob: str) -> tuple[str, str] | None:
    """The (space, name) of a blob name of the disk layout; the inverse of :func:`disk_name`."""
    parts = blob.split("/")
    prefix = ""
    if len(parts) > 2 and parts[1].startswith("@"):
        prefix = parts[1] + "/"
        parts = [parts[0], *parts[2:]]
    elif parts[0] == "bazel" and len(parts) == 5 and parts[1] == "_":
        parts = [parts[0], *parts[2:]]
    else:
        prefix = ""
    tool = parts[0]
    if tool == "polykit" and len(parts) == 2 and prefix:
        return "polykit", prefix + parts[1]
    if tool == "turbo" and len(parts) == 4:
        return "turbo", f"{prefix}{parts[1]}/{parts[3]}"
    if tool == "nx" and len(parts) == 3:
        return "nx", prefix + parts[2]
    if tool == "kv" and len(parts) >= 3:
        return "kv", prefix + "/".join(parts[1:])
    if tool == "bazel" and len(parts) == 4 and parts[1] in ("ac", "cas"):
        return f"bazel-{parts[1]}", prefix + parts[3]
    return None


# Metadata of this many entries (artifacts and blobs together) is kept in memory, so a HEAD or GET
# of a popular entry need not reread it (see metacache for when a copy is used).
INFO_CACHE_SIZE = 16384
# The bytes of entries up to KEPT_BODY_SIZE (the size the server answers as bytes, http.READ_AT_ONCE)
# are kept too, KEPT_BODIES_BYTES of them per worker process at most, under the same rule: a GET of
# one then costs a stat instead of an open, a stat, a read and a close (each a system call that
# lets another thread take the interpreter). The bound keeps a worker's peak RSS under 100 MiB: with
# it full and 8 connections reading 64 KiB entries, a worker's peak was 53 MiB (31 MiB idle).
KEPT_BODY_SIZE = READ_AT_ONCE
KEPT_BODIES_BYTES = 16 << 20
# Blob names whose file path is kept (about 400 bytes each): names up to KEPT_PATH_NAME characters
# (every digest-named protocol's, and most key-value names), as a peer may ask for as many names of
# 2 KiB (the longest path app.MAX_PATH lets through) as it likes, ten times more memory each; a
# longer one's path is worked out per request.
BLOB_PATHS = 4096
KEPT_PATH_NAME = 256


class Storage(Store):
    """One storage folder, the disk store. Thread-safe; one instance per server process."""

    def __init__(self, root: Path | str, max_storage: int | None = None, *,
                 setxattr: Callable[[int | str, str, bytes], None] | None = SETXATTR,
                 fsync: Callable[[int], None] = os.fsync, unnamed_temps: bool = True) -> None:
        """``setxattr`` sets an entry's metadata attribute (None: always a file beside it);
        ``fsync`` makes a file or folder durable; ``unnamed_temps`` off makes uploads in progress
        named files in ``tmp/``, as on a filesystem without ``O_TMPFILE``."""
        self.root = Path(root).absolute()
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.max_storage = max_storage
        self._setxattr = setxattr
        self._fsync = fsync
        self._unnamed_temps = unnamed_temps
        self._lock = threading.Lock()
        # Held while entries appear on disk or leave it (publication, eviction), so a check for an
        # entry, its metadata and its folders never see a half-done change; taken before _lock.
        # With worker processes, it is also a lock on a file (see share()).
        self._layout_lock: threading.Lock | LayoutLock = threading.Lock()
        self._prefix = str(self.root) + "/"
        # Index key (a cache key, or a blob's id) -> its metadata (ArtifactInfo, or a blob's Stat),
        # each used only for the file it was read from (see _info_of and _blob_stat_of).
        self._info: IdentityCache[ArtifactInfo | Stat] = IdentityCache(INFO_CACHE_SIZE)
        # (space, name) -> a blob's names (see _blob_paths).
        self._paths: dict[tuple[str, str], tuple[str, str, str]] = {}
        # Index key -> the bytes of a small entry, each used only for the file it was read from.
        self._bodies: IdentityCache[bytes] = IdentityCache(INFO_CACHE_SIZE, KEPT_BODIES_BYTES)
        # The system clock, read before an entry's fstat to tell whether its bytes may be kept.
        self._clock: Callable[[], int] = time.time_ns
        # Sizes, costs and the least-recently-used order of the entries (keyed by cache key or
        # blob id): in this process, or shared by the worker processes (see share()).
        self._index: MemoryIndex | SharedIndex = MemoryIndex(disk_cost)

    # --- paths -------------------------------------------------------------------------------

    def artifact_path(self, key: str) -> Path:
        """Where a key's artifact lives; the key must have been validated (it becomes a path)."""
        return Path(self._zst(key))

    def _zst(self, key: str) -> str:
        if not is_cache_key(key):
            raise ValueError(f"invalid cache key {key!r}")
        return f"{self._prefix}{key[0:2]}/{key[2:4]}/{key}.zst"

    def _blob_paths(self, space: str, name: str) -> tuple[str, str, str]:
        """(blob name, index key, data file) of a blob: the key is a SHA-256 of the name, so the
        three are kept per name read (at most BLOB_PATHS names of at most KEPT_PATH_NAME
        characters, all dropped at the bound)."""
        found = self._paths.get((space, name))
        if found is None:
            blob = disk_name(space, name)
            key = blob_id(blob)
            found = (blob, key, self._data_path(key))
            if len(name) > KEPT_PATH_NAME:
                return found
            if len(self._paths) >= BLOB_PATHS:
                self._paths.clear()
            self._paths[(space, name)] = found
        return found

    def _data_path(self, key: str) -> str:
        """The file of an index key: an artifact (a bare cache key) or a blob's id."""
        return f"{self._prefix}{OBJECTS}/{key}" if "/" in key else self._zst(key)

    @staticmethod
    def _key_of(name: str) -> str:
        """The index key of a cache key or of a blob name."""
        return blob_id(name) if "/" in name else name

    @staticmethod
    def cost_of(size: int) -> int:
        """What an entry of ``size`` bytes counts against the bound."""
        return disk_cost(size)

    def _meta_path(self, key: str) -> Path:
        return self.artifact_path(key).with_suffix(".json")

    # --- start-up ----------------------------------------------------------------------------

    def lock(self) -> None:
        """Claim the folder for this server; a second server would sweep the first one's uploads."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StorageBusy(f"another polykit-cache is serving {self.root}") from None
        self._lock_fd = fd  # held, and so locked, until the process ends

    def share(self, path: Path | str) -> None:
        """Serve beside other worker processes: use the index in the shared database at ``path``,
        and a lock file for changes of the layout, so a bound, an order and first-write-wins hold
        across processes. Called in each worker after the fork (locks and connections are per process).
        """
        self._index = SharedIndex(path, disk_cost)
        self._layout_lock = LayoutLock(self.root / "layout.lock")
        self._info.clear()
        self._bodies.clear()

    def flush_uses(self) -> None:
        """Write the uses this worker gathered to the shared index (see lru.SharedIndex)."""
        self._index.flush()

    def publish_index(self, path: Path | str) -> None:
        """Write this process's index (loaded at start-up) to the shared database at ``path``."""
        shared = SharedIndex(path, disk_cost)
        try:
            shared.load(self._index.entries())
        finally:
            shared.close()

    def recover(self) -> None:
        """Under the lock, at start-up: remove stale temporaries, move blobs of the former layout,
        then load the index and drop metadata whose entry is gone."""
        self.sweep_temps()
        self.migrate_legacy_blobs()
        self.load_index(cleanup=True)

    def migrate_legacy_blobs(self) -> None:
        """Move blobs stored under their own path (``blobs/<name>``) to ``objects/`` (only under the lock)."""
        top, meta_top = self.root / LEGACY_BLOBS, self.root / LEGACY_BLOB_META
        if not top.is_dir():
            return
        moved = 0
        for folder, _, files in os.walk(top):
            for file in files:
                path = os.path.join(folder, file)
                name = os.path.relpath(path, top)
                meta: dict = {}
                try:
                    with open(meta_top / (name + ".json"), "rb") as fh:
                        loaded = json.load(fh)
                    meta = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
                final = self._data_path(blob_id(name))
                self._put_meta(path, final + ".json", {**meta, "name": name})
                self._retry_in_folder(final, lambda: os.replace(path, final))
                moved += 1
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(meta_top, ignore_errors=True)
        if moved:
            log.info("moved %d blobs to the hashed layout under %s/", moved, OBJECTS)

    def sweep_temps(self) -> None:
        """Remove what interrupted uploads left in ``tmp/`` (only safe while no server writes)."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.is_dir(follow_symlinks=False):
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            log.info("removed %d stale temporary files", removed)

    def load_index(self, cleanup: bool = False) -> None:
        """Count what is stored and when each artifact was last used, from file sizes and mtimes
        (no artifact is read), repair metadata a crash left missing, and evict beyond the bound.

        ``cleanup`` (only under the lock) also removes metadata files whose entry is gone: a
        blob's is written before the blob itself, so beside a live server it may belong to an upload.
        """
        count = total = cost = 0
        uses: dict[str, list[int]] = {}
        for key, path in self._scan():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            size = st.st_size
            uses[key] = [st.st_mtime_ns, size, st.st_mtime_ns]
            if not has_meta(str(path), str(self._meta_path(key))):
                # The artifact was verified and synced before it was linked; only its
                # metadata was lost, so recompute it rather than throw the artifact away.
                sha, size = hash_file(path)
                self._write_meta(key, size, sha, path.stat().st_mtime)
                log.warning("rebuilt missing metadata of %s", key)
            count += 1
            total += size
            cost += disk_cost(size)
        for key, st in self._scan_blobs(cleanup):
            uses[key] = [st.st_mtime_ns, st.st_size, st.st_mtime_ns]
            count += 1
            total += st.st_size
            cost += disk_cost(st.st_size)
        for meta in self.root.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.json"):
            if not meta.with_suffix(".zst").exists():
                meta.unlink(missing_ok=True)
        self._index.load((key, use[0], use[1]) for key, use in uses.items())
        self.evict()

    def _scan_blobs(self, cleanup: bool = False):
        """(id, stat) of every blob under ``objects/<protocol>/<h[0:2]>/``."""
        top = self.root / OBJECTS
        if not top.is_dir():
            return
        for protocol in os.scandir(top):
            if not protocol.is_dir(follow_symlinks=False):
                continue
            for shard in os.scandir(protocol.path):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(shard.path):
                    if entry.name.endswith(".json"):
                        if cleanup and not os.path.exists(entry.path[:-5]):
                            os.unlink(entry.path)
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat_module.S_ISREG(st.st_mode):
                        yield f"{protocol.name}/{shard.name}/{entry.name}", st

    def _scan(self):
        for top in sorted(os.scandir(self.root), key=lambda e: e.name):
            if len(top.name) != 2 or not top.is_dir(follow_symlinks=False):
                continue
            for sub in os.scandir(top.path):
                if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(sub.path):
                    name = entry.name
                    if name.endswith(".zst") and is_cache_key(name[:-4]):
                        yield name[:-4], Path(entry.path)

    # --- reads -------------------------------------------------------------------------------

    def lookup(self, key: str) -> ArtifactInfo | None:
        """The stored artifact's metadata, or None when the key is not (yet) published."""
        path = self._zst(key)

        def read(settled: bool) -> ArtifactInfo | None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            return self._info_of(key, path, st, settled)

        return self._settled_read(read)

    def _settled_read(self, read: Callable[[bool], object]):
        """``read(settled)`` of an entry's file and its metadata; again under the layout lock when
        the two did not pair (see :func:`paired`): there, what is read is what is published."""
        try:
            return read(False)
        except _Unpaired:
            with self._layout_lock:
                return read(True)

    def _sidecar_meta(self, target: int | str, path: str, sidecar: str, st: os.stat_result,
                      settled: bool) -> dict | None:
        """An entry's metadata (see :func:`entryfile.read_meta`), checked to belong to the file
        seen as ``st``; raises _Unpaired when not, unless ``settled`` (under the layout lock:
        then the metadata file is the entry's, in a folder copied with new inode numbers, and
        is rewritten to name its file)."""
        meta = read_meta(target, sidecar)
        if meta is None or paired(meta, st):
            return meta
        if not settled:
            raise _Unpaired(path)
        if meta.get("size") != st.st_size:
            return None  # not this file's: as lost metadata
        try:
            self._put_meta(path, sidecar, {k: v for k, v in meta.items() if k != INODE})
        except OSError as exc:
            log.warning("cannot rewrite the metadata of %s: %s", path, exc)
        return meta

    def _info_of(self, key: str, path: str, st: os.stat_result, settled: bool = False) -> ArtifactInfo | None:
        """The metadata of the artifact file ``path`` whose stat (taken first) is ``st``.

        A copy kept in memory is used only for that very file (see :mod:`.metacache`): an
        eviction (by any worker) and a new upload of the key make a new file, so the copy no
        longer matches, whichever process changed the file; this costs one ``stat`` the read
        path needs anyway, where asking the shared index would cost a query.

        The stat comes first and the metadata second: an artifact's metadata is its file's
        attribute (or, in a file beside it, written before the file is linked and removed after
        it), so what is read belongs to the file seen or to a later one, and a size that
        disagrees with the file is a miss rather than a wrong answer.
        """
        cached = self._info.get(key, st)
        if cached is not None:
            return cached
        try:
            meta = self._sidecar_meta(path, path, path[:-4] + ".json", st, settled)
            if meta is None:  # the file is gone since its stat, or its metadata was lost
                raise FileNotFoundError(path)
            info = ArtifactInfo(key, int(meta["size"]), str(meta["sha256"]), float(meta["created"]), path,
                                {k: v for k, v in meta.items() if k not in RESERVED_META})
        except (OSError, ValueError, KeyError, TypeError):
            info = self._repair_meta(key, path)
            if info is None:
                return None
        if info.size != st.st_size:
            return None
        self._info.put(key, st, info)
        return info

    def repair_meta(self, key: str) -> ArtifactInfo | None:
        """Rebuild a key's metadata from its artifact file, if the file is there."""
        return self._repair_meta(key, self._zst(key))

    def _repair_meta(self, key: str, path: str) -> ArtifactInfo | None:
        """Metadata torn by a power loss: the artifact was synced before it was linked, so rehash it."""
        try:
            sha, size = hash_file(path)
            created = os.stat(path).st_mtime
        except OSError:
            return None
        self._write_meta(key, size, sha, created)
        log.warning("rebuilt unreadable metadata of %s", key)
        return ArtifactInfo(key, size, sha, created, path)

    def forget(self, name: str) -> None:
        """Drop an artifact (by key) or blob (by name) that vanished from disk from the in-memory state."""
        key = self._key_of(name)
        if key not in self._info and key not in self._bodies and not self._index.contains(key):
            return  # never stored (an upload's check that its name is free): no write to the index
        with self._lock:
            if os.path.exists(self._data_path(key)):
                return  # uploaded again since it was found missing
            self._info.pop(key, None)
            self._bodies.pop(key, None)
        self._index.remove(key)

    # --- writes ------------------------------------------------------------------------------

    def _publish(self, key: str, final: str, sidecar: str, staged: EntryStaged, meta: dict, replace: bool) -> bool:
        """Publish a staged upload at ``final``; False when the name exists and ``replace`` is off
        (first write wins). Consumes ``staged`` either way.

        In this order, for crash safety: the metadata onto the file; ``fsync`` of the file, so the
        bytes and the metadata are durable before the name appears (``fsync``, not
        ``fdatasync``: the attribute is the inode's, which fdatasync need not write); the name,
        under the layout lock (a metadata file, where one is needed, first: a visible entry
        always has the metadata of its own upload); ``fsync`` of its folder, so the name is
        durable before the upload is answered.
        """
        sidecar_temp = None
        try:
            in_attr = self._set_attr(staged.fh.fileno(), meta)
            if not in_attr:  # written and synced outside the lock, which other workers wait for
                sidecar_temp = self._json_temp({**meta, INODE: os.fstat(staged.fh.fileno()).st_ino})
            self._fsync(staged.fh.fileno())
            with self._layout_lock:
                if sidecar_temp is not None:
                    if not replace and os.path.exists(final):
                        return False
                    self._retry_in_folder(sidecar, lambda: os.replace(sidecar_temp, sidecar))
                    sidecar_temp = None
                try:
                    self._retry_in_folder(final, lambda: staged.replace(final) if replace else staged.link(final))
                except FileExistsError:
                    return False
            self._sync_folder(os.path.dirname(final))
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageFull(str(exc)) from None
            raise
        finally:
            staged.discard()
            if sidecar_temp is not None:  # not installed: the name existed, or a failure
                Path(sidecar_temp).unlink(missing_ok=True)
        self._index.add(key, staged.size, time.time_ns())
        self.evict()
        return True

    def _set_attr(self, target: int | str, meta: dict) -> bool:
        """Put metadata in a file's attribute; False when the filesystem refuses it (then it
        goes in a file beside the entry). A filesystem without user attributes is not asked again."""
        if self._setxattr is None:
            return False
        try:
            set_meta(target, meta, self._setxattr)
        except OSError as exc:
            if exc.errno in UNSUPPORTED:
                self._setxattr = None
                log.info("%s refuses extended attributes: metadata goes in .json files beside the entries", self.root)
            if exc.errno in REFUSED:
                return False
            raise
        return True

    def _sync_folder(self, folder: str) -> None:
        """Make the names in ``folder`` durable (a folder an eviction removed meanwhile holds none of ours)."""
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _retry_in_folder(path: str, operation) -> None:
        """Run ``operation``, which puts a file at ``path``; make the folder only when it is missing.

        A shard folder is made once, by the first entry that needs it, not checked by every
        upload: the operation itself fails with ENOENT when the folder is missing, and then the
        folder is made and the operation tried again (also when an eviction removed an emptied
        folder meanwhile; ``makedirs`` may race an rmdir of a parent too).
        """
        for attempt in range(5):
            try:
                operation()
                return
            except FileNotFoundError:
                if attempt == 4:
                    raise
                os.makedirs(os.path.dirname(path), exist_ok=True)

    # --- least recently used eviction ---------------------------------------------------------

    def touch(self, name: str, mtime_ns: int) -> None:
        """Record a GET or HEAD of an artifact (by key) or blob (by name) whose file has ``mtime_ns``
        as a use: in the index now; on disk as the file's mtime when that is older than
        ``PERSIST_USE_NS``, so the order survives a restart without a write per read."""
        self._use(self._key_of(name), mtime_ns)

    def _use(self, key: str, mtime_ns: int) -> None:
        """:meth:`touch` by index key."""
        now = time.time_ns()
        self._index.touch(key, now)
        if now - mtime_ns > PERSIST_USE_NS:
            try:
                os.utime(self._data_path(key), ns=(now, now))
            except OSError:
                pass

    def evict(self, limit: int | None = None) -> list[str]:
        """Remove least recently used artifacts while the total is over the bound; returns their keys.

        An artifact being downloaded stays readable: its open file outlives the unlink. The
        choice and the removal happen under the layout lock, so an upload of a key being
        evicted waits and then stores it anew instead of finding it "already stored".
        """
        limit = self.max_storage if limit is None else limit
        if limit is None:
            return []
        if self._index.total_cost() <= limit:
            return []
        with self._layout_lock:
            taken = self._index.take_victims(limit)
            victims = [key for key, _ in taken]
            freed = sum(size for _, size in taken)
            with self._lock:
                for key in victims:
                    self._info.pop(key, None)
                    self._bodies.pop(key, None)
            for key in victims:
                path = self._data_path(key)
                # Data first: a blob's metadata must never be missing while the blob is visible.
                for name in (path, path + ".json") if "/" in key else (path, path[:-4] + ".json"):
                    try:
                        os.unlink(name)
                    except FileNotFoundError:
                        pass
                self._remove_empty_folders(os.path.dirname(path), levels=1 if "/" in key else 2)
        if victims:
            log.info("evicted %d entries (%d bytes) to stay under %d bytes", len(victims), freed, limit)
        return victims

    @staticmethod
    def _remove_empty_folders(folder: str, levels: int) -> None:
        """Remove a folder left empty and its empty parents (a publish racing this makes them again)."""
        for _ in range(levels):
            try:
                os.rmdir(folder)
            except OSError:  # not empty, or already gone
                return
            folder = os.path.dirname(folder)

    def _write_meta(self, key: str, size: int, sha256: str, created: float, meta: dict | None = None) -> None:
        """Rewrite the metadata of a published artifact (a repair)."""
        self._put_meta(self._zst(key), str(self._meta_path(key)),
                       {**(meta or {}), "size": size, "sha256": sha256, "created": created})

    def _put_meta(self, path: str, sidecar: str, meta: dict) -> None:
        """Set a file's metadata: its attribute, else the file beside it (naming the file's inode)."""
        if not self._set_attr(path, meta):
            self._write_json(sidecar, {**meta, INODE: os.stat(path).st_ino})

    def _write_json(self, path: Path | str, value: object) -> None:
        """Replace a small JSON file atomically (see :meth:`_json_temp`)."""
        name = self._json_temp(value)
        try:
            self._retry_in_folder(str(path), lambda: os.replace(name, path))
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def _json_temp(self, value: object) -> str:
        """A JSON file in tmp/ (swept at start-up), synced, to be renamed to its name: its
        content is durable before its name appears (the folder is synced with the entry's)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="meta-", suffix=".part")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh)
                fh.flush()
                self._fsync(fh.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return name

    # --- other protocols' blobs -------------------------------------------------------------
    # Opaque blobs live under objects/<protocol>/..., apart from artifacts, so a blob is never
    # served as an artifact nor the other way round. They share the index, the bound and the
    # eviction order. ``name`` is ``<protocol>/<path>``, whose parts the protocol module validated.

    def blob_meta(self, name: str) -> dict:
        """What a protocol stored beside a blob (for example turbo's duration and tag), or {}."""
        def read(settled: bool) -> dict:
            try:
                st = os.stat(self._data_path(blob_id(name)))
            except OSError:
                return {}
            return self._blob_json(name, st, settled=settled)

        return {k: v for k, v in self._settled_read(read).items() if k not in RESERVED_META}

    @property
    def cost(self) -> int:
        """What the entries cost on disk: the figure ``--max-storage`` bounds."""
        return self._index.total_cost()

    def totals(self) -> tuple[int, int, int]:
        """(artifacts stored, bytes stored, evictions so far), kept current without touching the disk."""
        return self._index.totals()

    def use_range(self) -> tuple[float, float] | None:
        """Last use of the least and of the most recently used artifact (seconds since the epoch)."""
        found = self._index.use_range()
        return (found[0] / 1e9, found[1] / 1e9) if found else None

    # --- the storage interface (store.Store) --------------------------------------------------
    # Artifacts (space "polykit") keep the artifact layout; every other space maps onto the blob
    # layout through disk_name(), so the folder is exactly what it was before the interface.

    @staticmethod
    def _is_artifact(space: str, name: str) -> bool:
        """Whether an object lives in the artifact layout (an artifact outside any namespace)."""
        return space == "polykit" and not name.startswith("@")

    def stat(self, space: str, name: str, use: bool = False) -> Stat | None:
        check_space(space)
        return self._settled_read(lambda settled: self._stat(space, name, use, settled))

    def _stat(self, space: str, name: str, use: bool, settled: bool) -> Stat | None:
        if self._is_artifact(space, name):
            path = self._zst(name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self._vanished(name)
                return None
            return self._artifact_stat(name, path, st, use, settled)
        blob, key, path = self._blob_paths(space, name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self.forget(blob)  # in case it was moved away behind the server's back
            return None
        if not stat_module.S_ISREG(st.st_mode):
            return None
        found = self._blob_stat_of(space, name, blob, key, path, st, None, settled)
        if use:
            self._use(key, st.st_mtime_ns)
        return found

    def _artifact_stat(self, key: str, path: str, st: os.stat_result, use: bool, settled: bool) -> Stat | None:
        info = self._info_of(key, path, st, settled)
        if info is None:
            return None
        if use:
            self.touch(key, st.st_mtime_ns)
        return Stat("polykit", key, info.size, info.sha256, info.created, info.meta, path)

    def _vanished(self, key: str) -> None:
        """An artifact file not found: forget it if it was served or a metadata file beside it is
        left (removed behind our back: verify's quarantine, gc); a key never stored costs no more
        than one check. (An attribute leaves with its file: then only a served one is known.)"""
        if key in self._info or os.path.exists(self._zst(key)[:-4] + ".json"):
            self.forget(key)

    @staticmethod
    def _blob_stat(space: str, name: str, size: int, mtime: float, meta: dict, path: str) -> Stat:
        sha = meta.get("sha256")
        created = meta.get("created")
        return Stat(space, name, size, sha if isinstance(sha, str) else None,
                    float(created) if isinstance(created, (int, float)) else mtime,
                    {k: v for k, v in meta.items() if k not in RESERVED_META}, path)

    def _blob_stat_of(self, space: str, name: str, blob: str, key: str, path: str, st: os.stat_result,
                      fd: int | None, settled: bool) -> Stat:
        """A blob's Stat for the file whose stat is ``st``: the copy kept for that very file (see
        :mod:`.metacache`), else its metadata read (from ``fd``, that file open, where given).
        Raises _Unpaired as :meth:`_blob_json` (nothing is kept then)."""
        cached = self._info.get(key, st)
        if cached is not None:
            return cached
        meta = self._blob_json(blob, st, fd, settled)
        found = self._blob_stat(space, name, st.st_size, st.st_mtime, meta, path)
        if meta:  # metadata that could not be read is tried again next time
            self._info.put(key, st, found)
        return found

    def _blob_json(self, blob: str, st: os.stat_result, fd: int | None = None, settled: bool = False) -> dict:
        """Everything kept with a blob (its name, sha256, created and the protocol's fields), or {};
        ``st``: the blob's file as seen, ``fd``: that file open, whose own attribute is read.
        Raises _Unpaired as :meth:`_sidecar_meta`."""
        path = self._data_path(blob_id(blob))
        try:
            meta = self._sidecar_meta(path if fd is None else fd, path, path + ".json", st, settled)
        except (OSError, ValueError):
            return {}
        return meta if meta is not None and meta.get("name") == blob else {}

    def open(self, space: str, name: str, use: bool = True) -> tuple[Stat, BinaryIO] | None:
        check_space(space)
        return self._settled_read(lambda settled: self._open(space, name, use, settled))

    def _open(self, space: str, name: str, use: bool, settled: bool) -> tuple[Stat, BinaryIO] | None:
        artifact = self._is_artifact(space, name)
        if artifact:
            key = name
            path = self._zst(name)
        else:
            blob, key, path = self._blob_paths(space, name)
        if key in self._bodies:
            # The bytes kept are this file's if its stat is the one they were read with (see
            # metacache), and they go out only with the metadata kept for that same stat: read now
            # by path, the metadata could be a later file's (the entry deleted or evicted and
            # uploaded anew since the stat), beside the old bytes (a turbo tag that does not sign
            # them). Without that copy, the file is opened and both are read from it.
            try:
                st = os.stat(path)
            except OSError:
                st = None  # gone, or not a file: the open below finds out and forgets it
            data = self._bodies.get(key, st) if st is not None else None
            info = self._info.get(key, st) if data is not None else None
            if info is not None:
                if use:
                    self._use(key, st.st_mtime_ns)
                if isinstance(info, ArtifactInfo):
                    info = Stat("polykit", key, info.size, info.sha256, info.created, info.meta, path)
                return info, io.BytesIO(data)
        try:
            fh = open(path, "rb")
        except FileNotFoundError:
            if artifact:
                self._vanished(name)
            else:
                self.forget(blob)
            return None
        except (NotADirectoryError, IsADirectoryError):
            if artifact:
                raise  # an artifact's own path (a folder there is an error, answered 500)
            self.forget(blob)  # a blob's path: its folder or file replaced behind our back
            return None
        try:
            seen = self._clock()  # before the fstat, the file open (see metacache.settled)
            st = os.fstat(fh.fileno())
            # The metadata of the very file opened (see _info_of): for a blob it is read after the
            # blob was opened (the attribute of that very file), written before the blob was
            # published, so a blob that is visible always has it.
            if artifact:
                found = self._artifact_stat(name, path, st, use, settled)
            else:
                found = self._blob_stat_of(space, name, blob, key, path, st, fh.fileno(), settled)
                if use:
                    self._use(key, st.st_mtime_ns)
            if found is None or st.st_size > KEPT_BODY_SIZE:
                if found is None:
                    fh.close()
                    return None
                return found, fh
            with fh:
                data = fh.read(st.st_size + 1)
        except BaseException:
            fh.close()
            raise
        if len(data) == st.st_size:  # entries are never written in place; this is only a guard
            self._bodies.put(key, st, data, seen)
        return found, io.BytesIO(data)

    def stage(self) -> Staged:
        return EntryStaged(str(self.tmp_dir), self._unnamed_temps)

    def spool(self) -> Staged:
        """An upload's body goes straight into its temporary in ``tmp/``: written once, on this
        filesystem, and linked as the entry once verified (a crash leaves nothing, see entryfile)."""
        return EntryStaged(str(self.tmp_dir), self._unnamed_temps)

    def commit(self, space: str, name: str, staged: Staged, meta=None) -> bool:
        check_space(space)
        extra = dict(meta or {})
        if RESERVED_META & set(extra):
            staged.discard()
            raise ValueError(f"metadata may not use {sorted(RESERVED_META & set(extra))}")
        if not isinstance(staged, EntryStaged):
            staged.discard()
            raise TypeError("commit takes an upload staged by this store")
        extra.update(size=staged.size, sha256=staged.sha256, created=time.time())
        if self._is_artifact(space, name):
            final = self._zst(name)
            return self._publish(name, final, final[:-4] + ".json", staged, extra, replace=False)
        blob = disk_name(space, name)
        key = blob_id(blob)
        final = self._data_path(key)
        return self._publish(key, final, final + ".json", staged, {**extra, "name": blob}, replace=space in REPLACEABLE)

    def _files_of(self, space: str, name: str) -> tuple[str, str, str]:
        """(index key, data file, metadata file) of an object."""
        if self._is_artifact(space, name):
            data = self._zst(name)
            return name, data, data[:-4] + ".json"
        key = blob_id(disk_name(space, name))
        data = self._data_path(key)
        return key, data, data + ".json"

    def delete(self, space: str, name: str) -> bool:
        check_space(space)
        key, data, meta = self._files_of(space, name)
        with self._layout_lock:
            try:
                os.unlink(data)  # data first: a visible blob always has its metadata
            except FileNotFoundError:
                return False
            finally:
                with self._lock:
                    self._info.pop(key, None)
                    self._bodies.pop(key, None)
                self._index.remove(key)
            try:
                os.unlink(meta)
            except FileNotFoundError:
                pass
            self._remove_empty_folders(os.path.dirname(data), levels=2 if self._is_artifact(space, name) else 1)
        return True

    def quarantine(self, space: str, name: str) -> None:
        """Move an object's files under ``quarantine/`` (kept for a look, never served)."""
        check_space(space)
        key, data, meta = self._files_of(space, name)
        top = self.root / "quarantine"
        with self._layout_lock:
            if self._is_artifact(space, name):
                targets = [(data, top / os.path.basename(data)), (meta, top / os.path.basename(meta))]
            else:
                rel = os.path.relpath(data, self.root / OBJECTS)
                targets = [(data, top / OBJECTS / rel)]
            for src, target in targets:
                if os.path.exists(src):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, target)
        self.forget(name if self._is_artifact(space, name) else disk_name(space, name))

    def scan(self, space: str, prefix: str = ""):
        check_space(space)
        if space == "polykit" and not prefix.startswith("@"):
            for key, _ in list(self._scan()):
                if key.startswith(prefix):
                    # Lost metadata is rebuilt: the artifact was synced before it was linked.
                    found = self.stat(space, key) or (self.repair_meta(key) and self.stat(space, key))
                    if found:
                        yield found
        for key, st in self._scan_blobs():
            path = self._data_path(key)
            def read(settled: bool, path: str = path, seen: os.stat_result = st) -> tuple[os.stat_result, dict | None]:
                seen = os.stat(path) if settled else seen  # the entry may have been replaced since the scan
                return seen, self._sidecar_meta(path, path, path + ".json", seen, settled)

            try:
                st, meta = self._settled_read(read)
            except (OSError, ValueError):
                continue
            named = space_name(meta.get("name", "")) if meta is not None and isinstance(meta.get("name"), str) else None
            if named is None or named[0] != space or not named[1].startswith(prefix):
                continue
            yield self._blob_stat(space, named[1], st.st_size, st.st_mtime, meta, path)

    def usage(self) -> Usage:
        return Usage(*self.totals())

    def refresh(self) -> None:
        self.load_index()

    def quarantined(self) -> int:
        return len(list((self.root / "quarantine").glob("*.zst")))

    def fits(self, size: int) -> bool:
        return self.max_storage is None or disk_cost(size) <= self.max_storage

    def describe(self) -> str:
        return str(self.root)
