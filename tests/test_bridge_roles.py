"""Role alternation (issue 22, defect 2): both bridges' chat requests alternate roles after at most one leading
system message, for every input their protocol accepts, so a strict chat template (Mistral, Gemma, many Llama
fine-tunes: vLLM answers 400 "roles must alternate") takes them.

The scripted upstream here runs in strict mode (tests/upstream.py ``strict_roles``); besides, every test of the
suite has its chat requests checked the same way by tests/conftest.py.
"""
from __future__ import annotations

import json

import anthropic
import pytest
import requests

from tests.anthropic_invariants import check_stream
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.test_anthropic_stream import MESSAGES, chunk, usage_chunk
from tests.upstream import STRICT_ROLES_ERROR, FakeUpstream, Reply, completion, role_problem, sse

BASH = {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
USE = {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}}
RESULT = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}
AGENTS = "Available agent types for the Task tool:\n- general-purpose"

# Inputs the Messages API accepts that made [.., user, user] or [.., assistant, assistant] upstream.
MESSAGES_CASES = {
    "claude code's fresh session": [{"role": "user", "content": "hi"}, {"role": "system", "content": AGENTS}],
    "system messages anywhere": [
        {"role": "system", "content": "first"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "system", "content": [{"type": "text", "text": "x"}]},
        {"role": "user", "content": "go"}, {"role": "system", "content": "late"}],
    "consecutive user turns": [{"role": "user", "content": "a"}, {"role": "user", "content": [
        {"type": "text", "text": "b"}]}, {"role": "user", "content": "c"}],
    "tool results then text, then another user turn": [
        {"role": "user", "content": "list"}, {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [RESULT, {"type": "text", "text": "and?"}]}, {"role": "user", "content": "well"}],
    "a tool-results-only turn followed by a user turn": [
        {"role": "user", "content": "list"}, {"role": "assistant", "content": [USE]},
        {"role": "user", "content": [RESULT]}, {"role": "user", "content": "now explain"}],
    "empty and blank turns": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": []},
        {"role": "user", "content": [{"type": "text", "text": "  "}]}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "go"}],
    "consecutive assistant turns": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "let me look"},
        {"role": "assistant", "content": [USE]}, {"role": "user", "content": [RESULT]}],
    "an image turn after a text turn": [
        {"role": "user", "content": "see"}, {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}],
}


@pytest.fixture
def strict(serve):
    fake = FakeUpstream(strict_roles=True)
    fake.handler = lambda rec: Reply(events=sse(chunk({"content": "fine"}), chunk(finish="stop"), usage_chunk())) \
        if rec.body.get("stream") else Reply(body=json.dumps(completion("fine")).encode())
    server = serve(make_app(settings_doc(provider(fake, **{"native-apis": ["chat"]}))))
    yield server, fake
    fake.stop()


@pytest.mark.any_roles
def test_the_strict_upstream_refuses_what_a_strict_template_refuses(strict):
    server, fake = strict
    bad = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    response = requests.post(server.url + "/v1/chat/completions", json={"model": "m", "messages": bad},
                             headers=AUTH, timeout=10)
    assert response.status_code == 400 and STRICT_ROLES_ERROR in response.text
    assert role_problem(bad) and role_problem([{"role": "user"}, {"role": "system"}])
    assert role_problem([{"role": "system"}, {"role": "user"}, {"role": "assistant", "tool_calls": [{}, {}]},
                         {"role": "tool"}, {"role": "tool"}, {"role": "user"}]) is None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", list(MESSAGES_CASES))
def test_messages_bridge_alternates_roles_for_every_input_the_api_accepts(strict, case, stream):
    server, fake = strict
    body = dict(MESSAGES, system=[{"type": "text", "text": "You are X"}, {"type": "text", "text": "Be brief"}],
                messages=MESSAGES_CASES[case], tools=[BASH], stream=stream)
    response = requests.post(server.url + "/v1/messages", json=body,
                             headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}, timeout=20)
    assert response.status_code == 200, response.text
    if stream:
        assert check_stream(response.content).text == "fine"
    else:
        assert response.json()["content"][0]["text"] == "fine"
    messages = fake.requests[-1].body["messages"]
    assert role_problem(messages) is None
    assert messages[0] == {"role": "system", "content": "You are X\n\nBe brief"}
    text = "\n".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"]) for m in messages)
    for original in MESSAGES_CASES[case]:  # nothing said was lost in the merge
        content = original["content"]
        for piece in [content] if isinstance(content, str) else [b.get("text") for b in content]:
            assert piece is None or not piece.strip() or piece in text


def test_claude_codes_fresh_session_through_the_sdk(strict):
    server, fake = strict
    with anthropic.Anthropic(base_url=server.url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
        with client.messages.stream(model="m", max_tokens=100, system="You are Claude Code.",
                                    messages=MESSAGES_CASES["claude code's fresh session"]) as stream:
            assert stream.get_final_message().content[0].text == "fine"
    sent = fake.requests[-1].body["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert sent[1]["content"] == f"hi\n\n<system-reminder>\n{AGENTS}\n</system-reminder>"


RESPONSES_CASES = {
    "consecutive user messages": ["a", "b"],
    "consecutive assistant messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                                       {"role": "assistant", "content": "two"}, {"role": "user", "content": "go"}],
    "developer messages in the middle": [
        {"role": "developer", "content": "lead"}, {"role": "user", "content": "hi"},
        {"role": "developer", "content": "later"}, {"role": "user", "content": "go"},
        {"role": "system", "content": "latest"}],
    "a user message between a call and its output": [
        {"role": "user", "content": "ls"},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"role": "user", "content": "meanwhile"},
        {"type": "function_call_output", "call_id": "c1", "output": "a.py"},
        {"role": "user", "content": "and?"}],
    "an assistant message after a call's output": [
        {"role": "user", "content": "ls"},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "a.py"},
        {"role": "assistant", "content": "done"}, {"role": "assistant", "content": "really"}],
}


@pytest.mark.parametrize("case", list(RESPONSES_CASES))
def test_responses_bridge_alternates_roles(strict, case):
    server, fake = strict
    items = [{"role": "user", "content": x} if isinstance(x, str) else x for x in RESPONSES_CASES[case]]
    body = {"model": "m", "instructions": "Be brief", "input": items,
            "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}]}
    response = requests.post(server.url + "/v1/responses", json=body, headers=AUTH, timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["output"][0]["content"][0]["text"] == "fine"
    assert role_problem(fake.requests[-1].body["messages"]) is None
