"""The workspace: the root ``polykit.toml``, the packages found under it, and their tasks.

Everything is read and checked once, up front, so that a mistake is reported with its file
and line before anything runs, never as a traceback halfway through a build.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .envpatterns import EnvPatternError, check as check_env_entry
from .globs import DEFAULT_INPUTS, PatternError, normalise

ROOT_FILE = "polykit.toml"
SKIP_DIRS = frozenset({".git", ".hg", ".svn", "node_modules", "target", ".venv", ".polykit"})
LANGUAGES = {"js": "js", "javascript": "js", "ts": "ts", "typescript": "ts", "python": "python", "go": "go", "rust": "rust"}
TASK_FIELDS = ("command", "depends_on", "outputs", "inputs", "env")
_NAME = re.compile(r"[A-Za-z0-9@][A-Za-z0-9@/._+-]*")


class ConfigError(Exception):
    """A configuration mistake, with the file (and line, when known) it is in."""

    def __init__(self, path: Path | str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


@dataclass(frozen=True)
class Task:
    name: str
    command: str
    depends_on: tuple[str, ...] = ()
    outputs: tuple[str, ...] | None = None  # None: nothing declared (the log alone is cached)
    inputs: tuple[str, ...] | None = None  # None: the workspace default
    env: tuple[str, ...] = ()


@dataclass(frozen=True)
class Package:
    name: str
    path: str  # relative to the workspace root, posix; "." for the root itself
    dir: Path
    language: str | None
    internal_deps: tuple[str, ...]
    tasks: Mapping[str, Task]
    config_file: Path


@dataclass(frozen=True)
class RemoteSettings:
    url: str | None = None
    token: str | None = None
    read_only: bool = False
    env_vars: tuple[str, ...] = ()
    input_files: tuple[str, ...] | None = None
    max_artifact_size: int | None = None
    timeout: float = 10.0
    deadline: float | None = None  # seconds per transfer in all; None: scaled with the body's size


@dataclass(frozen=True)
class Workspace:
    root: Path
    packages_dir: str
    cache_dir: Path
    cache_max_size: int
    default_parallel: int | None
    remote: RemoteSettings
    packages: Mapping[str, Package] = field(default_factory=dict)


def _line_of(text: str, key: str) -> int | None:
    """Best-effort line of ``key = ...`` for errors about a value tomllib parsed fine."""
    pattern = re.compile(r'^\s*(?:"%s"|%s)\s*=' % (re.escape(key), re.escape(key)), re.MULTILINE)
    match = pattern.search(text)
    return text.count("\n", 0, match.start()) + 1 if match else None


def load_toml(path: Path) -> tuple[dict, str]:
    """Parse a TOML file; a syntax error names the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, f"cannot read: {exc}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column \d+\)", message)
        line = int(match.group(1)) if match else None
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        if "Cannot overwrite a value" in message or "Cannot declare" in message:
            message += (
                " (to give a task's depends_on beside its plain command, quote the key:"
                ' "lint.depends_on" = [...], or use lint = { command = "...", depends_on = [...] })'
            )
        raise ConfigError(path, f"invalid TOML: {message}", line) from None


def _is_root(data: dict) -> bool:
    return "workspace" in data or "remote_cache" in data or "name" not in data


