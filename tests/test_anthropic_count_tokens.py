"""/v1/messages/count_tokens: always 200 for a valid body, never the chat upstream; the upstream tokenizer when set."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from proxy import tokenizer
from tests.conftest import AUTH, CLIENT_KEY, PROVIDER_KEY, make_app, provider, settings_doc
from tests.upstream import Reply

TOOLS = [{"name": "Bash", "description": "Run a shell command and return its output.",
          "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}},
         {"name": "Read", "description": "Read a file from the local filesystem.",
          "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}]
BODY = {"model": "m", "system": "You are a careful coding assistant.",
        "messages": [{"role": "user", "content": "What does this repository do?"}]}


@pytest.fixture(autouse=True)
def _fresh_tokenizer_state():
    tokenizer._cache.clear()
    tokenizer._failed.clear()
    yield
    tokenizer._cache.clear()
    tokenizer._failed.clear()


def count(client, body: dict, path: str = "/v1/messages/count_tokens?beta=true") -> int:
    response = client.post(path, json=body, headers={"x-api-key": CLIENT_KEY, "anthropic-beta": "token-counting"})
    assert response.status_code == 200, response.data
    assert set(response.get_json()) == {"input_tokens"}
    return response.get_json()["input_tokens"]


def test_a24_counts_system_messages_and_tools_without_calling_the_upstream(client, upstream):
    bare = count(client, dict(BODY, system=None))
    with_system = count(client, BODY)
    with_tools = count(client, dict(BODY, tools=TOOLS))
    assert 0 < bare < with_system < with_tools
    assert with_tools - with_system >= 40  # two tool definitions are not free
    assert upstream.requests == []


def test_a24_fifty_parallel_counts_all_succeed(live, upstream):
    def one(_):
        return requests.post(live.url + "/v1/messages/count_tokens?beta=true", json=dict(BODY, tools=TOOLS),
                             headers=AUTH, timeout=10)
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(one, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert len({r.json()["input_tokens"] for r in responses}) == 1
    assert upstream.requests == []


def test_count_of_an_unknown_model_is_still_an_estimate_not_a_404(client):
    assert count(client, dict(BODY, model="claude-unknown-model")) > 0


def test_count_takes_images_tool_history_and_no_max_tokens(client):
    history = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "source": {
                   "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash",
                                                  "input": {"command": "ls -la"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a.py b.py"}]}]
    assert count(client, dict(BODY, messages=history)) > 1000  # an image is counted as one


def test_count_with_a_bad_body_is_a_400(client):
    response = client.post("/v1/messages/count_tokens", json={"model": "m"}, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"


def vllm_app(upstream, **extra):
    return make_app(settings_doc(provider(upstream, name="gpu", tokenizer="vllm", **extra)))


def test_vllm_tokenizer_is_asked_and_cached(upstream):
    upstream.handler = lambda rec: Reply(body=json.dumps({"count": 321, "max_model_len": 32768,
                                                          "tokens": list(range(321))}).encode())
    client = vllm_app(upstream).test_client()
    assert count(client, dict(BODY, tools=TOOLS)) == 321
    rec = upstream.requests[0]
    assert rec.path == "/tokenize"
    assert rec.body["model"] == "upstream-model"
    assert rec.body["messages"][0] == {"role": "system", "content": "You are a careful coding assistant."}
    assert [t["function"]["name"] for t in rec.body["tools"]] == ["Bash", "Read"]
    assert rec.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert count(client, dict(BODY, tools=TOOLS)) == 321
    assert len(upstream.requests) == 1  # the second answer came from the cache


def test_llama_cpp_tokenizer_applies_the_template_then_tokenizes(upstream):
    def answer(rec):
        if rec.path == "/apply-template":
            return Reply(body=json.dumps({"prompt": "<|im_start|>user\nhi<|im_end|>\n"}).encode())
        return Reply(body=json.dumps({"tokens": [1, 2, 3, 4, 5, 6, 7]}).encode())
    upstream.handler = answer
    client = make_app(settings_doc(provider(upstream, name="cpp", tokenizer="llama.cpp"))).test_client()
    assert count(client, BODY) == 7
    assert [r.path for r in upstream.requests] == ["/apply-template", "/tokenize"]
    assert upstream.requests[1].body == {"content": "<|im_start|>user\nhi<|im_end|>\n"}


@pytest.mark.parametrize("reply", [Reply(status=404, body=b'{"detail":"Not Found"}'),
                                   Reply(body=b"<html>not json</html>", content_type="text/html"),
                                   Reply(body=b'{"no_count": true}'),
                                   Reply(hang=3)],
                         ids=["404", "not-json", "no-count", "hang"])
def test_tokenizer_failure_falls_back_to_the_estimate_and_leaves_the_model_usable(upstream, reply):
    upstream.handler = lambda rec: reply
    app = vllm_app(upstream)
    client = app.test_client()
    estimate = count(make_app(settings_doc(provider(upstream))).test_client(), BODY)
    assert count(client, BODY) == estimate
    asked = len(upstream.requests)
    assert count(client, BODY) == estimate and len(upstream.requests) == asked  # backing off, not asking again
    # the model is not "missing" and its key is not cooling down: chat still goes out
    upstream.handler = lambda rec: Reply(body=json.dumps({
        "id": "c", "object": "chat.completion", "created": 1, "model": "upstream-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]
    }).encode())
    response = client.post("/v1/messages", json=dict(BODY, max_tokens=10), headers=AUTH)
    assert response.status_code == 200 and response.get_json()["content"][0]["text"] == "fine"
