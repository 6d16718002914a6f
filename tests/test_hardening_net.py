"""Hardening, network half (issue 12): hostile clients and broken upstreams against gunicorn with 2 workers.

One gunicorn instance and one raw-socket upstream serve the whole module.
The upstream writes exactly the bytes a test scripts (an interim 103, a
redirect, a gzip body, a control character in a header), which a
well-behaved HTTP server library would not let us send.
"""
from __future__ import annotations

import gzip
import json
import resource
import socket
import threading
import time
import zlib
from dataclasses import dataclass

import openai
import pytest
import requests

from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import completion, sse, text_chunks

CLIENT_TIMEOUT = 5  # seconds; long enough that a test's 1 s wait cannot be a slow client being dropped
MAX_BODY = 100_000


@dataclass
class Seen:
    head: bytes
    headers: dict
    body: bytes


class RawUpstream:
    """A loopback server that answers each request with ``reply(seen)`` bytes, then closes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.seen: list[Seen] = []
        self.reply = lambda seen: http_answer(200, json.dumps(completion()).encode())
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, body = data.partition(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            while len(body) < int(headers.get("content-length", 0)):
                body += conn.recv(65536)
            seen = Seen(head, headers, body)
            self.seen.append(seen)
            conn.sendall(self.reply(seen))

    def stop(self) -> None:
        self.listener.close()


def http_answer(status: int, body: bytes, content_type: str = "application/json", extra: bytes = b"",
                reason: bytes = b"X") -> bytes:
    """A whole HTTP/1.1 answer as an upstream would write it (close-delimited)."""
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sConnection: close\r\n\r\n" % (
        status, reason, content_type.encode(), extra)) + body


def events_bytes(pieces: list[str]) -> bytes:
    return b"".join(sse(*text_chunks(pieces)))


@pytest.fixture(scope="module")
def raw():
    server = RawUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(raw, tmp_path_factory):
    doc = settings_doc(provider(raw.url), **{"client-timeout": CLIENT_TIMEOUT, "request-retry": 0,
                                             "max-request-bytes": MAX_BODY})
    # Keep-alive on, as shipped (gunicorn_util turns it off by default): kept-alive
    # and pipelined requests go through the worker's reading too.
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("net") / "settings.yaml", doc), workers=2,
                      env={"GUNICORN_CMD_ARGS": "--worker-connections 64"})
    yield server
    server.stop()


@pytest.fixture
def sdk(proxy):
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def send_raw(proxy: Gunicorn, data: bytes, close_after: bool = False, wait: float = 10) -> bytes:
    """Write ``data`` on a fresh connection and read until the proxy closes it."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=wait) as sock:
        sock.sendall(data)
        if close_after:
            return b""
        out = b""
        while True:
            more = sock.recv(65536)
            if not more:
                return out
            out += more


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def assert_healthy(proxy: Gunicorn) -> None:
    for _ in range(4):  # reaches both workers, most likely
        assert requests.get(proxy.url + "/healthz", timeout=5).status_code == 200


# -- requirement 1: slow clients ------------------------------------------------------------
def test_slow_clients_do_not_freeze_the_proxy_and_are_answered_408_after_client_timeout(proxy, raw):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:  # each held connection is a file descriptor here too
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    raw.reply = lambda seen: http_answer(200, json.dumps(completion("alive")).encode())
    slow = []
    try:
        for i in range(2000):  # a request line and one header, then nothing (slowloris)
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n")
            if i % 100 == 0:  # or the whole head and part of the body
                sock.sendall(b"Authorization: Bearer " + CLIENT_KEY.encode()
                             + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ")
            slow.append(sock)
        opened = time.monotonic()
        # The bound: both answer within 1 s while all 2,000 are held.
        assert requests.get(proxy.url + "/healthz", timeout=1).status_code == 200
        chat = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=1)
        assert chat.json()["choices"][0]["message"]["content"] == "alive"
        assert time.monotonic() - opened < CLIENT_TIMEOUT  # so none of them had been dropped yet
        answers = []
        for sock in slow:  # each is answered 408 and closed once client-timeout has passed
            answer = b""
            while more := sock.recv(4096):
                answer += more
            answers.append(answer)
        assert time.monotonic() - opened >= CLIENT_TIMEOUT - 1
        assert all(status_and_json(a)[0] == 408 for a in answers)
        assert status_and_json(answers[0])[1]["error"]["code"] == "request_timeout"
    finally:
        for sock in slow:
            sock.close()
    assert_healthy(proxy)


