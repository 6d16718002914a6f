"""The proxy as deployed: gunicorn with the shipped gunicorn.conf.py, several workers."""
from __future__ import annotations

import re
import signal
import threading
import time

import openai
import pytest
import requests

from tests.conftest import AUTH, CHAT, CLIENT_KEY, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.test_streaming import open_raw_stream
from tests.upstream import Reply, sse, text_chunks


@pytest.fixture
def gunicorn(tmp_path, upstream):
    servers = []

    def start(doc=None, **kwargs) -> Gunicorn:
        path = write_settings(tmp_path / f"settings{len(servers)}.yaml", doc or settings_doc(provider(upstream)))
        server = Gunicorn(path, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_sdk_works_through_gunicorn_workers(gunicorn, upstream):
    server = gunicorn(settings_doc(provider(upstream, **{"force-upstream-stream": True})))
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["folded", " answer"])))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    for _ in range(6):
        assert client.chat.completions.create(model="m", messages=CHAT["messages"]).choices[0].message.content \
            == "folded answer"
    streamed = client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "folded answer"
    assert [m.id for m in client.models.list()] == ["m"]
    # each request's access line is logging's default line from the worker, whole (proxy/logline.py writes it
    # directly when only its own handler would take it, as here)
    lines = [line for line in server.output().splitlines() if " streamfold.access " in line]
    shape = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d{3} \[(\d+)\] INFO streamfold\.access request_id=[0-9a-f]{24} "
                       r"route=(\S+) model=(\S+) provider=(\S+) status=(\d+) upstream_ms=(-|[\d.]+) forced_stream=(yes|no) "
                       r"folded=(yes|no) attempts=\d+ keys=\S+ client=(?:-|key-[0-9a-f]{8}) result=\S+")
    matches = [shape.fullmatch(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    chats = [m.groups()[2:] for m in matches if m[3] == "/v1/chat/completions"]
    assert [c[:4] for c in chats] == [("/v1/chat/completions", "m", "up", "200")] * 7
    assert [c[5:] for c in chats] == [("yes", "yes")] * 6 + [("no", "no")]
    assert {int(m[2]) for m in matches} <= set(server.worker_pids())
    assert all(abs(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) - time.time()) < 60 for m in matches)


def test_client_disconnect_under_gunicorn_closes_upstream(gunicorn, upstream):
    server = gunicorn()
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks([f"w{i}" for i in range(100)])), delay=0.05)
    sock = open_raw_stream(server.url, dict(CHAT, stream=True))
    got = b""
    while got.count(b"data: ") < 2:
        got += sock.recv(65536)
    sock.close()
    closed_at = time.monotonic()
    rec = upstream.requests[0]
    while rec.disconnected_at is None and time.monotonic() < closed_at + 2:
        time.sleep(0.02)
    assert rec.disconnected_at is not None and rec.disconnected_at - closed_at < 1.0


def test_sigterm_lets_running_streams_finish(gunicorn, upstream):
    server = gunicorn()
    events = sse(*text_chunks([f"part{i} " for i in range(10)]))
    upstream.handler = lambda rec: Reply(events=events, delay=0.15)
    result = {}

    def consume():
        response = requests.post(server.url + "/v1/chat/completions", json=dict(CHAT, stream=True),
                                 headers=AUTH, timeout=20)
        result["body"] = response.content

    reader = threading.Thread(target=consume)
    reader.start()
    while not upstream.requests or not upstream.requests[0].events_sent:
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    reader.join(20)
    assert result["body"] == b"".join(events)  # the whole stream, [DONE] included
    assert server.proc.wait(20) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/healthz", timeout=1)


def test_a_gunicorn_that_cannot_boot_fails_the_test_with_its_own_words(tmp_path):
    # tests/gunicorn_util: the error used to be "flush of closed file", hiding why gunicorn stopped
    path = write_settings(tmp_path / "bad.yaml", settings_doc(provider("http://127.0.0.1:9/v1", name="Bad Name")))
    with pytest.raises(RuntimeError, match="gunicorn did not start") as failed:
        Gunicorn(path)
    assert "openai-compatibility[0].name: use only a-z, 0-9" in str(failed.value)
