"""Beyond chat: completions, embeddings, responses (folded too), metrics; through the SDK."""
from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.gunicorn_util import Gunicorn, write_settings
from tests.upstream import Reply, sse

CRAFTED = Path(__file__).parent / "fixtures" / "crafted"
EMBEDDING = {"object": "list", "model": "upstream-model", "usage": {"prompt_tokens": 2, "total_tokens": 2},
             "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}]}
TEXT_COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1764300000, "model": "upstream-model",
                   "choices": [{"index": 0, "text": " world", "logprobs": None, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def fixture_events(name: str) -> list[bytes]:
    data = (CRAFTED / name).read_bytes()
    return [part + b"\n\n" for part in data.split(b"\n\n") if part]


def responses_json() -> bytes:
    completed = fixture_events("openai-responses-completed.sse")[-1]
    return json.dumps(json.loads(completed.split(b"data: ", 1)[1])["response"]).encode()


@pytest.fixture
def forced(upstream, serve):
    return serve(make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}))))


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def test_completions_relay_and_stream(live, upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps(TEXT_COMPLETION).encode()) if not rec.body.get("stream") \
        else Reply(events=fixture_events("vllm-completions-logprobs.sse"))
    client = sdk(live)
    assert client.completions.create(model="m", prompt="Hello").choices[0].text == " world"
    assert upstream.requests[0].path == "/v1/completions"
    assert upstream.requests[0].body["model"] == "upstream-model"
    pieces = [c.choices[0].text for c in client.completions.create(model="m", prompt="Once", stream=True) if c.choices]
    assert "".join(pieces) == " Once upon a"


