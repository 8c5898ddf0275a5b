"""The waitress connection layer: requests judged on their head, bounded connections, every answer seen.

waitress reads and spools a whole request body before it calls the application, and answers
some requests itself (an over-limit ``Content-Length``, a malformed head, a full spool disk). The
pieces here hook in where a request's head is complete:

- :class:`HeadParser` asks the application's ``admit`` callable about the head. A refusal
  (no route, no valid token, over the size limit) is answered at once: no ``100 Continue`` is
  sent first (RFC 9110 section 10.1.1) and no byte of the body is spooled.
- An admitted upload whose body waitress would spool to a file (over ``inbuf_overflow``, with a
  ``Content-Length``) is written by :class:`StagedBuffer` into the file the application's
  ``spool`` callable gives (the store's temporary, on the storage's filesystem), hashed on the
  way in: the handler verifies it there and links it, so a big body is written once, not spooled
  to ``TMPDIR`` and copied. It is discarded when the request ends any other way.
- :class:`EarlyAnswerTask` renders those refusals, and every error waitress finds itself, through
  the application under ``REFUSED``: the protocol's own error shape, metrics and the access log.
- :class:`Channel` reads and drops what a refused client still sends for a bounded while
  before it closes ("lingering close", as nginx does), so the client reads the answer instead of a
  connection reset; it also gives a request's head a deadline.
- :class:`Listener` never stops accepting: at the connection limit it closes the connection that
  has been idle longest, so a flood of idle or half-sent connections cannot lock anyone out.
  When the server stops it drains: idle connections close at once, busy ones after their
  answer, which :class:`Task` sends with ``Connection: close``.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import time
from typing import Callable

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser, ParsingError, crack_first_line
from waitress.receiver import FixedStreamReceiver
from waitress.server import TcpWSGIServer
from waitress.task import WSGITask
from waitress.utilities import Error, RequestEntityTooLarge

from .app import ADMITTED_WRITE, REFUSED, SPOOLED
from .http import HTTPError
from .store import Staged, StorageFull

log = logging.getLogger("polykit_cache.server")

Admit = Callable[[dict], "HTTPError | None"]
Spool = Callable[[dict], "Staged | None"]

# A request's head (request line and headers) must arrive within this many seconds of its first
# byte; clients send it in one go, a slowloris one byte at a time.
HEAD_TIMEOUT = 20.0
# After an answer given before the body, what the client still sends is read and dropped (never
# stored) until the declared body has come, LINGER_BYTES have, the client pauses for LINGER_IDLE
# seconds or LINGER_SECONDS have passed; then the connection is closed.
LINGER_BYTES = 64 << 20
LINGER_IDLE = 2.0
LINGER_SECONDS = 30.0

_WORDS = {400: "bad_request", 413: "too_large", 431: "headers_too_large", 501: "not_implemented", 500: "internal_error"}


def waitress_error(error: Error, body_limit: int) -> HTTPError:
    """One of waitress's own error answers as the application's error."""
    if isinstance(error, RequestEntityTooLarge):
        limit = body_limit - 1  # waitress refuses at >= its setting, one above the artifact limit
        return HTTPError(413, "too_large", f"The request body is over the artifact size limit of {limit} bytes.", limit=limit)
    if error.code == 500:
        return HTTPError(500, "internal_error", "The server failed to answer; see its log.")
    return HTTPError(error.code, _WORDS.get(error.code, "bad_request"), f"{error.reason}: {error.body}")


def spool_error(exc: OSError | StorageFull) -> HTTPError:
    """A failure to spool a request body: a full disk is the spec's 507, anything else a 500."""
    if isinstance(exc, StorageFull) or exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HTTPError(507, "storage_full", "The server's disk is full; the upload was not stored.")
    log.error("cannot spool a request body: %s", exc)
    return HTTPError(500, "internal_error", "The server could not receive the body; see its log.")


