"""Helpers shared by the tests: artifacts built by hand, WSGI calls, and real servers."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import zstandard

from polykit_cache.app import make_app
from polykit_cache.auth import Access
from polykit_cache.config import Config
from polykit_cache.server import Server
from polykit_cache.storage import Storage
from polykit_client import artifact

KEY = "ab" * 32
OTHER_KEY = "cd" * 32
ROOT = Path(__file__).resolve().parent.parent


def key_for(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def zst(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- artifacts --------------------------------------------------------------------------------


def pack_tree(tmp: Path, files: dict[str, bytes], key: str = KEY, log: bytes = b"built\n",
              meta: dict | None = None) -> bytes:
    """A real artifact of the given files, made by the project's own packer (``meta``: manifest fields)."""
    root = tmp / f"src-{key[:8]}-{len(files)}"
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    buf = io.BytesIO()
    artifact.pack(buf, root, sorted(files), {"package": "web", "task": "build", **(meta or {})}, log=log, cache_key=key)
    return buf.getvalue()


def member(name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
           linkname: str = "", size: int | None = None) -> dict:
    return {"name": name, "data": data, "kind": kind, "mode": mode, "linkname": linkname, "size": size}


def raw_tar(members: list[dict]) -> bytes:
    """A tar archive written member by member, with no checks: for building bad artifacts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m["name"])
            info.type = m["kind"]
            info.mode = m["mode"]
            info.linkname = m["linkname"]
            data = m["data"]
            info.size = len(data) if m["size"] is None else m["size"]
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def manifest(files: dict[str, bytes], *, key: str = KEY, symlinks: dict | None = None,
             dirs: tuple[str, ...] = (), log: bytes = b"") -> dict:
    listing: dict = {p: {"sha256": sha(d), "size": len(d), "mode": 0o644} for p, d in files.items()}
    listing.update({d: {"type": "dir", "mode": 0o755} for d in dirs})
    return {
        "format": 1, "cache_key": key, "package": "web", "task": "build", "command": "make",
        "created_at": 0, "duration_ms": 1, "exit_code": 0,
        "files": listing, "symlinks": symlinks or {},
        "logs": {"output.log": {"sha256": sha(log), "size": len(log)}},
    }


def craft(files: dict[str, bytes], *, key: str = KEY, meta: dict | None = None, extra: list[dict] = (),
          symlinks: dict | None = None, log: bytes = b"", drop: tuple[str, ...] = ()) -> bytes:
    """A zstd artifact whose members follow ``files``; ``meta``/``extra``/``drop`` make it wrong."""
    meta = manifest(files, key=key, symlinks=symlinks, log=log) if meta is None else meta
    blob = json.dumps(meta).encode()
    members = [member("polykit-artifact.json", blob)]
    members += [member("outputs/" + p, d) for p, d in sorted(files.items())]
    members += [member("outputs/" + p, kind=tarfile.SYMTYPE, linkname=t, mode=0o777) for p, t in (symlinks or {}).items()]
    members.append(member("logs/output.log", log))
    members = [m for m in members if m["name"] not in drop] + list(extra)
    return zst(raw_tar(members))


def header(name: str, size: int = 0, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, linkname: str = "",
           fmt: int = tarfile.USTAR_FORMAT, **fields) -> bytes:
    """One raw tar header; ``fields`` set other TarInfo attributes (mtime, uname, ...)."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.linkname, info.mtime = kind, size, mode, linkname, 0
    for attr, value in fields.items():
        setattr(info, attr, value)
    return info.tobuf(format=fmt, encoding="utf-8", errors="surrogateescape")


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def pax_header(records: dict[str, bytes], kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A PAX extended header (POSIX.1-2001) carrying exactly ``records``."""
    body = b""
    for key, value in records.items():
        tail = b" " + key.encode() + b"=" + value + b"\n"
        length = len(tail) + len(str(len(tail)))
        length = len(tail) + len(str(length))
        body += str(length).encode() + tail
    return header("././@PaxHeader", len(body), kind=kind) + padded(body)


def tar_member(name: str, data: bytes = b"", mode: int = 0o644) -> bytes:
    return header(name, len(data), mode=mode) + padded(data)


TAR_END = b"\0" * 1024


# --- WSGI -------------------------------------------------------------------------------------


class Reply:
    def __init__(self, status: str, headers: list, body: bytes) -> None:
        self.status = int(status.split()[0])
        self.reason = status.partition(" ")[2]
        self.headers = {k.lower(): v for k, v in headers}
        self.header_lines = [(k.lower(), v) for k, v in headers]  # repeated headers included
        self.body = body

    def all(self, name: str) -> list[str]:
        """Every value of a header that may be repeated (WWW-Authenticate)."""
        return [v for k, v in self.header_lines if k == name.lower()]

    def json(self) -> dict:
        return json.loads(self.body)


class ExplodingInput:
    """A request body that must never be read (for limits refused from the headers alone)."""

    def read(self, *args):
        raise AssertionError("the body was read")

    readline = read
    readlines = read

    def __iter__(self):
        raise AssertionError("the body was read")


def make_environ(method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                 body_stream=None) -> dict:
    """The WSGI environ of one request (``path`` may carry a query string)."""
    path, _, query = path.partition("?")
    environ: dict = {"REQUEST_METHOD": method, "PATH_INFO": path, "SCRIPT_NAME": "", "QUERY_STRING": query}
    setup_testing_defaults(environ)
    environ["wsgi.input"] = body_stream if body_stream is not None else io.BytesIO(body or b"")
    if body is not None:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        if name.lower() == "content-length":
            environ["CONTENT_LENGTH"] = value
        else:
            environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call(app, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         body_stream=None, extra: dict | None = None) -> Reply:
    """One request through the WSGI app, checked by wsgiref's validator; no socket.

    ``extra`` is added to the environ (e.g. a refusal the server layer decided before the body)."""
    environ = make_environ(method, path, body, headers, body_stream)
    environ.update(extra or {})
    captured: dict = {}

    def start_response(status, response_headers, exc_info=None):
        captured["status"], captured["headers"] = status, response_headers
        return lambda data: None

    checked = validator(app) if body_stream is None else app
    result = checked(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return Reply(captured["status"], captured["headers"], data)


def new_app(storage_dir: Path, storage_options: dict | None = None, **settings):
    """The WSGI app on a recovered disk store; ``storage_options``: more arguments of :class:`Storage`."""
    config = Config(storage_dir=storage_dir, **settings)
    storage = Storage(storage_dir, config.max_storage, **(storage_options or {}))
    storage.recover()
    return make_app(config, storage, access=Access(config.token_file, {}, config.allow_anonymous_read))


# --- real servers -----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on (for a server that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(storage_dir: Path, drain_seconds: float | None = None, storage_options: dict | None = None,
                   **settings):
    """The real waitress server on a free loopback port, running in a thread of this process:
    yields the Server and the thread serving it (which ends once the server has drained).
    ``storage_options``: more arguments of :class:`Storage`."""
    config = Config(storage_dir=storage_dir, port=0, **settings)
    server = Server(new_app(storage_dir, storage_options, **settings), config,
                    **({} if drain_seconds is None else {"drain_seconds": drain_seconds}))
    thread = threading.Thread(target=server.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        yield server, thread
    finally:
        server.close()
        thread.join(30)


@contextmanager
def thread_server(storage_dir: Path, **settings):
    """The real waitress server on a free loopback port, in this process: yields its port and app."""
    with running_server(storage_dir, **settings) as (server, _):
        yield server.port, server.app


class ServerProcess:
    """``python -m polykit_cache`` as a child process; its log goes to a file (pipes can fill)."""

    def __init__(self, storage_dir: Path, log_path: Path, *args: str, env: dict | None = None) -> None:
        """``env`` is added to this process's environment for the server."""
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polykit_cache", "--port", "0", "--storage-dir", str(storage_dir), *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            found = re.findall(r"serving on http://127\.0\.0\.1:(\d+)", text)
            if found:
                return int(found[-1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{text}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("server did not start in 20 s")

    def peak_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60):
    """One request over a real socket; returns (status, headers dict, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def race_uploads(port: int, path: str, bodies: list[bytes]) -> list[int | None]:
    """PUT each body to one path at once (threads released together); the statuses, in order."""
    barrier = threading.Barrier(len(bodies))
    statuses: list[int | None] = [None] * len(bodies)

    def upload(i: int) -> None:
        barrier.wait()
        statuses[i] = request(port, "PUT", path, bodies[i])[0]

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


@contextmanager
def serve_handler(handler_class, **attributes):
    """A stdlib HTTP server on a free loopback port, for imitating a broken or lying cache server."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    server.daemon_threads = True
    for name, value in attributes.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class RawServer:
    """What ``serve_raw`` yields: its port, and the request heads it received, in order."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.heads: list[bytes] = []


@contextmanager
def serve_raw(answer):
    """A bare TCP server on a free loopback port, for answers no HTTP library would send.

    Each connection's request head is read (up to 64 KiB) and kept in ``heads``; then ``answer``
    is sent, either bytes, or a function of the socket and the head that writes what it likes,
    and the connection is closed. Client-side resets are ignored.
    """
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    server = RawServer(listener.getsockname()[1])
    stop = threading.Event()

    def serve(conn) -> None:
        with conn:
            conn.settimeout(10)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                server.heads.append(head)
                if callable(answer):
                    answer(conn, head)
                else:
                    conn.sendall(answer)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)
        listener.close()
