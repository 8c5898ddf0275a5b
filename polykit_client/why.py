"""``polykit why``: what changed in a task's key since its last build, one line per difference.

The current key components (:attr:`KeyMaker.parts`, what ``build --dry-run --json`` prints) are
compared with those of the task's last build in this workspace (:mod:`components` keeps them),
or, with ``--remote``, with those of the newest artifact the server holds for the task (its
manifest carries them, environment values hashed). A difference in a dependency's key is
followed up the graph to the first task whose own inputs changed, so the answer names the
cause, not only the chain of keys that moved with it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, TextIO

from .components import env_digest, inputs_digest, load_records
from .graph import GraphError, Node, task_deps, topological
from .workspace import Workspace

# Followed at most this deep up the graph (a chain of dependencies longer than this is named, not walked).
MAX_DEPTH = 32


@dataclass(frozen=True)
class Difference:
    """One change in a key component: ``kind`` is a fixed word, ``subject`` what it is about."""

    kind: str  # file-added, file-removed, file-changed, inputs-changed, env-added, env-removed, env-changed,
    #            command, toolchain, outputs, package-path, key-format, dependency-added, dependency-removed,
    #            dependency-changed, unrecorded (an upstream task with nothing to compare with)
    subject: str
    old: object = None
    new: object = None
    via: str | None = None  # the upstream task this difference was found in

    def line(self, show_values: bool = False) -> str:
        where = f"upstream {self.via}: " if self.via else ""
        text = {
            "file-added": f"file added: {self.subject}",
            "file-removed": f"file removed: {self.subject}",
            "file-changed": f"file changed: {self.subject}",
            "inputs-changed": "input files changed (the record lists no file names, only their digest)",
            "env-added": f"environment variable now recorded: {self.subject}",
            "env-removed": f"environment variable no longer recorded: {self.subject}",
            "env-changed": f"environment variable changed: {self.subject}",
            "command": f"command changed: {self.old!r} -> {self.new!r}",
            "toolchain": f"toolchain changed: {self.old} -> {self.new}",
            "outputs": f"declared outputs changed: {self.old} -> {self.new}",
            "package-path": f"package moved: {self.old} -> {self.new}",
            "key-format": f"cache key format changed: {self.old} -> {self.new}",
            "dependency-added": f"dependency added: {self.subject}",
            "dependency-removed": f"dependency removed: {self.subject}",
            "dependency-changed": f"dependency {self.subject} changed",
            "unrecorded": "no earlier build of it is recorded",
        }[self.kind]
        if show_values and self.kind.startswith("env-"):
            text += f" ({_shown(self.old)} -> {_shown(self.new)})"
        return where + text


def _digest(value: object) -> str | None:
    """An environment value as ``--show-values`` shows it: its SHA-256, as the dry run and an
    artifact's manifest carry it (a value may be a secret: only its digest leaves the process);
    None for an unset variable. A manifest's value is already a digest (``{"sha256": ...}``)."""
    if value is None:
        return None
    if isinstance(value, dict):
        found = value.get("sha256")
        return found if isinstance(found, str) else None
    return env_digest(str(value))


def _shown(value: object) -> str:
    digest = _digest(value)
    return "unset" if digest is None else f"sha256:{digest}"


def compare(old: dict, new: dict, hashed_env: bool = False) -> list[Difference]:
    """The differences between two sets of key components, dependencies included (not followed).

    ``hashed_env``: the old environment values are SHA-256 digests (an artifact's manifest), so
    the new values are compared by their digest and a changed value is shown only as such.
    """
    out: list[Difference] = []
    if old.get("format") != new.get("format"):
        out.append(Difference("key-format", "format", old.get("format"), new.get("format")))
    if old.get("package", {}).get("path") != new["package"]["path"]:
        out.append(Difference("package-path", new["package"]["name"], old.get("package", {}).get("path"),
                              new["package"]["path"]))
    if old.get("command") != new["command"]:
        out.append(Difference("command", "command", old.get("command"), new["command"]))
    old_tc, new_tc = old.get("toolchain") or {}, new["toolchain"]
    if old_tc != new_tc:
        out.append(Difference("toolchain", str(new_tc.get("language")), old_tc.get("version"), new_tc.get("version")))
    if old.get("outputs") != new["outputs"]:
        out.append(Difference("outputs", "outputs", old.get("outputs"), new["outputs"]))
    out += _env(old.get("env") or {}, new["env"], hashed_env)
    out += _files(old, new["inputs"])
    old_deps, new_deps = old.get("dependencies") or {}, new["dependencies"]
    for name in sorted(set(old_deps) | set(new_deps)):
        if name not in old_deps:
            out.append(Difference("dependency-added", name))
        elif name not in new_deps:
            out.append(Difference("dependency-removed", name))
        elif old_deps[name] != new_deps[name]:
            out.append(Difference("dependency-changed", name, old_deps[name], new_deps[name]))
    return out


