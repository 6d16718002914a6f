"""Failover, retries, cooldowns, timeouts and keep-alive against a real loopback upstream.

The fake upstream records every attempt with the provider key it carried, so
each test can prove which key was used and that nothing was retried after the
first byte reached the client.
"""
from __future__ import annotations

import email.utils
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from tests.conftest import AUTH, CHAT, CLIENT_KEY, make_app, provider, settings_doc
from tests.forward_proxy import ForwardProxy, Socks5Proxy
from tests.test_routes import metric_value
from tests.upstream import Reply, completion, free_port, sse, text_chunks

KEYS = ["sk-key-one-1111", "sk-key-two-2222", "sk-key-three-3333"]
OK = json.dumps(completion("fine")).encode()


def keyed(upstream, *, keys=KEYS, **extra):
    return provider(upstream, **{"api-key-entries": [{"api-key": k} for k in keys], **extra})


def app_with(*providers, **top):
    return make_app(settings_doc(*providers, **top)).test_client()


def post(client, body=CHAT):
    return client.post("/v1/chat/completions", json=body, headers=AUTH)


def used_keys(upstream) -> list[str]:
    return [rec.key for rec in upstream.requests]


def test_keys_rotate_round_robin(upstream):
    client = app_with(keyed(upstream))
    for _ in range(6):
        assert post(client).status_code == 200
    assert used_keys(upstream) == KEYS + KEYS


def test_429_cools_the_key_for_retry_after_and_moves_on(upstream):
    limited = Reply(status=429, body=b'{"error":{"message":"slow"}}', headers={"Retry-After": "30"})
    upstream.handler = lambda rec: limited if rec.key == KEYS[0] else Reply(body=OK)
    client = app_with(keyed(upstream))
    assert post(client).status_code == 200
    assert used_keys(upstream) == [KEYS[0], KEYS[1]]
    for _ in range(4):
        assert post(client).status_code == 200
    assert KEYS[0] not in used_keys(upstream)[2:]


def test_429_with_http_date_retry_after(upstream):
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    upstream.handler = lambda rec: (Reply(status=429, body=b"{}", headers={"Retry-After": when})
                                    if rec.key == KEYS[0] else Reply(body=OK))
    client = app_with(keyed(upstream, keys=KEYS[:2]))
    for _ in range(3):
        assert post(client).status_code == 200
    assert used_keys(upstream).count(KEYS[0]) == 1


def test_every_key_cooling_gives_429_with_retry_after_and_no_upstream_call(upstream):
    upstream.handler = lambda rec: Reply(status=429, body=b'{"error":{"message":"quota"}}',
                                         headers={"Retry-After": "40"} if rec.key == KEYS[0] else {"Retry-After": "20"})
    client = app_with(keyed(upstream, keys=KEYS[:2]))
    first = post(client)
    assert first.status_code == 429
    calls = len(upstream.requests)
    second = post(client)
    assert second.status_code == 429
    assert second.get_json()["error"]["type"] == "rate_limit_error"
    assert 15 <= int(second.headers["Retry-After"]) <= 20  # the soonest key recovers in 20 s
    assert len(upstream.requests) == calls


