"""Running one task with the caches: restore a hit, or run the command and store what it made.

Order per task: local cache, then the remote cache, then the command. A download is verified
completely (body hash, then every member against the manifest) in a staging folder before
anything in the package is touched; a cache problem of any kind becomes one warning and a
local build, never a failed build.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from .components import for_manifest
from .graph import Node
from .localcache import LocalCache
from .outputs import OutputError, check_restorable, expand_outputs, signature, walk_unchanged
from .timing import phase
from .workspace import Package, Task, Workspace

if TYPE_CHECKING:  # pragma: no cover
    from .prefetch import Prefetcher
    from .remote import RemoteCache
    from .restore import Staged


# ``artifact`` and ``restore`` (tar, zstd) are imported inside the methods that pack or restore: a build whose
# outputs are all in place never opens an artifact, and that import is a sizeable share of its time. So is
# ``prefetch`` (``concurrent.futures``, which brings ``logging``): such a build never asks the server.

RECORDS_FILE = ".polykit/outputs.json"
RECORD_LOG_LIMIT = 64 * 1024
# Pauses between attempts at a task's lock held by another run: doubling from the first to the last.
LOCK_PAUSE_FIRST = 0.002
LOCK_PAUSE_MAX = 0.05

# Output is read and written in lines of at most this many bytes: a task printing binary data
# without newlines cannot make a line grow without bound.
LINE_LIMIT = 64 * 1024


# What ``Console.hold`` keeps before writing it out: a bound on memory, and on how long a line waits.
HELD_LIMIT = 64 * 1024


class Console:
    """Serialises what tasks print; warnings go to stderr as ``warning: ...`` lines.

    Everything is written out and flushed at once, except what ``hold`` is given: the status
    lines and logs of hits whose outputs were in place, reported one after another by the
    scheduler's thread. Those are written in one go at the next ``flush``, at anything else
    printed, or past HELD_LIMIT bytes, rather than a write and a flush per line (1,000 of them
    for 500 such hits, each waking whatever reads the output).
    """

    def __init__(self, prefix_logs: bool, out=None, err=None) -> None:
        self.prefix_logs = prefix_logs
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._lock = threading.Lock()
        self._held: list[bytes] = []
        self._held_size = 0

    def line(self, text: str) -> None:
        with self._lock:
            self._write_held()
            self.out.write(text + "\n")
            self.out.flush()

    def warn(self, message: str) -> None:
        with self._lock:
            self._write_held()
            self.err.write(f"warning: {message}\n")
            self.err.flush()

    def _prefixed(self, node: Node, data: bytes) -> bytes:
        if self.prefix_logs and data:
            return b"".join(b"%s: %s\n" % (str(node).encode(), line) for line in data.splitlines())
        return data

    def log(self, node: Node, data: bytes) -> None:
        """Write a task's output (live or replayed), prefixed with the task when tasks run side by side."""
        if not data:
            return
        data = self._prefixed(node, data)
        with self._lock:
            self._write_held()
            self._write(data)

    def hold(self, node: Node, text: str, log: bytes) -> None:
        """A status line and its task's log, written out with the next ``flush`` or anything else printed."""
        data = (text + "\n").encode() + self._prefixed(node, log)
        with self._lock:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > HELD_LIMIT:
                self._write_held()

    def flush(self) -> None:
        """Write out what ``hold`` kept."""
        with self._lock:
            self._write_held()

    def _write_held(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            self._held_size = 0
            self._write(data)

    def _write(self, data: bytes) -> None:
        buffer = getattr(self.out, "buffer", None)
        if buffer is not None:  # the task's bytes as they are, whatever the terminal's encoding
            self.out.flush()
            buffer.write(data)
            buffer.flush()
        else:
            self.out.write(data.decode("utf-8", "replace"))
            self.out.flush()

    def log_file(self, node: Node, path: Path) -> None:
        """Replay a captured log line by line, so a long one never sits in memory."""
        with open(path, "rb") as fh:
            while line := fh.readline(LINE_LIMIT):
                self.log(node, line)

    def progress(self, label: str) -> Callable[[int, int | None], None] | None:
        """A progress line for long transfers, only when stderr is a terminal."""
        if not getattr(self.err, "isatty", lambda: False)():
            return None
        last = [0.0]

        def show(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] < 0.2 and (total is None or done < total):
                return
            last[0] = now
            size = f"{done / 1048576:.1f}" + (f"/{total / 1048576:.1f}" if total else "")
            with self._lock:
                self.err.write(f"\r{label} {size} MiB")
                if total is not None and done >= total:
                    self.err.write("\n")
                self.err.flush()

        return show


@dataclass
class Summary:
    """What the run did, for the closing line."""

    local_hits: int = 0
    remote_hits: int = 0
    misses: int = 0
    failed: int = 0
    saved_ms: int = 0
    statuses: dict = field(default_factory=dict)
    saved_by_task: dict = field(default_factory=dict)  # node -> ms a hit saved
    moved: dict = field(default_factory=dict)  # node -> {"down": bytes, "up": bytes} to and from the remote cache
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transfer(self, node: Node, direction: str, size: int) -> None:
        """Count ``size`` bytes a task moved ("down" or "up"), for the run summary."""
        with self.lock:
            entry = self.moved.setdefault(node, {"down": 0, "up": 0})
            entry[direction] += size

    def add(self, node: Node, status: str, saved_ms: int = 0) -> None:
        with self.lock:
            self.statuses[node] = status
            if saved_ms:
                self.saved_by_task[node] = saved_ms
            if status == "hit (local)":
                self.local_hits += 1
            elif status == "hit (remote)":
                self.remote_hits += 1
            elif status == "miss":
                self.misses += 1
            elif status.startswith("failed"):
                self.failed += 1
            self.saved_ms += saved_ms


# Uploads in flight at once: like downloads they wait on the network, not on a core, so they
# do not count against -j; a cold build's uploads overlap with its tasks and with each other.
UPLOAD_THREADS = 4
# Artifacts written at once beside the tasks (compressing is CPU work, so few). A task that
# finds them all busy waits for one: each holds up to artifact.KEEP_BUDGET bytes of outputs.
PACK_THREADS = 2



class Uploader:
    """Uploads in background threads, so the next task never waits for the network.

    ``known_absent(key)`` says whether this run's batch query found the server without the key,
    in which case the upload does not ask again with a ``HEAD`` first.
    """

    def __init__(self, remote: "RemoteCache", console: Console, summary: Summary | None = None,
                 known_absent: Callable[[str], bool] = lambda key: False, threads: int = UPLOAD_THREADS) -> None:
        self.remote = remote
        self.console = console
        self.summary = summary
        self._known_absent = known_absent
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name="polykit-upload", daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()
        self._count_lock = threading.Lock()
        self.uploaded = 0

    def submit(self, node: Node, key: str, path: Path) -> None:
        self._queue.put((node, key, path))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            node, key, path = item
            try:
                with phase("remote: uploads", threads=True):
                    stored = self.remote.store(key, path, self.console.progress(f"{node}  uploading"),
                                               ask_first=not self._known_absent(key))
                if stored:
                    with self._count_lock:
                        self.uploaded += 1
                    if self.summary is not None:
                        self.summary.transfer(node, "up", _size_of(path))
            except Exception as exc:  # an upload must never fail the build
                self.console.warn(f"upload of {node} failed ({_flat(exc)})")
            finally:
                self._queue.task_done()

    def finish(self, bound: float) -> None:
        """Wait for pending uploads, at most ``bound`` seconds."""
        for _ in self._threads:
            self._queue.put(None)
        end = time.monotonic() + bound
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self.console.warn(f"gave up waiting for uploads after {bound:.0f} s; they are kept in the local cache")


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _flat(exc: BaseException) -> str:
    """An exception as one short line, for a warning."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _signature(path: Path) -> list[int]:
    return signature(os.lstat(path))




def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(fd: int, name: str):
    """Hold ``name``'s byte of the lock file ``fd`` (POSIX record locks), waiting for another process's hold to end.

    Record locks belong to a process, not to a thread. A blocking lock (F_SETLKW) would let the
    kernel's deadlock detection (fcntl(2)) see this process holding one task's byte in one thread
    while another thread waits for a byte that a second run holds while it waits for the first:
    a cycle between the two processes, though each wait would end as soon as the holding thread
    finishes its task. One of the runs would fail with EDEADLK. Non-blocking attempts (F_SETLK)
    are never judged a deadlock, so a held byte is tried again after a short pause.
    """
    offset = _lock_offset(name)
    pause = LOCK_PAUSE_FIRST
    while not _try_lock(fd, offset):
        time.sleep(pause)
        pause = min(pause * 2, LOCK_PAUSE_MAX)
    try:
        yield
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


@contextlib.contextmanager
def held_if_free(fd: int, name: str):
    """Hold ``name``'s byte as ``held`` does if no other process holds it; yields whether it was taken."""
    offset = _lock_offset(name)
    if not _try_lock(fd, offset):
        yield False
        return
    try:
        yield True
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset)


