"""/v1/messages errors: Anthropic-shaped, the SPEC's status -> type table, bad input never a 500."""
from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, completion, free_port

MESSAGES = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def error_of(response) -> dict:
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert response.headers["Content-Type"].startswith("application/json")
    return body["error"]


def healthy(client, upstream) -> None:
    """The worker still answers a good request after the bad one."""
    upstream.handler = lambda rec: Reply(body=json.dumps(completion()).encode())
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["content"][0]["text"] == "Hello!"


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "could not parse the JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens: Field required"),
    ({"model": "m", "max_tokens": 10}, 400, "messages: Field required"),
    ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, 400, "model: Field required"),
    ({"model": "m", "max_tokens": "10", "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "max_tokens"),
    ({"model": "m", "max_tokens": 10, "messages": []}, 400, "non-empty"),
    ({"model": "m", "max_tokens": 10, "messages": "hi"}, 400, "messages"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "user"}]}, 400, "content: Field required"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]},
     400, "unknown content block type 'hologram'"),
    ({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, "text"),
    ({"model": "m", "max_tokens": 10, "stream": "yes", "messages": [{"role": "user", "content": "hi"}]},
     400, "stream"),
    ({"model": "m", "max_tokens": 10, "tools": [{"description": "no name"}],
      "messages": [{"role": "user", "content": "hi"}]}, 400, "tools.0.name"),
    ({"model": "m", "max_tokens": 10, "system": 42, "messages": [{"role": "user", "content": "hi"}]},
     400, "system"),
], ids=["non-json", "array-body", "missing-max_tokens", "missing-messages", "missing-model",
        "max_tokens-string", "max_tokens-zero", "empty-messages", "messages-string", "unknown-role",
        "missing-content", "unknown-block-type", "text-not-string", "stream-not-bool", "tool-without-name",
        "system-number"])
def test_bad_input_is_a_400_invalid_request_error_and_the_worker_stays_healthy(client, upstream, body, status,
                                                                              needle):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/messages", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and needle in error["message"]
    assert upstream.requests == []
    healthy(client, upstream)


def nested(depth: int) -> dict:
    node: dict = {"type": "object"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}}
    return node


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("where", ["tool-schema", "tool-use-input"])
def test_json_nested_too_deep_to_forward_is_a_400_not_a_500(client, upstream, path, where):
    body = dict(MESSAGES)
    if where == "tool-schema":
        body["tools"] = [{"name": "Deep", "input_schema": nested(200)}]
    else:
        body["messages"] = [{"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Deep",
                                                                "input": nested(200)}]}]
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 400
    assert "nests JSON too deeply" in error_of(response)["message"]
    assert upstream.requests == []
    healthy(client, upstream)


def test_oversize_body_is_a_413_request_too_large(upstream):
    client = make_app(settings_doc(provider(upstream), **{"max-request-bytes": 1000})).test_client()
    body = dict(MESSAGES, messages=[{"role": "user", "content": "x" * 5000}])
    response = client.post("/v1/messages", json=body, headers=AUTH)
    assert response.status_code == 413 and error_of(response)["type"] == "request_too_large"
    response = client.post("/v1/messages/count_tokens", json=body, headers=AUTH)
    assert response.status_code == 413 and error_of(response)["type"] == "request_too_large"
    healthy(client, upstream)


def test_bad_client_key_is_401_authentication_error(client, upstream):
    for headers in ({"x-api-key": "sk-wrong"}, {}, {"Authorization": "Bearer nope"}):
        response = client.post("/v1/messages", json=MESSAGES, headers=headers)
        assert response.status_code == 401 and error_of(response)["type"] == "authentication_error"
    response = client.post("/v1/messages/count_tokens", json=MESSAGES, headers={"x-api-key": "sk-wrong"})
    assert response.status_code == 401 and error_of(response)["type"] == "authentication_error"
    assert upstream.requests == []


def test_unknown_model_is_404_not_found_error(client):
    response = client.post("/v1/messages", json=dict(MESSAGES, model="claude-nope"), headers=AUTH)
    assert response.status_code == 404 and error_of(response)["type"] == "not_found_error"
    assert "claude-nope" in error_of(response)["message"]


def test_unknown_path_and_wrong_method_under_v1_messages_are_anthropic_shaped(client):
    response = client.post("/v1/messages/batches", json=MESSAGES, headers=AUTH)
    assert response.status_code == 404 and error_of(response)["type"] == "not_found_error"
    response = client.get("/v1/messages", headers=AUTH)
    assert response.status_code == 405 and error_of(response)["type"] == "invalid_request_error"
    assert response.headers["Allow"]


