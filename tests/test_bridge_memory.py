"""What the bridges hold (issue 21, findings 6 and 7, acceptance 5): bounded by settings, under gunicorn.

A 200 MB tool call through a *streaming* bridge was held whole (+824 MB RSS
on /v1/messages, +2.2 GB on /v1/responses, which also wrote it to the client
four times). Now what a bridged stream holds until its end (tool arguments;
a Responses stream's text) is charged against ``max-aggregate-bytes`` (8 MB
here) and past it the stream ends with its protocol's error event; worker
RSS is read from /proc (VmHWM) as in ``test_hardening_data``. A long
``previous_response_id`` chain is bounded by ``max-request-bytes`` (2 MB
here). The README's failure table has the full-size numbers (64 MiB, 200 MB,
10 MiB and 2 MB turns), measured by hand with the same requests.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import anthropic_invariants, responses_invariants
from tests.conftest import AUTH, CHAT, provider, settings_doc
from tests.gunicorn_util import Gunicorn, peak_rss, write_settings
from tests.test_responses_bridge import TEXT, answer
from tests.upstream import FakeUpstream, Reply, sse, text_chunks

MB = 1024 * 1024
LIMIT = 8 * MB
TOTAL = int(os.environ.get("STREAMFOLD_BRIDGE_MEMORY_MB", "200")) * MB  # the tool call's size
# What a worker may grow by: what the bridge holds (the limit), the read being parsed, the last events'
# serialisation and allocator slack.
RSS_ALLOWANCE = 3 * LIMIT + 24 * MB
REQUEST_LIMIT = 2 * MB
# A turn is parsed, its history read and translated, the upstream body written and the answer stored: about
# ten copies of what one request may carry (measured 95 MB at 10 MiB).
CHAIN_ALLOWANCE = 16 * REQUEST_LIMIT + 24 * MB
HEAD = {"id": "chatcmpl-big", "object": "chat.completion.chunk", "created": 1764000000, "model": "upstream-model"}


def tool_call(fragment: int, total: int = TOTAL):
    """A stream whose one tool call's arguments are ``total`` bytes, in fragments of ``fragment`` bytes."""
    yield b"data: " + json.dumps(dict(HEAD, choices=[{"index": 0, "delta": {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_big", "type": "function", "function": {"name": "write", "arguments": ""}}]},
        "finish_reason": None}])).encode() + b"\n\n"
    one = b"data: " + json.dumps(dict(HEAD, choices=[{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "a" * fragment}}]}, "finish_reason": None}])).encode() + b"\n\n"
    block = one * max(1, MB // len(one))
    for _ in range(total // (fragment * (len(block) // len(one)))):
        yield block
    yield from sse(dict(HEAD, choices=[{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    upstream = FakeUpstream()
    doc = settings_doc(provider(upstream, **{"native-apis": ["chat"]}),
                       **{"max-aggregate-bytes": LIMIT, "max-request-bytes": REQUEST_LIMIT})
    server = Gunicorn(write_settings(tmp_path_factory.mktemp("bridges") / "settings.yaml", doc), workers=2,
                      threads=4)
    yield server, upstream
    server.stop()
    upstream.stop()


def messages(server: Gunicorn) -> bytes:
    return requests.post(server.url + "/v1/messages", headers={**AUTH, "Connection": "close"}, timeout=120, json={
        "model": "m", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "write"}],
        "tools": [{"name": "write", "input_schema": {"type": "object"}}]}).content


def responses(server: Gunicorn) -> bytes:
    return requests.post(server.url + "/v1/responses", headers={**AUTH, "Connection": "close"}, timeout=120, json={
        "model": "m", "stream": True, "input": "write",
        "tools": [{"type": "function", "name": "write", "parameters": {"type": "object"}}]}).content


def ok_stream(rec):
    return Reply(events=sse(*text_chunks(["fine"])))


@pytest.mark.parametrize("fragment", [65536, 64])  # 64: the overhead per fragment counts as much as its text
@pytest.mark.parametrize("route", [messages, responses])
def test_a_200mb_tool_call_through_a_streaming_bridge_ends_with_its_error_event_within_the_bound(
        deployed, route, fragment):
    server, upstream = deployed
    upstream.handler = ok_stream
    for _ in range(4):  # warm both workers up: imports and first allocations are not the bridge's
        requests.post(server.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Connection": "close"},
                      timeout=10)
        route(server)
    before = {pid: peak_rss(pid) for pid in server.worker_pids()}
    upstream.handler = lambda rec: Reply(events=tool_call(fragment), content_type="text/event-stream")
    with ThreadPoolExecutor(2) as pool:  # one each, most likely: every worker must hold the bound
        answers = list(pool.map(lambda _: route(server), range(2)))
    for raw in answers:
        assert len(raw) < 3 * LIMIT  # the arguments streamed so far at most, never repeated whole
        if route is messages:
            checked = anthropic_invariants.check_stream(raw, broken=True)
            assert "max-aggregate-bytes" in checked.error["message"], checked.error
        else:
            terminal = responses_invariants.check(raw)
            assert terminal["type"] == "error" and terminal["code"] == "aggregate_too_large"
    grown = {pid: peak_rss(pid) - rss for pid, rss in before.items()}
    assert max(grown.values()) < RSS_ALLOWANCE, {pid: f"{g / MB:.1f} MB" for pid, g in grown.items()}
    upstream.handler = ok_stream
    assert requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200


@pytest.mark.parametrize("route", [messages, responses])
def test_a_tool_call_within_the_bound_still_streams_whole(deployed, route):
    server, upstream = deployed
    upstream.handler = lambda rec: Reply(events=tool_call(65536, 2 * MB), content_type="text/event-stream")
    raw = route(server)
    if route is messages:
        checked = anthropic_invariants.check_stream(raw)
        assert checked.stop_reason == "tool_use" and checked.blocks[-1]["type"] == "tool_use"
    else:
        terminal = responses_invariants.check(raw)
        assert terminal["type"] == "response.completed"
        assert len(terminal["response"]["output"][0]["arguments"]) > MB


def test_a_50_turn_previous_response_id_chain_is_refused_once_past_max_request_bytes_within_the_bound(deployed):
    server, upstream = deployed
    upstream.handler = answer(*TEXT)
    for _ in range(4):  # warm both workers up
        requests.post(server.url + "/v1/responses", json={"model": "m", "input": "hi"}, headers=AUTH, timeout=10)
    before = {pid: peak_rss(pid) for pid in server.worker_pids()}
    asked = len(upstream.requests)
    turn, previous, statuses = "x" * (REQUEST_LIMIT // 5), None, []
    for _ in range(50):
        body = {"model": "m", "input": turn} | ({"previous_response_id": previous} if previous else {})
        answered = requests.post(server.url + "/v1/responses", json=body, headers=AUTH, timeout=30)
        statuses.append(answered.status_code)
        if answered.status_code == 200:
            previous = answered.json()["id"]
        else:
            assert answered.json()["error"]["code"] == "conversation_too_large"
    assert statuses[:3] == [200] * 3 and statuses[-40:] == [413] * 40
    assert max(len(rec.raw) for rec in upstream.requests[asked:]) <= REQUEST_LIMIT
    grown = {pid: peak_rss(pid) - rss for pid, rss in before.items()}
    assert max(grown.values()) < CHAIN_ALLOWANCE, {pid: f"{g / MB:.1f} MB" for pid, g in grown.items()}