def test_forced_completions_fold_into_a_text_completion(forced, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("vllm-completions-logprobs.sse"))
    result = sdk(forced).completions.create(model="m", prompt="Once", logprobs=1)
    assert result.object == "text_completion" and result.id == "cmpl-3f1c2e0b8d2a4b7e9a1c"
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason) == (" Once upon a", "length")
    assert choice.logprobs.tokens == [" Once", " upon", " a"]
    assert choice.logprobs.text_offset == [0, 5, 10]
    assert result.usage.total_tokens == 7
    sent = upstream.requests[0].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_forced_completions_keep_the_last_finish_reason(forced, upstream):
    # length, then a trailing stop: the text fold keeps the last explicit one, as the chat fold and the bridges
    # do (fold/base.kept_finish)
    head = {"id": "cmpl-2f", "object": "text_completion", "created": 1764300000, "model": "upstream-model"}
    upstream.handler = lambda rec: Reply(events=sse(
        dict(head, choices=[{"index": 0, "text": " cut sh", "logprobs": None, "finish_reason": None}]),
        dict(head, choices=[{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]),
        dict(head, choices=[{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}])))
    choice = sdk(forced).completions.create(model="m", prompt="Once").choices[0]
    assert (choice.text, choice.finish_reason) == (" cut sh", "stop")


def test_embeddings_are_relayed_and_never_streamed(forced, upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps(EMBEDDING).encode())
    result = sdk(forced).embeddings.create(model="m", input="hi")
    assert result.data[0].embedding == [0.25, -0.5, 0.125]
    assert upstream.requests[0].path == "/v1/embeddings"
    assert "stream" not in upstream.requests[0].body
    raw = requests.post(forced.url + "/v1/embeddings", headers=AUTH, timeout=10,
                        json={"model": "m", "input": "hi", "stream": True})
    assert raw.json() == EMBEDDING
    assert "stream" not in upstream.requests[1].body


def test_embeddings_need_input(live):
    response = requests.post(live.url + "/v1/embeddings", headers=AUTH, json={"model": "m"}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_responses_relay_and_stream(live, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("openai-responses-completed.sse")) \
        if rec.body.get("stream") else Reply(body=responses_json())
    client = sdk(live)
    assert client.responses.create(model="m", input="hi").output_text == "Hi there"
    assert upstream.requests[0].path == "/v1/responses"
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hi there"
    assert events[-1].type == "response.completed"


def test_forced_responses_fold_into_the_final_response(forced, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("openai-responses-completed.sse"))
    result = sdk(forced).responses.create(model="m", input="hi")
    assert result.id == "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b"
    assert result.status == "completed" and result.output_text == "Hi there"
    assert result.usage.total_tokens == 48
    sent = upstream.requests[0].body
    assert sent["stream"] is True and "stream_options" not in sent


def test_forced_responses_failed_stream_is_an_error(forced, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("openai-responses-failed.sse"))
    with pytest.raises(openai.APIStatusError) as info:
        sdk(forced).responses.create(model="m", input="hi")
    assert info.value.status_code == 502
    assert "failed to generate" in info.value.message


def test_forced_responses_incomplete_is_returned_as_incomplete(forced, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("openai-responses-incomplete.sse"))
    result = sdk(forced).responses.create(model="m", input="hi")
    assert result.status == "incomplete"
    assert result.incomplete_details.reason == "max_output_tokens"


def test_forced_responses_cut_off_is_502(forced, upstream):
    upstream.handler = lambda rec: Reply(events=fixture_events("openai-responses-cut-off.sse"))
    response = requests.post(forced.url + "/v1/responses", headers=AUTH, json={"model": "m", "input": "hi"},
                             timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["message"] == "upstream stream ended early"


def test_responses_error_event_with_rate_limit_is_429(forced, upstream):
    upstream.handler = lambda rec: Reply(events=[b'event: error\ndata: {"type":"error","code":"rate_limit_exceeded",'
                                                 b'"message":"Too many requests","param":null}\n\n'])
    response = requests.post(forced.url + "/v1/responses", headers=AUTH, json={"model": "m", "input": "hi"},
                             timeout=10)
    assert response.status_code == 429
    assert response.json()["error"]["message"] == "Too many requests"


def test_compact_is_never_forced_and_loses_stream(forced, upstream):
    upstream.handler = lambda rec: Reply(body=b'{"id":"resp_c","object":"response.compaction","output":[]}')
    response = requests.post(forced.url + "/v1/responses/compact", headers=AUTH, timeout=10,
                             json={"model": "m", "input": [], "stream": True})
    assert response.status_code == 200 and response.json()["id"] == "resp_c"
    assert upstream.requests[0].path == "/v1/responses/compact"
    assert "stream" not in upstream.requests[0].body


def metric_value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_folds_and_tokens_without_keys(upstream):
    app = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": True}),
                                **{"api-keys": [{"key": CLIENT_KEY, "name": "team-a"}],
                                   "remote-management": {"secret-key": "metrics-secret-1234"}}))
    client = app.test_client()
    operator = {"X-Management-Key": "metrics-secret-1234"}  # the per-client series are the operator's
    before = client.get("/metrics", headers=operator).get_data(as_text=True)
    upstream.handler = lambda rec: Reply(events=sse(
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]},
        {"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}}))
    for _ in range(3):
        assert client.post("/v1/chat/completions", headers=AUTH,
                           json={"model": "m", "messages": [{"role": "user", "content": "x"}]}).status_code == 200
    client.post("/v1/chat/completions", headers=AUTH, json={"model": "random-name-123", "messages": []})
    text = client.get("/metrics", headers=operator).get_data(as_text=True)
    labels = {"route": "/v1/chat/completions", "model": "m", "provider": "up", "status": "200"}
    assert metric_value(text, "streamfold_requests_total", **labels) - \
        metric_value(before, "streamfold_requests_total", **labels) == 3
    assert metric_value(text, "streamfold_folded_streams_total", provider="up", result="ok") - \
        metric_value(before, "streamfold_folded_streams_total", provider="up", result="ok") == 3
    assert metric_value(text, "streamfold_tokens_total", client="team-a", kind="prompt") - \
        metric_value(before, "streamfold_tokens_total", client="team-a", kind="prompt") == 33
    assert "random-name-123" not in text  # unrouted model names never become series
    assert CLIENT_KEY not in text and "sk-provider" not in text
    assert "streamfold_upstream_ttfb_seconds_bucket" in text and "streamfold_active_streams" in text


def test_metrics_are_summed_across_gunicorn_workers(upstream, tmp_path):
    path = write_settings(tmp_path / "m.yaml", settings_doc(provider(upstream)))
    server = Gunicorn(path, workers=2, threads=4)
    try:
        from concurrent.futures import ThreadPoolExecutor
        upstream.handler = lambda rec: Reply(body=json.dumps(TEXT_COMPLETION).encode(), hang=0.05)

        def one(_):
            return requests.post(server.url + "/v1/completions", json={"model": "m", "prompt": "x"},
                                 headers={**AUTH, "Connection": "close"}, timeout=10).status_code

        # 10 at once, each >= 50 ms, against 2 workers that accept 4 connections each: both must serve
        with ThreadPoolExecutor(10) as pool:
            assert list(pool.map(one, range(30))) == [200] * 30
        output = server.output()
        pids = {line.split("[")[1].split("]")[0] for line in output.splitlines() if "route=/v1/completions" in line}
        assert len(pids) == 2  # both workers served some
        for _ in range(4):  # whichever worker answers the scrape reports the sum
            text = requests.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            assert metric_value(text, "streamfold_requests_total", route="/v1/completions", status="200") == 30
            assert metric_value(text, "streamfold_tokens_total", kind="completion") == 30
    finally:
        server.stop()
