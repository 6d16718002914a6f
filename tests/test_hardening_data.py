"""Issue 12, data half, as deployed: one gunicorn with 2 workers for the module, a hostile upstream.

A settings file rewritten in place must never open the proxy, and a fold fed
200 MB of hostile stream must stay within ``max-aggregate-bytes`` (8 MB here)
plus a small constant, with worker RSS read from /proc. The werkzeug-level
tests of the same issue are in ``test_hardening_input.py``.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY
from tests.gunicorn_util import Gunicorn, peak_rss
from tests.upstream import FakeUpstream, Reply, sse, text_chunks

LIMIT = 8 * 1024 * 1024
MB = 1024 * 1024
# What a worker may grow by while folding a hostile 200 MB stream: the limit,
# the one read being parsed, the answer's serialisation and allocator slack.
RSS_ALLOWANCE = LIMIT + 24 * MB


def settings_text(upstream_url: str) -> str:
    """Providers first and api-keys last, so a file cut short still validates, with auth off."""
    doc = {"openai-compatibility": [{"name": "up", "base-url": upstream_url, "force-upstream-stream": True,
                                     "api-key-entries": [{"api-key": PROVIDER_KEY}],
                                     "models": [{"name": "upstream-model", "alias": "m"}]}],
           "timeouts": {"connect": 2, "read": 10}, "max-aggregate-bytes": LIMIT,
           "api-keys": [CLIENT_KEY]}
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    upstream = FakeUpstream()
    path = Path(tmp_path_factory.mktemp("hardening")) / "settings.yaml"
    path.write_text(settings_text(upstream.url))
    server = Gunicorn(path, workers=2, threads=4)
    yield server, path, upstream
    server.stop()
    upstream.stop()


def ok_stream(rec):
    return Reply(events=sse(*text_chunks(["fine"])))


def test_rewriting_the_settings_file_in_place_never_opens_the_proxy(deployed):
    server, path, upstream = deployed
    upstream.handler = ok_stream
    content = path.read_bytes()
    lines = content.splitlines(keepends=True)
    stop = threading.Event()

    def rewrite():
        # What cp, > and some editors do: truncate, then write, here a line per write.
        while not stop.is_set():
            with open(path, "wb") as fh:
                for line in lines:
                    fh.write(line)
                    fh.flush()
                    time.sleep(0.001)

    def hammer(_):
        statuses = []
        session = requests.Session()
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            statuses.append(session.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code)
        return statuses

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = [s for batch in pool.map(hammer, range(4)) for s in batch]
    finally:
        stop.set()
        writer.join()
    path.write_bytes(content)
    assert len(statuses) > 50
    assert statuses.count(200) == 0, f"{statuses.count(200)} unauthenticated requests were served"
    assert set(statuses) == {401}
    assert requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                         timeout=10).json()["choices"][0]["message"]["content"] == "fine"


def repeat(block: bytes, total: int):
    """``total`` bytes of stream as the same block again and again (the test holds one block)."""
    for _ in range(total // len(block)):
        yield block


def sse_block(events: list[dict], size: int = MB) -> bytes:
    one = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events)
    return one * max(1, size // len(one))


HEAD = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1764000000, "model": "upstream-model"}


def endless_line():
    yield b'data: {"id":"chatcmpl-x","choices":[{"index":0,"delta":{"content":"'
    yield from repeat(b"a" * MB, 200 * MB)


def unknown_fields():
    filler = "x" * (MB - 64)
    for i in range(200):
        yield (b"data: " + json.dumps(dict(HEAD, choices=[], **{f"x_{i}": filler})).encode() + b"\n\n")


def logprobs():
    entry = {"token": "tok", "logprob": -0.5, "bytes": [116, 111, 107],
             "top_logprobs": [{"token": f"t{k}", "logprob": -1.0, "bytes": [116]} for k in range(5)]}
    block = sse_block([dict(HEAD, choices=[{"index": 0, "delta": {"content": "tok"},
                                            "logprobs": {"content": [entry] * 4}, "finish_reason": None}])])
    yield from repeat(block, 200 * MB)


def choice_indexes():
    for start in range(0, 300_000, 10_000):
        yield b"".join(b'data: {"choices":[{"index":%d,"delta":{"content":"a"}}]}\n\n' % i
                       for i in range(start, start + 10_000))


def tiny_fragments():
    block = sse_block([dict(HEAD, choices=[{"index": 0, "delta": {"content": "a"}}])])
    yield from repeat(block, 200 * MB)


@pytest.mark.parametrize("stream", [endless_line, unknown_fields, logprobs, choice_indexes, tiny_fragments])
def test_a_hostile_200mb_stream_is_a_502_and_worker_memory_stays_within_the_limit(deployed, stream):
    server, _, upstream = deployed
    upstream.handler = ok_stream
    for _ in range(4):  # warm both workers up: imports and first allocations are not the fold's
        requests.post(server.url + "/v1/chat/completions", json=CHAT,
                      headers={**AUTH, "Connection": "close"}, timeout=10)
    before = {pid: peak_rss(pid) for pid in server.worker_pids()}
    upstream.handler = lambda rec: Reply(events=stream(), content_type="text/event-stream")
    with ThreadPoolExecutor(2) as pool:  # one each, most likely: every worker must hold the bound
        answers = list(pool.map(lambda _: requests.post(
            server.url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "Connection": "close"},
            timeout=60), range(2)))
    for answer in answers:
        assert answer.status_code == 502, answer.text[:300]
        error = answer.json()["error"]
        assert error["code"] == "aggregate_too_large" and "max-aggregate-bytes" in error["message"]
    grown = {pid: peak_rss(pid) - rss for pid, rss in before.items()}
    assert max(grown.values()) < RSS_ALLOWANCE, {pid: f"{g / MB:.1f} MB" for pid, g in grown.items()}
    upstream.handler = ok_stream
    assert requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=AUTH,
                         timeout=10).status_code == 200
