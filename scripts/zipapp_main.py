"""Start a polykit zipapp: make zstd importable, then run the command the zipapp was built for.

``scripts/build_zipapp.py`` copies this file into each zipapp as its ``__main__.py``, beside the
pure-Python packages and a manifest (``_polykit_zipapp/manifest.json``) that names the entry
point and the zstandard builds carried as data.

Why this exists: zipimport loads only Python source and bytecode, so zstandard's compiled module
cannot be imported from inside the zip. On Python 3.14+ the standard library's
``compression.zstd`` is used and nothing is unpacked. Otherwise the zstandard build whose file
name suffix matches this interpreter (``importlib.machinery.EXTENSION_SUFFIXES``: CPython version,
ABI, OS and CPU in one tag) is unpacked once into a per-user cache folder named after the hash of
its contents, and that folder goes on ``sys.path``. The first cache folder that works wins:

1. ``$POLYKIT_ZIPAPP_CACHE`` when set (for a home on a ``noexec`` mount, or a shared location);
2. ``$XDG_CACHE_HOME/polykit/zipapp``, else ``~/.cache/polykit/zipapp``;
3. ``<system temp folder>/polykit-zipapp-<uid>``, private to the user (mode 0700, checked).

Two processes that start at once each unpack into their own temporary folder beside the final
one and rename it into place; the rename is atomic and refuses a non-empty target, so the loser
just uses the winner's folder. A folder whose files have the wrong sizes (a crash before the data
reached the disk, a hand-edited cache) is set aside and unpacked again.

Standard library only, and nothing newer than the oldest Python it must report on: an interpreter
that is too old or unsupported gets one line that says what this zipapp does support.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):
    sys.exit("error: polykit needs Python 3.11 or newer; this is Python %d.%d" % sys.version_info[:2])

import hashlib
import importlib
import importlib.machinery
import json
import os
import platform
import re
import shutil
import stat
import tempfile
import time
import zipimport

DATA = "_polykit_zipapp"
MANIFEST = DATA + "/manifest.json"
CACHE_ENV = "POLYKIT_ZIPAPP_CACHE"
STALE_SECONDS = 3600.0


class BootError(Exception):
    """The zipapp cannot start here; the message says why and what would work."""


def stdlib_zstd() -> bool:
    """True on interpreters whose standard library has ``compression.zstd`` (3.14+, built with libzstd)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        return False
    return True


def interpreter_tags() -> list[str]:
    """This interpreter's extension-module tags, most specific first (e.g. ``cpython-311-x86_64-linux-gnu``)."""
    tags = []
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        parts = suffix.split(".")
        if len(parts) == 3 and parts[1]:
            tags.append(parts[1])
    return tags


def pick_native(manifest: dict) -> tuple[str, dict] | None:
    """The carried zstandard build that this interpreter can load, by tag, or None."""
    native = manifest.get("native", {})
    for tag in interpreter_tags():
        if tag in native:
            return tag, native[tag]
    return None


def describe_support(manifest: dict) -> str:
    """Which interpreters and platforms this zipapp serves, in one sentence."""
    by_platform: dict[str, list[str]] = {}
    for build in manifest.get("native", {}).values():
        by_platform.setdefault(build["platform"], []).append(build["python"])
    carried = "; ".join(
        "CPython " + ", ".join(sorted(set(versions), key=lambda v: [int(x) for x in re.findall(r"\d+", v)])) + " on " + where
        for where, versions in sorted(by_platform.items())
    )
    text = "This zipapp runs on any Python 3.14+ whose standard library has compression.zstd"
    if carried:
        text += f", and carries zstandard {manifest.get('zstandard', '?')} for {carried}"
    return text + "."


def describe_interpreter() -> str:
    """This interpreter and machine, as the error message shows them."""
    tags = interpreter_tags()
    tag = f", extension tag {tags[0]}" if tags else ""
    return (f"{platform.python_implementation()} {platform.python_version()} on "
            f"{sys.platform} {platform.machine() or 'unknown CPU'}{tag}")


def unsupported(manifest: dict, reason: str) -> BootError:
    """The one error a user sees: what this interpreter is, why it failed, and what would work."""
    return BootError(
        f"polykit cannot load zstd on {describe_interpreter()}: {reason}\n"
        f"{describe_support(manifest)}\n"
        "Build a zipapp on a machine like this one with scripts/build_zipapp.py "
        "(--python-versions adds more CPython versions), or install zstandard and run polykit from source."
    )


def cache_roots() -> list[tuple[str, bool]]:
    """Candidate cache folders, best first; the flag marks the shared temp folder that must be private."""
    roots: list[tuple[str, bool]] = []
    explicit = os.environ.get(CACHE_ENV, "")
    if explicit:
        roots.append((os.path.abspath(explicit), False))
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        roots.append((os.path.join(xdg, "polykit", "zipapp"), False))
    else:
        home = os.path.expanduser("~")
        if os.path.isabs(home):
            roots.append((os.path.join(home, ".cache", "polykit", "zipapp"), False))
    try:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        roots.append((os.path.join(tempfile.gettempdir(), f"polykit-zipapp-{uid}"), True))
    except OSError:
        pass
    return roots


