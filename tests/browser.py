"""Headless Chromium for the status page tests, driven over the DevTools protocol on a pipe.

Chromium is Debian's ``chromium`` (CI installs it); tests that need it are skipped without it.
The protocol runs over ``--remote-debugging-pipe`` (JSON messages ending in a NUL byte on file
descriptors 3 and 4), so the standard library is enough: no websocket client. The page's own
requests are read from the Network domain's events (the browser's background traffic is not the
page's), and that traffic is sent to a proxy on 127.0.0.1 that answers 404, so a test run never
reaches the internet.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--no-pings", "--remote-debugging-pipe",
)
# Seconds the protocol may take for one answer or event; a bound so a stuck browser fails the test.
WAIT = 60.0


def chromium_binary() -> str:
    """The browser's path; skips the test where none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not installed (CI installs Debian's chromium)")


class BlackholeProxy:
    """A proxy on a loopback port that answers 404 to everything: the browser's traffic stays here."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            with conn:
                try:
                    conn.settimeout(2)
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@dataclass
class Visit:
    """What one page load gave: the DOM, the URLs the page requested, and a PNG screenshot."""

    html: str
    requests: list[str] = field(default_factory=list)
    png: bytes = b""


def _high(fd: int) -> int:
    """The same pipe end at a number above the ones the child will use (3 and 4)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium, its own profile in ``folder``; close() ends it."""

    def __init__(self, folder: Path) -> None:
        self._proxy = BlackholeProxy()
        to_child_r, to_child_w = map(_high, os.pipe())
        from_child_r, from_child_w = map(_high, os.pipe())

        def wire() -> None:  # in the child: fd 3 reads commands, fd 4 writes answers
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self._proc = subprocess.Popen(
            [chromium_binary(), *FLAGS, f"--user-data-dir={folder / 'profile'}",
             f"--proxy-server=http://127.0.0.1:{self._proxy.port}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(folder / "chromium.log", "wb"),
            preexec_fn=wire, pass_fds=(3, 4), cwd=folder)
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = os.fdopen(to_child_w, "wb")
        self._in = os.fdopen(from_child_r, "rb")
        self._buffer = b""
        self._next = 0
        self._events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._on_fetch = None

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self._proc.wait(20)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._out.close()
        self._in.close()
        self._proxy.close()

    # --- the protocol --------------------------------------------------------------------------

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._in.fileno()], [], [], WAIT)
            if not ready:
                raise TimeoutError("the browser sent nothing")
            chunk = os.read(self._in.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        """One command; events that arrive meanwhile are dispatched (a paused request is answered at once)."""
        self._next += 1
        ident = self._next
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        self._out.flush()
        deadline = time.monotonic() + WAIT
        while ident not in self._replies:
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            self._receive()
        reply = self._replies.pop(ident)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _receive(self) -> None:
        message = self._read()
        if "id" in message:
            self._replies[message["id"]] = message
        elif message.get("method", "").startswith("Fetch.") and self._on_fetch is not None:
            self._on_fetch(message)
        else:
            self._events.append(message)

    def visit(self, url: str, *, width: int = 1280, height: int = 900, credentials: tuple[str, str] | None = None,
              full_page: bool = True) -> Visit:
        """Load ``url`` in a new tab; answer a basic-authentication challenge with ``credentials``."""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Network.enable", session)
        self.send("Page.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
                  mobile=width < 600)

        def on_fetch(event: dict) -> None:
            params = event["params"]
            if event["method"] == "Fetch.requestPaused":
                self.send("Fetch.continueRequest", event["sessionId"], requestId=params["requestId"])
            elif event["method"] == "Fetch.authRequired":
                user, password = credentials
                self.send("Fetch.continueWithAuth", event["sessionId"], requestId=params["requestId"],
                          authChallengeResponse={"response": "ProvideCredentials", "username": user,
                                                 "password": password})

        if credentials:
            self._on_fetch = on_fetch
            self.send("Fetch.enable", session, handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        self._events = []
        try:
            self.send("Page.navigate", session, url=url)
            deadline = time.monotonic() + WAIT
            while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                          for e in self._events):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not load")
                self._receive()
            requests = [e["params"]["request"]["url"] for e in self._events
                        if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session]
            root = self.send("DOM.getDocument", session, depth=-1)["root"]["nodeId"]
            html = self.send("DOM.getOuterHTML", session, nodeId=root)["outerHTML"]
            if full_page:
                size = self.send("Page.getLayoutMetrics", session)["cssContentSize"]
                self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=int(size["height"]) + 1,
                          deviceScaleFactor=1, mobile=width < 600)
            png = base64.b64decode(self.send("Page.captureScreenshot", session, format="png")["data"])
        finally:
            self._on_fetch = None
        self.send("Target.closeTarget", targetId=target)
        return Visit(html, requests, png)


@contextmanager
def browser(folder: Path):
    """A headless Chromium for the duration of the block."""
    chromium_binary()
    folder.mkdir(parents=True, exist_ok=True)
    instance = Browser(folder)
    try:
        yield instance
    finally:
        instance.close()


class Figures(HTMLParser):
    """Every ``data-figure`` of a document: its path in /v1/stats, its raw value and its text."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self._open: list[tuple[str, str, str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-figure" in attrs:
            self._open.append((tag, attrs["data-figure"], attrs.get("data-value", ""), []))

    def handle_data(self, data):
        for entry in self._open:
            entry[3].append(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, path, value, text = self._open.pop()
            self.found.append((path, value, "".join(text)))


def figures(html: str) -> list[tuple[str, str, str]]:
    parser = Figures()
    parser.feed(html)
    return parser.found
