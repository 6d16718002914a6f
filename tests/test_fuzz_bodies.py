"""Hostile request bodies on every client protocol: a 4xx in the route's own error shape or a 200, never a 500.

A property test (issue 21, finding 9) takes a rich valid body per route (a
Claude-Code-shaped Messages request, a Codex-shaped Responses request, a chat
request with tools, a Gemini-CLI-shaped generateContent request) and replaces, deletes or adds values anywhere in it:
other JSON types (lists where a name is hashed, objects where text is
joined), JSON nested to 240-300 levels (orjson reads 1024 but writes 254),
huge numbers, empty strings. Each body goes through a real server to a real
loopback upstream; the worker must stay healthy afterwards.
"""
from __future__ import annotations

import copy
import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import AUTH, LiveServer, make_app, provider, settings_doc
from tests.test_responses_bridge_input import CODEX_BODY
from tests.upstream import FakeUpstream, Reply, completion, sse, text_chunks

BASH = {"name": "Bash", "description": "Run a command",
        "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}
MESSAGES_BODY = {
    "model": "m", "max_tokens": 256, "stream": False,
    "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "list files"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                  "data": "iVBORw0KGgo="}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "ls", "signature": ""},
            {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "a.txt"}]},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
            {"type": "text", "text": "thanks"}]},
    ],
    "tools": [BASH, {"type": "web_search_20250305", "name": "web_search"}],
    "tool_choice": {"type": "auto"}, "stop_sequences": ["###"], "temperature": 0.2, "top_k": 5,
    "metadata": {"user_id": "u1"}, "thinking": {"type": "enabled", "budget_tokens": 4096},
}
COUNT_BODY = {key: MESSAGES_BODY[key] for key in ("model", "system", "messages", "tools")}
CHAT_BODY = {
    "model": "m", "stream": False, "temperature": 0.1, "max_tokens": 64,
    "messages": [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
    "stream_options": {"include_usage": True},
}
GEMINI_BODY = {  # Gemini-CLI-shaped: the stream is the path's, not the body's
    "systemInstruction": {"parts": [{"text": "You are Gemini CLI."}]},
    "contents": [
        {"role": "user", "parts": [{"text": "list files"}, {"inlineData": {"mimeType": "image/png", "data": "iVBO"}}]},
        {"role": "model", "parts": [{"text": "ls", "thought": True, "thoughtSignature": "c2ln"},
                                    {"functionCall": {"id": "c1", "name": "ls", "args": {"dir": "."}}}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "c1", "name": "ls", "response": {"output": "a.txt"}}},
                                   {"text": "thanks"}]}],
    "tools": [{"functionDeclarations": [{"name": "ls", "description": "list", "parametersJsonSchema": {
        "type": "OBJECT", "properties": {"dir": {"type": "STRING", "nullable": True}}}}]}, {"googleSearch": {}}],
    "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["ls"]}},
    "generationConfig": {"temperature": 0.2, "maxOutputTokens": 64, "stopSequences": ["###"],
                         "responseMimeType": "application/json", "responseSchema": {"type": "OBJECT"},
                         "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024}},
    "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
}
ROUTES = {"/v1/messages": MESSAGES_BODY, "/v1/messages/count_tokens": COUNT_BODY,
          "/v1/responses": dict(CODEX_BODY, stream=False), "/v1/chat/completions": CHAT_BODY,
          "/v1beta/models/m:generateContent": GEMINI_BODY,
          "/v1beta/models/m:streamGenerateContent?alt=sse": GEMINI_BODY, "/v1beta/models/m:countTokens": GEMINI_BODY}
ONE_WAY = ("/v1/messages/count_tokens", "/v1beta/")  # paths whose body does not choose the stream
# Strings that mean something somewhere in these bodies, so type confusions between them get tried.
WORDS = ["text", "image", "tool_use", "tool_result", "thinking", "message", "function_call", "function_call_output",
         "custom_tool_call", "reasoning", "input_text", "output_text", "input_image", "function", "custom",
         "namespace", "user", "assistant", "system", "developer", "tool", "auto", "none", "required", "m", "",
         "model", "parts", "functionCall", "functionResponse", "inlineData", "OBJECT", "STRING", "ANY", "NONE"]


def nested(depth: int, leaf, kind: str):
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from(WORDS), st.text(max_size=8))
hostile = st.one_of(
    leaves,
    st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                 st.dictionaries(st.sampled_from(WORDS + ["type", "content"]), inner,
                                                                 max_size=3)), max_leaves=6),
    st.builds(nested, st.integers(240, 300), leaves, st.sampled_from(["list", "dict"])),
)


def _slots(value, out: list) -> list:
    """Every (container, key) pair in a JSON value, so a mutation can reach anywhere."""
    if isinstance(value, dict):
        for key in list(value):
            out.append((value, key))
            _slots(value[key], out)
    elif isinstance(value, list):
        for i in range(len(value)):
            out.append((value, i))
            _slots(value[i], out)
    return out


@st.composite
def mutated(draw, base: dict) -> dict:
    body = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(body, [])
        container, key = slots[draw(st.integers(0, len(slots) - 1))]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            container[key] = draw(hostile)
        elif action == "delete":
            del container[key]
        elif isinstance(container, dict):
            container[draw(st.sampled_from(WORDS + ["type", "role", "content", "arguments", "input"]))] = draw(hostile)
        else:
            container.insert(key, draw(hostile))
    return body


