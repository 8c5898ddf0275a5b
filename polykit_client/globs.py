"""Glob patterns over relative posix paths: ``*``, ``?``, ``[abc]`` within a name, ``**`` across folders.

A pattern that names a folder also covers everything under it (``dist`` is ``dist/**``), as
users of Turborepo and Nx expect from an ``outputs`` entry.
"""

from __future__ import annotations

import re
from typing import Iterable


def translate(pattern: str) -> str:
    """The regular expression (without anchors) for one pattern."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            at_start = i == 0 or pattern[i - 1] == "/"
            i += 2
            if at_start and pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[]", i) else i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class GlobSet:
    """Matches a path against any of several patterns, or any folder above it."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p.strip("/") for p in patterns if p.strip("/"))
        joined = "|".join(f"(?:{translate(p)})" for p in self.patterns)
        self._regex = re.compile(f"(?:{joined})") if self.patterns else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, path: str) -> bool:
        if self._regex is None:
            return False
        if self._regex.fullmatch(path):
            return True
        cut = path.rfind("/")
        while cut > 0:
            if self._regex.fullmatch(path, 0, cut):
                return True
            cut = path.rfind("/", 0, cut)
        return False
