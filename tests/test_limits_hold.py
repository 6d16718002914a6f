"""Limits that cannot be walked around (issue 21, finding 3).

tpm: a stream cut off before its usage chunk (the client left, or the
upstream broke off) was charged 0 tokens, so a client that disconnects just
before the end had no token limit. max-concurrent: a client that left a
padded non-stream answer, or an Anthropic stream still waiting for its
upstream, got its slot back while the upstream kept working for it.
"""
from __future__ import annotations

import threading
import time

import requests

from proxy import pump
from tests.conftest import make_app
from tests.test_limits import limited, policy_doc
from tests.test_usage import KEY_A, chat, openai_like, wait_for_usage
from tests.upstream import Reply, sse, text_chunks


def long_stream(rec, **reply) -> Reply:
    """100 one-token events, 20 ms apart, and usage only at the very end."""
    usage = {"prompt_tokens": 3, "completion_tokens": 100, "total_tokens": 103}
    return Reply(events=sse(*text_chunks(["tok"] * 100, model=rec.body["model"], usage=usage)), delay=0.02, **reply)


def wait_until(check, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_stream_the_client_leaves_before_its_usage_is_charged_from_what_was_sent(upstream, serve):
    upstream.handler = long_stream
    live = serve(make_app(policy_doc(upstream, team_a={"tpm": 40})))
    with requests.post(live.url + "/v1/chat/completions", stream=True, timeout=10,
                       headers={"Authorization": f"Bearer {KEY_A}"},
                       json={"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as cut:
        events = 0
        for line in cut.iter_lines():
            events += line.startswith(b"data:")
            if events == 60:
                break  # gone well before the usage chunk
    wait_until(lambda: upstream.requests[0].disconnected_at is not None)
    row = wait_for_usage(live.url, 1)["data"][0]
    # estimated from the bytes received (60 or more one-token events, sized by the first read): about that many
    assert 40 <= row["completion_tokens"] <= 110 and row["prompt_tokens"] > 0
    refused = chat(live.url, KEY_A, "qwen")
    assert limited(refused) and "40 tokens per minute" in refused.json()["error"]["message"]


def test_a_stream_the_upstream_breaks_off_without_usage_is_charged_too(upstream, serve):
    upstream.handler = lambda rec: long_stream(rec, drop_after=50)
    live = serve(make_app(policy_doc(upstream, team_a={"tpm": 40})))
    broken = chat(live.url, KEY_A, "qwen", stream=True)
    assert broken.status_code == 200 and b'"error"' in broken.content  # the failure is said in the stream
    row = wait_for_usage(live.url, 1)["data"][0]
    assert row["errors"] == 1 and 40 <= row["completion_tokens"] <= 60  # 50 events received
    assert limited(chat(live.url, KEY_A, "qwen"))


def test_a_long_prompt_without_spaces_up_front_is_estimated_by_its_length_not_as_one_image(upstream, serve):
    """A usage-less answer's prompt is estimated from the body sent: a 200 000-character prompt starting with
    "data:" or with 5000 characters without a space was charged as one image (1600 tokens)."""
    upstream.handler = lambda rec: long_stream(rec, drop_after=5)
    live = serve(make_app(policy_doc(upstream)))
    prose = "the quick brown fox jumps over the lazy dog " * 4600
    for prompt in ("data:" + prose, "x" * 5000 + " " + prose):
        assert len(prompt) > 200_000
        assert b'"error"' in chat(live.url, KEY_A, "qwen", prompt, stream=True).content
    total = wait_for_usage(live.url, 2)["total"]
    assert total["prompt_tokens"] >= 2 * 200_000 // 4


def test_a_client_leaving_a_padded_answer_keeps_its_slot_until_the_upstream_is_done(upstream, serve, caplog):
    release = threading.Event()

    def slow(rec) -> Reply:
        if rec.body["messages"][0]["content"] == "slow":
            release.wait(30)  # the upstream is still generating this answer
        return openai_like(rec)

    upstream.handler = slow
    doc = policy_doc(upstream, team_a={"max-concurrent": 1}, **{"nonstream-keepalive-interval": 0.05})
    live = serve(make_app(doc))
    try:
        with requests.post(live.url + "/v1/chat/completions", stream=True, timeout=10,
                           headers={"Authorization": f"Bearer {KEY_A}"},
                           json={"model": "qwen", "messages": [{"role": "user", "content": "slow"}]}) as padded:
            assert padded.raw.read(1) == b"\n"  # the 200 is committed; padding follows
        wait_until(lambda: 'result="client closed"' in caplog.text)  # the proxy saw the client go
        assert len(upstream.requests) == 1
        assert limited(chat(live.url, KEY_A, "qwen"))  # the upstream still works for the one allowed request
        assert len(upstream.requests) == 1
        release.set()
        wait_until(lambda: chat(live.url, KEY_A, "qwen").status_code == 200)  # free once the fold has ended
    finally:
        release.set()
    usage = wait_for_usage(live.url, 3, **{"group-by": "client"})["total"]
    assert usage["prompt_tokens"] >= 4 and usage["completion_tokens"] >= 7  # the left answer's real usage too


def test_a_client_leaving_an_anthropic_stream_before_the_upstream_answered_keeps_its_slot(upstream, serve, caplog,
                                                                                           monkeypatch):
    monkeypatch.setattr(pump, "KEEPALIVE_INTERVAL", 0.05)  # commit early, then ping through the silence
    release = threading.Event()

    def slow(rec) -> Reply:
        if rec.body["messages"][-1]["content"] == "slow":
            release.wait(30)  # thinking: no byte yet
        return openai_like(rec)

    upstream.handler = slow
    doc = policy_doc(upstream, team_a={"max-concurrent": 1})
    doc["openai-compatibility"][0]["native-apis"] = ["chat"]
    live = serve(make_app(doc))
    headers = {"x-api-key": KEY_A, "anthropic-version": "2023-06-01"}
    message = {"model": "qwen", "max_tokens": 16, "messages": [{"role": "user", "content": "slow"}], "stream": True}
    try:
        with requests.post(live.url + "/v1/messages", json=message, headers=headers, stream=True, timeout=10) as left:
            assert next(left.iter_lines()).startswith(b"event: message_start")
        wait_until(lambda: 'result="client closed"' in caplog.text)
        fast = dict(message, messages=[{"role": "user", "content": "fast"}], stream=False)
        refused = requests.post(live.url + "/v1/messages", json=fast, headers=headers, timeout=10)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert len(upstream.requests) == 1
        release.set()
        wait_until(lambda: requests.post(live.url + "/v1/messages", json=fast, headers=headers,
                                         timeout=10).status_code == 200)
    finally:
        release.set()
