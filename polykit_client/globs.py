"""Glob patterns over relative posix paths, as Turborepo users write them in ``inputs`` and ``outputs``.

``*``, ``?`` and ``[abc]`` (``[!abc]`` negated) match within a name, ``**`` (a whole path
segment) across folders, ``{a,b}`` one of several spellings. A pattern that names a folder also
covers everything under it (``dist`` is ``dist/**``). An entry starting with ``!`` is an
exclusion: a path is matched when some inclusion matches it and no exclusion does, whatever the
order of the entries (Turborepo applies exclusions after every inclusion; an exclusion covers
everything under what it names, as its documentation says ``!`` "automatically applies ``/**``").

In ``inputs`` (and ``input_files``) the entry ``$TURBO_DEFAULT$`` stands for the default inputs
(the package's files as git lists them), so ``["$TURBO_DEFAULT$", "!README.md"]`` narrows the
default; Nx's ``{projectRoot}/`` prefix is the package folder itself. Anything else (backslash
escapes, nested braces, other ``$...$`` or ``{...}`` tokens, Nx named inputs like ``^production``,
``..``) is refused with a :class:`PatternError` naming the pattern: a form that silently matched
nothing would leave a declared input out of the key.
"""

from __future__ import annotations

import re
from typing import Iterable

from .globmatch import Matcher

_MICROSYNTAX = re.compile(r"\$[A-Za-z_]+\$")
DEFAULT_INPUTS = "$TURBO_DEFAULT$"
_PROJECT_ROOT = "{projectRoot}"
_SPECIAL = "*?[{"


class PatternError(ValueError):
    """A pattern whose form is not supported, with what is wrong with it."""


def normalise(pattern: str) -> str:
    """The pattern without a leading ``!``, leading ``./`` or surrounding slashes; checked."""
    body = pattern[1:] if pattern.startswith("!") else pattern
    if body == _PROJECT_ROOT or body.startswith(_PROJECT_ROOT + "/"):
        body = body[len(_PROJECT_ROOT):]
    while body.startswith("./"):
        body = body[2:]
    body = body.strip("/")
    if not body:
        raise PatternError(f"pattern {pattern!r} is empty")
    if body.startswith("!"):
        raise PatternError(f"pattern {pattern!r}: a double negation is not supported")
    if "\\" in body:
        raise PatternError(f"pattern {pattern!r}: backslash escapes are not supported")
    if _MICROSYNTAX.search(body):
        raise PatternError(f"pattern {pattern!r}: {_MICROSYNTAX.search(body).group()} is not supported here")
    if body.startswith("^"):
        raise PatternError(f"pattern {pattern!r}: named inputs (Nx's ^name) are not supported; list the files")
    if pattern.startswith("/") or ".." in body.split("/") or "." in body.split("/"):
        raise PatternError(f"pattern {pattern!r} must stay inside the package (relative, without . or .. folders)")
    for part in body.split("/"):
        if "**" in part and part != "**":
            raise PatternError(f"pattern {pattern!r}: ** must be a whole path segment (like src/**/*.ts)")
    tokens(body, pattern)  # raises on unbalanced brackets and braces
    return body


