"""A task's key components as they travel: in the artifact manifest, and in the workspace's record of its last build.

The components are :attr:`KeyMaker.parts`: package, task, command, environment, input files,
dependency keys, toolchain and outputs; ``polykit build --dry-run --json`` prints them with
environment values hashed (:func:`hashed_env`). An
artifact carries them so that ``polykit why --remote`` can say why another machine's build did
not match, but never an environment value: each is replaced by its SHA-256, enough to tell that
a value differs and not what it is. A package with very many inputs carries one digest of them
instead of the list, so the manifest stays within ``MAX_COMPONENTS`` (which the server checks).

The workspace keeps the full components of each task's last build in ``RECORD_FILE`` (values
included, readable by the owner only), which ``polykit why`` compares with the current ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping


RECORD_FILE = ".polykit/keys.json"
RECORD_VERSION = 2  # 2: a first line of keys alone; 1, one JSON document, is still read


def env_digest(value: str | None) -> str | None:
    """What a manifest carries for an environment value: its SHA-256 (an unset variable stays null)."""
    return None if value is None else hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def hashed_env(env: Mapping[str, str | None]) -> dict[str, str | None]:
    """Environment names with their values' digests: what anything printed or uploaded shows.

    A value selected by ``env`` may be a secret (``*_TOKEN``); as in Turborepo's dry run and
    run summary, only its SHA-256 leaves the process, enough to tell two values apart.
    """
    return {name: env_digest(value) for name, value in env.items()}


def inputs_digest(inputs: Mapping[str, str]) -> str:
    """One digest of every input file's path and digest, for components too big to list them."""
    blob = json.dumps(dict(sorted(inputs.items())), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


def for_manifest(parts: dict) -> dict:
    """The components an artifact carries: environment values hashed, bounded by ``MAX_COMPONENTS``."""
    from .artifact import MAX_COMPONENTS  # only packing needs it: a build of hits never imports tar and zstd

    out = {name: value for name, value in parts.items()}
    out["env"] = hashed_env(parts["env"])
    if len(json.dumps(out, sort_keys=True, separators=(",", ":"))) > MAX_COMPONENTS:
        inputs = out.pop("inputs")
        out["inputs_digest"] = inputs_digest(inputs)
    return out


def load_records(root: Path) -> dict[str, dict]:
    """The components of each task's last build in this workspace, by ``package:task``."""
    try:
        with open(root / RECORD_FILE, encoding="utf-8") as fh:
            head = json.loads(fh.readline())
            data = head if isinstance(head, dict) and head.get("version") == 1 else json.loads(fh.readline())
    except (OSError, ValueError):
        return {}
    if not isinstance(head, dict) or head.get("version") not in (1, RECORD_VERSION) or not isinstance(data, dict) \
            or not isinstance(data.get("tasks"), dict):
        return {}
    return {name: entry for name, entry in data["tasks"].items() if isinstance(entry, dict)}


def recorded_keys(root: Path) -> dict[str, str]:
    """The key of each task's last build: the record's first line only, not its components."""
    try:
        with open(root / RECORD_FILE, encoding="utf-8") as fh:
            head = json.loads(fh.readline())
    except (OSError, ValueError):
        return {}
    keys = head.get("keys") if isinstance(head, dict) and head.get("version") == RECORD_VERSION else None
    return keys if isinstance(keys, dict) else {}


def save_records(root: Path, built: Mapping[str, dict]) -> None:
    """Record the components of the tasks just built or restored; other tasks keep their record.

    Two lines: each task's key, then each task's key and components. A key is the hash of its
    components, so when every task kept its key (a build of hits) the file is left as it is,
    which costs reading its first line rather than parsing and writing megabytes of components.
    Written to a temporary file and renamed, mode 0600 (environment values are in it); a
    record that cannot be written only leaves ``polykit why`` less to compare with.
    """
    if not built:
        return
    keys = recorded_keys(root)
    if all(keys.get(name) == entry["key"] for name, entry in built.items()):
        return
    records = load_records(root)
    records.update(built)
    path = root / RECORD_FILE
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            # dumps, not dump: json.dump streams through the pure-Python encoder, ten times slower
            # on the components of a package of thousands of files. Compact JSON has no newline.
            head = {"version": RECORD_VERSION, "keys": {name: entry.get("key") for name, entry in records.items()}}
            fh.write(json.dumps(head, sort_keys=True, separators=(",", ":")) + "\n")
            fh.write(json.dumps({"tasks": records}, sort_keys=True, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
