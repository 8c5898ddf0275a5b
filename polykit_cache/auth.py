"""Access control: tokens with a role each, or an open server when none are set.

A token is sent as a bearer token (RFC 6750), or as the password of HTTP basic authentication
(RFC 7617) under any user name, for clients that know no other scheme (Gradle, URLs with
``user:password@``, browsers).

Tokens are compared in constant time (``hmac.compare_digest`` against every token, with no early
exit), and never written to a log or an error message. A client sends the same ``Authorization``
value with every request, so each worker keeps the role found for a value (see
:meth:`Access.role`): the comparison is made once per distinct value, not once per request.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import logging
import threading
from pathlib import Path
from typing import Mapping

log = logging.getLogger("polykit_cache.auth")

ROLES = ("read", "read-write")
ENV_TOKENS = "POLYKIT_CACHE_TOKENS"


class TokenError(ValueError):
    """A token file or variable that cannot be used; the message never contains a token."""


def parse_tokens(text: str, source: str, commas: bool = False) -> list[tuple[str, bytes]]:
    """``role token`` per line, ``#`` comments; returns (role, token) pairs.

    A ``#`` starts a comment only at the start of a word, so it may appear inside a token;
    commas separate entries only in the environment variable, where lines are awkward.
    An error names the line by its number only: any word of a line that fails to parse may be
    a token (``<token> read-write`` is an easy slip), so none is ever quoted.
    """
    entries: list[tuple[str, bytes]] = []
    lines = text.replace(",", "\n").splitlines() if commas else text.splitlines()
    for number, raw in enumerate(lines, 1):
        words = []
        for word in raw.split():
            if word.startswith("#"):
                break
            words.append(word)
        if not words:
            continue
        if len(words) != 2:
            raise TokenError(f"{source} line {number}: expected 'role token' (two words)")
        role, token = words
        if role not in ROLES:
            raise TokenError(f"{source} line {number}: the first word must be a role, read or read-write")
        if len(token) < 8:
            raise TokenError(f"{source} line {number}: a token must be at least 8 characters long")
        entries.append((role, token.encode()))
    return entries


# A header longer than this holds no token of ours (tokens are short words); it is not decoded.
MAX_CREDENTIALS = 4096
# Roles kept per worker process, by Authorization value (see Access.role): a few per client
# (basic authentication may name any user), far more than a cache's clients send at once.
KEPT_ROLES = 256


def token_of(header: str | None) -> bytes | None:
    """The token an Authorization header carries: a bearer token, or basic authentication's password.

    RFC 7617 section 2: basic credentials are base64 of ``user-id ":" password``; the user id
    cannot hold a colon, so the password is everything after the first one. Any user name is
    accepted: the token alone decides.
    """
    if not header or len(header) > MAX_CREDENTIALS:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if not value:
        return None
    if scheme.lower() == "bearer":
        return value.encode("utf-8", "surrogateescape")
    if scheme.lower() == "basic":
        try:
            decoded = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError):
            return None
        user, colon, password = decoded.partition(b":")
        return password if colon and password else None
    return None


class Access:
    """Decides who may read and write; reloadable from its token file."""

    def __init__(self, token_file: Path | None, environ: Mapping[str, str], allow_anonymous_read: bool) -> None:
        self.token_file = token_file
        self._env_text = environ.get(ENV_TOKENS, "")
        self.allow_anonymous_read = allow_anonymous_read
        self._lock = threading.Lock()
        # The tokens in force, and the roles kept for Authorization values (by their SHA-256)
        # among them: one pair, replaced whole by reload(), so a kept role never outlives its token.
        self._state: tuple[list[tuple[str, bytes]], dict[bytes, str]] = (self._load(), {})

    def _load(self) -> list[tuple[str, bytes]]:
        entries: list[tuple[str, bytes]] = []
        if self.token_file is not None:
            try:
                text = self.token_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenError(f"cannot read token file {self.token_file}: {exc.__class__.__name__}") from None
            entries += parse_tokens(text, str(self.token_file))
        if self._env_text.strip():
            entries += parse_tokens(self._env_text, ENV_TOKENS, commas=True)
        if not entries and (self.token_file is not None or self._env_text.strip()):
            # Tokens were asked for: an empty list must never turn into an open server.
            raise TokenError(f"{self.token_file or ENV_TOKENS} holds no tokens")
        return entries

    def reload(self) -> None:
        """Reread the token file (on SIGHUP); a broken file keeps the tokens already in force."""
        try:
            entries = self._load()
        except TokenError as exc:
            log.error("tokens not reloaded: %s", exc)
            return
        with self._lock:
            self._state = (entries, {})
        log.info("reloaded %d access tokens", len(entries))

    @property
    def _entries(self) -> list[tuple[str, bytes]]:
        return self._state[0]

    @property
    def open(self) -> bool:
        return not self._state[0]

    def describe(self) -> str:
        if self.open:
            return "no access tokens are configured: anyone who can reach this address can read and write"
        counts = {role: sum(1 for r, _ in self._entries if r == role) for role in ROLES}
        anon = "; anonymous reads allowed" if self.allow_anonymous_read else ""
        return f"access tokens: {counts['read']} read, {counts['read-write']} read-write{anon}"

    def role(self, header: str | None) -> str | None:
        """The role of the token in an Authorization header (bearer, or basic's password), or None.

        The role found for a header is kept under the SHA-256 of the header, so a repeated value
        is answered by one dictionary lookup. The lookup reveals nothing about a token: its time
        depends on the digest of the value sent, which an attacker can choose but cannot bring
        near a valid value's digest without knowing that value. Only valid values are kept, at most
        KEPT_ROLES (all dropped at the bound), so invalid ones cannot push the valid out, and the
        kept roles are replaced with the tokens themselves on reload (SIGHUP).
        """
        if not header or len(header) > MAX_CREDENTIALS:
            return None
        entries, kept = self._state  # one read: the kept roles belong to these tokens (reload() replaces both)
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest()
        found = kept.get(digest)
        if found is not None:
            return found
        given = token_of(header)
        if not given:
            return None
        for role, known in entries:  # every entry is compared: the time does not tell which matched
            if hmac.compare_digest(given, known) and found is None:
                found = role
        if found is not None:
            with self._lock:
                if kept is self._state[1]:  # not if a reload replaced the tokens meanwhile
                    if len(kept) >= KEPT_ROLES:
                        kept.clear()
                    kept[digest] = found
        return found

    def check(self, header: str | None, write: bool) -> tuple[int, str, str] | None:
        """None when allowed, else (status, error word, message) for a 401 or 403."""
        if self.open:
            return None
        role = self.role(header)
        if role is None:
            if not write and self.allow_anonymous_read and not header:
                return None
            if header:
                return 401, "unauthorized", "The token is not valid for this cache."
            if write and self.allow_anonymous_read:
                return 401, "unauthorized", "Anyone may read this cache; uploading needs a read-write token."
            return 401, "unauthorized", "This cache needs a token: Authorization: Bearer <token>, or basic authentication with the token as password."
        if write and role != "read-write":
            return 403, "forbidden", "This token may only read; uploading needs a read-write token."
        return None