class StagedBuffer:
    """waitress's body buffer (the part of its ``OverflowableBuffer`` interface a fixed-length
    body uses) over a store's staged upload: each piece received is written and hashed at once."""

    def __init__(self, staged: Staged) -> None:
        self.staged = staged

    def __len__(self) -> int:
        return self.staged.size

    def __bool__(self) -> bool:
        return True

    def append(self, data: bytes) -> None:
        self.staged.write(data)  # StorageFull or OSError: HeadParser.received answers it

    def getfile(self):
        """The body from its start (``wsgi.input``)."""
        return self.staged.reader()

    def close(self) -> None:
        self.staged.discard()  # once committed, there is nothing left to remove


class HeadParser(HTTPRequestParser):
    """waitress's parser, asking the channel about each request as soon as its head is complete."""

    # Defaults for a head too broken to name its method or path (waitress's 400s).
    command = "-"
    path = "/"
    query = ""
    request_uri = "/"
    url_scheme = "http"
    proxy_scheme = proxy_netloc = fragment = ""
    # After an early answer: bytes of body still to read and drop before closing (0: close at
    # once), or None when the request has no body and the connection may serve the next one.
    linger: int | None = 0
    # An admitted write (its token checked): its body is an upload, kept at the connection limit.
    upload = False
    # The environ admitted at the head of a read without a body, which its task reuses (see
    # Channel.admit_head); None otherwise.
    head_environ: dict | None = None
    # The store's staged upload the body is written into (see StagedBuffer), or None.
    spool: Staged | None = None

    def __init__(self, adj, channel: "Channel") -> None:
        super().__init__(adj)
        self.channel = channel
        self.started = time.time()
        channel.head_pending = True  # the head's deadline is watched until it is complete

    def received(self, data: bytes) -> int:
        consumed = self._received(data)
        if self.headers_finished or self.completed:
            self.channel.head_pending = False
        return consumed

    def _received(self, data: bytes) -> int:
        in_head = not self.headers_finished and not self.completed
        head_so_far = self.header_plus if in_head else b""
        try:
            consumed = super().received(data)
        except (OSError, StorageFull) as exc:  # the spool file could not be written (ENOSPC: a full disk)
            return self._answer_early(spool_error(exc), data, 0, body_left=self._body_left())
        if not in_head:
            # waitress's errors in the body (bad chunking, over the limit) close the connection:
            # the rest of this read is never parsed as another request.
            return len(data) if self.error is not None else consumed
        if not self.completed and not self.headers_finished or self.empty:
            return consumed  # the head goes on, or it was only blank lines (nothing to answer)
        if self.headers_finished and (self.error is None or isinstance(self.error, RequestEntityTooLarge)):
            refusal = self.channel.admit_head(self)
            if refusal is not None:
                return self._answer_early(refusal, data, consumed, body_left=self._declared_body())
            if self.error is not None:
                return self._answer_early(self.error, data, consumed, body_left=self._declared_body())
        elif self.error is not None:
            # The head as received, whichever read waitress gave up in: the answer's version must
            # not depend on how TCP cut the head into reads.
            self._name_first_line(head_so_far + data)
            return self._answer_early(self.error, data, consumed, body_left=None)
        return consumed

    def parse_header(self, header_plus: bytes) -> None:
        try:
            super().parse_header(header_plus)
        except (ParsingError, ValueError):
            self.header_plus = header_plus
            raise

    def _declared_body(self) -> int | None:
        """Bytes of body the head announces (LINGER_BYTES when chunked); None for no body at all."""
        if self.chunked:
            return LINGER_BYTES
        return self.content_length or None

    def _body_left(self) -> int:
        if self.chunked:
            return LINGER_BYTES
        return max(self.content_length - self.body_bytes_received, 0)

    def _name_first_line(self, head: bytes) -> None:
        """Method, path and version of a head waitress refused, for the answer and the log, where readable."""
        line = bytes(head).lstrip().split(b"\r\n", 1)[0]
        try:
            method, uri, version = crack_first_line(line)
        except ParsingError:
            return
        if method and uri.startswith(b"/"):
            self.command = method.decode("latin-1")
            self.path = uri.split(b"?", 1)[0].decode("latin-1")
        if version in (b"1.0", b"1.1"):
            self.version = version.decode()

    def _answer_early(self, error: Exception, data: bytes, consumed: int, body_left: int | None) -> int:
        """Stop reading this request: answer ``error`` now and drop the body instead of spooling it."""
        self.error = error
        self.completed = True
        self.expect_continue = False  # never invite a body that is refused
        self.spool = None
        if self.body_rcv is not None:
            try:
                self.body_rcv.getbuf().close()  # frees the spool file (even when its flush fails)
            except OSError:
                pass
            self.body_rcv = None
        if body_left is None:
            if isinstance(error, HTTPError):
                self.linger = None  # no body: what follows is the next request (keep-alive)
                return consumed
            return len(data)  # a head waitress could not frame: answer and close
        # The rest of this read belongs to the body: dropped, and counted against what may linger.
        self.linger = max(min(body_left, LINGER_BYTES) - (len(data) - consumed), 0)
        return len(data)