def anthropic_shaped(body: dict) -> bool:
    error = body.get("error")
    return (body.get("type") == "error" and isinstance(error, dict) and isinstance(error.get("type"), str)
            and isinstance(error.get("message"), str))


def gemini_shaped(body: dict) -> bool:
    error = body.get("error")
    return (list(body) == ["error"] and isinstance(error, dict) and isinstance(error.get("code"), int)
            and isinstance(error.get("message"), str) and isinstance(error.get("status"), str))


def openai_shaped(body: dict) -> bool:
    error = body.get("error")
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def answer(rec) -> Reply:
    if isinstance(rec.body, dict) and rec.body.get("stream") is True:
        return Reply(events=sse(*text_chunks(["fine"], usage={"prompt_tokens": 3, "completion_tokens": 1,
                                                               "total_tokens": 4})))
    return Reply(body=json.dumps(completion("fine")).encode())


@pytest.fixture(scope="module")
def fuzzed():
    upstream = FakeUpstream()
    upstream.handler = answer
    server = LiveServer(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))
    session = requests.Session()
    yield server, session, upstream
    session.close()
    server.stop()
    upstream.stop()


def check(server, session, path: str, body: dict) -> None:
    response = session.post(server.url + path, data=json.dumps(body), headers=AUTH, timeout=30)
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert b"internal error" not in response.content, response.text[:300]
    if response.status_code >= 400:
        shaped = (anthropic_shaped if path.startswith("/v1/messages") else
                  gemini_shaped if path.startswith("/v1beta/") else openai_shaped)
        assert shaped(response.json()), response.text[:300]


@pytest.mark.parametrize("path, stream", [
    pytest.param(path, stream, marks=pytest.mark.any_roles) if path == "/v1/chat/completions" else (path, stream)
    for path in ROUTES for stream in (False, True) if not path.startswith(ONE_WAY) or not stream])
def test_every_mutated_body_gets_a_4xx_in_the_routes_shape_or_a_200(fuzzed, path, stream):
    server, session, upstream = fuzzed
    base = ROUTES[path] if path.startswith(ONE_WAY) else dict(ROUTES[path], stream=stream)

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated(base))
    def run(body):
        check(server, session, path, body)

    run()
    health = session.get(server.url + "/healthz", timeout=5)
    assert health.status_code == 200
    ok = session.post(server.url + path, json=ROUTES[path], headers=AUTH, timeout=10)
    assert ok.status_code == 200, ok.text[:300]


# The three bodies the red team found (each was a 500; the last two only after the upstream had been called).
def test_a_content_block_type_that_is_a_list_or_an_object_is_a_400(fuzzed):
    server, session, upstream = fuzzed
    for kind in (["text"], {"a": 1}):
        for path, base in (("/v1/messages", MESSAGES_BODY), ("/v1/messages/count_tokens", COUNT_BODY)):
            body = dict(base, messages=[{"role": "user", "content": [{"type": kind, "text": "x"}]}])
            response = session.post(server.url + path, json=body, headers=AUTH, timeout=10)
            assert response.status_code == 400 and anthropic_shaped(response.json())
            assert "type" in response.json()["error"]["message"]


def test_function_call_arguments_nested_too_deep_are_a_400_before_the_upstream(fuzzed):
    server, session, upstream = fuzzed
    body = {"model": "m", "input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": nested(260, 1, "list")},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]}
    asked = len(upstream.requests)
    response = session.post(server.url + "/v1/responses", data=json.dumps(body), headers=AUTH, timeout=10)
    assert response.status_code == 400 and openai_shaped(response.json())
    assert response.json()["error"]["param"] == "input[0].arguments"
    assert len(upstream.requests) == asked


def test_a_tool_description_nested_too_deep_to_count_is_a_400_before_a_stream_starts(fuzzed):
    # Found by the fuzzer: the stream's prompt estimate (for message_start) failed after the upstream was
    # asked, a 500 that also left the upstream connection open.
    server, session, upstream = fuzzed
    asked = len(upstream.requests)
    body = dict(MESSAGES_BODY, stream=True, tools=[dict(BASH, description=nested(254, None, "list"))])
    response = session.post(server.url + "/v1/messages", data=json.dumps(body), headers=AUTH, timeout=10)
    assert response.status_code == 400 and anthropic_shaped(response.json()), response.text[:300]
    assert len(upstream.requests) == asked


@pytest.mark.parametrize("field", ["metadata", "text", "reasoning", "tools", "tool_choice"])
@pytest.mark.parametrize("stream", [False, True])
def test_echoed_fields_nested_too_deep_are_a_400_before_the_upstream_is_called(upstream, serve, field, stream):
    upstream.handler = answer
    server = serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))
    def body(depth: int) -> dict:
        value = nested(depth, 1, "dict")
        if field == "text":
            value = {"format": {"type": "text"}, "deep": value}
        elif field == "tools":
            value = [{"type": "web_search", "filters": value}]
        return {"model": "m", "input": "hi", "stream": stream, field: value}

    response = requests.post(server.url + "/v1/responses", data=json.dumps(body(300)), headers=AUTH, timeout=10)
    assert response.status_code == 400 and openai_shaped(response.json()), response.text[:300]
    assert upstream.requests == []
    response = requests.post(server.url + "/v1/responses", data=json.dumps(body(240)), headers=AUTH, timeout=10)
    assert response.status_code == 200 and b"error" not in response.content.replace(b'"error":null', b"")
