"""StreamfoldWorker: gthread with requests read whole in the event loop, a deadline and lingering closes."""
from __future__ import annotations

import errno
import resource
import selectors
import socket
import threading
import time
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

from .. import head
from ..errors import ErrorShapes, PayloadTooLarge, ProxyError, request_path
from .reading import RequestReader
from .replies import json_reply, parse_error, reply

# Connections still sending their request, per worker, at most (each costs a
# file descriptor and a small buffer; none costs a thread).
MAX_READING = 10_000
READ_SIZE = 65536
# client-timeout, max-request-bytes and max-inflight-bytes before settings load
DEFAULTS = (30.0, 10 * 1024 * 1024, 128 * 1024 * 1024)
# After the last answer on a connection, how long to wait for the client to
# close its side (RFC 9112 section 9.6), as gunicorn's close_graceful does.
LINGER = 2.0


class _Conn(TConn):
    """A connection whose graceful close lingers in the worker's event loop, not blocking it."""

    linger = None  # the worker's StreamfoldWorker._linger
    watched = False  # registered with the poller while its request is read

    def close(self, graceful: bool = False) -> None:
        if graceful and self.linger is not None:
            self.linger(self)
        else:
            super().close(graceful)


class StreamfoldWorker(ThreadWorker):
    """gthread with requests read in the event loop, a whole-request deadline and JSON parse errors."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # In arrival order, so in deadline order (``conn.timeout``) while
        # client-timeout stays the same; after a reload changes it, expiry is
        # late by the difference at most.
        self.reading: dict[TConn, RequestReader] = {}
        # Closed for writing, waiting up to LINGER for the client's FIN.
        # gunicorn's own close_graceful waits in the event loop itself: a
        # client that never closes stalled the whole worker for 2 s a time.
        self.lingering: dict[TConn, None] = {}
        self.max_reading = MAX_READING
        # Bytes held by the requests in ``reading`` (``RequestReader.held``: an announced body counts
        # whole from its head on), bounded by max-inflight-bytes.
        self.inflight = 0
        self.buffered = not self.cfg.is_ssl and getattr(self.cfg, "http2_cleartext", "off") == "off"
        self.line_limit = max(self.cfg.limit_request_line, self.cfg.limit_request_field_size) + 2  # not per request
        self.handling = threading.local()  # the path of the request a pool thread parses, for handle_error

    def init_process(self) -> None:
        self.max_reading = max(64, min(MAX_READING, _raise_open_files() - self.cfg.worker_connections - 64))
        super().init_process()

    def _settings(self):
        try:
            return self.wsgi.extensions["streamfold"].runtime.settings
        except (AttributeError, KeyError):
            return None

    def _limits(self) -> tuple[float, int, int]:
        """``client-timeout``, ``max-request-bytes`` and ``max-inflight-bytes`` from the current settings."""
        settings = self._settings()
        if settings is None:
            return DEFAULTS
        return settings.client_timeout, settings.max_request_bytes, settings.max_inflight_bytes

    def _shapes(self) -> ErrorShapes:
        """The app's error shape per route family (OpenAI's everywhere while the app is not loaded)."""
        try:
            return self.wsgi.extensions["streamfold.errors"]
        except (AttributeError, KeyError):
            return ErrorShapes()

    def _reply(self, path: str, status: int, reason: str, message: str, code: str) -> bytes:
        """An error the worker answers itself, in the shape of the path's route family."""
        return json_reply(self._shapes(), path, status, reason, message, code)

    # -- reading requests in the event loop -------------------------------------------------
    def accept(self, listener) -> None:
        if not self.buffered:
            return super().accept(listener)
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        conn = _Conn(self.cfg, sock, addr, listener.getsockname())
        conn.linger = self._linger
        self._read(conn, b"")

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection has sent something: read its next request here, not in a thread."""
        if not self.buffered:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.nr_conns -= 1
        self._read(conn, b"")

    def _read(self, conn: TConn, already: bytes) -> None:
        timeout, body_limit, _ = self._limits()
        reader = RequestReader(body_limit + 1, self.line_limit, wanted=head.HEADERS)
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + timeout
        self.reading[conn] = reader
        # Read at once: a kept-alive connection is readable, and a new one has
        # often sent its request by now; saves a trip round the event loop.
        if already:
            self._take(conn, reader, already)
        else:
            self._on_readable(conn, None)
        if conn not in self.reading:
            return  # handed over or closed already
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        conn.watched = True
        if len(self.reading) >= self.max_reading:
            self.set_accept_enabled(False)

    def _on_readable(self, conn: TConn, _sock) -> None:
        reader = self.reading[conn]
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._take(conn, reader, data)

    def _take(self, conn: TConn, reader: RequestReader, data: bytes) -> None:
        if not data:  # the client went away before its request was complete: nothing to answer
            self._forget(conn)
            self._close(conn)
            return
        held = reader.held
        complete = reader.feed(data)
        self.inflight += reader.held - held
        if complete:
            self._forget(conn)
            if reader.error:
                self.log.warning("invalid request from %s: %s", (conn.client or ("-",))[0], reader.error)
                _send(conn.sock, self._reply(reader.path, 400, "Bad Request",
                                             f"The chunked request body is malformed ({reader.error}).",
                                             "invalid_chunked_body"))
                self._linger(conn)
                return
            self._dispatch(conn, reader)
            return
        if not reader.gated and reader.head_done and self._gate(conn, reader):
            return
        budget = self._limits()[2]
        if self.inflight > budget:
            self._over_budget(conn, reader, budget)
        elif reader.continue_needed:
            reader.continue_needed = False
            _send(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _gate(self, conn: TConn, reader: RequestReader) -> bool:
        """Refuse a request its head settles (no valid client key, a loop) before its body is read."""
        reader.gated = True
        settings = self._settings()
        refused = None if settings is None else head.refusal(settings, reader.method, reader.path, reader.headers)
        if refused is None:
            return False
        status = refused.status
        self.log.info("refused a request from %s before its body: %d", _address(conn), status)
        self._refuse(conn, reply(status, "Unauthorized" if status == 401 else "Loop Detected",
                                 self._shapes().body(reader.path, refused)))
        return True

    def _over_budget(self, conn: TConn, reader: RequestReader, budget: int) -> None:
        """The requests this worker is reading would hold more than max-inflight-bytes: refuse this one."""
        if reader.held > budget:  # alone more than the worker may hold: it can never be taken
            error: ProxyError = PayloadTooLarge(f"The request is {reader.held} bytes; this proxy holds at most "
                                                f"{budget} bytes of requests being received (max-inflight-bytes).")
            status, reason, extra = 413, "Payload Too Large", b""
        else:
            error = ProxyError("The proxy is receiving too many request bodies at once; retry shortly.",
                               status=503, code="server_busy")
            status, reason, extra = 503, "Service Unavailable", b"Retry-After: 1\r\n"
        self.log.warning("refused a request from %s with %d: requests being received would hold more than "
                         "max-inflight-bytes (%d bytes)", _address(conn), status, budget)
        self._refuse(conn, reply(status, reason, self._shapes().body(reader.path, error), extra))

    def _refuse(self, conn: TConn, answer: bytes) -> None:
        self._forget(conn)
        _send(conn.sock, answer)
        self._linger(conn)

    def _forget(self, conn: TConn) -> None:
        self.inflight -= self.reading[conn].held
        del self.reading[conn]
        if not conn.watched:
            return  # most requests: whole in the first read, never registered (a failed unregister formats
            # the socket's repr for its KeyError, two system calls, on every request)
        conn.watched = False
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _dispatch(self, conn: TConn, reader: RequestReader) -> None:
        """The request is in memory: give it to a thread, as gthread would have given the socket."""
        self.nr_conns += 1
        conn.path = reader.path or request_path(reader.buf)  # for an error the parser finds (handle_error)
        conn.data_ready = True
        conn.oversized = reader.oversized
        conn.init()
        unreader = conn.parser.unreader
        unreader.unread(reader.take())
        if isinstance(unreader.sock, _Deadline):
            unreader.sock.deadline = conn.timeout
        else:
            unreader.sock = _Deadline(conn.sock, conn.timeout)
        self.enqueue_req(conn)

    def _keepalive_after(self, conn, keepalive: bool) -> bool:
        """No keep-alive after a body over max-request-bytes: the app has answered 413 without
        reading it, and gthread would hold a thread for 5 s draining the rest."""
        if getattr(conn, "oversized", False):
            return False
        return super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn, fs) -> None:
        """As gthread; but a pipelined next request, partly read already, is read on here too."""
        if self.buffered and self.alive:
            unreader = getattr(conn.parser, "unreader", None)
            # the future is asked only when bytes are left over (its every question takes its lock)
            if (unreader is not None and unreader.buf.getbuffer().nbytes and not fs.cancelled()
                    and fs.exception() is None and fs.result() is True):
                self.nr_conns -= 1
                self._read(conn, unreader.take_buffered())
                return
        super().finish_request(conn, fs)

    def murder_pending(self) -> None:
        """Also drop connections past their deadline (called by gthread's loop at least every second)."""
        super().murder_pending()
        now, expired = time.monotonic(), []
        for conn, reader in self.reading.items():
            if conn.timeout > now:
                break
            expired.append((conn, reader))
        for conn, reader in expired:
            self._forget(conn)
            if reader.started:
                _send(conn.sock, self._reply(reader.path or request_path(reader.buf), 408, "Request Timeout",
                                             "The request was not received in time (client-timeout).",
                                             "request_timeout"))
            self._linger(conn)
        if expired:
            self.log.warning("closed %d connection(s) that did not send a whole request within "
                             "client-timeout", len(expired))
        while self.lingering:
            conn = next(iter(self.lingering))
            if conn.timeout > now:
                break
            self._end_linger(conn)

    def _linger(self, conn: TConn) -> None:
        """Close for writing; the event loop then watches for the client to close too (or LINGER to pass)."""
        if len(self.lingering) >= self.max_reading:
            return self._close(conn)
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger_readable, conn))
        except (OSError, ValueError, KeyError):
            return self._close(conn)
        conn.timeout = time.monotonic() + LINGER
        self.lingering[conn] = None

    def _on_linger_readable(self, conn: TConn, _sock) -> None:
        try:
            if conn.sock.recv(READ_SIZE):
                return  # the rest of a request nobody will read: discarded
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_linger(conn)

    def _end_linger(self, conn: TConn) -> None:
        del self.lingering[conn]
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        self._close(conn)

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and len(self.reading) < self.max_reading)

    @staticmethod
    def _close(conn: TConn) -> None:
        try:
            TConn.close(conn)  # at once (a _Conn's graceful close lingers)
        except OSError:
            pass

    # -- gunicorn's parse errors as JSON ----------------------------------------------------
    def handle(self, conn):
        self.handling.path = getattr(conn, "path", "")
        return super().handle(conn)

    def handle_error(self, req, client, addr, exc) -> None:
        status, reason, message, code = parse_error(exc)
        path = getattr(req, "path", None) or getattr(self.handling, "path", "")
        if status >= 500:
            self.log.exception("Error handling request")
        else:
            self.log.warning("invalid request from %s: %s", (addr or ("-",))[0], repr(str(exc))[:200])
        try:
            util.write_nonblock(client, self._reply(path, status, reason, message, code))
        except Exception:  # noqa: BLE001 - the client is gone; nothing else to do
            self.log.debug("Failed to send error message.")


class _Deadline:
    """The connection's socket as the request parser sees it: reads end at the client deadline.

    Past it, a read raises ``ConnectionResetError``: gunicorn drops the
    connection quietly, and the app's error handler treats it as a client
    that went away.
    """

    __slots__ = ("sock", "deadline")

    def __init__(self, sock, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv(self, size: int) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ConnectionResetError(errno.ECONNRESET, "client-timeout passed")
        prior = self.sock.gettimeout()
        self.sock.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            return self.sock.recv(size)
        except TimeoutError:
            raise ConnectionResetError(errno.ECONNRESET, "client-timeout passed") from None
        finally:
            self.sock.settimeout(prior)

    def gettimeout(self):
        return self.sock.gettimeout()

    def settimeout(self, value) -> None:
        self.sock.settimeout(value)


def _address(conn: TConn) -> str:
    return str((conn.client or ("-",))[0])


def _send(sock, data: bytes) -> None:
    """Best effort on a non-blocking socket: a small answer fits its send buffer."""
    try:
        sock.send(data)
    except OSError:
        pass


def _raise_open_files() -> int:
    """Raise this process's soft open-files limit to the hard one; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20