def find_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` whose polykit.toml is a workspace root."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / ROOT_FILE
        if candidate.is_file():
            data, _ = load_toml(candidate)
            if _is_root(data):
                return folder
    raise ConfigError(start, f"no workspace found: no {ROOT_FILE} with a [workspace] table here or above")


def _expect(cond: bool, path: Path, text: str, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message, _line_of(text, key))


def _str_list(value: Any, path: Path, text: str, key: str, what: str | None = None) -> tuple[str, ...]:
    _expect(isinstance(value, list) and all(isinstance(v, str) for v in value), path, text, key,
            f"{what or key} must be a list of strings")
    return tuple(value)


def _globs(value: Any, path: Path, text: str, key: str, what: str | None = None, *,
           default_allowed: bool = False) -> tuple[str, ...]:
    """A list of glob patterns, each of a supported form, with at least one inclusion."""
    patterns = _str_list(value, path, text, key, what)
    try:
        for pattern in patterns:
            if not (default_allowed and pattern == DEFAULT_INPUTS):
                normalise(pattern)
    except PatternError as exc:
        raise ConfigError(path, f"{what or key}: {exc}", _line_of(text, key)) from None
    _expect(not patterns or any(not p.startswith("!") for p in patterns), path, text, key,
            f"{what or key} has only exclusions: add what they exclude from (like \"**\")")
    return patterns


def _env_list(value: Any, path: Path, text: str, key: str, what: str | None = None) -> tuple[str, ...]:
    """A list of environment variable names, NAME_* wildcards and !NAME exclusions."""
    entries = _str_list(value, path, text, key, what)
    try:
        for entry in entries:
            check_env_entry(entry)
    except EnvPatternError as exc:
        raise ConfigError(path, f"{what or key}: {exc}", _line_of(text, key)) from None
    return entries


def _parse_root(root: Path, data: dict, text: str, environ: Mapping[str, str]) -> tuple[dict, RemoteSettings]:
    path = root / ROOT_FILE
    ws = data.get("workspace", {})
    _expect(isinstance(ws, dict), path, text, "workspace", "[workspace] must be a table")
    for key in ws:
        _expect(key in ("packages_dir", "cache_dir", "default_parallel", "cache_max_size"), path, text, key,
                f"unknown [workspace] setting {key!r} (known: packages_dir, cache_dir, default_parallel, cache_max_size)")
    packages_dir = ws.get("packages_dir", "packages")
    cache_dir = ws.get("cache_dir", ".polykit/cache")
    parallel = ws.get("default_parallel")
    cache_max = ws.get("cache_max_size", 10 << 30)
    _expect(isinstance(packages_dir, str), path, text, "packages_dir", "packages_dir must be a string")
    _expect(isinstance(cache_dir, str), path, text, "cache_dir", "cache_dir must be a string")
    _expect(parallel is None or (isinstance(parallel, int) and not isinstance(parallel, bool) and parallel >= 1),
            path, text, "default_parallel", "default_parallel must be a whole number of at least 1")
    _expect(isinstance(cache_max, int) and not isinstance(cache_max, bool) and cache_max >= 0,
            path, text, "cache_max_size", "cache_max_size must be a number of bytes")

    rc = data.get("remote_cache", {})
    _expect(isinstance(rc, dict), path, text, "remote_cache", "[remote_cache] must be a table")
    known = ("url", "token", "read_only", "env_vars", "input_files", "max_artifact_size", "timeout", "deadline")
    for key in rc:
        _expect(key in known, path, text, key, f"unknown [remote_cache] setting {key!r} (known: {', '.join(known)})")
    url = rc.get("url")
    _expect(url is None or isinstance(url, str), path, text, "url", "url must be a string")
    token = rc.get("token")
    _expect(token is None or isinstance(token, str), path, text, "token", "token must be a string")
    read_only = rc.get("read_only", False)
    _expect(isinstance(read_only, bool), path, text, "read_only", "read_only must be true or false")
    max_size = rc.get("max_artifact_size")
    _expect(max_size is None or (isinstance(max_size, int) and not isinstance(max_size, bool) and max_size > 0),
            path, text, "max_artifact_size", "max_artifact_size must be a positive number of bytes")
    timeout = rc.get("timeout", 10.0)
    _expect(_is_seconds(timeout), path, text, "timeout", f"timeout must be a positive number of seconds, {SECONDS_BOUND}")
    deadline = rc.get("deadline")
    _expect(deadline is None or _is_seconds(deadline), path, text, "deadline",
            f"deadline must be a positive number of seconds, {SECONDS_BOUND}")
    env_vars = _env_list(rc.get("env_vars", []), path, text, "env_vars")
    input_files = (_globs(rc["input_files"], path, text, "input_files", default_allowed=True)
                   if "input_files" in rc else None)

    # The environment overrides the file, for CI (the command line overrides both, later).
    if environ.get("POLYKIT_REMOTE_CACHE_URL"):
        url = environ["POLYKIT_REMOTE_CACHE_URL"]
    if environ.get("POLYKIT_REMOTE_CACHE_TOKEN"):
        token = environ["POLYKIT_REMOTE_CACHE_TOKEN"]
    if environ.get("POLYKIT_REMOTE_CACHE_READONLY", "").strip():
        read_only = environ["POLYKIT_REMOTE_CACHE_READONLY"].strip().lower() not in ("0", "false", "no", "off")
    if environ.get("POLYKIT_REMOTE_CACHE_DEADLINE", "").strip():
        deadline = _seconds(environ["POLYKIT_REMOTE_CACHE_DEADLINE"], "POLYKIT_REMOTE_CACHE_DEADLINE")
    remote = RemoteSettings(url or None, token or None, read_only, env_vars, input_files, max_size, float(timeout),
                            None if deadline is None else float(deadline))
    settings = {"packages_dir": packages_dir, "cache_dir": cache_dir, "default_parallel": parallel, "cache_max_size": cache_max}
    return settings, remote


# A socket timeout or a wait over about 2**33 seconds overflows the platform's time_t (an
# OverflowError on the first transfer); a week is more than any transfer of a build may take.
MAX_SECONDS = 7 * 24 * 3600
SECONDS_BOUND = f"at most {MAX_SECONDS} (7 days)"


def _is_seconds(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_SECONDS


def _seconds(text: str, variable: str) -> float:
    """A positive number of seconds from the environment; the error names the variable."""
    try:
        value = float(text.strip())
    except ValueError:
        value = 0.0
    if not _is_seconds(value):
        raise ConfigError(variable, f"must be a positive number of seconds, {SECONDS_BOUND}, not {text.strip()!r}")
    return value


def _parse_task(name: str, value: Any, path: Path, text: str) -> dict:
    if isinstance(value, str):
        return {"command": value}
    _expect(isinstance(value, dict), path, text, name,
            f'task {name!r} must be a command string or a table like {{ command = "...", outputs = [...] }}')
    for key in value:
        _expect(key in TASK_FIELDS, path, text, name, f"task {name!r} has unknown field {key!r} (known: {', '.join(TASK_FIELDS)})")
    _expect(isinstance(value.get("command"), str), path, text, name, f"task {name!r} needs a command string")
    return dict(value)


def parse_package(root: Path, config_file: Path) -> Package:
    """Read one package's polykit.toml."""
    data, text = load_toml(config_file)
    name = data.get("name")
    _expect(isinstance(name, str) and _NAME.fullmatch(name or "") is not None, config_file, text, "name",
            "a package needs a name: letters, digits and @ / . _ + -")
    language = data.get("language")
    if language is not None:
        _expect(isinstance(language, str) and language.lower() in LANGUAGES, config_file, text, "language",
                f"unknown language {language!r} (known: js, ts, python, go, rust, javascript, typescript)")
        language = LANGUAGES[language.lower()]
    deps = data.get("deps", {})
    _expect(isinstance(deps, dict), config_file, text, "deps", "[deps] must be a table")
    internal = _str_list(deps.get("internal", []), config_file, text, "internal")
    tasks_raw = data.get("tasks", {})
    _expect(isinstance(tasks_raw, dict), config_file, text, "tasks", "[tasks] must be a table")

    specs: dict[str, dict] = {}
    dotted: list[tuple[str, str, Any]] = []
    for key, value in tasks_raw.items():
        if "." in key and key.rsplit(".", 1)[1] in TASK_FIELDS[1:]:
            task, fieldname = key.rsplit(".", 1)
            dotted.append((task, fieldname, value))
        else:
            specs[key] = _parse_task(key, value, config_file, text)
    for task, fieldname, value in dotted:
        _expect(task in specs, config_file, text, f"{task}.{fieldname}",
                f'"{task}.{fieldname}" refers to a task {task!r} that is not defined')
        _expect(fieldname not in specs[task], config_file, text, f"{task}.{fieldname}",
                f"task {task!r} sets {fieldname} twice")
        specs[task][fieldname] = value

    tasks: dict[str, Task] = {}
    for task, spec in specs.items():
        _expect(_NAME.fullmatch(task) is not None and ":" not in task, config_file, text, task, f"invalid task name {task!r}")
        readers = {"depends_on": _str_list, "outputs": _globs, "inputs": functools.partial(_globs, default_allowed=True),
                   "env": _env_list}
        lists = {f: read(spec[f], config_file, text, task, f"task {task!r}: {f}") for f, read in readers.items() if f in spec}
        tasks[task] = Task(task, spec["command"], lists.get("depends_on", ()), lists.get("outputs"), lists.get("inputs"),
                           lists.get("env", ()))
    for task in tasks.values():
        for dep in task.depends_on:
            _expect(dep in tasks, config_file, text, task.name,
                    f"task {task.name!r} depends on {dep!r}, which package {name!r} does not define"
                    f" (it has: {', '.join(sorted(tasks)) or 'no tasks'})")
    rel = config_file.parent.relative_to(root).as_posix()
    return Package(name, rel, config_file.parent, language, internal, tasks, config_file)


def load(start: Path | str, environ: Mapping[str, str] | None = None) -> Workspace:
    """Find and read the workspace containing ``start``, with every package in it."""
    environ = os.environ if environ is None else environ
    root = find_root(Path(start))
    root_file = root / ROOT_FILE
    data, text = load_toml(root_file)
    settings, remote = _parse_root(root, data, text, environ)
    top = (root / settings["packages_dir"]).resolve()
    if top != root.resolve() and root.resolve() not in top.parents:
        raise ConfigError(root_file, f"packages_dir {settings['packages_dir']!r} must be a folder inside the workspace",
                          _line_of(text, "packages_dir"))
    if not top.is_dir():
        top = root
    from .configcache import ConfigCache  # it reads packages with parse_package

    kept = ConfigCache(root)
    packages: dict[str, Package] = {}
    # The root's own polykit.toml may also describe a package (a single-package workspace).
    found = ([root_file] if "name" in data or "tasks" in data else []) + kept.find(top, root_file)
    for config_file in found:
        pkg = kept.package(root, config_file)
        if pkg.name in packages:
            raise ConfigError(config_file, f"package name {pkg.name!r} is already used by {packages[pkg.name].config_file}")
        packages[pkg.name] = pkg
    for pkg in packages.values():
        for dep in pkg.internal_deps:
            if dep not in packages:
                data_text = pkg.config_file.read_text(encoding="utf-8")
                raise ConfigError(pkg.config_file, f"unknown internal dependency {dep!r} (packages: {', '.join(sorted(packages))})",
                                  _line_of(data_text, "internal"))
    kept.save()
    return Workspace(root, settings["packages_dir"], root / settings["cache_dir"], settings["cache_max_size"],
                     settings["default_parallel"], remote, dict(sorted(packages.items())))
