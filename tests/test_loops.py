"""Loops (issue 21, finding 8): a provider whose base-url is the proxy itself answers 508 at once.

Before the hop header, one such request re-entered the proxy until every
thread of a worker was taken (the worker froze for more than 90 s); here a
loop would outlast the client's timeout, so a 508 proves it was cut at once.
"""
from __future__ import annotations

import anthropic
import openai
import pytest
import requests

from proxy.hop import HEADER, forward
from tests.conftest import AUTH, CHAT, CLIENT_KEY, make_app, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import FakeUpstream, Reply, free_port, sse, text_chunks

LOOP_TIMEOUT = 10  # seconds: a looping request would hold the client far longer (every thread of a worker)


@pytest.fixture(scope="module")
def model_server():
    upstream = FakeUpstream()
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def looping(model_server, tmp_path_factory):
    """gunicorn, 2 workers of 8 threads, with a provider "self" whose base-url is the proxy itself."""
    port = free_port()
    doc = settings_doc(provider(f"http://127.0.0.1:{port}/v1", name="self", **{"force-upstream-stream": True}),
                       provider(model_server, name="ok", models=[{"name": "upstream-model", "alias": "ok"}]))
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("loop") / "settings.yaml", doc),
                      env={"PORT": str(port)})
    yield server
    server.stop()


def assert_healthy(server: Gunicorn) -> None:
    for _ in range(4):  # both workers, most likely
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
        answer = requests.post(server.url + "/v1/chat/completions", json=dict(CHAT, model="ok"), headers=AUTH,
                               timeout=5)
        assert answer.json()["choices"][0]["message"]["content"] == "fine"


@pytest.mark.parametrize("stream", [False, True])
def test_a_provider_pointing_at_the_proxy_itself_is_a_508_and_the_workers_stay_healthy(looping, stream):
    for _ in range(4):
        answer = requests.post(looping.url + "/v1/chat/completions", json=dict(CHAT, stream=stream),
                               headers=AUTH, timeout=LOOP_TIMEOUT)
        assert answer.status_code == 508 and answer.headers["Content-Type"] == "application/json"
        error = answer.json()["error"]
        assert error["code"] == "loop_detected" and "base-url" in error["message"]
    assert_healthy(looping)
    assert "Traceback" not in looping.output()


def test_bridged_routes_answer_the_loop_in_their_own_shape(looping):
    claude = anthropic.Anthropic(base_url=looping.url, api_key=CLIENT_KEY, max_retries=0, timeout=LOOP_TIMEOUT)
    with pytest.raises(anthropic.APIStatusError) as caught:
        claude.messages.create(model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 508 and caught.value.body["type"] == "error"
    assert "base-url" in caught.value.body["error"]["message"]
    codex = openai.OpenAI(base_url=looping.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=LOOP_TIMEOUT)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            codex.responses.create(model="m", input="hi", stream=stream)
        assert caught.value.status_code == 508 and caught.value.body["code"] == "loop_detected"
    assert_healthy(looping)


def test_a_request_carrying_this_instances_hop_is_refused_in_the_routes_shape(serve, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    live = serve(make_app(settings_doc(provider(upstream))))
    looped = {**AUTH, HEADER: forward("sf-from-elsewhere")}  # this process's own id, after another's
    chat = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=looped, timeout=5)
    assert chat.status_code == 508 and chat.json()["error"]["code"] == "loop_detected"
    messages = requests.post(live.url + "/v1/messages", headers=looped, timeout=5,
                             json={"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 508 and messages.json()["type"] == "error"
    assert not upstream.requests
    # Another instance's hop (a chain of proxies) passes, and this instance adds its own for the next one.
    chained = requests.post(live.url + "/v1/chat/completions", json=CHAT, timeout=5,
                            headers={**AUTH, HEADER: "sf-0123456789abcdef"})
    assert chained.status_code == 200
    assert upstream.requests[-1].headers[HEADER.lower()] == forward("sf-0123456789abcdef")
    too_many = ", ".join(f"sf-{i:016x}" for i in range(9))  # a loop through several instances
    assert requests.post(live.url + "/v1/chat/completions", json=CHAT, timeout=5,
                         headers={**AUTH, HEADER: too_many}).status_code == 508


def test_a_chain_of_proxies_passes_and_a_loop_behind_it_is_still_cut(looping, serve, model_server):
    """A second proxy (this process) -> gunicorn, whose provider loops: the hop of the second does not stop
    gunicorn, and gunicorn's own stops the loop."""
    middle = serve(make_app(settings_doc(provider(looping.url + "/v1", name="back", **{
        "api-key-entries": [{"api-key": CLIENT_KEY}], "models": [{"name": "m", "alias": "m"}]}))))
    answer = requests.post(middle.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=LOOP_TIMEOUT)
    assert answer.status_code == 508 and answer.json()["error"]["code"] == "loop_detected"
    assert_healthy(looping)


def test_a_loop_on_an_unknown_messages_path_is_an_anthropic_508(live):
    # Raised before routing found a view: the app's handler renders it in the route family's shape.
    looped = {**AUTH, HEADER: forward("sf-from-elsewhere")}
    answer = requests.post(live.url + "/v1/messages/batches", headers=looped, json={}, timeout=10)
    assert answer.status_code == 508 and answer.json()["type"] == "error"
    assert "passed through this proxy" in answer.json()["error"]["message"]
