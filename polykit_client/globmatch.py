"""Matching paths against glob patterns in time linear in the path, whatever the pattern.

A glob translated into a Python regular expression backtracks: ``**/a/**/a/**/a/**/b`` against a
path of many ``a/`` folders tries every way of sharing the folders among the ``**``, a power of
the path's length, and ``*a*a*a*b`` does the same within one name. Here the patterns are
compiled to one nondeterministic automaton (Thompson's construction: each state remembers only
where in which pattern it is) and a path is read once, character by character, through the set of
states it can be in. Each set met is kept as a state of a deterministic automaton, with its
transitions, so a path costs one dictionary lookup per character once the sets it meets are
known (the lazy DFA of RE2 and grep). The sets kept are bounded by ``MAX_STATES``: past that they
are dropped and built again, so a pattern whose deterministic form would be huge costs time
proportional to the number of patterns' states per character, never memory without bound.

The tokens are those of :func:`polykit_client.globs.tokens`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

# Deterministic states kept per matcher before they are dropped and built again.
MAX_STATES = 4096

Test = Callable[[str], bool]


def _in_name(c: str) -> bool:
    return c != "/"


def _anything(c: str) -> bool:
    return True


class _Program:
    """The nondeterministic automaton: per state, what character it reads (if any), where that
    leads, and the states it stands for without reading (epsilon moves)."""

    def __init__(self) -> None:
        self.test: list[Test | None] = []
        self.target: list[int] = []
        self.free: list[list[int]] = []
        self.final: set[int] = set()

    def add(self, test: Test | None = None, target: int | None = None) -> int:
        self.test.append(test)
        self.target.append(len(self.test) if target is None else target)
        self.free.append([])
        return len(self.test) - 1

    def emit(self, tokens: Sequence[tuple]) -> None:
        """Append states that read ``tokens`` in sequence; the last one leads to the next state added."""
        for token in tokens:
            kind = token[0]
            if kind == "char":
                self.add(token[1].__eq__)
            elif kind == "one":  # "?": one character of a name
                self.add(_in_name)
            elif kind == "class":  # "[...]": one character of a name, in (or not in) the class
                regex = re.compile(token[1])
                self.add(lambda c, match=regex.fullmatch: c != "/" and match(c) is not None)
            elif kind == "star":  # "*": any characters of a name
                here = self.add(_in_name, len(self.test))
                self.target[here] = here
                self.free[here].append(here + 1)
            elif kind == "any":  # a final "**": anything, folders included
                here = self.add(_anything, len(self.test))
                self.target[here] = here
                self.free[here].append(here + 1)
            elif kind == "folders":  # "**/": nothing, or anything that ends with "/"
                entry = self.add()
                loop = self.add(_anything)
                self.target[loop] = loop
                slash = self.add("/".__eq__)
                self.free[entry] += [loop, slash + 1]
                self.free[loop].append(slash)
            elif kind == "either":  # "{a,b}": one of the spellings
                entry = self.add()
                ends = []
                for option in token[1]:
                    self.free[entry].append(len(self.test))
                    self.emit(option)
                    ends.append(self.add())  # a state that only moves on, patched below
                for end in ends:
                    self.free[end].append(len(self.test))
            else:  # pragma: no cover - tokens() makes only the kinds above
                raise ValueError(f"unknown glob token {kind!r}")

    def pattern(self, tokens: Sequence[tuple]) -> int:
        """Add one whole pattern; returns its first state."""
        start = len(self.test)
        self.emit(tokens)
        self.final.add(self.add())  # reading nothing more, the pattern has matched
        return start


class Matcher:
    """Whether a path (or, with ``folders``, one of the folders above it) matches any of the patterns."""

    def __init__(self, patterns: Iterable[Sequence[tuple]]) -> None:
        program = _Program()
        starts = [program.pattern(tokens) for tokens in patterns]
        # A final state reads nothing and leads nowhere.
        for final in program.final:
            program.free[final] = []
        self._program = program
        self._start_set = self._closure(starts)
        self._reset()

    def _reset(self) -> None:
        self._sets: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._moves: list[dict[str, int]] = []
        self._accepts: list[bool] = []
        self._start = self._state(self._start_set)
        self._dead = self._state(frozenset())

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        free = self._program.free
        seen: set[int] = set()
        stack = list(states)
        while stack:
            state = stack.pop()
            if state not in seen:
                seen.add(state)
                stack.extend(free[state])
        return frozenset(seen)

    def _state(self, states: frozenset[int]) -> int:
        found = self._ids.get(states)
        if found is None:
            found = self._ids[states] = len(self._sets)
            self._sets.append(states)
            self._moves.append({})
            self._accepts.append(not self._program.final.isdisjoint(states))
        return found

    def _move(self, state: int, c: str) -> int:
        """The deterministic state after reading ``c`` (built now: work bounded by the patterns' size)."""
        test, target = self._program.test, self._program.target
        reached = self._closure(target[s] for s in self._sets[state] if test[s] is not None and test[s](c))
        if len(self._sets) >= MAX_STATES:
            self._reset()
            state = self._state(reached)
            return state
        following = self._state(reached)
        self._moves[state][c] = following
        return following

    def matches(self, path: str, folders: bool = False) -> bool:
        """``path`` matches; with ``folders``, or one of the folders above it does (a folder pattern covers its contents)."""
        state, dead = self._start, self._dead
        moves, accepts = self._moves, self._accepts
        for c in path:
            if folders and c == "/" and accepts[state]:
                return True
            following = moves[state].get(c)
            if following is None:
                following = self._move(state, c)
                if moves is not self._moves:  # the kept states were dropped and built again
                    moves, accepts, dead = self._moves, self._accepts, self._dead
            if following == dead:
                return False
            state = following
        return accepts[state]