def test_clients_that_never_close_after_connection_close_do_not_stall_the_workers(proxy):
    """gthread's lingering close waited in the event loop: 2 s of a frozen worker per such client."""
    held = []
    try:
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            held.append(sock)
        for sock in held:  # each is answered; none of them closes its side
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        for _ in range(4):
            assert requests.get(proxy.url + "/healthz", timeout=1).status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_requests_arriving_in_fragments_or_pipelined_are_each_answered_once(proxy, raw):
    raw.reply = lambda seen: http_answer(200, json.dumps(completion("pieced")).encode())
    body = json.dumps(CHAT).encode()
    auth = b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
    by_length = CHAT_HEAD + auth + b"Content-Length: %d\r\n\r\n" % len(body) + body
    chunked = (CHAT_HEAD + auth + b"Transfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
               + b"0\r\nX-Trailer: t\r\n\r\n")
    for request in (by_length, chunked):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for cut in range(0, len(request), 23):  # 23-byte pieces, each its own segment
                sock.sendall(request[cut:cut + 23])
                time.sleep(0.002)
            sock.sendall(request + b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            answer = b""
            while more := sock.recv(65536):
                answer += more
        assert answer.count(b"HTTP/1.1 200 ") == 3 and answer.count(b'"pieced"') == 2, answer[:300]
        assert answer.endswith(b'{"status":"ok"}')


# -- requirement 11: framing errors ---------------------------------------------------------
CHAT_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("request_bytes, status", [
    (CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),         # invalid chunk size
    (CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n", 400),             # no CRLF after data
    (CHAT_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),  # CL+TE
    (CHAT_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{} ", 400),                 # two lengths
    (CHAT_HEAD + b"X-Padding: " + b"a" * 10240 + b"\r\nContent-Length: 2\r\n\r\n{}", 431),  # 10 KB header
    (b"GET /v1/models?" + b"q" * 10240 + b" HTTP/1.1\r\nHost: proxy\r\n\r\n", 414),          # 10 KB URL
    (b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nBad Header: x\r\n\r\n", 400),               # space in a name
], ids=["chunk-size", "chunk-terminator", "cl-and-te", "two-lengths", "header-10k", "url-10k", "header-name"])
def test_client_framing_errors_are_openai_json_errors(proxy, request_bytes, status):
    got_status, body = status_and_json(send_raw(proxy, request_bytes))
    assert got_status == status
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert_healthy(proxy)


MESSAGES_HEAD = b"POST /v1/messages HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize("request_bytes, status", [
    (MESSAGES_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    (MESSAGES_HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400),
    (MESSAGES_HEAD + b"X-Padding: " + b"a" * 10240 + b"\r\nContent-Length: 2\r\n\r\n{}", 431),
    (b"POST /v1/messages/count_tokens?" + b"q" * 10240 + b" HTTP/1.1\r\nHost: proxy\r\n\r\n", 414),
    (b"POST /v1//messages HTTP/1.1\r\nHost: proxy\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /v1/messages HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n", 405),
], ids=["chunk-size", "cl-and-te", "header-10k", "url-10k", "header-name", "method"])
def test_errors_the_worker_renders_on_messages_paths_are_anthropic_shaped(proxy, request_bytes, status):
    # Issue 21, finding 12: these were OpenAI-shaped on the Anthropic API's paths.
    got_status, body = status_and_json(send_raw(proxy, request_bytes))
    assert got_status == status
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert_healthy(proxy)


def test_a_messages_request_not_sent_within_client_timeout_gets_an_anthropic_408(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT * 3) as sock:
        sock.sendall(MESSAGES_HEAD + b"x-api-key: " + CLIENT_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"model\": ")
        answer = b""
        while more := sock.recv(4096):
            answer += more
    status, body = status_and_json(answer)
    assert status == 408 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "client-timeout" in body["error"]["message"]


@pytest.mark.parametrize("framing", ["announced", "chunked"])
def test_body_over_max_request_bytes_is_a_413_at_once_and_the_connection_closes(proxy, framing):
    head = CHAT_HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode() + b"\r\n"
    if framing == "announced":  # a length over the limit, and then nothing: answered without waiting for it
        request = head + b"Content-Length: 50000000\r\n\r\n"
    else:  # more than the limit actually sent, and the body not finished
        request = head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (MAX_BODY * 3) + b" " * (MAX_BODY + 10)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT - 2) as sock:
        sock.sendall(request)
        answer = b""
        while more := sock.recv(65536):  # closed by the proxy, long before client-timeout
            answer += more
    status, body = status_and_json(answer)
    assert status == 413 and body["error"]["code"] == "request_too_large"


def test_client_hanging_up_mid_body_or_mid_head_logs_no_error(proxy):
    before = len(proxy.output())
    send_raw(proxy, CHAT_HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode()
             + b"\r\nContent-Length: 400\r\n\r\n{\"model\"", close_after=True)
    send_raw(proxy, CHAT_HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode()
             + b"\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"mo", close_after=True)
    send_raw(proxy, b"POST /v1/chat/comp", close_after=True)
    assert_healthy(proxy)
    time.sleep(1)  # what the workers make of the hang-ups reaches their log by then
    logged = proxy.output()[before:]
    assert "ERROR" not in logged and "Traceback" not in logged and "NoMoreData" not in logged


def test_expect_100_continue_gets_its_interim_answer_before_the_body(proxy, raw):
    raw.reply = lambda seen: http_answer(200, json.dumps(completion("continued")).encode())
    body = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(CHAT_HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode()
                     + b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while b'"continued"' not in answer:
            answer += sock.recv(65536)
    assert b"HTTP/1.1 200 " in answer
    assert "expect" not in raw.seen[-1].headers


# -- requirement 6: upstream status lines ---------------------------------------------------
def test_early_hints_before_the_answer_are_skipped(proxy, raw, sdk):
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    raw.reply = lambda seen: hints + hints + http_answer(200, json.dumps(completion("after hints")).encode())
    for _ in range(6):
        reply = sdk.chat.completions.create(model="m", messages=CHAT["messages"])
        assert reply.choices[0].message.content == "after hints"
    raw.reply = lambda seen: hints + http_answer(200, events_bytes(["streamed", " after hints"]),
                                                 "text/event-stream")
    stream = sdk.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "streamed after hints"


def test_upstream_switching_protocols_is_a_502_not_an_answer(proxy, raw):
    raw.reply = lambda seen: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    response = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_bad_status"


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_redirect_is_a_502_never_followed_whose_location_only_the_log_names(proxy, raw, stream):
    target = "http://127.0.0.1:9/v1/chat/completions"
    raw.reply = lambda seen: http_answer(307, events_bytes(["redirect", " body"]), "text/event-stream",
                                         b"Location: %s\r\n" % target.encode(), b"Temporary Redirect")
    before = len(raw.seen)
    response = requests.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, stream=stream), headers=AUTH,
                             timeout=10)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_redirect" and "HTTP 307, a redirect" in error["message"]
    assert target not in response.text and "127.0.0.1" not in response.text  # where the upstream points is internal
    assert f"answered HTTP 307 redirecting to {target}" in proxy.output()  # the operator's log line says it
    assert len(raw.seen) == before + 1  # asked once; the redirect was not followed


# -- requirement 9: what goes upstream ------------------------------------------------------
def test_only_end_to_end_non_credential_headers_go_upstream(proxy, raw):
    raw.reply = lambda seen: http_answer(200, json.dumps(completion()).encode())
    sent = {"Connection": "keep-alive, X-Hop-Secretless", "X-Hop-Secretless": "hop", "Keep-Alive": "timeout=5",
            "Via": "1.1 corp-proxy", "Range": "bytes=0-10", "If-None-Match": '"abc"', "Expect": "100-continue",
            "Content-Encoding": "identity", "TE": "trailers", "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Api-Key": "client-azure-key", "X-Goog-Api-Key": "client-goog-key", "X-Auth-Token": "tok",
            "X-Amz-Security-Token": "amz", "X-Client-Secret": "sec", "Cookie": "session=abc",
            "X-Stainless-Lang": "python", "OpenAI-Beta": "assistants=v2", "X-Trace": "t-1"}
    response = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, **sent}, timeout=10)
    assert response.status_code == 200
    got = raw.seen[-1].headers
    for name in ("x-hop-secretless", "keep-alive", "via", "range", "if-none-match", "expect", "content-encoding",
                 "te", "proxy-authorization", "api-key", "x-goog-api-key", "x-auth-token", "x-amz-security-token",
                 "x-client-secret", "cookie"):
        assert name not in got, name
    assert got["x-stainless-lang"] == "python" and got["openai-beta"] == "assistants=v2" and got["x-trace"] == "t-1"
    assert got["authorization"] == f"Bearer {PROVIDER_KEY}" and got["accept-encoding"] == "identity"
    for value in ("client-azure-key", "client-goog-key", "session=abc", "Zm9vOmJhcg=="):
        assert value not in raw.seen[-1].head.decode("latin-1")