# Every route, with a body the upstream gets (streaming where the route streams).
EVERY_ROUTE = {
    "chat": ("/v1/chat/completions", CHAT),
    "chat-stream": ("/v1/chat/completions", {**CHAT, "stream": True}),
    "completions": ("/v1/completions", {"model": "m", "prompt": "hi"}),
    "embeddings": ("/v1/embeddings", {"model": "m", "input": "hi"}),
    "responses": ("/v1/responses", {"model": "m", "input": "hi"}),
    "responses-stream": ("/v1/responses", {"model": "m", "input": "hi", "stream": True}),
    "messages": ("/v1/messages", {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    "messages-stream": ("/v1/messages", {"model": "m", "max_tokens": 16, "stream": True,
                                         "messages": [{"role": "user", "content": "hi"}]}),
    "gemini": ("/v1beta/models/m:generateContent", {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
    "gemini-stream": ("/v1beta/models/m:streamGenerateContent?alt=sse",
                      {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
}


@pytest.mark.parametrize("route", list(EVERY_ROUTE))
def test_an_upstream_503_with_retry_after_reaches_the_client_with_it_on_every_route(upstream, serve, route):
    upstream.handler = lambda rec: Reply(status=503, body=b'{"error":{"message":"loading the model"}}',
                                         headers={"Retry-After": "7"})
    live = serve(make_app(settings_doc(keyed(upstream, keys=KEYS[:2]))))
    path, body = EVERY_ROUTE[route]
    for _ in range(2):  # a 503 cools nothing: each request asks both keys, and answers the last one's 503
        answer = requests.post(live.url + path, json=body, headers=AUTH, timeout=10)
        assert answer.status_code == (529 if route.startswith("messages") else 503), answer.text
        assert answer.headers["Retry-After"] == "7"
    assert len(upstream.requests) == 4


@pytest.mark.parametrize("route", list(EVERY_ROUTE))
def test_an_upstream_429_and_then_every_key_cooling_give_retry_after_on_every_route(upstream, serve, route):
    upstream.handler = lambda rec: Reply(status=429, body=b'{"error":{"message":"quota"}}',
                                         headers={"Retry-After": "40"})
    live = serve(make_app(settings_doc(provider(upstream))))
    path, body = EVERY_ROUTE[route]
    first = requests.post(live.url + path, json=body, headers=AUTH, timeout=10)
    assert first.status_code == 429 and first.headers["Retry-After"] == "40"  # the upstream's
    second = requests.post(live.url + path, json=body, headers=AUTH, timeout=10)
    assert second.status_code == 429 and 35 <= int(second.headers["Retry-After"]) <= 40  # the key's cooldown
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("header, sent", [("12", "12"), ("0.2", "1"), ("inf", "120"), ("soon", None), ("nan", None)])
def test_a_503_retry_after_reaches_the_client_in_whole_seconds_within_max_cooldown(upstream, serve, header, sent):
    upstream.handler = lambda rec: Reply(status=503, body=b'{"error":{"message":"busy"}}',
                                         headers={"Retry-After": header})
    live = serve(make_app(settings_doc(provider(upstream), **{"max-cooldown": 120})))
    answer = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert answer.status_code == 503
    assert answer.headers.get("Retry-After") == sent


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_moves_to_the_next_key(upstream, status):
    upstream.handler = lambda rec: Reply(status=status, body=b'{"error":{"message":"x"}}') if rec.key == KEYS[0] \
        else Reply(body=OK)
    assert post(app_with(keyed(upstream))).status_code == 200
    assert used_keys(upstream) == KEYS[:2]


def test_refused_key_sits_out_and_the_next_key_is_used(upstream):
    upstream.handler = lambda rec: Reply(status=401, body=b'{"error":{"message":"bad key"}}') if rec.key == KEYS[0] \
        else Reply(body=OK)
    client = app_with(keyed(upstream))
    for _ in range(4):
        assert post(client).status_code == 200
    assert used_keys(upstream).count(KEYS[0]) == 1


def test_every_key_refused_is_502_naming_the_provider(upstream):
    upstream.handler = lambda rec: Reply(status=403, body=b'{"error":{"message":"forbidden"}}')
    response = post(app_with(keyed(upstream, name="gpu-box")))
    assert response.status_code == 502
    assert "gpu-box" in response.get_json()["error"]["message"]
    assert used_keys(upstream) == KEYS


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_client_errors_are_returned_at_once(upstream, status):
    upstream.handler = lambda rec: Reply(status=status, body=b'{"error":{"message":"your fault"}}')
    assert post(app_with(keyed(upstream))).status_code == status
    assert len(upstream.requests) == 1


def test_request_retry_bounds_the_attempts(upstream):
    upstream.handler = lambda rec: Reply(status=503, body=b'{"error":{"message":"busy"}}')
    assert post(app_with(keyed(upstream), **{"request-retry": 1})).status_code == 503
    assert len(upstream.requests) == 2
    upstream.requests.clear()
    assert post(app_with(keyed(upstream, **{"request-retry": 0}))).status_code == 503
    assert len(upstream.requests) == 1


def test_connect_failure_fails_over_to_another_provider_which_then_goes_first(upstream):
    dead = provider(f"http://127.0.0.1:{free_port()}/v1", name="dead")
    client = app_with(dead, provider(upstream, name="alive"))
    for _ in range(4):
        assert post(client).status_code == 200
    assert len(upstream.requests) == 4


def test_hung_upstream_gives_504_after_read_timeout_and_worker_recovers(upstream):
    upstream.handler = lambda rec: Reply(hang=30) if len(upstream.requests) == 1 else Reply(body=OK)
    client = app_with(provider(upstream, **{"request-retry": 0}), timeouts={"connect": 1, "read": 0.5})
    started = time.monotonic()
    response = post(client)
    elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert 0.4 < elapsed < 3
    assert post(client).status_code == 200


def test_upstream_silent_mid_stream_ends_with_timeout_error_event(upstream):
    events = sse(*text_chunks(["a", "b"]))
    upstream.handler = lambda rec: Reply(events=events, delays={2: 30})
    client = app_with(provider(upstream), timeouts={"connect": 1, "read": 0.5})
    response = post(client, dict(CHAT, stream=True))
    assert response.status_code == 200
    assert response.data.startswith(events[0] + events[1])
    assert b'"upstream_timeout"' in response.data.rsplit(b"data: ", 1)[1]
    assert len(upstream.requests) == 1  # nothing retried after the first byte


def test_drop_after_first_byte_is_not_retried(upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["a", "b", "c"])), drop_after=2)
    response = post(app_with(keyed(upstream)), dict(CHAT, stream=True))
    assert response.status_code == 200
    assert b"upstream_error" in response.data
    assert len(upstream.requests) == 1


def test_empty_200_stream_fails_over_before_the_first_byte(upstream):
    upstream.handler = lambda rec: Reply(events=[]) if rec.key == KEYS[0] else Reply(events=sse(*text_chunks(["ok"])))
    response = post(app_with(keyed(upstream)), dict(CHAT, stream=True))
    assert response.status_code == 200 and b'"ok"' in response.data
    assert used_keys(upstream) == KEYS[:2]


def test_forced_fold_cut_off_is_retried_as_a_whole(upstream):
    full = sse(*text_chunks(["all", " of it"]))
    upstream.handler = lambda rec: Reply(events=full, drop_after=2) if rec.key == KEYS[0] else Reply(events=full)
    response = post(app_with(keyed(upstream, **{"force-upstream-stream": True})))
    assert response.status_code == 200
    assert response.get_json()["choices"][0]["message"]["content"] == "all of it"
    assert used_keys(upstream) == KEYS[:2]


def test_log_line_shows_attempts_and_redacted_keys(upstream, caplog):
    upstream.handler = lambda rec: Reply(status=503, body=b"{}") if rec.key == KEYS[0] else Reply(body=OK)
    post(app_with(keyed(upstream)))
    line = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"][-1]
    assert "attempts=2" in line and "keys=...1111,...2222" in line
    assert all(k not in "\n".join(r.getMessage() for r in caplog.records) for k in KEYS)


def test_proxy_url_per_key_is_used_without_touching_the_environment(upstream):
    forward = ForwardProxy()
    try:
        entries = [{"api-key": KEYS[0], "proxy-url": forward.url}, {"api-key": KEYS[1]}]
        client = app_with(provider(upstream, **{"api-key-entries": entries}))
        assert post(client).status_code == 200
        assert post(client).status_code == 200
        assert forward.seen == [upstream.url + "/chat/completions"]
        assert used_keys(upstream) == KEYS[:2]
        assert "HTTP_PROXY" not in os.environ and "http_proxy" not in os.environ
    finally:
        forward.stop()


def test_socks5_proxy_url_per_key(upstream):
    socks = Socks5Proxy()
    try:
        client = app_with(provider(upstream, **{"api-key-entries": [{"api-key": KEYS[0], "proxy-url": socks.url}]}))
        for _ in range(2):
            assert post(client).status_code == 200
            assert post(client, dict(CHAT, stream=True)).status_code == 200
        assert socks.seen and all(target == ("127.0.0.1", upstream.port) for target in socks.seen)
        assert used_keys(upstream) == [KEYS[0]] * 4
    finally:
        socks.stop()


def test_100_concurrent_requests_with_first_key_rate_limited_all_succeed_without_waiting(upstream, serve):
    upstream.handler = lambda rec: (Reply(status=429, body=b"{}", headers={"Retry-After": "30"})
                                    if rec.key == KEYS[0] else Reply(body=OK))
    app = make_app(settings_doc(keyed(upstream)))
    live = serve(app)

    def one(_):
        started = time.monotonic()
        r = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=20)
        return r.status_code, time.monotonic() - started

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(100)))
    assert [status for status, _ in results] == [200] * 100
    assert max(took for _, took in results) < 10  # nobody sat out the 30 s cooldown
    assert sum(1 for rec in upstream.requests if rec.key == KEYS[0]) < 100


def slow_fold_reply(rec):
    return Reply(events=sse(*text_chunks(["slow", " but", " sure"])), delay=0.25)


def test_keepalive_pads_a_long_fold_and_the_sdk_parses_it(upstream, serve):
    upstream.handler = slow_fold_reply
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}),
                                **{"nonstream-keepalive-interval": 0.2}))
    live = serve(app)
    raw = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert raw.status_code == 200
    assert raw.content.startswith(b"\n") and raw.content.count(b"\n") >= 3
    assert json.loads(raw.content)["choices"][0]["message"]["content"] == "slow but sure"
    sdk = openai.OpenAI(base_url=live.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    result = sdk.chat.completions.create(model="m", messages=CHAT["messages"])
    assert result.choices[0].message.content == "slow but sure"


def test_keepalive_padded_fold_counts_its_upstream_time_once(upstream, serve):
    upstream.handler = slow_fold_reply
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}),
                                **{"nonstream-keepalive-interval": 0.2}))
    live = serve(app)

    def count() -> float:
        text = requests.get(live.url + "/metrics", timeout=10).text
        return metric_value(text, "streamfold_upstream_seconds_count", provider="up")

    before = count()
    raw = requests.post(live.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert raw.content.startswith(b"\n") and json.loads(raw.content)["choices"][0]["message"]["content"]
    assert count() - before == 1  # one request, one sample (it was counted by the fold and again by the padding)


def test_keepalive_error_after_commit_is_an_openai_error_body(upstream, serve):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["cut", "off", "here"]), done=False)[:3], delay=0.25)
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True, "request-retry": 0}),
                                **{"nonstream-keepalive-interval": 0.2}))
    raw = requests.post(serve(app).url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert raw.status_code == 200  # committed before the failure was known
    assert json.loads(raw.content)["error"]["message"] == "upstream stream ended early"


def test_keepalive_fast_fold_keeps_its_real_status(upstream):
    upstream.handler = lambda rec: Reply(status=404, body=b'{"error":{"message":"no such model upstream"}}')
    client = app_with(provider(upstream, **{"force-upstream-stream": True}), **{"nonstream-keepalive-interval": 5})
    assert post(client).status_code == 404


@pytest.mark.parametrize("failure, expected", [
    (lambda: Reply(status=503, body=b'{"error":{"message":"restarting"}}'), 503),
    (lambda: Reply(status=429, body=b'{"error":{"message":"busy"}}', headers={"Retry-After": "1"}), 429),
    (lambda: Reply(hang=30), 504),
    (lambda: Reply(events=sse(*text_chunks(["a", "b"]))[:1], drop_after=0), 502),
], ids=["503", "429", "hang", "empty-stream"])
def test_after_the_upstream_recovers_the_next_request_succeeds(upstream, failure, expected):
    broken = {"on": True}
    upstream.handler = lambda rec: failure() if broken["on"] else Reply(body=OK)
    client = app_with(provider(upstream, **{"request-retry": 0}), timeouts={"connect": 1, "read": 0.5})
    assert post(client).status_code == expected
    broken["on"] = False
    if expected == 429:
        time.sleep(1.1)  # the key sits out its Retry-After first
    assert post(client).status_code == 200
    assert post(client).json["choices"][0]["message"]["content"] == "fine"
