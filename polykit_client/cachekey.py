"""The cache key: a SHA-256 over everything that can change a task's outputs.

Components (all relative, so two checkouts in different folders or machines agree): the
package's name and path, the task, its exact command, the allow-listed environment variables,
the SHA-256 of every input file, the keys of the tasks it depends on, the language's toolchain
version, the declared outputs, and a format version. ``components()`` is what
``polykit build --dry-run --json`` prints, so a user can see why a key changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

from .globs import GlobSet
from .graph import Node
from .workspace import SKIP_DIRS, Package, Task, Workspace

KEY_FORMAT = "polykit-cache-key/1"
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
    """(size, mtime_ns, inode) -> sha256 per file, kept between runs so unchanged files are not read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._changed = False
        self.entries: dict[str, list] = {}
        self.tools: dict[str, list] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("version") == 1:
                self.entries = data.get("files", {})
                self.tools = data.get("tools", {})
        except (OSError, ValueError, AttributeError):
            pass  # a missing or damaged cache only costs a rehash

    def hash(self, rel: str, full: str, started_ns: int) -> str | None:
        """SHA-256 of a file, from the cache when its stat is unchanged; None if it vanished."""
        try:
            st = os.stat(full)
        except OSError:
            return None
        sig = [st.st_size, st.st_mtime_ns, st.st_ino]
        cached = self.entries.get(rel)
        if cached is not None and cached[:3] == sig:
            return cached[3]
        try:
            with open(full, "rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        except OSError:
            return None
        if st.st_mtime_ns < started_ns - int(RACY_SECONDS * 1e9):
            with self._lock:
                self.entries[rel] = sig + [digest]
                self._changed = True
        return digest

    def remember_tool(self, name: str, sig: list, version: str) -> None:
        with self._lock:
            self.tools[name] = sig + [version]
            self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "files": self.entries, "tools": self.tools}, separators=(",", ":")))
        os.replace(tmp, self.path)
        self._changed = False


def list_files(root: Path) -> list[str] | None:
    """Tracked and untracked-but-not-ignored files of a git work tree, relative to ``root``; None outside git."""
    if shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(
            ["git", "-c", "core.quotepath=off", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    names = out.stdout.decode("utf-8", "surrogateescape").split("\0")
    return sorted({n for n in names if n})


def walk_files(top: Path, root: Path) -> list[str]:
    """Every file under ``top`` (relative to ``root``), skipping VCS and dependency folders."""
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found.extend(prefix + f for f in files)
    return sorted(found)


class KeyMaker:
    """Computes every task's key for one run; input files are listed once and hashed in parallel."""

    def __init__(self, ws: Workspace, environ: Mapping[str, str] | None = None) -> None:
        self.ws = ws
        self.environ = os.environ if environ is None else environ
        self.stat_cache = StatCache(ws.root / STATE_FILE)
        self._started_ns = time.time_ns()
        self._files = self._package_files()
        self._toolchains: dict[str, dict] = {}
        self.keys: dict[Node, str] = {}
        self.parts: dict[Node, dict] = {}

    def _package_files(self) -> dict[str, list[str]]:
        """Each package's files, relative to the package, without nested packages' files."""
        listing = list_files(self.ws.root)
        if listing is None:
            listing = walk_files(self.ws.root, self.ws.root)
        else:
            listing = [f for f in listing if not (set(f.split("/")[:-1]) & SKIP_DIRS)]
        owners = sorted(((p.path, p.name) for p in self.ws.packages.values()), key=lambda x: -len(x[0]))
        files: dict[str, list[str]] = {p.name: [] for p in self.ws.packages.values()}
        for rel in listing:
            for path, name in owners:
                if path == ".":
                    files[name].append(rel)
                    break
                if rel.startswith(path + "/"):
                    files[name].append(rel[len(path) + 1 :])
                    break
        return files

    def input_files(self, pkg: Package, task: Task) -> list[str]:
        """The files (relative to the package) that are inputs of a task."""
        patterns = task.inputs if task.inputs is not None else self.ws.remote.input_files
        candidates = self._files[pkg.name]
        if patterns is not None:
            wanted = GlobSet(patterns)
            return [f for f in candidates if wanted.matches(f)]
        outputs = GlobSet(p for t in pkg.tasks.values() for p in (t.outputs or ()))
        return [f for f in candidates if not outputs.matches(f)]

    def hash_inputs(self, pkg: Package, files: Iterable[str]) -> dict[str, str]:
        base = "" if pkg.path == "." else pkg.path + "/"
        root = str(self.ws.root)
        files = sorted(files)

        def one(rel: str) -> str | None:
            return self.stat_cache.hash(base + rel, f"{root}/{base}{rel}", self._started_ns)

        if len(files) > 64:
            with ThreadPoolExecutor(max_workers=8) as pool:
                digests = list(pool.map(one, files))
        else:
            digests = [one(f) for f in files]
        return {f: d for f, d in zip(files, digests) if d is not None}

    def toolchain(self, language: str | None) -> dict:
        """The toolchain version for a language, detected once a run (and cached by the tool's stat)."""
        if language is None:
            return {"language": None, "version": "none"}
        if language in self._toolchains:
            return self._toolchains[language]
        tool, arg = TOOLCHAINS[language]
        found = shutil.which(tool, path=self.environ.get("PATH"))
        if found is None:
            version = f"missing:{tool}"
        else:
            st = os.stat(found)
            sig = [os.path.realpath(found), st.st_size, st.st_mtime_ns]
            cached = self.stat_cache.tools.get(tool)
            if cached is not None and cached[:3] == sig:
                version = cached[3]
            else:
                try:
                    out = subprocess.run([found, arg], capture_output=True, text=True, timeout=30)
                    version = (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if out.returncode == 0 else f"error:{tool}"
                except (OSError, subprocess.SubprocessError, IndexError):
                    version = f"error:{tool}"
                if not version.startswith("error:"):
                    self.stat_cache.remember_tool(tool, sig, version)
        self._toolchains[language] = {"language": language, "version": version}
        return self._toolchains[language]

    def compute(self, order: list[Node], deps: Mapping[Node, list[Node]]) -> dict[Node, str]:
        """Keys for every node, dependencies first."""
        for node in order:
            pkg = self.ws.packages[node.package]
            task = pkg.tasks[node.task]
            env_names = sorted(set(self.ws.remote.env_vars) | set(task.env))
            parts = {
                "format": KEY_FORMAT,
                "package": {"name": pkg.name, "path": pkg.path},
                "task": task.name,
                "command": task.command,
                "env": {name: self.environ.get(name) for name in env_names},
                "inputs": self.hash_inputs(pkg, self.input_files(pkg, task)),
                "dependencies": {str(dep): self.keys[dep] for dep in sorted(deps[node])},
                "toolchain": self.toolchain(pkg.language),
                "outputs": sorted(task.outputs) if task.outputs is not None else None,
            }
            self.parts[node] = parts
            self.keys[node] = key_of(parts)
        self.stat_cache.save()
        return self.keys


def key_of(parts: dict) -> str:
    """SHA-256 of the canonical JSON encoding (sorted keys, no spaces)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()
