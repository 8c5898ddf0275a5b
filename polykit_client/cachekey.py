"""The cache key: a SHA-256 over everything that can change a task's outputs.

Components (all relative, so two checkouts in different folders or machines agree): the
package's name and path, the task, its exact command, the environment variables its ``env``
entries select (names, wildcards, exclusions: ``envpatterns``), the git blob id of every input
file (``blobid``; from git's index where ``gitindex`` finds git vouching for it), the keys of
the tasks it depends on, the language's toolchain version, the declared outputs, and a format
version. ``components()`` is what ``polykit build --dry-run --json`` prints, so a user can see
why a key changed.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping

from . import envpatterns
from .blobid import blob_id_large, blob_id_small
from .gitindex import GitIndex, GitState
from .timing import phase
from .globs import DEFAULT_INPUTS, GlobSet
from .graph import Node
from .outputs import linked_folders
from .workspace import SKIP_DIRS, Package, Task, Workspace

# Folders an explicit input pattern never walks into: version control and polykit's own state.
VCS_DIRS = frozenset({".git", ".hg", ".svn", ".polykit"})
# Dependency and build folders, often huge: a pattern's wildcards do not walk into them; a
# pattern whose literal folders name one (``node_modules/lib/**``) does.
DEPENDENCY_DIRS = SKIP_DIRS - VCS_DIRS
# A path with a skipped folder in it.
_SKIPPED = re.compile(r"(?:^|/)(?:%s)/" % "|".join(re.escape(d) for d in sorted(SKIP_DIRS)))

# /2: an input file's digest is its git blob id (blobid.py), whether git's index gave it or the
# file was read; /1 held each file's SHA-256.
KEY_FORMAT = "polykit-cache-key/2"
TOOLCHAINS = {
    "js": ("node", "--version"),
    "ts": ("node", "--version"),
    "rust": ("rustc", "--version"),
    "go": ("go", "version"),
    "python": ("python3", "--version"),
}
STATE_FILE = ".polykit/state.json"
# A file changed within this many seconds of being hashed may change again within the same
# mtime tick; such entries are not kept in the stat cache (git's "racy clean" problem).
RACY_SECONDS = 2.0


class StatCache:
    """A file's signature (size, mtime_ns, inode, ctime_ns) -> its blob id, kept between runs so
    unchanged files are not read again (files git vouches for are not in it: git's index is).

    Kept by folder: each folder's names, signatures and digests as three strings, split into a
    dictionary only when a file of that folder is looked up. Loading then parses three strings
    per folder rather than six values per file, which is what made loading the cache of a large
    tree take longer than the rest of a no-op build.
    """

    VERSION = 4  # 4: blob ids (3 held SHA-256 digests, which must never be taken for blob ids)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._changed = False
        self._stored: dict[str, list] = {}  # folder -> [names, signatures, digests], "\0"-joined
        self._folders: dict[str, dict[str, tuple[str, str]]] = {}  # folder -> name -> (signature, digest)
        self.tools: dict[str, list] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == self.VERSION:
                self._stored = data.get("folders", {})
                self.tools = data.get("tools", {})
            else:
                self._changed = True  # rewritten, so that an old one is not parsed again on every run
        except (OSError, ValueError, AttributeError):
            pass  # a missing or damaged cache only costs a rehash

    def _folder(self, folder: str) -> dict[str, tuple[str, str]]:
        found = self._folders.get(folder)
        if found is None:
            found = {}
            stored = self._stored.get(folder)
            try:
                names, sigs, digests = (part.split("\0") for part in stored) if stored else ((), (), ())
                if len(names) == len(sigs) == len(digests):
                    found = dict(zip(names, zip(sigs, digests)))
            except (TypeError, ValueError, AttributeError):
                pass  # a damaged folder entry only costs a rehash of that folder
            self._folders[folder] = found
        return found

    def get(self, rel: str, sig: str) -> str | None:
        """The digest remembered for ``rel`` with exactly this signature, or None."""
        folder, _, name = rel.rpartition("/")
        entry = self._folder(folder).get(name)
        return entry[1] if entry is not None and entry[0] == sig else None

    def remember(self, rel: str, sig: str, mtime_ns: int, digest: str, started_ns: int) -> None:
        # A file changed just before it was read may change again within the same mtime tick,
        # so it is not remembered.
        if mtime_ns < started_ns - int(RACY_SECONDS * 1e9):
            folder, _, name = rel.rpartition("/")
            self._folder(folder)[name] = (sig, digest)
            self._changed = True

    def remember_tool(self, name: str, sig: list, version: str) -> None:
        self.tools[name] = sig + [version]
        self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        folders = dict(self._stored)
        for folder, entries in self._folders.items():
            names = list(entries)
            folders[folder] = ["\0".join(names), "\0".join(entries[n][0] for n in names),
                               "\0".join(entries[n][1] for n in names)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Its own temporary name: a key computation of another thread may be saving too.
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"version": self.VERSION, "folders": folders, "tools": self.tools},
                                      separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only checkout still builds; it only rehashes next time
        self._changed = False


def _tree_digest(folder: str) -> str:
    """SHA-256 over the relative paths and blob ids of every file under a folder (its .git aside)."""
    digest = hashlib.sha256()
    for rel in walk_files(Path(folder), Path(folder)):
        if rel == ".git" or rel.startswith(".git/"):
            continue
        path = os.path.join(folder, rel)
        # A link to a folder in it counts by its target's name (its blob in git), not followed: a loop ends nowhere.
        file_digest = blob_id_large(path) or (f"link:{os.readlink(path)}" if os.path.islink(path) else "unreadable")
        digest.update(f"{rel}\0{file_digest}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def walk_files(top: Path, root: Path) -> list[str]:
    """Every file under ``top`` (relative to ``root``), skipping VCS and dependency folders.

    A symlink to a folder is one entry, as git lists it (mode 120000) and as it is then hashed:
    through the link, by the files behind it. os.walk puts such a link among the folders and
    does not enter it; left out, an edit behind it would leave the key unchanged outside git.
    """
    found = []
    for folder, dirs, files in os.walk(top):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        kept = [d for d in dirs if d not in SKIP_DIRS]
        dirs[:] = [d for d in kept if not os.path.islink(os.path.join(folder, d))]
        found.extend(prefix + d for d in kept if d not in dirs)
        found.extend(prefix + f for f in files)
    return sorted(found)


class KeyMaker:
    """Computes every task's key for one run; input files are listed once and hashed once."""

    # Files over this size are hashed in a thread pool (hashlib releases the GIL for large
    # updates); small ones are cheaper to read and hash in one loop than to hand to threads.
    LARGE_FILE = 256 * 1024
    # A fresh checkout has no stat cache: its many small files are read by a few threads, each
    # taking a share in order (open, read and close release the GIL, so the cores overlap them).
    SMALL_BATCH = 512
    HASH_THREADS = 4

    def __init__(self, ws: Workspace, environ: Mapping[str, str] | None = None, git: GitIndex | None = None) -> None:
        self.ws = ws
        self.environ = os.environ if environ is None else environ
        # Started before the stat cache loads (unless the command started it earlier): git lists
        # the files (with the untracked ones when some task takes the default inputs) and gives
        # the blob ids of unmodified tracked files.
        self._git = git if git is not None else GitIndex(ws.root, untracked=self._uses_default_inputs())
        self._git_state: GitState | None = None
        self._git_done = False
        with phase("keys: stat cache loading"):
            self.stat_cache = StatCache(ws.root / STATE_FILE)
        self._started_ns = time.time_ns()
        self._toolchains: dict[str, dict] = {}
        self._listing: dict[str, list[str]] | None = None
        self._package_paths = {p.path for p in ws.packages.values()}
        self._walked: dict[tuple[str, str], list[str]] = {}
        self._cache_dir = os.path.normpath(ws.cache_dir)
        self.keys: dict[Node, str] = {}
        self.parts: dict[Node, dict] = {}
        self._saving: threading.Thread | None = None

    def _uses_default_inputs(self) -> bool:
        """Whether some task's inputs are, or include, the default inputs (the git listing)."""
        for pkg in self.ws.packages.values():
            for task in pkg.tasks.values():
                patterns = task.inputs if task.inputs is not None else self.ws.remote.input_files
                if patterns is None or DEFAULT_INPUTS in patterns:
                    return True
        return False

    def _git_result(self) -> GitState | None:
        """git's listing and blob ids, waited for once; None outside a git work tree."""
        if not self._git_done:
            with phase("keys: git listing (waiting for it)"):
                self._git_state = self._git.result()
            self._git_done = True
        return self._git_state

    def _package_files(self) -> dict[str, list[str]]:
        """Each package's files, relative to the package, without nested packages' files nor
        those under a skipped folder (``node_modules``, ``target``, ...).

        The listing is sorted, so a package's files are one run of it, found by bisection, less
        the runs of the packages nested in it: slices, where asking for each of 50,000 files
        which package owns it took most of the listing's time.
        """
        state = self._git_result()
        listing = state.files if state is not None else walk_files(self.ws.root, self.ws.root)
        prefixes = sorted(("" if p.path == "." else p.path + "/", p.name) for p in self.ws.packages.values())
        starts = [prefix for prefix, _ in prefixes]

        def run(prefix: str, within: list[str]) -> tuple[int, int]:
            """Where the entries starting with ``prefix`` are in a sorted list ("0" follows "/")."""
            if not prefix:
                return 0, len(within)
            lo = bisect.bisect_left(within, prefix)
            return lo, bisect.bisect_left(within, prefix[:-1] + "0", lo)

        files: dict[str, list[str]] = {}
        for index, (prefix, name) in enumerate(prefixes):
            lo, hi = run(prefix, listing)
            first, last = run(prefix, starts)
            nested = sorted(run(other, listing) for other in starts[max(first, index + 1):last])
            cut = len(prefix)
            found: list[str] = []
            for start, end in [*nested, (hi, hi)]:
                if start > lo:
                    found += [rel[cut:] for rel in listing[lo:start]] if cut else listing[lo:start]
                lo = max(lo, end)
            joined = "\0" + "\0".join(found)
            if any(f"/{d}/" in joined or f"\0{d}/" in joined for d in SKIP_DIRS):
                found = [rel for rel in found if not _SKIPPED.search(rel)]
            files[name] = found
        return files

    def input_files(self, pkg: Package, task: Task) -> list[str]:
        """The files (relative to the package) that are inputs of a task.

        Explicit patterns (the task's ``inputs``, else ``[remote_cache] input_files``) match every
        file of the package, git-ignored or not: a file a user names is an input. The git listing
        (tracked and untracked-but-not-ignored files) is used only for the default inputs.
        """
        patterns = task.inputs if task.inputs is not None else self.ws.remote.input_files
        if patterns is None:
            return self._default_inputs(pkg)
        wanted = GlobSet(patterns, default_allowed=True)
        found: set[str] = set()
        for base in wanted.bases(DEPENDENCY_DIRS):
            found.update(self._walk(pkg, base))
        chosen = {f for f in found if wanted.matches(f)}
        if wanted.default:  # $TURBO_DEFAULT$: the default inputs, less the exclusions
            chosen.update(f for f in self._default_inputs(pkg) if not wanted.excluded(f))
        return sorted(chosen)

    def _default_inputs(self, pkg: Package) -> list[str]:
        """Every file of the package (as git lists it) except what its tasks declare as outputs."""
        if self._listing is None:  # listed once, and only when some task uses the default inputs
            self._listing = self._package_files()
        candidates = self._listing[pkg.name]
        # What the package's tasks write (their inclusions, exclusions aside: an excluded
        # .next/cache is still written by the build) is not a default input.
        declared = [p for t in pkg.tasks.values() for p in (t.outputs or ()) if not p.startswith("!")]
        if not declared:
            return list(candidates)
        outputs = GlobSet(declared)
        # An output folder reached through a symlink (dist -> .output/public) is written too.
        linked = linked_folders(pkg.dir, declared)
        under = tuple(path + "/" for path in linked)
        # Only a path at or under an output pattern's literal folders can match it: a string
        # test in the comprehension spares the other files a method call each.
        bases = outputs.bases()
        if "" in bases or not bases:
            return [f for f in candidates
                    if not outputs.matches(f) and not (linked and (f in linked or f.startswith(under)))]
        exact, below = frozenset(bases), tuple(base + "/" for base in bases)
        return [f for f in candidates
                if not ((f in exact or f.startswith(below)) and outputs.matches(f))
                and not (linked and (f in linked or f.startswith(under)))]

    def _walk(self, pkg: Package, base: str) -> list[str]:
        """Every file under ``base`` (relative to the package; "" is all of it), as os.walk sees it.

        Skips version-control folders, nested packages and, below ``base``, dependency folders.
        A symlink is one entry (hashed through it, as git lists it). Memoised per run.
        """
        memo = (pkg.name, base)
        if memo in self._walked:
            return self._walked[memo]
        prefix = "" if pkg.path == "." else pkg.path + "/"
        top = os.path.join(pkg.dir, base) if base else str(pkg.dir)
        parts = base.split("/") if base else []
        found: list[str] = []
        inside_other = any(prefix + "/".join(parts[: i + 1]) in self._package_paths for i in range(len(parts)))
        if not inside_other and not any(p in VCS_DIRS for p in parts):
            if os.path.isdir(top) and not os.path.islink(top):
                for folder, dirs, files in os.walk(top):
                    rel = os.path.relpath(folder, pkg.dir).replace(os.sep, "/")
                    rel = "" if rel == "." else rel + "/"
                    keep = []
                    for d in dirs:
                        if d in VCS_DIRS or d in DEPENDENCY_DIRS or prefix + rel + d in self._package_paths:
                            continue
                        if os.path.join(folder, d) == self._cache_dir:
                            continue
                        if os.path.islink(os.path.join(folder, d)):
                            found.append(rel + d)
                        else:
                            keep.append(d)
                    dirs[:] = keep
                    found.extend(rel + f for f in files)
            elif os.path.lexists(top):
                found.append(base)
        self._walked[memo] = found
        return found

    def hash_files(self, paths: set[str]) -> dict[str, str]:
        """Blob ids of files given relative to the root: from git's index for the tracked files
        git vouches for, from the stat cache for unchanged others, else read.

        The answer may hold more paths than asked for (all that git vouches for: a copy of its
        table costs less than a look-up per file); a path asked for and missing is not a file.
        """
        root = str(self.ws.root) + "/"
        cache = self.stat_cache
        state = self._git_result()
        digests: dict[str, str] = dict(state.blobs) if state is not None else {}
        large: list[tuple[str, str, int]] = []  # (path, signature, mtime_ns)
        small: list[tuple[str, str, int]] = []
        for rel in paths.difference(digests) if digests else paths:
            try:
                st = os.stat(root + rel)
            except OSError:
                continue  # listed by git but deleted: not an input
            if stat.S_ISDIR(st.st_mode):
                # git lists a submodule as one entry: its files count through one tree digest.
                digests[rel] = _tree_digest(root + rel)
                continue
            # ctime too: a rewrite that puts the old mtime back cannot hide from it.
            sig = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"
            cached = cache.get(rel, sig)
            if cached is not None:
                digests[rel] = cached
            elif st.st_size > self.LARGE_FILE:
                large.append((rel, sig, st.st_mtime_ns))
            else:
                small.append((rel, sig, st.st_mtime_ns))
        if len(small) >= self.SMALL_BATCH:
            from concurrent.futures import ThreadPoolExecutor

            shares = [small[i::self.HASH_THREADS] for i in range(self.HASH_THREADS)]
            with ThreadPoolExecutor(max_workers=self.HASH_THREADS) as pool:
                hashed = list(pool.map(lambda share: [blob_id_small(root + item[0]) for item in share], shares))
            small = [item for share in shares for item in share]
            results = [digest for part in hashed for digest in part]
        else:
            results = [blob_id_small(root + item[0]) for item in small]
        for (rel, sig, mtime_ns), digest in zip(small, results):
            if digest is not None:
                digests[rel] = digest
                cache.remember(rel, sig, mtime_ns, digest, self._started_ns)
        if large:
            from concurrent.futures import ThreadPoolExecutor  # only runs with large inputs import it

            with ThreadPoolExecutor(max_workers=min(8, len(large))) as pool:
                results = pool.map(lambda item: blob_id_large(root + item[0]), large)
                for (rel, sig, mtime_ns), digest in zip(large, results):
                    if digest is not None:
                        digests[rel] = digest
                        cache.remember(rel, sig, mtime_ns, digest, self._started_ns)
        return digests

    def _detect(self, language: str) -> dict:
        tool, arg = TOOLCHAINS[language]
        found = shutil.which(tool, path=self.environ.get("PATH"))
        if found is None:
            return {"language": language, "version": f"missing:{tool}"}
        st = os.stat(found)
        sig = [os.path.realpath(found), st.st_size, st.st_mtime_ns]
        cached = self.stat_cache.tools.get(tool)
        if cached is not None and cached[:3] == sig:
            return {"language": language, "version": cached[3]}
        try:
            out = subprocess.run([found, arg], capture_output=True, text=True, timeout=30)
            text = (out.stdout.strip() or out.stderr.strip()).splitlines()
            version = text[0] if out.returncode == 0 and text else f"error:{tool}"
        except (OSError, subprocess.SubprocessError):
            version = f"error:{tool}"
        if not version.startswith("error:"):
            self.stat_cache.remember_tool(tool, sig, version)
        return {"language": language, "version": version}

    def toolchain(self, language: str | None) -> dict:
        """The toolchain version for a language, detected once a run (and cached by the tool's stat)."""
        if language is None:
            return {"language": None, "version": "none"}
        if language not in self._toolchains:
            self._toolchains[language] = self._detect(language)
        return self._toolchains[language]

    def compute(self, order: list[Node], deps: Mapping[Node, list[Node]]) -> dict[Node, str]:
        """Keys for every node, dependencies first."""
        languages = {self.ws.packages[n.package].language for n in order} - {None}
        # Toolchain commands take tens of milliseconds each; run them while files are hashed.
        detect = [threading.Thread(target=self.toolchain, args=(lang,)) for lang in sorted(languages)]
        for thread in detect:
            thread.start()
        inputs: dict[Node, tuple[str, list[str]]] = {}
        with phase("keys: input listing (and git's)"):
            for node in order:
                pkg = self.ws.packages[node.package]
                base = "" if pkg.path == "." else pkg.path + "/"
                inputs[node] = (base, self.input_files(pkg, pkg.tasks[node.task]))
        needed = {base + rel for base, rels in inputs.values() for rel in rels}
        with phase("keys: hashing, with the stat cache"):
            digests = self.hash_files(needed)
        with phase("keys: toolchain detection (waiting for it)"):
            for thread in detect:
                thread.join()
        for node in order:
            pkg = self.ws.packages[node.package]
            task = pkg.tasks[node.task]
            base, rels = inputs[node]
            parts = {
                "format": KEY_FORMAT,
                "package": {"name": pkg.name, "path": pkg.path},
                "task": task.name,
                "command": task.command,
                "env": envpatterns.select(self.ws.remote.env_vars + task.env, self.environ),
                "inputs": {rel: digest for rel in sorted(rels) if (digest := digests.get(base + rel)) is not None},
                "dependencies": {str(dep): self.keys[dep] for dep in sorted(deps[node])},
                "toolchain": self.toolchain(pkg.language),
                "outputs": sorted(task.outputs) if task.outputs is not None else None,
            }
            self.parts[node] = parts
            self.keys[node] = key_of(parts)
        # Written beside the tasks (a fresh checkout's is megabytes); not a daemon thread, so the
        # interpreter waits for it before it exits.
        self._saving = threading.Thread(target=self._save, name="polykit-stat-cache")
        self._saving.start()
        self._git.close()
        return self.keys

    def _save(self) -> None:
        with phase("keys: stat cache saving (beside the tasks)"):
            self.stat_cache.save()


def key_of(parts: dict) -> str:
    """SHA-256 of the canonical JSON encoding (sorted keys, no spaces)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()
