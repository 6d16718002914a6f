"""Transport to upstream servers: pooled connections, one POST, raw reads.

This is the one place where ``requests``/``urllib3`` exceptions become ours
(``UpstreamUnavailable`` 502, ``UpstreamTimeout`` 504), like requests'
``HTTPAdapter.send`` does for socket errors.

Each provider has one ``requests.Session`` with ``trust_env`` off (otherwise
every request re-reads proxy variables and ``.netrc``), shared by the worker's
threads. Its ``HTTPAdapter`` owns the connection pools, the TLS settings
(``verify-tls``, ``ca-bundle``) and the proxy managers for a key's
``proxy-url`` (http, https, socks5 via ``requests[socks]``; passed per
request, never through the environment).

The hot path then sends on the adapter's urllib3 pool directly instead of
``Session.post``: measured on loopback, ``Session.post`` spends ~170 us per
call building models, merging settings and parsing cookies we never use,
more than the rest of the proxy put together. The pool, the request URL for
a proxy and the timeout are looked up once per provider/key and cached.

Status lines are read like nginx does: interim 1xx answers (``103 Early
Hints``) are skipped by the connection's response class, so the response
handed back is the final one. Bodies are decoded here (urllib3 does gzip and
deflate, br and zstd only when their optional modules are installed); an
answer in an encoding that cannot be decoded is a 502, never bytes relayed
without their ``Content-Encoding``.

A request's head and body (up to ``ONE_WRITE_BYTES``) go out in one write,
not urllib3's two: one system call, and the upstream wakes once per request.
Header sections are read into the message http.client's email parser would
make, but a plain one (every line ``Name: value`` in printable ASCII) without
that parser, which costs more than the rest of a relayed request's upstream
work (``_parse_headers``).

Reads: ``read1`` returns whatever bytes have arrived (for chunked and
close-delimited bodies alike), so nothing is held back waiting for a fixed
``chunk_size`` and nothing waits for the end of a close-delimited body.
"""
from __future__ import annotations

import email.parser
import http.client
import os
import re
import select
import ssl
import threading
import time
import types
from typing import Callable, Iterator
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse

from .config.model import KeyEntry, Provider, Timeouts
from .errors import ProxyError, UpstreamTimeout, UpstreamUnavailable

READ_SIZE = 65536
# ``finish``: how long to wait for, and how many bytes to read past an answer's end ([DONE]) to keep its
# connection
FINISH_WAIT = 0.05
FINISH_BYTES = 65536
# Connections kept per upstream host; above this, extra connections are
# opened and closed per request rather than blocking a thread (pool_block=False).
POOL_SIZE = 64
# Encodings urllib3 decodes in this environment, besides identity.
DECODABLE = frozenset(HTTPResponse.CONTENT_DECODERS) | {"identity"}
# Interim responses skipped before the final one; more is a broken upstream.
MAX_INTERIM = 16
_MAX_LINE = 65536
ONE_WRITE_BYTES = 64 * 1024  # a request body up to this size goes out in one write with its head
_MAX_HEADERS = 100  # header lines per answer, as http.client
_PLAIN_BYTES = bytes(range(0x20, 0x7f)) + b"\t\r\n"  # a header section of only these may skip the email parser
_UNSAFE = re.compile(r"[^\t\x20-\x7e]")


class Sessions:
    """Per provider: a pooled ``requests.Session``; per provider, URL and key: the pool to send on."""

    def __init__(self) -> None:
        self._sessions: dict[tuple, requests.Session] = {}
        self._routes: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def get(self, provider: Provider) -> requests.Session:
        key = (provider.name, provider.verify_tls, provider.ca_bundle)
        session = self._sessions.get(key)
        if session is None:
            with self._lock:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = _new_session(provider)
        return session

    def close(self) -> None:
        """Close every pooled connection (a config holder going away, or a worker exiting)."""
        with self._lock:
            sessions, self._sessions, self._routes = list(self._sessions.values()), {}, {}
        for session in sessions:
            session.close()

    def route(self, provider: Provider, url: str, entry: KeyEntry) -> tuple:
        """``(pool, url to request on it)`` from the provider's adapter, cached while the pool is open."""
        key = (provider.name, provider.verify_tls, provider.ca_bundle, url, entry.proxy_url)
        route = self._routes.get(key)
        if route is None or route[0].pool is None:  # a pool the manager evicted is closed
            session = self.get(provider)
            adapter: HTTPAdapter = session.get_adapter(url)
            prepared = requests.Request("POST", url).prepare()
            proxies = {"http": entry.proxy_url, "https": entry.proxy_url} if entry.proxy_url else {}
            try:
                pool = adapter.get_connection_with_tls_context(prepared, session.verify, proxies=proxies)
            except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as exc:
                raise UpstreamUnavailable(f"cannot use the upstream or its proxy: {type(exc).__name__}") from None
            pool.ConnectionCls = _connection_class(pool.ConnectionCls)
            route = self._routes[key] = (pool, adapter.request_url(prepared, proxies),
                                         bool(entry.proxy_url) and not entry.proxy_url.startswith("socks"))
        return route


