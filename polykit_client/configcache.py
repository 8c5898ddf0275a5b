"""The packages' configuration as the last run read it, so that an unchanged workspace is not
walked and parsed again on every run.

Finding the packages walks every folder under ``packages_dir`` (listing 50,000 files costs
some 25 ms), and reading 500 ``polykit.toml`` files some 45 ms (most of it ``tomllib``). What
they gave is kept in ``CACHE_FILE``:

- the walk's answer, with each folder walked and its signature (mtime, ctime, inode), taken
  before the folder was listed: adding, removing or renaming an entry of a folder changes its
  mtime (POSIX: creat(2), unlink(2), rename(2), mkdir(2) "mark for update" the parent's
  st_mtime and st_ctime), so while every folder has its signature the answer is the same, and
  a ``stat`` per folder replaces listing it;
- each package's parsed configuration, by its file's signature (size, mtime, ctime, inode).

A folder or file changed within ``RACY_SECONDS`` of being looked at may change again within the
same timestamp: such an answer is not kept (git's "racy clean" problem, as in the stat cache).
Anything that does not match is read again; a missing or damaged cache costs only that.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

from . import __version__
from .workspace import ROOT_FILE, SKIP_DIRS, Package, Task, parse_package

CACHE_FILE = ".polykit/workspace.json"
VERSION = 1
# What the kept file must have been written by: this layout, this release of polykit (which may
# parse a polykit.toml otherwise) and these fields of a task and a package. Anything else is read
# afresh, so an upgrade never serves packages parsed by older rules.
_WRITER = f"{VERSION} {__version__} " + ",".join(f.name for f in (*fields(Task), *fields(Package)))
RACY_SECONDS = 2.0


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class ConfigCache:
    """What the last run found; :meth:`save` keeps what this one found."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._path = root / CACHE_FILE
        self._limit = time.time_ns() - int(RACY_SECONDS * 1e9)  # changed after this: not kept
        self._changed = False
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != _WRITER:
                data = {}
        except (OSError, ValueError):
            data = {}
        self._walk = data.get("walk") if isinstance(data.get("walk"), dict) else {}
        self._packages = data.get("packages") if isinstance(data.get("packages"), dict) else {}
        self._used: dict[str, dict] = {}

    def _settled(self, st: os.stat_result) -> bool:
        return st.st_mtime_ns < self._limit and st.st_ctime_ns < self._limit

    def find(self, top: Path, root_file: Path) -> list[Path]:
        """Every ``polykit.toml`` under ``top`` but ``root_file``, skipping SKIP_DIRS, in walk order."""
        kept = self._walk
        try:
            if kept.get("top") == str(top) and kept.get("root_file") == str(root_file) and all(
                    _signature(os.stat(folder))[1:] == sig for folder, sig in kept["folders"].items()):
                return [Path(name) for name in kept["found"]]
        except (OSError, KeyError, TypeError, AttributeError, ValueError):
            pass
        found: list[Path] = []
        folders: dict[str, list[int]] = {}
        settled = True
        pending = [str(top)]
        while pending:
            folder = pending.pop()
            try:
                st = os.stat(folder)  # before the listing: a change after it shows next time
                with os.scandir(folder) as entries:
                    names = [(entry.name, entry.is_dir()) for entry in entries]
            except OSError:
                settled = False  # as os.walk, a folder that cannot be listed is passed over, and looked at again next time
                continue
            settled = settled and self._settled(st)
            folders[folder] = _signature(st)[1:]
            if any(name == ROOT_FILE and not is_dir for name, is_dir in names):
                candidate = Path(folder) / ROOT_FILE
                if candidate != root_file:
                    found.append(candidate)
            subfolders = sorted(name for name, is_dir in names if is_dir and name not in SKIP_DIRS)
            # os.walk's order (top-down, sorted), and like it without following links to folders.
            pending += [os.path.join(folder, name) for name in reversed(subfolders)
                        if not os.path.islink(os.path.join(folder, name))]
        if settled:
            self._walk = {"top": str(top), "root_file": str(root_file), "folders": folders,
                          "found": [str(path) for path in found]}
            self._changed = True
        return found

    def package(self, root: Path, config_file: Path) -> Package:
        """The package ``config_file`` describes: as kept when the file has its signature, else parsed."""
        name = str(config_file)
        try:
            st = os.stat(config_file)
        except OSError:
            return parse_package(root, config_file)  # it says what is wrong with the file
        kept = self._packages.get(name)
        if isinstance(kept, dict) and kept.get("signature") == _signature(st):
            try:
                package = _unpacked(kept["package"], config_file)
                self._used[name] = kept
                return package
            except (KeyError, TypeError, ValueError, AttributeError):
                pass
        package = parse_package(root, config_file)
        if self._settled(st):
            self._used[name] = {"signature": _signature(st), "package": _packed(package)}
            self._changed = True
        return package

    def save(self) -> None:
        """Keep this run's answers (the packages it read only), when they differ from what was kept."""
        if not self._changed and len(self._used) == len(self._packages):
            return
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"version": _WRITER, "walk": self._walk, "packages": self._used},
                                      separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError:
            pass  # a read-only checkout: the next run reads everything again


def _packed(package: Package) -> dict:
    return {"name": package.name, "path": package.path, "language": package.language,
            "internal_deps": list(package.internal_deps),
            "tasks": [[t.name, t.command, list(t.depends_on), _list(t.outputs), _list(t.inputs), list(t.env)]
                      for t in package.tasks.values()]}


def _list(value: tuple[str, ...] | None) -> list[str] | None:
    return None if value is None else list(value)


def _tuple(value: list | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not all(isinstance(item, str) for item in value):
        raise ValueError("not a list of strings")
    return tuple(value)


def _unpacked(data: dict, config_file: Path) -> Package:
    tasks = {}
    for name, command, depends_on, outputs, inputs, env in data["tasks"]:
        if not isinstance(name, str) or not isinstance(command, str):
            raise ValueError("not a task")
        tasks[name] = Task(name, command, _tuple(depends_on), _tuple(outputs), _tuple(inputs), _tuple(env))
    language = data["language"]
    if not isinstance(data["name"], str) or not isinstance(data["path"], str) or not (language is None or isinstance(language, str)):
        raise ValueError("not a package")
    return Package(data["name"], data["path"], config_file.parent, language, _tuple(data["internal_deps"]), tasks,
                   config_file)
