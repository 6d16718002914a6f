"""Stored conversations are bounded (issue 21, finding 7): by max-request-bytes when re-expanded, in count and bytes.

Each ``previous_response_id`` turn stores the whole history; 25 turns of 2 MB
gave a 52 MB body sent upstream and a 734 MB state file. Now a continuation
whose history would take the upstream body past ``max-request-bytes`` is a
413 ``conversation_too_large`` before any upstream call, a turn too large to
continue is stored as a note saying so, and the store keeps at most
``responses-store-max-count`` answers and ``responses-store-max-bytes`` bytes,
dropping the oldest (SQLite and a real redis-server).
"""
from __future__ import annotations

import json

import pytest
import requests

from proxy import create_app
from tests.conftest import AUTH, settings_doc
from tests.gunicorn_util import write_settings
from tests.redis_util import RedisServer
from tests.test_identity import ALICE, BOB, respond
from tests.test_responses_bridge import TEXT, answer, chat_only, chunk, post, usage

LIMIT = 200_000  # max-request-bytes here
TURN = "x" * 40_000


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request):
    if request.param == "sqlite":
        yield {}
        return
    redis = RedisServer()
    yield {"redis-url": redis.url}
    redis.stop()


def bounded(upstream, serve, store: dict, tmp_path, **top):
    """The proxy from a settings file (Redis's shared layer reloads from it), on a real server."""
    upstream.handler = answer(*TEXT)
    doc = settings_doc(chat_only(upstream), **{"max-request-bytes": LIMIT, **store, **top})
    path = write_settings(tmp_path / f"settings-{len(list(tmp_path.iterdir()))}.yaml", doc)
    return serve(create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}}))


def test_a_conversation_past_max_request_bytes_is_a_413_before_the_upstream_is_called(upstream, serve, store_settings, tmp_path):
    server = bounded(upstream, serve, store_settings, tmp_path)
    previous, turns = None, 0
    while True:
        body = {"model": "m", "input": TURN} | ({"previous_response_id": previous} if previous else {})
        answered = post(server, body)
        if answered.status_code != 200:
            break
        turns += 1
        assert len(upstream.requests[-1].raw) <= LIMIT  # what went upstream stayed within the limit
        previous = answered.json()["id"]
        assert turns < 10, "the history grew past max-request-bytes and was still sent"
    asked = len(upstream.requests)
    assert answered.status_code == 413, answered.text
    error = answered.json()["error"]
    assert error["code"] == "conversation_too_large" and error["param"] == "previous_response_id"
    assert "max-request-bytes" in error["message"]
    assert len(upstream.requests) == asked  # refused before any upstream call
    assert 3 <= turns  # 40 KB a turn against 200 KB: a few turns fit
    chunked = requests.post(server.url + "/v1/responses", headers=AUTH, timeout=10,  # no Content-Length: counted too
                            data=iter([json.dumps({"model": "m", "input": TURN, "previous_response_id": previous})
                                       .encode()]))
    assert chunked.status_code == 413 and len(upstream.requests) == asked
    fresh = post(server, {"model": "m", "input": "a new conversation"})
    assert fresh.status_code == 200


def test_a_turn_too_large_to_continue_says_so_when_continued(upstream, serve, store_settings, tmp_path):
    server = bounded(upstream, serve, store_settings, tmp_path)
    upstream.handler = answer(chunk({"role": "assistant", "content": "z" * 100_000}), chunk(finish="stop"), usage())
    big = post(server, {"model": "m", "input": "y" * 150_000})  # with its 100 KB answer, over the limit
    assert big.status_code == 200
    upstream.handler = answer(*TEXT)
    after = post(server, {"model": "m", "input": "more", "previous_response_id": big.json()["id"]})
    assert after.status_code == 413 and after.json()["error"]["code"] == "conversation_too_large"


def test_the_store_keeps_at_most_its_count_and_bytes_dropping_the_oldest(upstream, serve, store_settings, tmp_path):
    server = bounded(upstream, serve, store_settings, tmp_path, **{"responses-store-max-count": 3})
    ids = [post(server, {"model": "m", "input": f"turn {i}"}).json()["id"] for i in range(5)]
    for i, response_id in enumerate(ids):
        answered = post(server, {"model": "m", "input": "again", "store": False, "previous_response_id": response_id})
        if i < 2:
            assert answered.status_code == 400 and answered.json()["error"]["code"] == "previous_response_not_found"
        else:
            assert answered.status_code == 200, (i, answered.text)
    server = bounded(upstream, serve, store_settings, tmp_path, **{"responses-store-max-bytes": 100_000})
    ids = [post(server, {"model": "m", "input": TURN}).json()["id"] for _ in range(4)]  # ~40 KB stored each
    kept = [post(server, {"model": "m", "input": "again", "store": False, "previous_response_id": i}).status_code
            for i in ids]
    assert kept[:2] == [400, 400] and kept[2:] == [200, 200]


def continuable(server, key: str, ids: list[str]) -> list[int]:
    """Whether each id can still be continued by ``key`` (the checks themselves store nothing)."""
    return [requests.post(server.url + "/v1/responses", timeout=20, headers={"Authorization": f"Bearer {key}"},
                          json={"model": "m", "input": "again", "store": False, "previous_response_id": i}).status_code
            for i in ids]


def test_a_tenant_past_the_caps_drops_its_own_oldest_answers_not_another_tenants(upstream, serve, store_settings,
                                                                                 tmp_path):
    server = bounded(upstream, serve, store_settings, tmp_path, **{"api-keys": [ALICE, BOB],
                                                                   "responses-store-max-count": 4})
    alice = [respond(server.url, ALICE, f"alice {i}").json()["id"] for i in range(2)]
    bob = [respond(server.url, BOB, f"bob {i}").json()["id"] for i in range(6)]  # a flood past the count cap
    assert continuable(server, ALICE, alice) == [200, 200]
    assert continuable(server, BOB, bob) == [400] * 4 + [200, 200]
    server = bounded(upstream, serve, store_settings, tmp_path, **{"api-keys": [ALICE, BOB],
                                                                   "responses-store-max-bytes": 100_000})
    alice = [respond(server.url, ALICE, "small").json()["id"]]
    bob = [respond(server.url, BOB, TURN).json()["id"] for _ in range(5)]  # ~40 KB stored each
    assert continuable(server, ALICE, alice) == [200]
    assert continuable(server, BOB, bob) == [400, 400, 400, 200, 200]
