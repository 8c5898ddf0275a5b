"""The declared route table: what each path means, who may use it, and how its errors look.

Every route names its protocol, its root (the first path segment it owns), a pattern for the
path from its root on, its handlers by method, which of those methods write, whether it is
public, its error renderer, and sample paths. Routing does not depend on order: a path is tried
against the routes of its root only, so no two patterns can match one path
(``tests/test_routes.py`` tries every sample against every pattern).

A pattern without regular expression syntax is a path of its own (``/v1/stats``) and is found by
one dictionary lookup; the patterns with parameters of the root are then tried. The table is
checked when it is built: a path of its own that a pattern also matches is refused there.

Namespaces: whatever comes before the leftmost segment that is a root names a namespace, for
every protocol alike (``/cache-v2/v1/artifacts/<key>`` is the polykit protocol in namespace
``cache-v2``; a Bazel instance name is the same thing). So a namespace's parts are never a root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from .http import HTTPError, Response, render_json_error

Handler = Callable[[dict, dict], Response]
Renderer = Callable[[HTTPError], Response]

# Methods that only read (RFC 9110 9.2.1 "safe"); any other method a route serves must be
# declared either a write or, explicitly, a read (turbo's batch query is a POST that reads).
SAFE = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Route:
    protocol: str
    root: str  # the path segment the route owns ("v8", "kv", "ac"); a namespace may come before it
    pattern: str  # a regular expression for the path from the root on, with named groups for the handlers
    handlers: Mapping[str, Handler]
    writes: frozenset[str] = frozenset()
    reads: frozenset[str] = SAFE
    public: bool = False
    render: Renderer = render_json_error
    samples: tuple[str, ...] = ()  # paths the route must own, for the overlap test
    # The answer to a write without credentials on a server that lets anyone read: 401 asks for
    # a token; a client that takes 401 as fatal but tolerates 403 (Nx) declares 403.
    anonymous_write_status: int = 401
    read_body_limit: int = 0  # bytes a read may send (0: the application's default)
    bodiless: frozenset[str] = frozenset()  # writes that take no body (WebDAV's MKCOL, RFC 4918 9.3)
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        handlers = dict(self.handlers)
        if "GET" in handlers and "HEAD" not in handlers:
            handlers["HEAD"] = handlers["GET"]  # RFC 9110 9.3.2: HEAD is GET without the body
        object.__setattr__(self, "handlers", handlers)
        unclassified = set(handlers) - self.writes - self.reads
        if unclassified or self.writes & self.reads:
            # A method neither declared a read nor a write would fall open to read-only tokens.
            raise ValueError(f"{self.protocol} route {self.pattern}: classify {sorted(unclassified)} as reads or writes")
        object.__setattr__(self, "regex", re.compile(self.pattern))

    @property
    def literal(self) -> bool:
        """Whether the pattern is a path of its own (no parameters, no regular expression syntax)."""
        return re.escape(self.pattern) == self.pattern

    def is_write(self, method: str) -> bool:
        """Whether the method stores something here (authorisation asks this, never the method name)."""
        return method in self.writes

    @property
    def allowed(self) -> str:
        return ", ".join(sorted(self.handlers))


class Router:
    """Finds the one route of a path; built once from every protocol's declared routes."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = list(routes)
        # Root -> the routes with parameters under it; path -> the route that is that path.
        self._by_root: dict[str, list[Route]] = {}
        self._exact: dict[str, Route] = {}
        for route in self.routes:
            patterns = self._by_root.setdefault(route.root, [])
            if not route.literal:
                patterns.append(route)
                continue
            path = route.pattern
            if path != "/" + route.root and not path.startswith(f"/{route.root}/") or path in self._exact:
                raise ValueError(f"{route.protocol} route {path}: outside its root {route.root!r}, or declared twice")
            self._exact[path] = route
        for path, route in self._exact.items():
            # Found by the lookup, never by the order of the table: no pattern may claim it too.
            for other in self._by_root[route.root]:
                if other.regex.fullmatch(path):
                    raise ValueError(f"{route.protocol} route {path} is also matched by {other.pattern}")

    @property
    def roots(self) -> frozenset[str]:
        """Every path segment some route owns (never part of a namespace)."""
        return frozenset(self._by_root)

    def match(self, path: str) -> tuple[Route, dict] | None:
        """The route owning ``path`` and its parameters, or None.

        The parameters include ``namespace``: the segments before the root, joined by ``/``
        (``""`` for none), not yet validated.
        """
        if not path.startswith("/"):
            return None
        end = path.find("/", 1)
        patterns = self._by_root.get(path[1:end] if end > 0 else path[1:])
        if patterns is not None:  # no namespace, the common case
            rest, namespace = path, ""
        else:
            parts = path[1:].split("/")
            root = next((i for i, part in enumerate(parts) if part in self._by_root), None)
            if root is None:
                return None
            patterns = self._by_root[parts[root]]
            rest, namespace = "/" + "/".join(parts[root:]), "/".join(parts[:root])
        route = self._exact.get(rest)
        if route is not None:
            return route, {"namespace": namespace}
        found = None
        for route in patterns:
            m = route.regex.fullmatch(rest)
            if m is not None:
                if found is not None:  # the declared patterns overlap: a bug, never resolved by order
                    raise HTTPError(500, "internal_error", "Two routes claim this path.")
                found = route, m
        if found is None:
            return None
        return found[0], {**found[1].groupdict(), "namespace": namespace}

    def owner(self, path: str) -> Route | None:
        """The route a path belongs to, for the error shape of a refusal; None for unknown paths."""
        try:
            found = self.match(path)
        except HTTPError:
            return None
        return found[0] if found else None