def _new_session(provider: Provider) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = provider.ca_bundle or provider.verify_tls
    adapter = HTTPAdapter(pool_connections=32, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _FinalResponse(http.client.HTTPResponse):
    """An ``http.client`` response that reads past interim 1xx answers to the final one.

    ``http.client`` skips only ``100 Continue``; a ``103 Early Hints`` would
    otherwise become the answer (no body) and leave the real one on the
    pooled connection. ``101`` is final (the proxy never asks to upgrade; the
    executor reports it).
    """

    def _read_status(self):
        for _ in range(MAX_INTERIM):
            version, status, reason = super()._read_status()
            if not 100 <= status < 200 or status == 101:
                return version, status, reason
            while True:  # the interim answer's header section, discarded
                line = self.fp.readline(_MAX_LINE + 1)
                if len(line) > _MAX_LINE:
                    raise http.client.LineTooLong("interim header line")
                if line in (b"\r\n", b"\n", b""):
                    break
        raise http.client.HTTPException(f"more than {MAX_INTERIM} interim responses")


def _parse_headers(fp, _class: type = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """``http.client.parse_headers``: the same message, read under the same limits, without the email parser
    when every line is a plain ``Name: value`` (visible ASCII) and the type is not multipart or message/.

    The email parser costs ~190,000 instructions for nginx's five header
    lines, a tenth of a relayed JSON request's whole cost; this builds the
    message it would (the raw headers in order, an empty payload) for a few
    thousand. Anything else (folded lines, a bare CR, a line with no name, bytes
    outside ASCII, a header section cut by EOF) goes to the email parser, as before.
    """
    lines = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
    block = b"".join(lines)
    if line and not block.translate(None, _PLAIN_BYTES) and block.count(b"\r") == block.count(b"\r\n"):
        lower = block.lower()  # ended by its blank line, printable ASCII, each CR ending its line: read here
        # (`find`, not `in`: a bytes `in` first tries its operand as an int, an exception each time)
        if lower.find(b"multipart") < 0 and lower.find(b"message") < 0:  # (unless a type might be one)
            message = _class()
            for line in lines[:-1]:
                name, colon, value = line.partition(b":")
                if not colon or not name or name.find(b" ") >= 0 or name.find(b"\t") >= 0:
                    break  # a folded line, a line with no name: the email parser's rules
                message.set_raw(name.decode("ascii"), value.lstrip(b" \t").rstrip(b"\r\n").decode("ascii"))
            else:
                message.set_payload("")
                return message
    return email.parser.Parser(_class=_class).parsestr(block.decode("iso-8859-1"))


def _begin_with(parse_headers: Callable) -> Callable:
    """``http.client.HTTPResponse.begin`` itself, run with ``parse_headers`` in place of http.client's."""
    begin = http.client.HTTPResponse.begin
    return types.FunctionType(begin.__code__, {**vars(http.client), "parse_headers": parse_headers},
                              begin.__name__, begin.__defaults__, begin.__closure__)


_FinalResponse.begin = _begin_with(_parse_headers)


class _OneWrite:
    """A connection that writes a request's head and a small body in one ``send`` (one system call, one TCP
    segment) where urllib3 writes them in two, so the upstream reads the whole request at once instead of
    waking for the head and again for the body. The bytes sent are the same."""

    _held: bytes | None = None  # while a request is sent: b"" until the head comes, then the head

    def request(self, method, url, body=None, headers=None, **kwargs) -> None:
        if isinstance(body, bytes) and 0 < len(body) <= ONE_WRITE_BYTES:
            self._held = b""
        try:
            super().request(method, url, body, headers, **kwargs)
        except BaseException:
            self._held = None
            raise
        head, self._held = self._held, None
        if head:  # no body came after all: the head as urllib3 would have sent it
            super().send(head)

    def send(self, data) -> None:
        head = self._held
        if head is None:
            return super().send(data)
        if not head:
            self._held = data  # the head (http.client writes it whole): kept for the body
            return None
        self._held = None
        return super().send(head + data)


_CONNECTIONS: dict[type, type] = {}


def _connection_class(connection_class: type) -> type:
    """``connection_class`` (plain, TLS or SOCKS) with ``_FinalResponse`` as its response class, writing a
    request in one send (``_OneWrite``)."""
    if getattr(connection_class, "response_class", None) is _FinalResponse:
        return connection_class
    made = _CONNECTIONS.get(connection_class)
    if made is None:
        made = _CONNECTIONS[connection_class] = type(connection_class.__name__, (_OneWrite, connection_class),
                                                     {"response_class": _FinalResponse})
    return made


def header_value(value: str | None, limit: int = 1024) -> str | None:
    """An upstream header value safe to hand on (visible ASCII, space, tab), else ``None``."""
    if value is None or len(value) > limit:
        return None
    return None if _UNSAFE.search(value) else value


def _where(provider: Provider, entry: KeyEntry) -> str:
    """Which provider, which host, and the setting that names it, for an operator to fix; never the
    credentials a base-url or proxy-url may carry."""
    parts = urlsplit(provider.base_url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    where = f"provider {provider.name!r} at {f'[{host}]' if ':' in host else host}:" \
            f"{port or (443 if parts.scheme == 'https' else 80)} (base-url)"
    return where + (" through its proxy-url" if entry.proxy_url else "")


def _failed(error: type[ProxyError], provider: Provider, entry: KeyEntry, before: str, after: str) -> ProxyError:
    """``error`` naming the provider, its host and the setting to fix, for the client as for the operator (its
    ``detail``: the log line per attempt, the operator page). Issue 21 asked for the host in the client's
    message (a newcomer's curl read "could not connect to upstream 'local': NewConnectionError" and could not
    tell what to fix); credentials in the URL never appear."""
    where = f"{before}{_where(provider, entry)}{after}"
    return error(where, detail=where)


def _reason(exc: Exception) -> str:
    """What the socket said (connection refused, name not known), else the exception's kind."""
    cause = exc.__cause__
    if isinstance(cause, OSError) and isinstance(cause.strerror, str) and cause.strerror:
        return cause.strerror[:1].lower() + cause.strerror[1:200]
    return type(exc).__name__


def post(sessions: Sessions, provider: Provider, url: str, body: bytes, headers: dict,
         entry: KeyEntry, timeouts: Timeouts) -> HTTPResponse:
    """POST ``body`` and return the response with its body unread."""
    response = _open(sessions, provider, "POST", url, body, headers, entry, timeouts)
    coding = response.headers.get("Content-Encoding")
    if coding and not all(c.strip().lower() in DECODABLE for c in coding.split(",")):
        response.close()
        shown = header_value(coding[:64]) or "(invalid)"
        raise UpstreamUnavailable(f"upstream {provider.name!r} answered with Content-Encoding {shown}, which "
                                  "this proxy cannot decode; have it answer uncompressed or gzip",
                                  code="upstream_encoding")
    return response


def read_chunks(response: HTTPResponse, first: bytes = b"") -> Iterator[bytes]:
    """Yield the body as it arrives; a silence longer than the read timeout becomes ``UpstreamTimeout``."""
    if first:
        yield first
    read = response.read1
    try:
        while True:
            data = read(READ_SIZE)
            if not data:
                return
            yield data
    except urllib3.exceptions.TimeoutError:
        raise UpstreamTimeout("upstream went silent for longer than the read timeout") from None
    except urllib3.exceptions.DecodeError:
        raise UpstreamUnavailable("upstream body does not decode as its Content-Encoding says",
                                  code="upstream_encoding") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise UpstreamUnavailable(f"upstream connection dropped mid-response: {type(exc).__name__}") from None


def finish(response: HTTPResponse) -> None:
    """Close a response whose answer is complete (its ``[DONE]`` was read), keeping the connection if it can.

    The fold and the bridges stop reading at ``[DONE]``; a chunked body
    (vLLM, llama.cpp, Ollama, TGI all send one) still has its last chunk to
    come, and closing before it drops the connection, so every such request
    opened a new one. What is left is read first if it comes within
    ``FINISH_WAIT`` (servers send the last chunk with ``[DONE]`` or right
    after it): bytes http.client already holds, or a socket that turns
    readable in that time, each receive bounded by what is left of it. Once
    the body has ended, urllib3 has put the connection back in the pool and
    ``close`` no longer touches it. Anything else (an upstream that goes on
    after its ``[DONE]``, an error) costs the connection, never the answer.
    Like every upstream read, a read here is bounded per receive, so an
    upstream that trickles bytes can hold it longer, as it can hold a
    stream; ``FINISH_BYTES`` caps what is read.
    """
    connection = response.connection
    sock = getattr(connection, "sock", None)
    if sock is not None:
        deadline = time.monotonic() + FINISH_WAIT
        left = FINISH_BYTES
        raw = getattr(response, "_fp", None)  # http.client's response: its reader may hold the bytes already
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while left > 0:
                reader = getattr(raw, "fp", None)
                sock.settimeout(0.0)  # this connection's own: urllib3 sets it again on reuse
                try:
                    ready = reader is not None and bool(reader.peek(1))  # buffered, or on the socket already
                except ssl.SSLWantReadError:
                    ready = False  # TLS: no whole record decrypted yet
                if not ready:
                    wait = deadline - time.monotonic()
                    if wait <= 0 or not poller.poll(wait * 1000):
                        break
                # a read may first take the end of [DONE]'s own chunk, then wait for the last one
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = response.read1(left)
                if response.connection is not connection or not data:
                    break  # the body ended: the connection is back in the pool, no longer ours to touch
                left -= len(data)
        except Exception:  # noqa: BLE001 - best effort: the close below drops the connection
            pass
    response.close()


def ready(response: HTTPResponse) -> bool:
    """Whether the next read of ``response`` returns without waiting on the upstream: the body is complete,
    or the socket holds bytes (one read returns them). Otherwise (bytes only in a buffer, a compressed or
    TLS body) it may wait: a caller that must not block hands it to another thread (slower, never wrong).

    The one place that looks inside urllib3 and http.client for this (``_fp``, ``connection.sock``).
    """
    raw = getattr(response, "_fp", None)  # urllib3 wraps http.client's response
    if raw is None or getattr(raw, "fp", None) is None or getattr(raw, "length", None) == 0:
        return True
    if response.headers.get("content-encoding", "identity") != "identity":
        return False
    sock = getattr(response.connection, "sock", None)
    if sock is None or hasattr(sock, "pending"):
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def read_first(response: HTTPResponse) -> bytes:
    """The first bytes of the body (``b""`` when it is empty)."""
    for data in read_chunks(response):
        return data
    return b""


def read_body(response: HTTPResponse, first: bytes, limit: int) -> bytes:
    """The rest of a (JSON) body after ``first``; over ``limit`` bytes is an upstream failure."""
    parts, size = [first], len(first)
    for data in read_chunks(response):
        parts.append(data)
        size += len(data)
        if size > limit:
            raise UpstreamUnavailable(f"upstream answer exceeds max-aggregate-bytes ({limit} bytes)")
    return b"".join(parts)



def get(sessions: Sessions, provider: Provider, url: str, headers: dict, entry: KeyEntry, timeouts: Timeouts,
        limit: int) -> tuple[int, bytes]:
    """GET ``url`` (no redirects): the status and at most ``limit`` bytes of the body (the rest is not read)."""
    response = _open(sessions, provider, "GET", url, None, headers, entry, timeouts)
    parts, size = [], 0
    try:
        for data in read_chunks(response):
            parts.append(data[:limit - size])
            size += len(parts[-1])
            if size >= limit:
                break
    finally:
        response.close()
    return response.status, b"".join(parts)


# What urlopen makes of retries=False, and a timeout per setting, made once: urllib3 never changes either (it
# clones the timeout per request, and counting an attempt makes a new Retry)
_NO_RETRIES = urllib3.Retry(False, redirect=False)
_TIMEOUTS: dict[Timeouts, urllib3.Timeout] = {}


def _open(sessions: Sessions, provider: Provider, method: str, url: str, body: bytes | None, headers: dict,
          entry: KeyEntry, timeouts: Timeouts) -> HTTPResponse:
    """Send one request on the pooled connection; its response's body unread. Transport errors become ours."""
    pool, target, via_http_proxy = sessions.route(provider, url, entry)
    timeout = _TIMEOUTS.get(timeouts)
    if timeout is None:
        if len(_TIMEOUTS) >= 64:  # settings reloaded many times over
            _TIMEOUTS.clear()
        timeout = _TIMEOUTS[timeouts] = urllib3.Timeout(connect=timeouts.connect, read=timeouts.read)
    try:
        return pool.urlopen(method, target, body=body, headers=headers, retries=_NO_RETRIES, redirect=False,
                            assert_same_host=not via_http_proxy, preload_content=False, timeout=timeout)
    except urllib3.exceptions.NewConnectionError as exc:  # a subclass of ConnectTimeoutError in urllib3
        raise _failed(UpstreamUnavailable, provider, entry, "could not connect to ", f": {_reason(exc)}") from None
    except urllib3.exceptions.ConnectTimeoutError:
        raise _failed(UpstreamTimeout, provider, entry, "could not connect to ",
                      f" within timeouts.connect ({timeouts.connect:g} s)") from None
    except urllib3.exceptions.TimeoutError:
        raise _failed(UpstreamTimeout, provider, entry, "",
                      f" sent no answer within timeouts.read ({timeouts.read:g} s)") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        if provider.ca_bundle and not os.path.isfile(provider.ca_bundle):  # deleted since the settings took it
            raise UpstreamUnavailable(f"could not reach upstream {provider.name!r}: the file its ca-bundle "
                                      "names is missing") from None
        raise UpstreamUnavailable(f"could not reach upstream {provider.name!r}: {type(exc).__name__}") from None