def _env(old: Mapping, new: Mapping, hashed: bool) -> list[Difference]:
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            out.append(Difference("env-added", name, None, new[name]))
        elif name not in new:
            out.append(Difference("env-removed", name, old[name], None))
        elif hashed and old[name] != env_digest(new[name]):
            out.append(Difference("env-changed", name, {"sha256": old[name]} if old[name] else None, new[name]))
        elif not hashed and old[name] != new[name]:
            out.append(Difference("env-changed", name, old[name], new[name]))
    return out


def _files(old: dict, new: Mapping[str, str]) -> list[Difference]:
    if "inputs" not in old:  # a manifest with too many inputs to list carries their digest
        return [] if old.get("inputs_digest") == inputs_digest(new) else [Difference("inputs-changed", "inputs")]
    before = old["inputs"] or {}
    out = []
    for path in sorted(set(before) | set(new)):
        if path not in before:
            out.append(Difference("file-added", path))
        elif path not in new:
            out.append(Difference("file-removed", path))
        elif before[path] != new[path]:
            out.append(Difference("file-changed", path))
    return out


@dataclass
class Explanation:
    task: str
    key: str
    recorded_key: str | None
    differences: list[Difference]

    @property
    def status(self) -> str:
        if self.recorded_key is None:
            return "no record"
        return "unchanged" if self.recorded_key == self.key else "changed"

    def as_json(self, show_values: bool) -> dict:
        diffs = []
        for d in self.differences:
            entry = {k: v for k, v in asdict(d).items() if v is not None}
            if d.kind.startswith("env-"):
                entry.pop("old", None)
                entry.pop("new", None)
                if show_values:
                    entry.update(old=_digest(d.old), new=_digest(d.new))
            entry["line"] = d.line(show_values)
            diffs.append(entry)
        return {"task": self.task, "status": self.status, "key": self.key, "recorded_key": self.recorded_key,
                "differences": diffs}


def explain(node: Node, keys: Mapping[Node, str], parts: Mapping[Node, dict],
            record_of: Callable[[Node], dict | None], hashed_env: bool = False) -> Explanation:
    """Why ``node``'s key differs from its record; a changed dependency is followed to its cause.

    ``record_of(node)`` gives a task's recorded ``{"key", "components"}`` or None.
    """
    record = record_of(node)
    if record is None:
        return Explanation(str(node), keys[node], None, [])
    own = compare(record["components"], parts[node], hashed_env)
    # A variable that changed for this task too (the workspace's env_vars) is said once, here.
    said = {(d.kind, d.subject) for d in own if d.kind.startswith("env-")}
    out: list[Difference] = []
    for diff in own:
        if diff.kind != "dependency-changed":
            out.append(diff)
            continue
        found = _upstream(_node(diff.subject), keys, parts, record_of, hashed_env, 1)
        causes = [d for d in found if (d.kind, d.subject) not in said]
        if causes or not found:  # a dependency that changed only by what was said above adds nothing
            out += [diff, *causes]
    return Explanation(str(node), keys[node], record["key"], out)


