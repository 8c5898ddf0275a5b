"""A task's outputs: what its ``outputs`` patterns declare, on disk and in an artifact.

An output folder may be reached through a symlink inside the package (``dist -> .output/public``,
as static-site generators lay it out): the link is an output, and so is every file of its target
that the patterns match through the link (``dist/index.html`` is ``.output/public/index.html``).
The artifact holds the link and the files at their real paths (never an entry under a symlink),
and a restore recreates both. A declared output that cannot be cached faithfully (a link
leaving the package, a link loop) is an :class:`OutputError` naming it: the task is then not
cached at all, never cached as less than the build made.
"""

from __future__ import annotations

import functools
import itertools
import os
import posixpath
import stat
import time
from pathlib import Path
from typing import Iterable, Mapping

from .globs import GlobSet

# A restore maps a file back through at most this many symlinked folders (a chain of links).
MAX_LINK_VIEWS = 64
# A walk is kept (see expand_outputs) only when every folder it noted last changed at least this
# long before it began: a folder's timestamps come from a clock that ticks every few ms, so an
# entry added in the same tick as a noted change leaves them as they were. Git's index has the
# same "racy" rule (Documentation/technical/racy-git.txt). A filesystem that stamps whole
# seconds (2 s for FAT's mtime) has a tick of up to 2 s: a timestamp with no fraction of a
# second takes the longer wait.
SETTLE_NS = 100_000_000
SETTLE_WHOLE_SECONDS_NS = 2_000_000_000


class OutputError(Exception):
    """A declared output that cannot be cached, named in the message."""


@functools.lru_cache(maxsize=None)
def globs_of(patterns: tuple[str, ...] | None) -> GlobSet:
    return GlobSet(patterns or ())


