"""Streaming relay against a real loopback upstream, with the proxy on a real server."""
from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from tests.conftest import AUTH, CHAT, CLIENT_KEY
from tests.upstream import Reply, sse, text_chunks


def first_read_time(url: str, body: dict) -> tuple[float, bytes, requests.Response]:
    response = requests.post(url + "/v1/chat/completions", json=body, headers=AUTH, stream=True, timeout=10)
    data = response.raw.read1(65536)
    return time.monotonic(), data, response


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_first_event_reaches_client_before_upstream_sends_the_next(live, upstream, chunked):
    events = sse(*text_chunks(["one", "two", "three"]))
    upstream.handler = lambda rec: Reply(events=events, chunked=chunked, delays={1: 1.0})
    received, data, response = first_read_time(live.url, dict(CHAT, stream=True))
    rec = upstream.requests[0]
    assert data.startswith(b"data: ")
    assert b"chat.completion.chunk" in data
    # the first event got through while the upstream was still sleeping before event 2
    assert received - rec.sent_at[0] < 0.05
    assert len(rec.sent_at) == 1
    rest = data + response.raw.read()
    assert rest == b"".join(events)
    response.close()


def open_raw_stream(url: str, body: dict) -> socket.socket:
    """A bare HTTP/1.1 client, so the test decides exactly when the connection goes away."""
    host, port = url.split("//")[1].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Authorization: " + AUTH["Authorization"].encode() +
                 b"\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def test_client_disconnect_closes_the_upstream_connection(live, upstream):
    events = sse(*text_chunks([f"w{i} " for i in range(100)]))
    upstream.handler = lambda rec: Reply(events=events, delay=0.05)
    sock = open_raw_stream(live.url, dict(CHAT, stream=True))
    got = b""
    while got.count(b"data: ") < 2:
        got += sock.recv(65536)
    sock.close()  # hang up like a closed browser tab
    closed_at = time.monotonic()
    rec = upstream.requests[0]
    deadline = closed_at + 2
    while rec.disconnected_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.disconnected_at is not None
    assert rec.disconnected_at - closed_at < 1.0
    assert rec.events_sent < 30


def test_upstream_dropping_mid_stream_ends_with_an_error_event(live, upstream):
    events = sse(*text_chunks(["a", "b", "c", "d"]))
    upstream.handler = lambda rec: Reply(events=events, drop_after=3, chunked=True)
    response = requests.post(live.url + "/v1/chat/completions", json=dict(CHAT, stream=True), headers=AUTH,
                             timeout=10)
    assert response.status_code == 200
    assert response.content.startswith(b"".join(events[:3]))
    last = response.content.strip().split(b"\n\n")[-1]
    assert json.loads(last[len(b"data: "):])["error"]["type"] == "upstream_error"


def sdk(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def test_sdk_chat_completion_non_stream(live, upstream):
    result = sdk(live).chat.completions.create(model="m", messages=CHAT["messages"])
    assert result.choices[0].message.content == "Hello!"
    assert result.usage.total_tokens == 7
    assert upstream.requests[0].body["model"] == "upstream-model"


def test_sdk_chat_completion_stream(live, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["Hel", "lo ", "there"],
                                                                 usage={"prompt_tokens": 3, "completion_tokens": 3,
                                                                        "total_tokens": 6})))
    stream = sdk(live).chat.completions.create(model="m", messages=CHAT["messages"], stream=True,
                                               stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there"
    assert chunks[-1].usage.total_tokens == 6


def test_sdk_models_list(live):
    assert [m.id for m in sdk(live).models.list()] == ["m"]


def test_sdk_sees_errors_as_exceptions(live, upstream):
    with pytest.raises(openai.NotFoundError):
        sdk(live).chat.completions.create(model="nope", messages=CHAT["messages"])
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=CHAT["messages"])


def test_sdk_stream_cut_by_upstream_raises(live, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["a", "b", "c"])), drop_after=2)
    with pytest.raises(openai.APIError):
        list(sdk(live).chat.completions.create(model="m", messages=CHAT["messages"], stream=True))


def test_chunked_body_over_the_limit_is_413_through_a_real_server(upstream, serve):
    from tests.conftest import make_app, provider, settings_doc
    live = serve(make_app(settings_doc(provider(upstream), **{"max-request-bytes": 2000})))
    big = json.dumps(dict(CHAT, messages=[{"role": "user", "content": "y" * 5000}])).encode()

    def pieces():  # a generator body: requests sends it chunked, without Content-Length
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    response = requests.post(live.url + "/v1/chat/completions", data=pieces(), timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert upstream.requests == []
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200
