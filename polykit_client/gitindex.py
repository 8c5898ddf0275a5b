"""What git knows about the work tree: the files it lists, and the blob id of each tracked file
whose working copy is exactly the blob the index names, so that such files need not be read.

``git ls-files -s -v -m`` gives both: every tracked entry with its mode, blob id and tag,
the tracked files whose working copy differs from the index (``-m``: git compares the stat data
it recorded with the file's, and reads the file when the entry is "racily clean", a change within
the same timestamp as the index write); beside it, for the default inputs, ``git ls-files
--others --exclude-standard`` gives the untracked files that are not ignored. A blob id is a content hash (SHA-1 of ``blob <size>\\0<content>``, see
gitformat-index(5) and git-hash-object(1)), the same digest :mod:`blobid` computes by reading a
file, so the key does not depend on where a digest came from.

git's answer is taken only where it describes the bytes on disk:

- only entries tagged ``H``: ``h`` (assume-unchanged) and ``S`` (skip-worktree) are claims git
  does not check, ``M`` an unmerged path, ``C`` a file git found modified (or deleted, or added
  with ``--intent-to-add``, whose index entry is the empty blob);
- only regular files (mode 100644 or 100755): a symlink's blob is its target's name, while an
  input is hashed through the link, and a submodule (160000) is a commit, not its files;
- only SHA-1 repositories (40 hexadecimal digits), the digest :mod:`blobid` computes;
- the stat check is git's own, made strict on the command line whatever the configuration says
  (``core.checkStat=default``, ``core.trustctime=true``, no ``core.fsmonitor`` hook);
- never for files that a checkout or ``git add`` may convert (end-of-line conversion, ``ident``,
  ``filter``, ``working-tree-encoding``): there the blob is not the working copy. Any such
  attribute in a ``.gitattributes`` leaves the files under its folder to be read; in
  ``info/attributes``, the global or the system attributes file, or ``core.autocrlf``, all files;
- only where the file on disk has its blob's size, which the size git recorded in its index file
  tells for almost every entry (read by :mod:`indexfile`, see :meth:`GitIndex._sized`), or its
  bytes hash to its blob id, where that costs less than looking up the blobs' sizes (a fresh
  clone of a local folder, whose objects are loose: see :mod:`gitobjects`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import gitobjects, indexfile

# Attributes that make a checked-out file differ from its blob (gitattributes(5), "Effects").
CONVERSIONS = frozenset({"text", "eol", "crlf", "filter", "ident", "working-tree-encoding"})
ATTRIBUTES_FILE = ".gitattributes"
KEPT_FILE = ".polykit/git-index.json"  # the index file's doubtful entries and the blobs' sizes, see GitIndex._index_verdict
KEPT_VERSION = 1
OLD_BLOB_SIZES_FILE = ".polykit/blob-sizes"  # what held the blobs' sizes before KEPT_FILE; removed when it is written
# Entries without a kept blob size from which hashing their files may be chosen over looking up
# the sizes (below, either costs little: the look-ups keep the sizes for a later index).
HASH_FROM = 4096

STRICT = ("-c", "core.quotepath=off", "-c", "core.checkStat=default", "-c", "core.trustctime=true",
          "-c", "core.fsmonitor=false")
# Records: "? path" for an untracked file; "T MODE ID STAGE\tpath" for an index entry (the first
# tab ends the fields; the path may hold tabs of its own). T is H for an entry git checks, h for
# assume-unchanged, S or s for skip-worktree, M or m for an unmerged path, C or c for a modified one.
_TRUSTED = ("H 100644 ", "H 100755 ")  # a regular file's entry git checks
_ID = len(_TRUSTED[0])
_PATH = _ID + 40 + 3  # stage 0 after a 40-digit SHA-1 (a SHA-256 repository's 64 digits do not fit)
_MODIFIED = ("C ", "c ")  # also a tracked file's second record
_UNMERGED = ("M ", "m ")
_STAGE_0 = " 0\t"


@dataclass
class GitState:
    """``files``: the listing (sorted, relative to the root); ``blobs``: path -> blob id of the
    tracked files whose working copy git vouches for (see the module's rules)."""

    files: list[str]
    blobs: dict[str, str] = field(default_factory=dict)


@dataclass
class SizeVerdict:
    """One version of git's index file (``identity``: :func:`indexfile.identity`), as
    :meth:`GitIndex._sized` uses it: ``doubtful`` maps each entry whose recorded size is 0 or not
    its blob's to the blob's size (None when unknown); ``ids``, each entry's blob id, when the
    file was read whole."""

    identity: tuple[int, int, int]
    doubtful: dict[str, int | None]
    ids: dict[str, str] | None = None


def _run(args: list[str], cwd: Path, timeout: float, found_nothing: int | None = None) -> bytes | None:
    """The command's output; None when it failed (``found_nothing``: an exit status meaning an empty answer)."""
    try:
        out = subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode == found_nothing:
        return b""
    return out.stdout if out.returncode == 0 else None


def converting(text: str, macros: set[str]) -> bool:
    """Whether an attributes file sets any conversion attribute (or a macro that does).

    Every word of every line counts, the pattern's too: a pattern that reads like an attribute
    only costs reading some files. ``-attr`` (unset) and ``!attr`` (unspecified: the
    configuration decides, and ``core.autocrlf`` is checked on its own) convert nothing.
    """
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        for word in words:
            if word[:1] in "-!":
                continue
            name = word.split("=", 1)[0]
            if name.startswith("[attr]"):
                continue
            if name in CONVERSIONS or name in macros:
                return True
    return False


def converting_macros(texts: list[str]) -> set[str]:
    """Macros (``[attr]name ...``) whose definition sets a conversion attribute, directly or through another macro."""
    definitions = []
    for text in texts:
        for line in text.splitlines():
            words = line.split()
            if words and words[0].startswith("[attr]"):
                definitions.append((words[0][len("[attr]"):], " ".join(words[1:])))
    found: set[str] = set()
    while True:
        more = {name for name, body in definitions if name not in found and converting(body, found)}
        if not more:
            return found
        found |= more


def _kept_sizes(kept: dict, ids: set[str]) -> dict[str, int]:
    """The sizes ``KEPT_FILE`` holds for these blob ids ("<id> <size>" lines)."""
    known: dict[str, int] = {}
    text = kept.get("sizes")
    if isinstance(text, str):
        for line in text.splitlines():
            oid, _, size = line.partition(" ")
            if oid in ids and size.isdigit():
                known[oid] = int(size)
    return known


class GitIndex:
    """Runs ``git ls-files`` (and, beside it, the look-ups that find the attributes files and
    ``core.autocrlf``) from the moment it is made; :meth:`result` waits for them."""

    TIMEOUT = 60.0

    def __init__(self, root: Path, untracked: bool, environ=None, proof: str | None = None) -> None:
        """``proof``: how entries without a kept blob size are proven, "sizes" or "hashes";
        None (the default) for whichever costs less (see :meth:`_hashed`)."""
        self.root = root
        self.proof = proof
        self.environ = os.environ if environ is None else environ
        self._procs: list[subprocess.Popen] = []
        self._setup: dict = {}
        self._verdict: SizeVerdict | None = None
        self._setup_thread: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self._parsed: list[tuple[dict[str, str], list[str], bytes] | None] = []
        git = shutil.which("git", path=self.environ.get("PATH"))
        if git is None:
            return
        self._git = git
        # The tracked files (an lstat each) and the untracked ones (a listing of every folder,
        # matched against the ignore rules) are two processes, which two cores run at once.
        listings = [[git, *STRICT, "ls-files", "-z", "-v", "-s", "-m", "--cached"]]
        if untracked:
            listings.append([git, *STRICT, "ls-files", "-z", "--others", "--exclude-standard"])
        try:
            for args in listings:
                self._procs.append(subprocess.Popen(args, cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                    stderr=subprocess.DEVNULL))
        except OSError:
            self.close()
            self._procs = []
            return
        self._parsed = [None] * len(self._procs)
        self._readers = [threading.Thread(target=self._read, args=(index,), name="polykit-git-listing", daemon=True)
                         for index in range(len(self._procs))]
        for reader in self._readers:
            reader.start()
        self._setup_thread = threading.Thread(target=self._find_setup, name="polykit-git-setup", daemon=True)
        self._setup_thread.start()

    def _read(self, index: int) -> None:
        """Read one listing as git writes it, parsing the records of each piece as it comes.

        git's output of 50,000 entries is megabytes: left in the pipe, git waits for every 64 KiB
        to be read. Read at once, git never waits, and its records are parsed beside it (by
        comprehensions over fixed offsets, not a loop or a regular expression per record: some
        40 ms for 50,000 entries) rather than after it. A record never holds a NUL, nor does a
        UTF-8 character, so each piece is cut after its last NUL and the rest kept for the next.
        """
        entries: dict[str, str] = {}
        rest: list[str] = []
        tail = b""
        stdout = self._procs[index].stdout
        try:
            while chunk := os.read(stdout.fileno(), 1 << 20):
                data = tail + chunk if tail else chunk
                cut = data.rfind(b"\0") + 1
                tail = data[cut:]
                if not cut:
                    continue
                records = data[:cut - 1].decode("utf-8", "surrogateescape").split("\0")
                entries.update({r[_PATH:]: r[_ID:_ID + 40] for r in records
                                if r.startswith(_STAGE_0, _ID + 40) and r.startswith(_TRUSTED)})
                rest += [r for r in records if not (r.startswith(_STAGE_0, _ID + 40) and r.startswith(_TRUSTED))]
        except (OSError, ValueError):
            return  # no answer: result() says None
        finally:
            stdout.close()
        self._parsed[index] = (entries, rest, tail)

    def _find_setup(self) -> None:
        """The work tree's top, the attributes files outside the tree, and ``core.autocrlf``."""
        paths = _run([self._git, "rev-parse", "--path-format=absolute", "--show-toplevel", "--git-path",
                      "info/attributes", "--git-path", "index", "--git-path", "objects", "--show-prefix"],
                     self.root, self.TIMEOUT)
        config = _run([self._git, "config", "-z", "--get-regexp", r"^core\.(autocrlf|attributesfile)$"],
                      self.root, self.TIMEOUT, found_nothing=1)
        if paths is None or config is None:
            return  # no answer: no blob id is trusted
        lines = paths.decode("utf-8", "surrogateescape").splitlines()
        if len(lines) != 5:
            return
        settings = {}
        for entry in config.decode("utf-8", "surrogateescape").split("\0"):
            name, separator, value = entry.partition("\n")
            if name:
                settings[name.lower()] = value if separator else "true"  # a bare "autocrlf" line is true
        self._setup = {"top": lines[0], "info": lines[1], "index": lines[2], "objects": lines[3], "prefix": lines[4],
                       "autocrlf": settings.get("core.autocrlf", "false"), "global": settings.get("core.attributesfile")}
        # While git lists the files: what the index file says of their sizes (see _sized).
        self._verdict = self._index_verdict(lines[2], lines[4])

    def result(self) -> GitState | None:
        """The listing and trusted blob ids; None outside a git work tree (or when git failed)."""
        if not self._procs:
            return None
        deadline = time.monotonic() + self.TIMEOUT
        for reader, proc in zip(self._readers, self._procs):
            reader.join(max(0.0, deadline - time.monotonic()))
            try:
                code = proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = None
            if reader.is_alive() or code != 0:
                self.close()
                return None
        parsed = self._parsed
        if any(part is None or part[2] for part in parsed):
            return None  # unread, or not ended by a NUL
        # The tracked files' records, then "? path" for each untracked file. The index lists
        # paths in order, then come the untracked files in order: sorting a few runs costs next
        # to nothing.
        entries = parsed[0][0]
        rest = [record for part in parsed for record in part[1]]
        modified = {r[r.find("\t") + 1:] for r in rest if r.startswith(_MODIFIED)}
        files = list(entries)
        files += [r[2:] if r.startswith("? ") else r[r.find("\t") + 1:] for r in rest if not r.startswith(_MODIFIED)]
        files.sort()
        if any(r.startswith(_UNMERGED) for r in rest):
            files = sorted(set(files))  # an unmerged path has an entry per stage
        if self._setup_thread is not None:
            self._setup_thread.join(self.TIMEOUT)
        scopes = self._converted_scopes(files)
        if scopes is None or "" in scopes:
            return GitState(files)
        if modified or scopes:
            prefixes = tuple(scopes)
            entries = {path: oid for path, oid in entries.items()
                       if path not in modified and not (prefixes and path.startswith(prefixes))}
        return GitState(files, self._sized(entries))

    def _sized(self, entries: dict[str, str]) -> dict[str, str]:
        """The entries whose file on disk has the size of its blob.

        git calls a file unmodified when its stat data matches what the index recorded as git
        wrote it, under the conversions of that moment. A conversion in force then and not now
        leaves other bytes than the blob's behind a clean entry: an ``eol`` attribute removed by
        a later commit (a checkout does not rewrite a file whose blob did not change), a one-off
        ``git -c core.autocrlf=true checkout``, or an attributes file a sparse checkout keeps
        off the disk. Line-ending, ``ident`` and encoding conversions change a file's size, so a
        size that differs from the blob's sends the file to be read. (A ``filter`` whose output
        keeps the size, its attribute removed since the checkout, is not caught.)

        The file's size is the one git's index recorded, not an ``lstat`` of each file: for an
        entry ``ls-files -m`` calls unmodified, git compared its recorded size with the file's
        (read-cache.c, ``ce_match_stat_basic``: the size is compared whatever ``core.checkStat``
        says) and a different size is "modified" unless the recorded size is 0, which git writes
        for an entry it has not stat'ed yet (``read-tree``, ``--cacheinfo``) and for a racily
        clean one it smudges; those it compares by content, after conversion, so their size
        proves nothing. The recorded size is the file's modulo 2**32. So an unmodified entry whose
        recorded size is not 0 and equals its blob's has a file of the blob's size; every other
        one (:class:`SizeVerdict`'s ``doubtful``) is ``lstat``'ed. Without a readable index file
        (a split index) every entry is; without the blobs' sizes no blob id is trusted.
        """
        if not entries:
            return entries
        verdict = self._verdict
        path = self._setup.get("index")
        if verdict is not None and path is not None and indexfile.identity(path) != verdict.identity:
            # Rewritten since it was read (a git command beside this run): read it again. The
            # newer file describes the files as they are now, and an entry whose blob id is not
            # the one ls-files gave is not trusted.
            verdict = self._index_verdict(path, self._setup["prefix"], reread=True)
        if verdict is None:
            ids = set(entries.values())
            known = _kept_sizes(self._load_kept(), ids)
            sizes = self._blob_sizes(ids, known)
            if sizes is None:
                return {}
            if len(known) < len(ids):  # some were asked of git: keep them for the next run
                self._keep({"version": KEPT_VERSION, "index": "", "doubtful": {},
                            "sizes": "".join(f"{oid} {size}\n" for oid, size in sizes.items())})
            doubtful = {path: sizes.get(oid) for path, oid in entries.items()}
            kept = {}
        else:
            ids = verdict.ids
            if ids is not None:  # an entry whose blob id is not the one ls-files gave is not trusted
                entries = {rel: oid for rel, oid in entries.items() if ids.get(rel) == oid}
            kept = {rel: oid for rel, oid in entries.items() if rel not in verdict.doubtful}
            doubtful = {rel: verdict.doubtful[rel] for rel in entries if rel in verdict.doubtful}
        for rel, size in doubtful.items():
            try:
                if size is not None and os.lstat(os.path.join(self.root, rel)).st_size == size:
                    kept[rel] = entries[rel]
            except OSError:
                continue
        return kept

    def _converted_scopes(self, files: list[str]) -> set[str] | None:
        """Folders (relative to the root, with a trailing slash; "" for all) whose files a
        conversion may make differ from their blobs; None when that cannot be told."""
        setup = self._setup
        if not setup:
            return None
        if setup["autocrlf"].strip().lower() not in ("false", "no", "off", "0", ""):
            return {""}
        everywhere = [Path(setup["info"])]
        global_file = setup["global"]
        if global_file is not None:
            everywhere.append(Path(os.path.expanduser(global_file)))
        else:
            xdg = self.environ.get("XDG_CONFIG_HOME") or os.path.join(self.environ.get("HOME", "~"), ".config")
            everywhere.append(Path(os.path.expanduser(xdg)) / "git" / "attributes")
        if not self.environ.get("GIT_ATTR_NOSYSTEM"):
            # $(prefix)/etc/gitattributes: /etc for a distribution's git, beside its prefix otherwise.
            prefix = Path(os.path.realpath(self._git)).parent.parent
            everywhere += [Path("/etc/gitattributes"), prefix / "etc" / "gitattributes"]
        root = os.path.realpath(self.root)
        top = os.path.realpath(setup["top"])
        # Attributes files above the root (up to the work tree's top) apply to every file.
        folder = root
        while True:
            everywhere.append(Path(folder) / ATTRIBUTES_FILE)
            if folder == top or os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
        # Inside: every folder holding a listed file, and the folders above them. An attributes
        # file git ignores still applies, so each folder is looked at, not only the listing.
        folders = {path[:path.rfind("/") + 1] for path in files}  # "dir/sub/", "" for the root
        for name in list(folders):
            while name:
                name = name[:name.rfind("/", 0, -1) + 1]
                if name in folders:
                    break
                folders.add(name)
        # Plain strings and open(): a Path per folder cost more than the failed open itself.
        base = os.path.join(self.root, "")
        inside = [(name, f"{base}{name}{ATTRIBUTES_FILE}") for name in folders if name]
        sources = [("", str(path)) for path in everywhere] + inside
        texts: list[tuple[str, str | None]] = []
        for scope, path in sources:
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as fh:
                    texts.append((scope, fh.read()))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                texts.append((scope, None))  # unreadable: it may convert anything under its folder
        macros = converting_macros([text for _, text in texts if text is not None])
        return {scope for scope, text in texts if text is None or converting(text, macros)}

    def _index_verdict(self, path: str, prefix: str, reread: bool = False) -> SizeVerdict | None:
        """The doubtful entries of the index file at ``path`` (see :meth:`_sized`), by path from
        the root (``prefix``: the root's path from the top of the work tree).

        Kept in ``KEPT_FILE`` with the file's checksum: while the index stays the same (every
        run that changes nothing in git) only its last 20 bytes are read. Otherwise the index is
        read whole, the blobs' sizes looked up and the answer kept for the next run. An index
        written without a checksum (``index.skipHash``) is read whole every time.
        """
        kept = self._load_kept()
        if not reread:
            found = indexfile.trailer(path)
            if found is None:
                return None
            ident, checksum = found
            doubtful = kept.get("doubtful")
            if checksum.strip(b"\0") and kept.get("index") == checksum.hex() and isinstance(doubtful, dict):
                return SizeVerdict(ident, doubtful)
        read = indexfile.read(path)
        if read is None:
            return None
        ident, checksum, entries = read
        if prefix:
            cut = len(prefix)
            entries = {rel[cut:]: entry for rel, entry in entries.items() if rel.startswith(prefix)}
        ids = {oid for oid, _ in entries.values()}
        known = _kept_sizes(kept, ids)
        hashed = self._hashed(entries, known)
        if hashed:
            ids = {oid for rel, (oid, _) in entries.items() if rel not in hashed}
        sizes = self._blob_sizes(ids, known)
        if sizes is None:
            return None
        # A hashed entry is doubtful when its bytes are not its blob (None: no size to compare with).
        doubtful = {rel: None for rel, (oid, _) in entries.items() if rel in hashed and hashed[rel] != oid}
        doubtful.update({rel: sizes.get(oid) for rel, (oid, size) in entries.items()
                         if rel not in hashed and (not size or sizes.get(oid) != size)})
        self._keep({"version": KEPT_VERSION, "index": checksum.hex() if checksum.strip(b"\0") else "",
                    "doubtful": doubtful, "sizes": "".join(f"{oid} {size}\n" for oid, size in sizes.items())})
        return SizeVerdict(ident, doubtful, {rel: oid for rel, (oid, _) in entries.items()})

    def _load_kept(self) -> dict:
        """What ``KEPT_FILE`` holds, or nothing when it is missing, damaged or of another version."""
        try:
            with open(os.path.join(self.root, KEPT_FILE), encoding="utf-8", errors="surrogateescape") as fh:
                data = json.loads(fh.read())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("version") == KEPT_VERSION else {}

    def _keep(self, data: dict) -> None:
        """Write ``KEPT_FILE`` (its own temporary name, then a rename: another run may be writing too)."""
        path = os.path.join(self.root, KEPT_FILE)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            import tempfile  # only a run that reads the index whole writes this file

            fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".git-index-")
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False))
            os.replace(temp, path)
        except OSError:
            return  # only a cache: the next run asks git again
        try:
            os.unlink(os.path.join(self.root, OLD_BLOB_SIZES_FILE))
        except OSError:
            pass

    def _hashed(self, entries: dict[str, tuple[str, int]], known: dict[str, int]) -> dict[str, str]:
        """The blob ids of the files of entries without a kept blob size, from their bytes, when
        that costs less than looking the sizes up (see :mod:`gitobjects`); nothing otherwise.

        A file whose bytes hash to its entry's blob id is its blob: exact, whatever conversion
        wrote it. Only entries with a recorded size are hashed: git compares those by their
        stat data, so in a later run with this same index file git calling one unmodified means
        the file is still the one hashed (any write since changes its ctime). An entry of size
        0 is compared by content, under the conversions of that later run, and keeps the size
        check. The blobs' sizes are not learnt this way (the recorded size is the file's modulo
        2**32), so a later index file has its entries proven again. Only files ``ls-files``
        calls unmodified are opened: one git found changed (a named pipe now, or a file grown
        to gigabytes) is not read, and its blob's size is looked up instead.
        """
        if self.proof == "sizes":
            return {}
        todo = {rel: (oid, size) for rel, (oid, size) in entries.items()
                if oid not in known and size and gitobjects.hashable(rel)}
        if self.proof is None:
            if len(todo) < HASH_FROM:
                return {}
            ids = list({oid for oid, _ in todo.values()})
            loose = gitobjects.loose_share(self._setup["objects"], ids)
            if not gitobjects.hashing_pays(loose, len(ids), len(todo), sum(size for _, size in todo.values())):
                return {}
        vouched = self._vouched()
        todo = {rel: entry for rel, entry in todo.items() if rel in vouched}
        if not todo:
            return {}
        found = gitobjects.blob_ids(self._git, str(self.root), list(todo), self.TIMEOUT)
        return found or {}  # no answer (a file gone meanwhile): the sizes are looked up instead

    def _vouched(self) -> set[str]:
        """The regular files ``ls-files`` lists unmodified (waiting for its listing); none without it."""
        if not self._readers:
            return set()
        self._readers[0].join(self.TIMEOUT)
        parsed = self._parsed[0]
        if parsed is None or parsed[2]:
            return set()
        entries, rest, _ = parsed
        return set(entries).difference(r[r.find("\t") + 1:] for r in rest if r.startswith(_MODIFIED))

    def _blob_sizes(self, ids: set[str], known: dict[str, int]) -> dict[str, int] | None:
        """The size of each blob: ``known`` (what ``KEPT_FILE`` holds: a blob's size never
        changes, its id is the hash of its size and bytes), then ``git cat-file --batch-check``
        for the ids it lacks (see :mod:`gitobjects`). None when git gives no answer."""
        known = dict(known)
        missing = [oid for oid in ids if oid not in known]
        if not missing:
            return known
        found = gitobjects.blob_sizes(self._git, str(self.root), missing, self.TIMEOUT)
        if found is None:
            return None
        known.update(found)
        return known

    def close(self) -> None:
        """A listing no task needed: do not leave the process behind."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