def _upstream(node: Node | None, keys: Mapping[Node, str], parts: Mapping[Node, dict],
              record_of: Callable[[Node], dict | None], hashed_env: bool, depth: int) -> list[Difference]:
    """The own changes of the first tasks up the graph whose inputs changed (their dependency changes followed)."""
    if node is None or node not in parts or depth > MAX_DEPTH:
        return []
    record = record_of(node)
    if record is None:
        return [Difference("unrecorded", str(node), via=str(node))]
    out = []
    for diff in compare(record["components"], parts[node], hashed_env):
        if diff.kind == "dependency-changed":
            out += _upstream(_node(diff.subject), keys, parts, record_of, hashed_env, depth + 1)
        else:
            out.append(Difference(diff.kind, diff.subject, diff.old, diff.new, via=str(node)))
    return out


def _node(name: str) -> Node | None:
    package, sep, task = name.rpartition(":")
    return Node(package, task) if sep else None


# --- the command ---------------------------------------------------------------------------------


def _wanted(ws: Workspace, names: list[str], default: list[str]) -> list[Node]:
    """The tasks named as PACKAGE:TASK (an unknown one names what exists), or the default ones that still exist."""
    if not names:
        found = [n for n in map(_node, default) if n and n.package in ws.packages
                 and n.task in ws.packages[n.package].tasks]
        return sorted(found)
    out = []
    for name in names:
        node = _node(name)
        if node is None:
            raise GraphError(f"{name!r} is not PACKAGE:TASK")
        if node.package not in ws.packages:
            raise GraphError(f"unknown package {node.package!r} (packages: {', '.join(ws.packages) or 'none'})")
        tasks = ws.packages[node.package].tasks
        if node.task not in tasks:
            raise GraphError(f"package {node.package!r} has no task {node.task!r} "
                             f"(it has: {', '.join(sorted(tasks)) or 'no tasks'})")
        out.append(node)
    return out


def _closure(ws: Workspace, nodes: list[Node]) -> tuple[list[Node], dict[Node, list[Node]]]:
    deps: dict[Node, list[Node]] = {}
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in deps:
            deps[node] = task_deps(ws, node)
            todo.extend(deps[node])
    return topological(deps), deps


def command(ws: Workspace, names: list[str], *, as_json: bool, show_values: bool, remote=None,
            out: TextIO = sys.stdout, git=None) -> int:
    """``polykit why``; ``remote`` is a RemoteCache for ``--remote``, ``git`` a started GitIndex.
    Returns the exit status (0)."""
    from .cachekey import KeyMaker

    records = {} if remote is not None else load_records(ws.root)
    everything = [f"{p.name}:{t}" for p in ws.packages.values() for t in p.tasks]
    nodes = _wanted(ws, names, everything if remote is not None else sorted(records))
    if not nodes:
        print("no build is recorded in this workspace yet: run polykit build (or name PACKAGE:TASK with --remote)",
              file=out)
        return 0
    order, deps = _closure(ws, nodes)
    keymaker = KeyMaker(ws, git=git)
    keys = keymaker.compute(order, deps)
    fetched: dict[Node, dict | None] = {}

    def record_of(node: Node) -> dict | None:
        if remote is None:
            return records.get(str(node))
        if node not in fetched:
            found = remote.task_record(node.package, node.task)
            components = found.get("components") if found else None
            fetched[node] = {"key": found["key"], "components": components} if isinstance(components, dict) else None
        return fetched[node]

    explained = [explain(node, keys, keymaker.parts, record_of, hashed_env=remote is not None) for node in nodes]
    if as_json:
        print(json.dumps({"compared_with": "remote" if remote is not None else "last build",
                          "tasks": [e.as_json(show_values) for e in explained]}, indent=2), file=out)
        return 0
    against = "the newest artifact on the server" if remote is not None else "its last build here"
    for e in explained:
        if e.status == "no record":
            print(f"{e.task}  no record to compare with ({'the server holds no artifact of it with its components' if remote is not None else 'never built here'})", file=out)
        elif e.status == "unchanged":
            print(f"{e.task}  unchanged since {against} (key {e.key[:12]})", file=out)
        else:
            print(f"{e.task}  changed since {against} (key {e.recorded_key[:12]} -> {e.key[:12]})", file=out)
            for diff in e.differences:
                print(f"  {diff.line(show_values)}", file=out)
    return 0