class Task(WSGITask):
    """waitress's task, closing the connection after its answer when the server is stopping."""

    def get_environment(self) -> dict:
        if self.environ is None and self.request.head_environ is not None:
            self.environ = self.request.head_environ  # built and admitted at the head: no body came since
        environ = super().get_environment()
        if self.request.spool is not None:
            environ[SPOOLED] = self.request.spool
        return environ

    def build_response_header(self) -> bytes:
        if self.channel.draining:
            self.set_close_on_finish()  # "Connection: close" (RFC 9112 section 9.6): no next request
        return super().build_response_header()


class EarlyAnswerTask(Task):
    """Answers a request judged before its body (or broken) through the application, under REFUSED."""

    def get_environment(self) -> dict:
        environ = super().get_environment()
        environ["wsgi.input"] = io.BytesIO()
        error = self.request.error
        if not isinstance(error, HTTPError):
            error = waitress_error(error, self.channel.adj.max_request_body_size)
        environ[REFUSED] = error
        return environ

    def execute(self) -> None:
        if self.request.linger is not None:
            self.set_close_on_finish()  # "Connection: close": the body is not read (RFC 9112 section 9.6)
        super().execute()

    def finish(self) -> None:
        super().finish()
        linger = self.request.linger
        if linger:
            self.close_on_finish = False  # the channel closes once it has dropped what still comes
            self.channel.start_lingering(linger)


