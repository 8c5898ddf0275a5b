"""Which environment variables enter a task's key: names, ``*`` wildcards and ``!`` exclusions.

As in Turborepo's ``env``: ``NEXT_PUBLIC_*`` takes every variable whose name starts so, ``*`` may
stand anywhere in a name (``*_URL``, ``A*B``), and ``!NAME`` or ``!PREFIX_*`` removes names
whatever the order of the entries. A plain name is recorded even when unset (as ``null``, so
"unset" and "empty" differ); a wildcard records the variables it matches, with their values.
Names are compared exactly (case-sensitive), as the environment is.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Mapping

_FORM = re.compile(r"!?[A-Za-z0-9_.*-]+")


class EnvPatternError(ValueError):
    """An entry that is not a variable name, a wildcard or an exclusion."""


def check(entry: str) -> str:
    """The entry itself when its form is supported; an :class:`EnvPatternError` otherwise."""
    if not _FORM.fullmatch(entry) or entry in ("!",):
        raise EnvPatternError(
            f"environment entry {entry!r} is not supported: use a NAME, a PREFIX_* wildcard or a !NAME exclusion")
    return entry


def _regex(patterns: Iterable[str]) -> re.Pattern | None:
    # fnmatch's translation matches each "*" between literals atomically (a leftmost match is
    # always a right one), so "*A*A*A*B" costs linear time, not a power of the name's length.
    # The entry forms leave it only "*" to interpret: no "?" or "[" passes check().
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(parts)) if parts else None


def select(entries: Iterable[str], environ: Mapping[str, str]) -> dict[str, str | None]:
    """The recorded variables, name -> value (None when a plainly named variable is unset)."""
    entries = [check(e) for e in entries]
    plain = {e for e in entries if not e.startswith("!") and "*" not in e}
    wild = _regex(e for e in entries if not e.startswith("!") and "*" in e)
    excluded = _regex(e[1:] for e in entries if e.startswith("!"))
    names = set(plain)
    if wild is not None:
        names.update(name for name in environ if wild.fullmatch(name))
    if excluded is not None:
        names = {name for name in names if not excluded.fullmatch(name)}
    return {name: environ.get(name) for name in sorted(names)}