def ensure_private(path: str) -> None:
    """Make or accept ``path`` only as this user's own folder, closed to others.

    The system temp folder is shared: a folder planted there by someone else could hand us a
    native module of their choosing.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise BootError(f"{path} is not a folder")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise BootError(f"{path} belongs to another user or is writable by others; not used")


def folder_name(manifest: dict, tag: str, build: dict) -> str:
    """Readable, and unique per content: the key is the SHA-256 of the files it holds."""
    return f"zstandard-{manifest.get('zstandard', 'x')}-{tag}-{build['key'][:16]}"


def is_complete(folder: str, build: dict) -> bool:
    """Cheap check on every start: every file is there with its size (the rename made it whole)."""
    try:
        for rel, meta in build["files"].items():
            if os.stat(os.path.join(folder, *rel.split("/"))).st_size != meta["size"]:
                return False
    except OSError:
        return False
    return True


def sweep_stale(root: str) -> None:
    """Remove temporary folders left by processes that died while unpacking."""
    now = time.time()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name.startswith(".tmp-"):
            path = os.path.join(root, name)
            try:
                if now - os.lstat(path).st_mtime > STALE_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def fsync_dir(path: str) -> None:
    """Make the rename itself durable, so a crash cannot leave a folder that lost its files' names."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def extract(archive: zipimport.zipimporter, tag: str, build: dict, dest: str) -> None:
    """Write the build's files into ``dest``, checking each against the hash the build recorded."""
    for rel, meta in sorted(build["files"].items()):
        try:
            data = archive.get_data(f"{DATA}/native/{tag}/{rel}")
        except OSError as exc:
            raise BootError(f"the zipapp is damaged: {rel} for {tag} is missing ({exc})") from None
        if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise BootError(f"the zipapp is damaged: {rel} for {tag} does not match its hash")
        path = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(path, 0o755 if rel.endswith((".so", ".pyd")) else 0o644)


def set_aside(folder: str, root: str) -> None:
    """Move an incomplete folder out of the way (atomically), then delete it."""
    trash = tempfile.mkdtemp(prefix=".tmp-damaged-", dir=root)
    try:
        os.rename(folder, os.path.join(trash, "old"))
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)


def unpack(archive: zipimport.zipimporter, root: str, name: str, tag: str, build: dict) -> str:
    """The unpacked folder under ``root``, made now if it is not there yet; safe against races."""
    final = os.path.join(root, name)
    if is_complete(final, build):
        return final
    os.makedirs(root, exist_ok=True)
    sweep_stale(root)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        extract(archive, tag, build, tmp)
        os.chmod(tmp, 0o755)
        for _attempt in range(3):
            try:
                os.rename(tmp, final)
            except OSError:
                if is_complete(final, build):
                    return final  # another process won the race
                set_aside(final, root)
            else:
                fsync_dir(root)
                return final
        raise BootError(f"cannot put the unpacked files in place at {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_zstd(archive: zipimport.zipimporter, manifest: dict) -> None:
    """Make ``compression.zstd`` or ``zstandard`` importable, or raise BootError saying what is supported."""
    if stdlib_zstd():
        return
    picked = pick_native(manifest)
    if picked is None:
        try:
            import zstandard  # one installed beside the interpreter is fine too
        except ImportError:
            raise unsupported(manifest, "this zipapp has no zstandard build for it") from None
        return
    tag, build = picked
    name = folder_name(manifest, tag, build)
    problems = []
    for root, private in cache_roots():
        try:
            if private:
                ensure_private(root)
            folder = unpack(archive, root, name, tag, build)
        except (OSError, BootError) as exc:
            problems.append(f"{root}: {exc}")
            continue
        sys.path.insert(1, folder)
        try:
            import zstandard
        except (ImportError, OSError) as exc:
            sys.path.remove(folder)
            problems.append(f"{folder}: {exc}")
            continue
        return
    raise unsupported(manifest, "no usable zstandard (" + "; ".join(problems or ["no cache folder"]) + "); "
                      f"{CACHE_ENV}=DIR unpacks into another folder (one where programs may run, not noexec)")


def run_entry(entry: str) -> int:
    """Import ``module:function`` from the zip only now, after zstd is importable, and run it."""
    module_name, _, func = entry.partition(":")
    result = getattr(importlib.import_module(module_name), func)()
    return 0 if result is None else result


def main() -> int:
    """Read the manifest from the zip this file sits in, set up zstd, run the entry point."""
    location = os.path.dirname(os.path.abspath(__file__))
    try:
        try:
            archive = zipimport.zipimporter(location)
            manifest = json.loads(archive.get_data(MANIFEST))
        except (zipimport.ZipImportError, OSError, ValueError) as exc:
            raise BootError(f"{location} is not a polykit zipapp built by scripts/build_zipapp.py ({exc})") from None
        load_zstd(archive, manifest)
    except BootError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return run_entry(manifest["entry"])


if __name__ == "__main__":
    sys.exit(main())