def signature(st: os.stat_result) -> list[int]:
    """What changes when a file, folder or link is touched in any way (ctime cannot be set back)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode]


def expand_outputs(pkg_dir: Path, patterns: tuple[str, ...] | None, *, strict: bool = True,
                   walked: dict[str, list[int] | None] | None = None) -> list[str]:
    """Files, symlinks and empty folders of the package that the output patterns declare.

    Paths are real (relative to the package, never under a symlink); patterns match the path as
    the user sees it, through symlinked folders. ``strict=False`` (to clear old outputs before a
    restore) leaves out a link leaving the package, and stops at a loop, instead of raising.

    ``walked``, when given, receives what the answer depends on besides the files it lists: the
    signature of each entry on the way to a pattern's folder (None where it is missing) and of
    every folder listed ("." for the package), each taken before the folder is listed. While all
    of them are unchanged, no entry was added, removed, renamed or changed in type in any folder
    the walk looked at (each of those changes its folder's mtime and ctime), so the same walk
    would list the same paths: see ``walk_unchanged``. A walk that meets a symlink depends on
    more than that (where the link leads); it leaves ``walked`` empty. So does a walk that noted
    a folder changed less than a tick of the filesystem's clock before it began (``SETTLE_NS``): an entry added after the folder was
    listed, in the same tick of the filesystem's clock, would leave its signature as noted (a
    late file from a build's own background process, say). Such outputs are walked in full
    again, and the first walk that finds them settled is kept.
    """
    globs = globs_of(tuple(patterns) if patterns is not None else None)
    if not globs:
        return []
    started = time.time_ns()
    root = os.path.realpath(pkg_dir)
    found: set[str] = set()
    seen: dict[str, list[int] | None] = {}
    links = False

    def visit(view: str, real: str, chain: frozenset[str], base: bool = False) -> None:
        nonlocal links
        full = os.path.join(root, real)
        try:
            st = os.lstat(full)
        except OSError:
            seen[real] = None
            return
        if base:
            seen[real] = signature(st)
        if stat.S_ISLNK(st.st_mode):
            links = True
            under = globs.may_match_under(view)
            if not (under or globs.matches(view)):
                return
            target = os.path.realpath(full)
            if target != root and not target.startswith(root + os.sep):
                if strict:
                    raise OutputError(f"output {view!r} is a symlink to {os.readlink(full)!r}, outside the package")
                return  # left alone: a restore refuses to write through it
            found.add(real)
            if under and os.path.isdir(target):
                if target in chain:
                    if strict:
                        raise OutputError(f"output {view!r} is a symlink loop")
                    return
                folder(view, os.path.relpath(target, root).replace(os.sep, "/"), chain | {target})
        elif stat.S_ISDIR(st.st_mode):
            if globs.may_match_under(view):
                seen[real] = signature(st)
                folder(view, real, chain)
            elif globs.matches(view):
                seen[real] = signature(st)
                if not os.listdir(full):
                    found.add(real)
        elif globs.matches(view):
            found.add(real)

    def folder(view: str, real: str, chain: frozenset[str]) -> None:
        full = os.path.join(root, real) if real and real != "." else root
        names = sorted(os.listdir(full))
        if not names and view and globs.matches(view):
            found.add(real)
        for name in names:
            if name == ".git":
                continue
            base = "" if real in ("", ".") else real + "/"
            visit(f"{view}/{name}" if view else name, base + name, chain)

    for base in globs.bases():
        if base:
            _descend(root, base, visit, seen)
        else:
            try:
                seen["."] = signature(os.lstat(root))
            except OSError:
                seen["."] = None
            folder("", "", frozenset({root}))
    if walked is not None and not links and all(_settled(sig, started) for sig in seen.values()):
        walked.update(seen)
    return sorted(found)


def _settled(sig: list[int] | None, started: int) -> bool:
    """Whether an entry noted by a walk that began at ``started`` last changed a whole tick of
    its filesystem's clock before (see SETTLE_NS); a missing entry has nothing to change unseen."""
    if sig is None:
        return True
    mtime, ctime = sig[1], sig[3]
    whole = mtime % 1_000_000_000 == 0 or ctime % 1_000_000_000 == 0
    return max(mtime, ctime) < started - (SETTLE_WHOLE_SECONDS_NS if whole else SETTLE_NS)


def walk_unchanged(pkg_dir: Path, walked: dict[str, list[int] | None]) -> bool:
    """Whether every entry ``expand_outputs`` noted in ``walked`` still has its signature (or is still missing)."""
    for rel, sig in walked.items():
        try:
            now = signature(os.lstat(os.path.join(pkg_dir, rel)))
        except (FileNotFoundError, NotADirectoryError):
            now = None
        if now != sig:
            return False
    return True


def _descend(root: str, base: str, visit, seen: dict) -> None:
    """Visit ``base`` (the literal folders a pattern starts with), resolving links on the way.

    Notes in ``seen`` the signature of each entry on the way (a link among them is visited)."""
    parts = base.split("/")
    real = ""
    chain = frozenset({root})
    for i, part in enumerate(parts[:-1]):
        entry = f"{real}/{part}" if real else part
        full = os.path.join(root, entry)
        try:
            seen[entry] = signature(os.lstat(full))
        except OSError:
            seen[entry] = None
        if os.path.islink(full):
            visit("/".join(parts[: i + 1]), entry, chain)  # records the link (or refuses it)
            target = os.path.realpath(full)
            if target in chain or not target.startswith(root + os.sep) or not os.path.isdir(target):
                return
            chain |= {target}
            real = os.path.relpath(target, root).replace(os.sep, "/")
        elif os.path.isdir(full):
            real = entry
        else:
            return
    visit(base, f"{real}/{parts[-1]}" if real else parts[-1], chain, base=True)


def linked_folders(pkg_dir: Path, patterns: Iterable[str]) -> list[str]:
    """Symlinks in the literal part of output patterns, and the package folders they lead to.

    With ``outputs = ["dist/**"]`` and ``dist -> .output/public``, the build writes the link
    ``dist`` and the folder ``.output/public``: both are outputs, not default inputs. Only the literal folders of
    each pattern are looked at (a few ``lstat`` calls), so keys stay cheap to compute.
    """
    literal = [list(itertools.takewhile(lambda part: not any(c in part for c in "*?[{"), pattern.split("/")))
               for pattern in globs_of(tuple(p for p in patterns if not p.startswith("!"))).patterns]
    # Most packages have no link there: a look at each literal folder says so, without the
    # lstat of every folder above the package that resolving its path costs.
    if not any(os.path.islink(os.path.join(pkg_dir, *parts[:i + 1])) for parts in literal for i in range(len(parts))):
        return []
    root = os.path.realpath(pkg_dir)
    found = []
    for parts in literal:
        current = root
        for part in parts:
            current = os.path.join(current, part)
            if os.path.islink(current):
                found.append(os.path.relpath(current, root).replace(os.sep, "/"))
                target = os.path.realpath(current)
                if not target.startswith(root + os.sep) or not os.path.isdir(target):
                    break
                found.append(os.path.relpath(target, root).replace(os.sep, "/"))
                current = target
    return sorted(set(found))


def check_restorable(files: Iterable[str], links: Mapping[str, str], patterns: tuple[str, ...] | None,
                     pkg_dir: Path | None = None) -> None:
    """Refuse an artifact entry that the task's outputs do not declare.

    A link is declared when the patterns match it or something under it; a file, when the
    patterns match its path or its path as seen through a declared link to its folder. A file
    placed only through a link goes into a new top-level folder of the package, or one the same
    link already shows in ``pkg_dir``: an artifact cannot invent ``dist -> src`` to overwrite
    sources, nor ``dist -> node_modules/x`` to add a module beside the installed ones.
    """
    from .artifact import ArtifactError  # only a restore needs it (see runner.py)

    globs = globs_of(tuple(patterns) if patterns is not None else None)
    folders: list[tuple[str, str]] = []  # (real folder, link showing it)
    for link, target in links.items():
        if not (globs.matches(link) or globs.may_match_under(link)):
            raise ArtifactError("undeclared_output", f"the artifact holds {link!r}, which is not a declared output")
        real = posixpath.normpath(posixpath.join(posixpath.dirname(link), target))
        if not real.startswith("../") and real != "..":
            folders.append((real, link))
    used: set[tuple[str, str]] = set()
    for rel in files:
        if not _declared(rel, globs, folders, used):
            raise ArtifactError("undeclared_output", f"the artifact holds {rel!r}, which is not a declared output")
    for real, link in sorted(used) if pkg_dir is not None else ():
        shown = os.path.join(pkg_dir, link)
        top = real.split("/", 1)[0]  # "." for a link to the package itself
        if os.path.lexists(os.path.join(pkg_dir, top)) and not (
                os.path.islink(shown) and os.readlink(shown) == links[link]):
            raise ArtifactError("unsafe_path", f"the artifact's link {link!r} -> {links[link]!r} would place files in"
                                               f" the existing folder {top!r}, which that link does not show")


def _declared(rel: str, globs: GlobSet, folders: list[tuple[str, str]], used: set[tuple[str, str]]) -> bool:
    """Whether the patterns match ``rel`` or its path through declared links (noting the links used)."""
    seen, pending = {rel: None}, [rel]
    while pending:
        view = pending.pop()
        if globs.matches(view):
            while seen[view] is not None:  # the links this view went through
                previous, link_used = seen[view]
                used.add(link_used)
                view = previous
            return True
        for real, link in folders:
            if real == "." or view.startswith(real + "/"):
                shown = link + "/" + (view if real == "." else view[len(real) + 1:])
                if shown not in seen and len(seen) < MAX_LINK_VIEWS:
                    seen[shown] = (view, (real, link))
                    pending.append(shown)
    return False