@pytest.mark.parametrize("message", [
    "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
    "(8900 in the messages, 100 in the completion). Please reduce the length of the messages or completion.",
    "the request exceeds the available context size, try increasing it",  # llama.cpp exceed_context_size_error
])
def test_a22_upstream_context_overflow_is_400_prompt_is_too_long(client, upstream, message):
    upstream.handler = lambda rec: Reply(status=400, body=json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "code": 400}}).encode())
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["message"] == f"prompt is too long: {message}"


def test_upstream_400_other_than_overflow_passes_as_invalid_request_error(client, upstream):
    upstream.handler = lambda rec: Reply(status=400, body=b'{"error":{"message":"temperature must be <= 2",'
                                                          b'"type":"BadRequestError"}}')
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 400
    assert error_of(response) == {"type": "invalid_request_error", "message": "temperature must be <= 2"}


def test_a23_connection_refused_everywhere_is_529_overloaded_error(upstream):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    client = make_app(settings_doc(provider(dead))).test_client()
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 529 and error_of(response)["type"] == "overloaded_error"


def test_a23_upstream_refusing_the_provider_key_is_502_api_error_not_the_clients_401(client, upstream):
    # Deliberate: the SPEC's Part 1 rule (fail over, then 502 naming the provider). A 401
    # authentication_error would tell Claude Code the USER's key is bad and send them to /login.
    upstream.handler = lambda rec: Reply(status=401, body=b'{"error":{"message":"bad key"}}')
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 502
    error = error_of(response)
    assert error["type"] == "api_error" and "'up'" in error["message"]


def test_upstream_429_is_rate_limit_error_with_retry_after(client, upstream):
    upstream.handler = lambda rec: Reply(status=429, headers={"Retry-After": "7"},
                                         body=b'{"error":{"message":"too many requests"}}')
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 429 and error_of(response)["type"] == "rate_limit_error"
    assert int(response.headers["Retry-After"]) > 0


def test_upstream_503_is_529_overloaded_and_500_is_api_error(upstream):
    client = make_app(settings_doc(provider(upstream), **{"request-retry": 0})).test_client()
    upstream.handler = lambda rec: Reply(status=503, body=b'{"error":{"message":"busy"}}')
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 529 and error_of(response) == {"type": "overloaded_error", "message": "busy"}
    upstream.handler = lambda rec: Reply(status=500, body=b"Internal Server Error", content_type="text/plain")
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 500 and error_of(response)["type"] == "api_error"


def test_upstream_timeout_is_504_timeout_error(upstream):
    doc = settings_doc(provider(upstream), **{"request-retry": 0, "timeouts": {"connect": 2, "read": 0.3}})
    client = make_app(doc).test_client()
    upstream.handler = lambda rec: Reply(hang=3)
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 504 and error_of(response)["type"] == "timeout_error"


def test_upstream_answer_that_is_not_a_chat_completion_is_502_api_error(client, upstream):
    upstream.handler = lambda rec: Reply(body=b'{"unexpected": true}')
    response = client.post("/v1/messages", json=MESSAGES, headers=AUTH)
    assert response.status_code == 502 and error_of(response)["type"] == "api_error"


def test_stream_errors_before_the_first_event_are_ordinary_errors(live, upstream):
    upstream.handler = lambda rec: Reply(status=400, body=json.dumps({"error": {
        "message": "This model's maximum context length is 4096 tokens", "code": 400}}).encode())
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True),
                             headers={"x-api-key": CLIENT_KEY}, timeout=10)
    assert response.status_code == 400
    assert error_of(response)["message"].startswith("prompt is too long:")


def test_error_after_nonstream_keepalive_commit_is_anthropic_shaped(upstream, serve):
    doc = settings_doc(provider(upstream), **{"nonstream-keepalive-interval": 0.2, "request-retry": 0})
    live = serve(make_app(doc))
    upstream.handler = lambda rec: Reply(status=400, hang=0.7, body=b'{"error":{"message":"bad tool schema"}}')
    response = requests.post(live.url + "/v1/messages", json=MESSAGES, headers=AUTH, timeout=10)
    assert response.status_code == 200  # committed by the padding
    assert json.loads(response.content) == {"type": "error", "error": {"type": "invalid_request_error",
                                                                       "message": "bad tool schema"}}
