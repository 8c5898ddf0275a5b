"""The declared route table: what each path means, who may use it, and how its errors look.

Every route names its protocol, its root (the first path segment it owns), a pattern for the
whole path, its handlers by method, which of those methods write, whether it is public, its error
renderer, and sample paths. Routing does not depend on order: a path is tried against the routes
of its first segment, and only a route declared ``fallback`` (Bazel's optional instance name)
takes paths whose first segment no other route owns, so no two patterns can match one path
(``tests/test_routes.py`` tries every sample against every pattern). A namespace prefix before
every protocol's root can later be added in :meth:`Router.match` alone.
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
    root: str  # the first path segment the route owns ("v8", "kv"); "" for the fallback route
    pattern: str  # a regular expression for the whole path, with named groups for the handlers
    handlers: Mapping[str, Handler]
    writes: frozenset[str] = frozenset()
    reads: frozenset[str] = SAFE
    public: bool = False
    render: Renderer = render_json_error
    samples: tuple[str, ...] = ()  # paths the route must own, for the overlap test
    fallback: bool = False
    read_body_limit: int = 0  # bytes a read may send (0: the application's default)
    # A page for people: a 401 also offers basic authentication (RFC 7617), so a browser asks for the token.
    browser: bool = False
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
        self._by_root: dict[str, list[Route]] = {}
        self._fallback: list[Route] = []
        for route in self.routes:
            if route.fallback:
                self._fallback.append(route)
            else:
                self._by_root.setdefault(route.root, []).append(route)
        # The fallback's own pattern refuses every owned root too, so no two patterns overlap
        # even when tried outside the router.
        owned = "|".join(re.escape(root) for root in sorted(self._by_root))
        for route in self._fallback:
            object.__setattr__(route, "regex", re.compile(rf"(?!/(?:{owned})(?:/|$)){route.pattern}"))

    def match(self, path: str) -> tuple[Route, dict] | None:
        """The route owning ``path`` and its parameters, or None."""
        root = path[1:].partition("/")[0] if path.startswith("/") else None
        if root is None:
            return None
        candidates = self._by_root.get(root, self._fallback)
        found = [(route, m) for route in candidates if (m := route.regex.fullmatch(path)) is not None]
        if not found:
            return None
        if len(found) > 1:  # the declared patterns overlap: a bug, never resolved by order
            raise HTTPError(500, "internal_error", "Two routes claim this path.")
        route, m = found[0]
        return route, m.groupdict()

    def owner(self, path: str) -> Route | None:
        """The route a path belongs to, for the error shape of a refusal; None for unknown paths."""
        try:
            found = self.match(path)
        except HTTPError:
            return None
        return found[0] if found else None