def tokens(pattern: str, original: str | None = None) -> list[tuple]:
    """One normalised pattern as the tokens :class:`~polykit_client.globmatch.Matcher` reads.

    ``("char", c)``, ``("one",)`` for ``?``, ``("class", regex)`` for ``[...]``, ``("star",)``
    for ``*``, ``("folders",)`` for ``**/``, ``("any",)`` for a final ``**`` and
    ``("either", [tokens, ...])`` for ``{a,b}``.
    """
    original = original or pattern
    out: list[tuple] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            # "**/**/" means what one "**/" means: one token, not two to share the folders.
            if out and out[-1] == ("folders",):
                out.pop()
            if pattern.startswith("/", i):
                out.append(("folders",))
                i += 1
            else:
                out.append(("any",))
            continue
        if c == "*":
            out.append(("star",))
        elif c == "?":
            out.append(("one",))
        elif c == "[":
            start = i + 2 if pattern.startswith("[!", i) or pattern.startswith("[^", i) else i + 1
            end = pattern.find("]", start + 1 if pattern.startswith("]", start) else start)
            if end < 0 or "/" in pattern[i:end]:
                raise PatternError(f"pattern {original!r}: '[' has no closing ']' within the name")
            body = pattern[start:end]
            negate = "^" if start == i + 2 else ""
            out.append(("class", "[" + negate + body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[") + "]"))
            i = end
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0 or "{" in pattern[i + 1 : end] or "/" in pattern[i + 1 : end]:
                raise PatternError(f"pattern {original!r}: '{{' needs a closing '}}' in the same name; braces cannot nest")
            options = pattern[i + 1 : end].split(",")
            if len(options) < 2:
                raise PatternError(f"pattern {original!r}: {pattern[i:end + 1]} is not a glob (braces list spellings,"
                                   " like {js,ts}); write the path relative to the package")
            out.append(("either", [tokens(o, original) for o in options]))
            i = end
        elif c == "}":
            raise PatternError(f"pattern {original!r}: '}}' without an opening '{{'")
        else:
            out.append(("char", c))
        i += 1
    return out


def literal_prefix(pattern: str) -> str:
    """The leading folders of a normalised pattern that hold no wildcard: where matches can be."""
    literal = []
    for part in pattern.split("/"):
        if any(c in part for c in _SPECIAL):
            break
        literal.append(part)
    return "/".join(literal)


def _compile(patterns: tuple[str, ...]) -> Matcher | None:
    # Not Python's re: a translated glob backtracks (see globmatch), and patterns come from
    # every package's configuration.
    return Matcher(tokens(p) for p in patterns) if patterns else None


def _matches(matcher: Matcher | None, path: str) -> bool:
    """The path or one of the folders above it matches (a folder pattern covers its contents)."""
    return matcher is not None and matcher.matches(path, folders=True)


class GlobSet:
    """Matches a path against inclusions and ``!`` exclusions (exclusions win, in any order)."""

    def __init__(self, patterns: Iterable[str], *, default_allowed: bool = False) -> None:
        include, exclude = [], []
        self.default = False  # whether $TURBO_DEFAULT$ is among the inclusions
        for raw in patterns:
            if raw == DEFAULT_INPUTS and default_allowed:
                self.default = True
                continue
            (exclude if raw.startswith("!") else include).append(normalise(raw))
        self.patterns = tuple(include)
        self.exclusions = tuple(exclude)
        self._include = _compile(self.patterns)
        self._exclude = _compile(self.exclusions)
        # Every match lies at or under a pattern's literal leading folders (``dist/**`` under
        # ``dist``), so a path elsewhere needs no regular expression: with thousands of sources
        # and outputs in one folder, this is most of what listing the default inputs costs.
        bases = self.bases()
        self._anywhere = "" in bases or not bases
        self._bases = frozenset(bases)
        self._under = tuple(base + "/" for base in bases)
        self._prefixes: dict[str, Matcher] = {}

    def __bool__(self) -> bool:
        return self._include is not None

    def bases(self, separate: frozenset[str] = frozenset()) -> list[str]:
        """The fewest folders (relative, "" for the whole package) under which every match lies.

        A base passing through a folder named in ``separate`` keeps its own entry, so a walk that
        skips such folders still walks the one a pattern names literally.
        """
        found = sorted({literal_prefix(p) for p in self.patterns})
        kept: list[str] = []
        for base in found:
            own = separate and any(part in separate for part in base.split("/"))
            if own or not any(base == k or k == "" or base.startswith(k + "/") for k in kept):
                kept.append(base)
        return kept

    def matches(self, path: str) -> bool:
        if not self._anywhere and path not in self._bases and not path.startswith(self._under):
            return False
        return _matches(self._include, path) and (self._exclude is None or not _matches(self._exclude, path))

    def excluded(self, path: str) -> bool:
        """Matched by an exclusion."""
        return _matches(self._exclude, path)

    def _prefix(self, prefix: str) -> Matcher:
        """The matcher of a pattern's leading folders (few per pattern: one per depth)."""
        found = self._prefixes.get(prefix)
        if found is None:
            found = self._prefixes[prefix] = Matcher([tokens(prefix)])
        return found

    def may_match_under(self, folder: str) -> bool:
        """Whether some path strictly under ``folder`` could be matched (checked pattern by pattern)."""
        if self._include is None or _matches(self._exclude, folder):
            return False
        if _matches(self._include, folder):
            return True
        depth = folder.count("/") + 1
        for pattern in self.patterns:
            parts = pattern.split("/")
            prefix = []
            for part in parts[:depth]:
                if part == "**":
                    return True
                prefix.append(part)
            if len(parts) > depth and self._prefix("/".join(prefix)).matches(folder):
                return True
        return False
