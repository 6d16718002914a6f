"""Request bodies being received (issue 21, finding 5): bounded per worker, unauthenticated ones never held.

Under gunicorn with 2 workers: a worker reads requests in its event loop
before a thread takes them, and held every body it was sent until
client-timeout: 100 clients each sending 9.99 MB of a 10 MB body held ~1 GB
of one worker. Now a POST to a client-key route without a valid key is
refused from its head (401 in the route's shape, before the body), and what
the requests still being received hold is bounded by max-inflight-bytes
(503 past it, 413 for a body that could never fit, and a log line).
"""
from __future__ import annotations

import resource
import socket
import time

import pytest

from tests.conftest import CLIENT_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, peak_rss, write_settings
from tests.test_hardening_net import assert_healthy, status_and_json
from tests.upstream import FakeUpstream

MB = 1024 * 1024
BUDGET = 4 * MB          # max-inflight-bytes here (per worker)
ANNOUNCED = 900_000      # each slow upload's Content-Length: under max-request-bytes, a quarter of BUDGET
CLIENT_TIMEOUT = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    upstream = FakeUpstream()
    doc = settings_doc(provider(upstream), **{"max-inflight-bytes": BUDGET, "max-request-bytes": 8 * MB,
                                              "client-timeout": CLIENT_TIMEOUT})
    gunicorn = Gunicorn(write_settings(tmp_path_factory.mktemp("inflight") / "settings.yaml", doc), workers=2)
    yield gunicorn
    gunicorn.stop()
    upstream.stop()


def upload_head(path: str, length: int, key: str | None) -> bytes:
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key is not None else b""
    return (b"POST %s HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n"
            % (path.encode(), auth, length))


def read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while more := sock.recv(65536):
        answer += more
    return answer


def raise_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def test_slow_unauthenticated_uploads_are_refused_from_their_head_and_hold_nothing(server):
    raise_open_files(2600)
    before = {pid: peak_rss(pid) for pid in server.worker_pids()}
    slow = []
    try:
        for i in range(1000):  # a body announced, a part of it sent, the rest never: no key, or a wrong one
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT - 3)
            path = "/v1/messages" if i % 10 == 0 else "/v1/chat/completions"
            sock.sendall(upload_head(path, ANNOUNCED, None if i % 2 else "sk-wrong-key-0001") + b"{" * 16384)
            slow.append((path, sock))
        for path, sock in slow:  # each is answered at once, long before client-timeout would end it
            status, body = status_and_json(read_answer(sock))
            assert status == 401, body
            if path == "/v1/messages":
                assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
            else:
                assert body["error"]["code"] == "invalid_api_key"
    finally:
        for _, sock in slow:
            sock.close()
    grown = {pid: peak_rss(pid) - rss for pid, rss in before.items()}
    assert max(grown.values()) < 32 * MB, {pid: f"{g / MB:.1f} MB" for pid, g in grown.items()}
    assert_healthy(server)
    assert "refused a request from 127.0.0.1 before its body: 401" in server.output()


def test_uploads_past_max_inflight_bytes_get_a_503_in_the_routes_shape_and_a_log_line(server):
    held = []
    try:
        for i in range(12):  # authenticated, each a quarter of a worker's budget, none finished yet
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT - 3)
            path = "/v1/messages" if i % 2 else "/v1/chat/completions"
            sock.sendall(upload_head(path, ANNOUNCED, CLIENT_KEY) + b" " * 1000)
            held.append((path, sock))
        time.sleep(1)  # the workers have read every head by now
        refused = []
        for path, sock in held:
            sock.settimeout(0.5)
            try:
                answer = read_answer(sock)
            except TimeoutError:
                continue  # still being received: held within the budget
            status, body = status_and_json(answer)
            assert status == 503, body
            assert (body["error"]["type"] == "overloaded_error" if path == "/v1/messages"
                    else body["error"]["code"] == "server_busy")
            assert b"\r\nRetry-After: 1\r\n" in answer
            refused.append(sock)
        # 2 workers hold at most 4 of these each (4 x 900 KB < 4 MB < 5 x 900 KB): 4 of 12 are refused at least
        assert len(refused) >= 4
        for path, sock in held:  # the others are read whole once they finish, and answered by the app
            if sock in refused:
                continue
            sock.settimeout(CLIENT_TIMEOUT)
            sock.sendall(b" " * (ANNOUNCED - 1000))
            status, _ = status_and_json(read_answer(sock))
            assert status == 400  # blank JSON: the app read it and said so
    finally:
        for _, sock in held:
            sock.close()
    assert "requests being received would hold more than max-inflight-bytes" in server.output()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:  # could never fit: 413
        sock.sendall(upload_head("/v1/chat/completions", 6 * MB, CLIENT_KEY) + b"{")
        status, body = status_and_json(read_answer(sock))
        assert status == 413 and "max-inflight-bytes" in body["error"]["message"]
    assert_healthy(server)