def _lock_offset(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def _try_lock(fd: int, offset: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # what a byte held elsewhere gives
            return False
        raise


class TaskRunner:
    """Runs tasks of one invocation; ``run(node)`` is what the scheduler calls."""

    def __init__(self, ws: Workspace, keys: dict[Node, str], console: Console, *, local: LocalCache | None,
                 remote_factory: Callable[[], "RemoteCache | None"], summary: Summary,
                 components: Mapping[Node, dict] | None = None) -> None:
        self.ws = ws
        self.keys = keys
        # Each task's key components (KeyMaker.parts): an artifact carries them for `polykit why --remote`.
        self.components = components or {}
        self.console = console
        self.local = local
        self.summary = summary
        self._remote_factory = remote_factory
        self._lock_file: int | None = None
        self._record_cache: dict | None = None
        self._records_changed = False
        self._remote_lock = threading.Lock()
        self._remote_made = False
        self.remote: RemoteCache | None = None
        self.uploader: Uploader | None = None
        self.prefetcher: "Prefetcher | None" = None
        self._packing = None  # the packing threads (a ThreadPoolExecutor), made by the first miss
        self._pack_slots = threading.BoundedSemaphore(PACK_THREADS)

    @functools.cached_property
    def limits(self):
        """What a downloaded artifact may unpack to: bounded like the server's default."""
        from . import artifact

        return artifact.Limits(max_unpacked_size=64 * (self.ws.remote.max_artifact_size or artifact.DEFAULT_MAX_ARTIFACT_SIZE))

    def _get_remote(self) -> "RemoteCache | None":
        """The remote backend, made on the first local miss: a build of local hits never pays for it."""
        with self._remote_lock:
            if not self._remote_made:
                self._remote_made = True
                try:
                    self.remote = self._remote_factory()
                    if self.remote is not None and not self.remote.read_only:
                        self.uploader = Uploader(self.remote, self.console, self.summary, self._known_absent)
                except Exception as exc:  # the remote cache only saves time: never a reason to fail
                    self.console.warn(f"the remote cache cannot be used ({_flat(exc)}); building without it")
                    self.remote = self.uploader = None
            return self.remote

    def _known_absent(self, key: str) -> bool:
        return self.prefetcher is not None and self.prefetcher.absent(key)

    def prefetch(self, order: list[Node]) -> None:
        """Ask the server at once about every task that the local cache cannot serve, and start
        downloading its hits (see ``prefetch.py``). A run of local hits never touches the network."""
        if self.local is None:
            return
        records = self._records()
        wanted = [self.keys[node] for node in order
                  if (records.get(str(node)) or {}).get("key") != self.keys[node] and not self.local.has(self.keys[node])]
        if not wanted:
            return
        label = {self.keys[node]: f"{node}  downloading" for node in order}
        from .prefetch import Prefetcher

        self.prefetcher = Prefetcher(self._get_remote, self.local, self._stage, lambda key: self.console.progress(label[key]))
        self.prefetcher.start(wanted)

    def finish_prefetch(self) -> None:
        """Throw away what was fetched for tasks that did not take it (skipped after a failure)."""
        if self.prefetcher is not None:
            self.prefetcher.close()

    # --- one task ----------------------------------------------------------------------------

    def run(self, node: Node) -> bool:
        try:
            with self._task_lock(node):
                return self._run(node)
        except Exception as exc:  # a bug or an unusable folder fails this task, never the whole run
            self.console.line(f"{node}  failed ({exc.__class__.__name__}: {exc})")
            self.summary.add(node, "failed")
            return False

    def quick(self, node: Node) -> bool:
        """The whole turn of a task whose outputs are already in place, or False (then ``run`` it).

        Meant for the scheduler's own thread (see ``graph.run_graph``): it answers at once
        without a record under the task's key, and never waits for another run holding the
        task's lock (``run`` does). Under the lock it is the same check and the same report as
        ``run`` makes; anything unexpected is left to ``run`` too, which reports it.
        """
        if self.local is None:
            return False
        try:
            record = self._records().get(str(node))
            if record is None or record.get("key") != self.keys[node]:
                return False
            fd = self._lock_fd()
            pkg = self.ws.packages[node.package]
            with held_if_free(fd, str(node)) if fd is not None else contextlib.nullcontext(True) as free:
                if not free:
                    return False
                with phase("tasks: outputs-in-place checks", threads=True):
                    return self._outputs_in_place(node, pkg, pkg.tasks[node.task], self.keys[node], hold=True)
        except Exception:
            return False

    @contextlib.contextmanager
    def _task_lock(self, node: Node):
        """One polykit at a time per task in a workspace: two runs must not swap the same outputs.

        One lock file for the workspace, one byte of it per task (POSIX record locks), so a fresh
        checkout does not pay for creating a lock file per task.
        """
        fd = self._lock_fd()
        if fd is None:
            yield  # a read-only checkout: no other run can write there either
            return
        with held(fd, str(node)):
            yield

    def _lock_fd(self) -> int | None:
        with self._remote_lock:
            if self._lock_file is None:
                path = self.ws.root / ".polykit" / "tasks.lock"
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._lock_file = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError:
                    self._lock_file = -1
            return self._lock_file if self._lock_file >= 0 else None

    def _run(self, node: Node) -> bool:
        pkg = self.ws.packages[node.package]
        task = pkg.tasks[node.task]
        key = self.keys[node]
        if self.local is not None:
            with phase("tasks: outputs-in-place checks", threads=True):
                hit = self._outputs_in_place(node, pkg, task, key)
            with phase("tasks: local cache lookups and restores", threads=True):
                hit = hit or self._guarded(node, "local", lambda: self._try_local(node, pkg, task, key))
            with phase("tasks: remote hits (waits and placing)", threads=True):
                hit = hit or self._guarded(node, "remote", lambda: self._try_remote(node, pkg, task, key))
            if hit:
                return True
        with phase("tasks: misses (command, packing, storing)", threads=True):
            return self._execute(node, pkg, task, key)

    # --- outputs already in place ----------------------------------------------------------------
    # After a task is built or restored, a record keeps its key, the signature of each output
    # (size, mtime, inode, ctime, mode) and its log. When the same key comes back and every output
    # is still exactly as left, nothing needs restoring: only the log is replayed. Records live in
    # one file, read once and written once a run; a lost record only costs a full restore.
    # A record also keeps the signatures of the folders the outputs' walk listed ("walked", see
    # expand_outputs): while those are unchanged the walk would find the same outputs, so it is
    # not done again, only each recorded entry looked at. A record without them (a restore lists
    # what its artifact placed, without a walk) gets them from the first walk that finds the
    # outputs in place, when its folders have settled (see SETTLE_NS in outputs.py). The files'
    # signatures rely on a change moving mtime or ctime: a same-size rewrite made within the same
    # tick of the filesystem's clock as the build's own last write, by something other than the
    # build, while polykit records it, is not seen.

    def _records(self) -> dict:
        with self._remote_lock:
            if self._record_cache is None:
                try:
                    data = json.loads((self.ws.root / RECORDS_FILE).read_text())
                    self._record_cache = data["tasks"] if data.get("version") == 1 else {}
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    self._record_cache = {}
            return self._record_cache

    def save_records(self) -> None:
        """Write the records of this run (called once, at its end)."""
        if not self._records_changed:
            return
        path = self.ws.root / RECORDS_FILE
        try:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "tasks": self._records()}, separators=(",", ":")))
            os.replace(tmp, path)
        except OSError:
            pass

    def _outputs_in_place(self, node: Node, pkg: Package, task: Task, key: str, hold: bool = False) -> bool:
        record = self._records().get(str(node))
        try:
            if record is None or record.get("key") != key:
                return False
            walked = record.get("walked")
            if walked is not None:
                if not walk_unchanged(pkg.dir, walked):
                    return False
                current = record["files"]
            else:
                walked = {}
                current = expand_outputs(pkg.dir, task.outputs, strict=False, walked=walked)
                if current != sorted(record["files"]):
                    return False
            if any(_signature(pkg.dir / rel) != record["files"][rel] for rel in current):
                return False
            log = base64.b64decode(record["log"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if "walked" not in record and walked:
            with self._remote_lock:
                record["walked"] = walked
                self._records_changed = True
        if hold:  # the scheduler's thread: written out when it next waits (see Console)
            self.console.hold(node, f"{node}  hit (local)", log)
        else:
            self.console.line(f"{node}  hit (local)")
            self.console.log(node, log)
        self.summary.add(node, "hit (local)", int(record.get("duration_ms", 0)))
        return True

    def _forget_record(self, node: Node) -> None:
        records = self._records()
        with self._remote_lock:
            if records.pop(str(node), None) is not None:
                self._records_changed = True

    def _write_record(self, node: Node, pkg: Package, task: Task, key: str, log: bytes | Path, duration_ms: int,
                      outputs: list[str] | None = None) -> None:
        record = self._record(pkg, task, key, log, duration_ms, outputs)
        if record is not None:
            self._keep_record(node, record)

    def _record(self, pkg: Package, task: Task, key: str, log: bytes | Path, duration_ms: int,
                outputs: list[str] | None = None, walked: dict | None = None) -> dict | None:
        """The record of a task's outputs as they are now, or None when it cannot be made.

        ``log`` is the task's output, as a file or (from an artifact verified into memory) as bytes.
        ``walked`` is what the walk that found ``outputs`` noted (see ``expand_outputs``), if it did."""
        try:
            if (len(log) if isinstance(log, bytes) else log.stat().st_size) > RECORD_LOG_LIMIT:
                return None  # a long log stays in the artifact only; such a task is restored each time
            if outputs is None:
                walked = {}
                outputs = expand_outputs(pkg.dir, task.outputs, strict=False, walked=walked)
            body = log if isinstance(log, bytes) else log.read_bytes()
            record = {"key": key, "duration_ms": duration_ms, "files": {rel: _signature(pkg.dir / rel) for rel in outputs},
                      "log": base64.b64encode(body).decode()}
            if walked:
                record["walked"] = walked
            return record
        except OSError:
            return None

    def _keep_record(self, node: Node, record: dict) -> None:
        records = self._records()
        with self._remote_lock:
            records[str(node)] = record
            self._records_changed = True

    def _try_local(self, node: Node, pkg: Package, task: Task, key: str) -> bool:
        from . import artifact

        path = self.local.get(key)
        if path is None:
            return False
        try:
            self._restore(node, "hit (local)", pkg, task, key, path)
        except artifact.ArtifactError as exc:
            self.console.warn(f"{node}: the local cache entry is damaged ({exc}); discarding it")
            self.local.discard(key)
            return False
        except OSError as exc:
            self.console.warn(f"{node}: could not restore from the local cache ({exc}); building locally")
            return False
        return True

    def _guarded(self, node: Node, cache: str, attempt: Callable[[], bool]) -> bool:
        """The last safety net of a cache lookup: a cache only ever saves time.

        The backend and the restore turn every problem they know of into one warning; anything
        else raised (whatever a server sent, a damaged entry, or a bug) becomes one warning and
        a local build too, never a failed task. A hit that was already reported stays a hit, so
        a task never gets a second status line.
        """
        try:
            return attempt()
        except Exception as exc:
            if node in self.summary.statuses:
                self.console.warn(f"{node}: the {cache} hit ended with an error ({_flat(exc)})")
                return True
            self.console.warn(f"{node}: the {cache} cache failed unexpectedly ({_flat(exc)}); building locally")
            return False

    def _try_remote(self, node: Node, pkg: Package, task: Task, key: str) -> bool:
        from .prefetch import ABSENT, UNKNOWN

        known = self.prefetcher.take(key) if self.prefetcher is not None else UNKNOWN
        if known == ABSENT:
            return False  # the batch query said so: no GET
        if known != UNKNOWN:
            return self._restore_prefetched(node, pkg, task, key, known)
        remote = self._get_remote()
        if remote is None or not remote.enabled:
            return False
        try:
            fh, temp = self.local.new_temp()
        except OSError as exc:
            self.console.warn(f"{node}: the local cache folder is not usable ({exc}); building locally")
            return False
        try:
            with fh:
                ok = remote.fetch(key, fh, self.console.progress(f"{node}  downloading"))
            if not ok:
                return False
            self.summary.transfer(node, "down", temp.stat().st_size)
            return self._restore_remote(node, pkg, task, key, temp)
        finally:
            temp.unlink(missing_ok=True)

    def _restore_prefetched(self, node: Node, pkg: Package, task: Task, key: str, future) -> bool:
        """Place an artifact the prefetcher downloaded and verified (or report why it could not)."""
        from . import artifact

        try:
            staged = future.result()
        except (artifact.ArtifactError, OSError) as exc:
            return self._remote_restore_failed(node, exc)
        if staged is None:
            return False  # the download failed; the backend said why
        self.summary.transfer(node, "down", staged.path.stat().st_size)
        try:
            return self._restore_remote(node, pkg, task, key, staged.path, staged=staged)
        finally:
            staged.discard()

    def _restore_remote(self, node: Node, pkg: Package, task: Task, key: str, path: Path, **kwargs) -> bool:
        """Restore a downloaded artifact; a refusal or a failure is one warning and a local build."""
        from . import artifact

        try:
            self._restore(node, "hit (remote)", pkg, task, key, path, keep=self.local.put, **kwargs)
        except (artifact.ArtifactError, OSError) as exc:
            return self._remote_restore_failed(node, exc)
        return True

    def _remote_restore_failed(self, node: Node, exc: Exception) -> bool:
        """The one warning for a downloaded artifact that could not be restored; the task builds."""
        from . import artifact

        if isinstance(exc, artifact.ArtifactError):
            self.console.warn(f"{node}: the remote cache sent an artifact that failed verification ({exc}); building locally")
        else:
            self.console.warn(f"{node}: could not restore the remote artifact ({exc}); building locally")
        return False

    def _stage(self, key: str, path: Path) -> "Staged":
        """Verify an artifact completely, into memory or a staging folder (nothing of the package is touched)."""
        from . import restore

        return restore.stage(path, key, self.limits, self.local.tmp)

    def _report_hit(self, node: Node, status: str, meta: dict, log: bytes | Path) -> None:
        # Counted as soon as its status line is out: a hit stays a hit if replaying its log fails.
        saved_ms = int(meta.get("duration_ms", 0))
        self.console.line(f"{node}  {status}")
        self.summary.add(node, status, saved_ms)
        if isinstance(log, bytes):
            self.console.log(node, log)
        else:
            self.console.log_file(node, log)

    def _restore(self, node: Node, status: str, pkg: Package, task: Task, key: str, path: Path,
                 keep: Callable[[str, Path], object] | None = None, staged: "Staged | None" = None) -> None:
        """Verify the artifact (unless ``staged`` already is), then swap its outputs into the package.

        An artifact may only place what the task declares as outputs, and never through a
        symlink: a poisoned cache entry must not overwrite sources or write outside the package.
        """
        staged = staged or self._stage(key, path)
        meta = staged.meta
        try:
            check_restorable(meta["files"], meta["symlinks"], task.outputs, pkg.dir)
            self._forget_record(node)
            for stale in expand_outputs(pkg.dir, task.outputs, strict=False):
                _remove(pkg.dir / stale)
            try:
                staged.place(pkg.dir)
            except BaseException:
                # Placing stopped part-way (a full disk, a file in the way that cannot go): what it
                # placed, a file cut short among it, must not stay for the build that follows to
                # take as up to date, nor be packed and recorded under this key. The task then
                # builds from no outputs, as after a clean.
                for placed in expand_outputs(pkg.dir, task.outputs, strict=False):
                    with contextlib.suppress(OSError):
                        _remove(pkg.dir / placed)
                raise
            if keep is not None:
                keep(key, path)  # a verified download joins the local cache
            # The record lists what the artifact placed: after the old outputs went, that is what the
            # output patterns match (were it not, the next run would only restore again, never miss a change).
            self._write_record(node, pkg, task, key, staged.log, int(meta.get("duration_ms", 0)),
                               sorted([*meta["files"], *meta["symlinks"]]))
            self._report_hit(node, status, meta, staged.log)
        finally:
            staged.release()

    def _execute(self, node: Node, pkg: Package, task: Task, key: str) -> bool:
        self.console.line(f"{node}  miss")
        self._forget_record(node)
        started = time.monotonic()
        # The output goes to the console as it comes and to a file for the artifact's log.
        import tempfile  # only a task that runs needs it

        capture = tempfile.NamedTemporaryFile(prefix="polykit-log-", suffix=".log", delete=False,
                                              dir=self._capture_dir())
        log = Path(capture.name)
        try:
            with capture:
                try:
                    proc = subprocess.Popen(task.command, shell=True, cwd=pkg.dir, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                except OSError as exc:
                    self.console.line(f"{node}  failed (cannot start: {exc})")
                    self.summary.add(node, "failed")
                    return False
                assert proc.stdout is not None
                while line := proc.stdout.readline(LINE_LIMIT):
                    capture.write(line)
                    self.console.log(node, line)
                code = proc.wait()
            duration_ms = int((time.monotonic() - started) * 1000)
            if code != 0:
                self.console.line(f"{node}  failed (exit {code})")
                self.summary.add(node, "failed")
                return False
            self.summary.add(node, "miss")
            if self.local is not None and self._store(node, pkg, task, key, log, duration_ms):
                log = None  # the artifact's writer removes it once written
            return True
        finally:
            if log is not None:
                log.unlink(missing_ok=True)

    def _capture_dir(self) -> str | None:
        if self.local is None:
            return None
        try:
            self.local.tmp.mkdir(parents=True, exist_ok=True)
            return str(self.local.tmp)
        except OSError:
            return None

    def _store(self, node: Node, pkg: Package, task: Task, key: str, log: Path, duration_ms: int) -> bool:
        """Hash the task's outputs now, under its lock, and write the artifact beside the next tasks.

        The scheduler moves on as soon as the outputs are hashed (see ``artifact.prepare``): the
        compression, the local cache entry and the upload happen on a packing thread, which
        writes exactly the bytes hashed here or, for a large file changed meanwhile, nothing.
        Returns True when that thread took over ``log`` (it removes the file when done).
        """
        from . import artifact

        if task.outputs is None:
            self.console.warn(f"{node} declares no outputs: only its log is cached")
        meta = {"package": pkg.name, "task": task.name, "command": task.command,
                "created_at": int(time.time()), "duration_ms": duration_ms, "exit_code": 0}
        if node in self.components:
            meta["components"] = for_manifest(self.components[node])
        # Every declared output is cached, or the task is not cached at all: a hit must never
        # restore less than the build made.
        self._pack_slots.acquire()  # bounds the prepared artifacts (and the bytes they hold) in memory
        try:
            try:
                walked: dict = {}
                outputs = expand_outputs(pkg.dir, task.outputs, walked=walked)
                prepared = artifact.prepare(pkg.dir, outputs, meta, log=log, cache_key=key)
            except (OutputError, artifact.ArtifactError, OSError) as exc:
                self.console.warn(f"{node}: not cached: {_describe(exc, pkg.dir)}")
                self._pack_slots.release()
                return False
            record = self._record(pkg, task, key, log, duration_ms, outputs, walked)  # the outputs as the build left them
            self._packer().submit(self._write_artifact, node, key, prepared, log, record)
        except BaseException:
            self._pack_slots.release()
            raise
        return True

    def _packer(self):
        with self._remote_lock:
            if self._packing is None:
                from concurrent.futures import ThreadPoolExecutor

                self._packing = ThreadPoolExecutor(max_workers=PACK_THREADS, thread_name_prefix="polykit-pack")
            return self._packing

    def _write_artifact(self, node: Node, key: str, prepared, log: Path, record: dict | None) -> None:
        """Compress a prepared artifact into the local cache, keep the task's record, queue the upload."""
        from . import artifact

        try:
            with phase("tasks: packing (beside the tasks)", threads=True):
                try:
                    fh, temp = self.local.new_temp()
                except OSError as exc:
                    self.console.warn(f"{node}: its outputs could not be cached ({exc})")
                    return
                try:
                    with fh:
                        prepared.write(fh)
                    path = self.local.put(key, temp)
                except (artifact.ArtifactError, OSError) as exc:
                    temp.unlink(missing_ok=True)
                    self.console.warn(f"{node}: not cached: {_describe(exc, prepared.root)}")
                    return
            if record is not None:
                self._keep_record(node, record)
            self._get_remote()
            if self.uploader is not None:
                self.uploader.submit(node, key, path)
        except Exception as exc:  # a cache only ever saves time: one warning, never a failed run
            self.console.warn(f"{node}: not cached ({_flat(exc)})")
        finally:
            log.unlink(missing_ok=True)
            self._pack_slots.release()

    def finish_packing(self) -> None:
        """Wait for the artifacts still being written; their uploads are queued once this returns."""
        if self._packing is not None:
            self._packing.shutdown(wait=True)


def _describe(exc: Exception, pkg_dir: Path) -> str:
    """An error about an output, naming the output relative to its package."""
    name = getattr(exc, "filename", None)
    if isinstance(exc, OSError) and isinstance(name, str) and name.startswith(str(pkg_dir) + os.sep):
        return f"output {os.path.relpath(name, pkg_dir)!r} cannot be read ({exc.strerror or exc})"
    return str(exc)