# -- requirement 10: what goes to the client ------------------------------------------------
@pytest.mark.parametrize("coding, compress", [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_upstream_answers_are_decoded(proxy, raw, sdk, coding, compress):
    extra = b"Content-Encoding: %s\r\n" % coding.encode()
    raw.reply = lambda seen: http_answer(200, compress(json.dumps(completion("unzipped")).encode()), extra=extra)
    response = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert "content-encoding" not in response.headers
    assert response.json()["choices"][0]["message"]["content"] == "unzipped"
    raw.reply = lambda seen: http_answer(200, compress(events_bytes(["unzipped", " stream"])), "text/event-stream",
                                         extra)
    stream = sdk.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "unzipped stream"


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, x-custom"])
@pytest.mark.parametrize("stream", [False, True])
def test_answers_in_an_encoding_the_proxy_cannot_decode_are_a_502(proxy, raw, coding, stream):
    raw.reply = lambda seen: http_answer(200, b"\x1b\x2c\x00\xf8\xa5\x05\x22\x9a\x00", "text/event-stream",
                                         b"Content-Encoding: %s\r\n" % coding.encode())
    response = requests.post(proxy.url + "/v1/chat/completions", json=dict(CHAT, stream=stream), headers=AUTH,
                             timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_encoding" and coding in response.json()["error"]["message"]


def test_broken_gzip_body_is_a_502_not_garbage(proxy, raw):
    raw.reply = lambda seen: http_answer(200, b"\x1f\x8b\x08\x00not really gzip", extra=b"Content-Encoding: gzip\r\n")
    response = requests.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_encoding"


def test_invalid_upstream_header_values_are_dropped_and_the_log_tells_the_real_status(proxy, raw):
    raw.reply = lambda seen: http_answer(200, json.dumps(completion("clean")).encode(), "application/json\x01x")
    response = requests.post(proxy.url + "/v1/chat/completions", json=CHAT,
                             headers={**AUTH, "X-Request-Id": "ctl-in-content-type"}, timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.json()["choices"][0]["message"]["content"] == "clean"
    raw.reply = lambda seen: http_answer(429, b'{"error": {"message": "slow down"}}',
                                         extra=b"Retry-After: 1\x0b\r\n")
    limited = requests.post(proxy.url + "/v1/chat/completions", json=CHAT,
                            headers={**AUTH, "X-Request-Id": "ctl-in-retry-after"}, timeout=10)
    assert limited.status_code == 429 and limited.json()["error"]
    assert all(0x20 <= ord(c) < 0x7f for c in limited.headers.get("Retry-After", "0"))
    deadline = time.monotonic() + 5
    while "request_id=ctl-in-retry-after" not in proxy.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = proxy.output().splitlines()
    assert any("request_id=ctl-in-content-type" in line and "status=200" in line for line in lines)
    assert any("request_id=ctl-in-retry-after" in line and "status=429" in line for line in lines)


def test_with_stock_gthread_reading_a_client_that_hangs_up_mid_body_is_no_error(tmp_path, raw):
    """The fallback (TLS configs keep gthread's own reading): the app reads the body, and it breaks."""
    doc = settings_doc(provider(raw.url), **{"request-retry": 0})
    server = Gunicorn(write_settings(tmp_path / "settings.yaml", doc), workers=2,
                      env={"GUNICORN_CMD_ARGS": "--worker-class gthread"})
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(CHAT_HEAD + b"Authorization: Bearer " + CLIENT_KEY.encode()
                         + b"\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"mo")
            time.sleep(0.3)  # the view is reading the body by now
        deadline = time.monotonic() + 5
        while "status=400" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Using worker: gthread" in server.output()
        logged = server.output()
        assert "status=400" in logged and "ERROR" not in logged and "Traceback" not in logged
    finally:
        server.stop()
