"""What proves a tracked file is its blob, asked of git the cheaper way: the blobs' sizes from the
object store, or the files' own blob ids.

:mod:`gitindex` trusts git's blob id for a file git calls unmodified only when the file holds the
blob's bytes and not a conversion of them (see :meth:`gitindex.GitIndex._sized`). Two answers are
exact:

- the blob's size, against the size git recorded for the file (``git cat-file --batch-check``):
  cheap for an object in a pack (an index look-up, a header; some 0.5 us), dear for a loose one,
  a file of its own to open, map and inflate (some 12 us of CPU);
- the file's own blob id, ``sha1(b"blob %d\\0" % size + content)`` (``git hash-object
  --no-filters``: the bytes as they are, no conversion), against the id in the index: some 4 us
  a file and 2 us a KiB (git's collision-detecting SHA-1), whatever the object store holds.

A clone from a server has its objects in a pack, so the sizes win by far; a clone of a local
folder hard-links the source's loose objects, and for 50,000 small files hashing them costs half
the look-ups. The share of loose objects is estimated from a few fan-out folders of the object
store (loose objects are spread evenly over them by their ids).
"""

from __future__ import annotations

import os
import subprocess
import threading

# Below this many items one process does it all; above, two share them (two cores).
SPLIT = 4096
# Costs in microseconds, measured on a 2-core virtual machine with git 2.39 (only their ratios matter).
LOOKUP_LOOSE = 12.0
LOOKUP_PACKED = 0.5
HASH_FILE = 4.0
HASH_KIB = 2.0
# Fan-out folders (objects/xx) listed to estimate the loose share.
SAMPLE_FOLDERS = 4


def _split_run(args: list[str], cwd: str, lines: list[str], timeout: float) -> list[list[str]] | None:
    """Run ``args`` on ``lines`` (one per input line), in two processes when there are many: each
    process's output lines, in the order of its share (``lines[0::2]``, ``lines[1::2]``). None
    when a process failed.

    Input and output are unnamed temporary files, not pipes: ``hash-object --stdin-paths``
    flushes its output after every line, and a pipe read as it comes woke this process 50,000
    times for 50,000 files (0.14 s of CPU, a third of git's own).
    """
    import tempfile  # only a fresh index without kept sizes comes here

    shares = [lines] if len(lines) < SPLIT else [lines[0::2], lines[1::2]]
    answers: list[list[str] | None] = [None] * len(shares)

    def ask(index: int) -> None:
        try:
            with tempfile.TemporaryFile() as into, tempfile.TemporaryFile() as out:
                into.write("".join(f"{line}\n" for line in shares[index]).encode("utf-8", "surrogateescape"))
                into.seek(0)
                done = subprocess.run(args, cwd=cwd, stdin=into, stdout=out, stderr=subprocess.DEVNULL, timeout=timeout)
                if done.returncode == 0:
                    out.seek(0)
                    answers[index] = out.read().decode("ascii", "replace").splitlines()
        except (OSError, subprocess.SubprocessError):
            return

    helper = threading.Thread(target=ask, args=(1,), daemon=True) if len(shares) > 1 else None
    if helper is not None:
        helper.start()
    ask(0)
    if helper is not None:
        helper.join()
    if any(answer is None for answer in answers):
        return None
    return answers  # type: ignore[return-value]


def blob_sizes(git: str, cwd: str, ids: list[str], timeout: float) -> dict[str, int] | None:
    """The size of each blob the repository holds (``git cat-file --batch-check``); None when git
    gives no answer."""
    answers = _split_run([git, "cat-file", "--buffer", "--batch-check=%(objectname) %(objectsize)"], cwd, ids, timeout)
    if answers is None:
        return None
    sizes: dict[str, int] = {}
    for answer in answers:
        for line in answer:
            oid, _, size = line.partition(" ")
            if size.isdigit():  # "<id> missing" for an object the repository lacks
                sizes[oid] = int(size)
    return sizes


def hashable(path: str) -> bool:
    """Whether ``git hash-object --stdin-paths`` takes the path as it is: a line (read as text,
    so a carriage return before its end is dropped: "a\\r" would be answered with the hash of
    "a"), not starting with a double quote (read as a C-quoted name)."""
    return "\n" not in path and "\r" not in path and not path.startswith('"')


def blob_ids(git: str, cwd: str, paths: list[str], timeout: float) -> dict[str, str] | None:
    """Each file's blob id from its bytes as they are (``git hash-object --no-filters``: no
    end-of-line conversion, no filter), by path relative to ``cwd``; the paths must be
    :func:`hashable`. None when git gives no answer (a file gone or unreadable stops it)."""
    answers = _split_run([git, "hash-object", "--no-filters", "--stdin-paths"], cwd, paths, timeout)
    if answers is None:
        return None
    shares = [paths] if len(answers) == 1 else [paths[0::2], paths[1::2]]
    ids: dict[str, str] = {}
    for share, answer in zip(shares, answers):
        if len(answer) != len(share):
            return None
        ids.update(zip(share, answer))
    return ids


def loose_share(objects: str, ids: list[str]) -> float:
    """The share of ``ids`` stored as loose objects under the folder ``objects``, estimated from
    the ids of a few fan-out folders (1.0 when none can be told: the look-ups would be dear)."""
    by_folder: dict[str, set[str]] = {}
    for oid in ids:
        by_folder.setdefault(oid[:2], set()).add(oid[2:])
    folders = sorted(by_folder, key=lambda name: -len(by_folder[name]))[:SAMPLE_FOLDERS]
    asked = found = 0
    for name in folders:
        try:
            names = set(os.listdir(os.path.join(objects, name)))
        except FileNotFoundError:
            names = set()
        except OSError:
            continue
        asked += len(by_folder[name])
        found += len(by_folder[name] & names)
    return found / asked if asked else 1.0


def hashing_pays(loose: float, ids: int, files: int, size: int) -> bool:
    """Whether hashing ``files`` files of ``size`` bytes in all costs less than looking up ``ids``
    blobs of which the share ``loose`` is loose."""
    lookup = ids * (loose * LOOKUP_LOOSE + (1 - loose) * LOOKUP_PACKED)
    return files * HASH_FILE + size / 1024 * HASH_KIB < lookup