class Channel(HTTPChannel):
    """One client connection; see the module's docstring."""

    task_class = Task
    error_task_class = EarlyAnswerTask
    linger_left: int | None = None
    linger_until = 0.0
    # The server is stopping: close once no request is in progress (see Listener.drain).
    draining = False
    # A request's head has begun and is not complete (set by HeadParser): its deadline is watched.
    head_pending = False

    def parser_class(self, adj) -> HeadParser:  # waitress calls self.parser_class(self.adj)
        return HeadParser(adj, self)

    def admit_head(self, request: HeadParser) -> HTTPError | None:
        admit = self.server.admit
        if admit is None:
            return None
        try:
            environ = WSGITask(self, request).get_environment()
            if request.chunked:
                # waitress drops Transfer-Encoding from the environ (it hands the application a
                # body it has de-chunked and measured); at the head, it is all that says a body comes.
                environ["HTTP_TRANSFER_ENCODING"] = "chunked"
            refusal = admit(environ)
            request.upload = refusal is None and environ.get(ADMITTED_WRITE) is True
            if request.upload:
                self._spool_in_store(request, environ)
            elif refusal is None and not request.chunked and not request.content_length:
                # A read without a body is complete: the environ its answer needs is this one
                # (its body stream empty), admitted already.
                request.head_environ = environ
            return refusal
        except StorageFull as exc:
            return spool_error(exc)
        except Exception:  # a fault here must not take down the I/O thread, which serves everyone
            log.exception("judging the head of %s %s failed", request.command, request.path)
            return HTTPError(500, "internal_error", "The server failed to answer; see its log.")

    def _spool_in_store(self, request: HeadParser, environ: dict) -> None:
        """Have an admitted upload's body written into the store's file, where waitress would
        spool it to a file of its own: a ``Content-Length`` body over what it keeps in memory."""
        spool = self.server.spool
        if spool is None or request.chunked or request.content_length < self.adj.inbuf_overflow:
            return
        staged = spool(environ)
        if staged is None:
            return
        request.spool = staged
        request.body_rcv.getbuf().close()  # waitress's buffer, still empty: no body byte is read yet
        request.body_rcv = FixedStreamReceiver(request.content_length, StagedBuffer(staged))

    def start_lingering(self, left: int) -> None:
        self.linger_left = left
        self.linger_until = time.time() + LINGER_SECONDS

    def received(self, data: bytes) -> bool:
        if self.linger_left is not None:
            self.linger_left -= len(data)  # the refused body: read and dropped
            return True
        return super().received(data)

    def readable(self) -> bool:
        # asyncore asks every connection at each turn of the loop, several times per request:
        # the common case (no drain, no lingering, no head under way) is three attributes and
        # waitress's own test, called directly (super() costs as much again), and no clock reading.
        if not (self.draining or self.head_pending or self.linger_left is not None):
            return HTTPChannel.readable(self)
        now = time.time()
        if self.draining and self.request is None and self.linger_left is None and self.idle() and not self._input_waits():
            self.will_close = True  # writable() now, and handle_write() closes
            return False
        if self.linger_left is not None:
            if self.requests or self.total_outbufs_len:
                return False  # the answer is still going out
            if self.linger_left <= 0 or now > self.linger_until or now - self.last_activity > LINGER_IDLE:
                self.will_close = True
                return False
            return True
        request = self.request
        if request is not None and not request.headers_finished and now - request.started > HEAD_TIMEOUT:
            log.info("closing a connection from %s: no complete request head in %.0f s", self.addr[0], HEAD_TIMEOUT)
            self.will_close = True
            return False
        return super().readable()

    def _input_waits(self) -> bool:
        """Bytes of a next request have arrived but are not read yet: the connection is not idle
        (closing it with unread data would reset it, and the client would lose the answer)."""
        try:
            return bool(self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False  # broken: closing it is right

    def idle(self) -> bool:
        """Neither running a request nor sending an answer: may be closed to make room."""
        return not self.requests and not self.total_outbufs_len

    def handle_close(self) -> None:
        if self.request is not None:  # a body cut off: its spool file goes now, not when collected
            self.request.close()
            self.request = None
        super().handle_close()

    def shed(self) -> None:
        """Close at once (the connection limit is reached and this one has waited longest)."""
        if self.request is not None:
            self.request.close()  # release its spool file
            self.request = None
        self.handle_close()


class Listener(TcpWSGIServer):
    """A listening socket whose connections are :class:`Channel` s, at most ``connection_limit``."""

    channel_class = Channel

    def __init__(self, application: Callable, admit: Admit | None, spool: Spool | None = None, **kwargs: object) -> None:
        self.admit = admit
        self.spool = spool
        super().__init__(application, **kwargs)

    def readable(self) -> bool:
        # waitress stops accepting at connection_limit, which lets idle connections lock everyone
        # out; here accepting goes on and handle_accept() makes room instead.
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)  # closes connections idle for channel_timeout
        return self.accepting

    def drain(self) -> None:
        """The server stops: accept no more, close each connection once it has no request in progress.

        Runs in the I/O thread (asyncore's channels are not thread-safe): the server's loop calls
        it, and each channel's ``readable()`` closes it at the next turn when it is idle, or
        after the answer of the request it is serving (a half-received request may finish).
        """
        wasyncore.dispatcher.close(self)  # the listening socket only; the trigger stays for the workers
        for channel in self.active_channels.values():
            channel.draining = True

    def handle_accept(self) -> None:
        before = set(self.active_channels)
        super().handle_accept()
        if len(self.active_channels) <= self.adj.connection_limit:
            return
        newcomers = set(self.active_channels) - before
        candidates = [c for fd, c in self.active_channels.items() if fd not in newcomers and c.idle()]
        if not candidates:  # every connection is busy: the newcomer waits for none of them
            candidates = [self.active_channels[fd] for fd in newcomers]
        if not candidates:
            return
        # Half-sent heads, idle keep-alive connections and bodies of reads go first (whatever
        # their last activity: an anonymous client trickling a GET's body stays busy as cheaply
        # as it likes), uploads admitted with their credentials last.
        victim = min(candidates, key=lambda c: (c.request is not None and c.request.upload, c.last_activity))
        log.info("connection limit %d reached: closing the connection from %s idle longest",
                 self.adj.connection_limit, victim.addr[0])
        victim.shed()
