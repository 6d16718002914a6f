"""Images in tool results, and usage when the upstream sends none (issue 22, defect 5).

Claude Code's Read tool returns a PNG as an image block inside ``tool_result``. OpenAI's chat format puts
images in user messages only (vLLM, llama.cpp and SGLang read tool messages as text), so the tool message
keeps the text and the images follow in one user message right after the tool messages; against the strict
upstream (roles must alternate) that is accepted. ``vision: false`` keeps the ``[image omitted]`` text.
A non-stream answer without upstream usage reports the same input estimate as a stream.
"""
from __future__ import annotations

import json

import anthropic
import requests

from tests.anthropic_invariants import check_stream
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.test_anthropic_sdk import PNG
from tests.test_anthropic_stream import chunk
from tests.test_bridge_roles import strict  # noqa: F401 - the strict-template upstream fixture
from tests.upstream import Reply, sse

USE = [{"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {"file_path": "/a.png"}},
       {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"file_path": "/b.txt"}}]
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
CONVERSATION = [
    {"role": "user", "content": "read both"},
    {"role": "assistant", "content": [{"type": "text", "text": "Reading."}, *USE]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "a.png:"}, IMAGE]},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": "plain text"},
        {"type": "text", "text": "what is in the picture?"}]},
]
READ = {"name": "Read", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}


def test_an_image_in_a_tool_result_reaches_a_vision_model_after_the_tool_messages(strict):  # noqa: F811
    server, fake = strict
    with anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
        answer = client.messages.create(model="m", max_tokens=100, tools=[READ], messages=CONVERSATION)
    assert answer.content[0].text == "fine"  # the strict upstream took it
    messages = fake.requests[-1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert messages[2] == {"role": "tool", "tool_call_id": "toolu_a", "content": "a.png:\n\n[image attached below]"}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_b", "content": "plain text"}
    parts = messages[4]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert "toolu_a" in parts[0]["text"] and parts[2]["text"] == "what is in the picture?"
    assert parts[1]["image_url"]["url"] == f"data:image/png;base64,{PNG}"


def test_an_image_only_tool_result_then_the_next_turn(strict):  # noqa: F811
    server, fake = strict
    conversation = [*CONVERSATION[:2], {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": [IMAGE]},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": [IMAGE]}]},
        {"role": "assistant", "content": "Two images."}, {"role": "user", "content": "thanks"}]
    response = requests.post(server.url + "/v1/messages", timeout=20, headers={"x-api-key": CLIENT_KEY},
                             json={"model": "m", "max_tokens": 100, "messages": conversation, "stream": True})
    assert check_stream(response.content).text == "fine"
    messages = fake.requests[-1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user", "assistant", "user"]
    assert messages[2]["content"] == messages[3]["content"] == "[image attached below]"
    assert [p["type"] for p in messages[4]["content"]] == ["text", "image_url", "text", "image_url"]


def test_a_text_only_model_keeps_the_placeholder(upstream, serve):
    models = [{"name": "upstream-model", "alias": "m", "vision": False}]
    server = serve(make_app(settings_doc(provider(upstream, models=models))))
    upstream.handler = lambda rec: Reply(events=sse(chunk({"content": "ok"}), chunk(finish="stop")))
    response = requests.post(server.url + "/v1/messages", timeout=20, headers={"x-api-key": CLIENT_KEY},
                             json={"model": "m", "max_tokens": 100, "messages": CONVERSATION, "tools": [READ]})
    assert response.status_code == 200
    messages = upstream.requests[-1].body["messages"]
    assert messages[2]["content"] == "a.png:\n\n[image omitted]"
    assert messages[4] == {"role": "user", "content": "what is in the picture?"}
    assert "image_url" not in json.dumps(messages)


def test_answers_without_upstream_usage_report_the_same_estimate_stream_or_not(upstream, serve):
    server = serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))
    events = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}), chunk(finish="stop"))
    upstream.handler = lambda rec: Reply(events=events)  # SSE, no usage, also to the non-stream request
    body = {"model": "m", "max_tokens": 100, "system": "You are a careful assistant. " * 20,
            "messages": [{"role": "user", "content": "hello there " * 50}]}
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    plain = requests.post(server.url + "/v1/messages", json=body, headers=headers, timeout=20).json()
    streamed = check_stream(requests.post(server.url + "/v1/messages", json={**body, "stream": True},
                                          headers=headers, timeout=20).content)
    count = requests.post(server.url + "/v1/messages/count_tokens", json=body, headers=headers, timeout=20).json()
    assert plain["usage"]["input_tokens"] == streamed.usage["input_tokens"] == count["input_tokens"] > 100
    assert streamed.events[0][1]["message"]["usage"]["input_tokens"] == count["input_tokens"]
    # the Responses bridge: usage absent both ways (never partial, never made up)
    answer = requests.post(server.url + "/v1/responses", json={"model": "m", "input": "hi"}, headers=AUTH,
                           timeout=20).json()
    terminal = requests.post(server.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                             headers=AUTH, timeout=20).text
    assert "usage" not in answer and '"usage"' not in terminal.rsplit("event: response.completed", 1)[1]
