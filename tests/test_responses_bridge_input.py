"""What reaches a chat upstream from a Codex-shaped request, and what bad input gets (issue 16, points 4 and 6)."""
from __future__ import annotations

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import responses_invariants
from tests.conftest import AUTH, make_app, settings_doc
from tests.test_responses_bridge import APPLY_PATCH, CODEX, NAMESPACE, TEXT, answer, chat_only, post

SHELL = {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
         "strict": False, "parameters": {"type": "object", "properties": {
             "command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"},
             "timeout_ms": {"type": "number"}}, "required": ["command"], "additionalProperties": False}}
PLAN = {"type": "function", "name": "update_plan", "description": "Updates the task plan.", "strict": False,
        "parameters": {"type": "object", "properties": {"plan": {"type": "array", "items": {"type": "object"}}},
                       "required": ["plan"]}}
CODEX_BODY = {
    "model": "m",
    "instructions": "You are Codex, based on GPT-5. You are running as a coding agent in the Codex CLI.",
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text":
            "<permissions instructions>Filesystem sandboxing: workspace-write.</permissions instructions>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text":
            "# AGENTS.md instructions for /work/demo\n\n<INSTRUCTIONS>Run tests.</INSTRUCTIONS>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text":
            "<environment_context>\n  <cwd>/work/demo</cwd>\n  <shell>bash</shell>\n</environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "add hello.txt"}]},
        {"type": "reasoning", "id": "rs_0a1", "summary": [{"type": "summary_text", "text": "**Listing files**"}],
         "content": None, "encrypted_content": "gAAAAABpZ-encrypted-blob"},
        {"type": "function_call", "id": "fc_0a2", "name": "shell", "call_id": "call_Ab12",
         "arguments": "{\"command\":[\"bash\",\"-lc\",\"ls\"],\"workdir\":\"/work/demo\"}"},
        {"type": "function_call_output", "call_id": "call_Ab12", "output": "README.md\nsrc\n"},
        {"type": "custom_tool_call", "id": "ctc_0a3", "status": "completed", "call_id": "call_Cd34",
         "name": "apply_patch", "input": "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"},
        {"type": "custom_tool_call_output", "call_id": "call_Cd34",
         "output": "{\"output\":\"Success. Updated the following files:\\nA hello.txt\\n\",\"metadata\":{}}"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Added hello.txt."}]},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Approval: never."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "now run the tests"}]},
    ],
    "tools": [SHELL, PLAN, APPLY_PATCH, {"type": "web_search"}, {"type": "local_shell"}, NAMESPACE],
    "tool_choice": "auto", "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
    "include": ["reasoning.encrypted_content"], "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "text": {"verbosity": "medium", "format": {"type": "json_schema", "name": "codex_output_schema", "strict": True,
                                               "schema": {"type": "object", "properties": {}}}},
}


def strict_template_accepts(messages: list[dict]) -> None:
    """What the strictest chat templates (Qwen/Llama/Mistral via llama.cpp and vLLM) insist on."""
    roles = [m["role"] for m in messages]
    assert "developer" not in roles
    assert "system" not in roles[1:], "a system message after the first"
    rest = messages[1:] if roles[0] == "system" else messages
    expect_tools: list[str] = []
    previous = None
    for m in rest:
        if expect_tools:
            assert m["role"] == "tool" and m["tool_call_id"] == expect_tools.pop(0), "tool messages must follow"
        elif m["role"] == "tool":
            raise AssertionError("a tool message without its call right before it")
        else:
            assert m["role"] != previous, f"two {m['role']} messages in a row"
            assert isinstance(m["content"], str)
        if m["role"] == "assistant" and m.get("tool_calls"):
            expect_tools = [c["id"] for c in m["tool_calls"]]
        previous = m["role"]
    assert not expect_tools, "calls without outputs"


@pytest.fixture
def bridged(upstream, serve):
    return serve(make_app(settings_doc(chat_only(upstream))))


def test_a_codex_shaped_request_reaches_the_upstream_as_a_strict_chat_request(bridged, upstream):
    upstream.handler = answer(*TEXT)
    response = post(bridged, CODEX_BODY, CODEX)
    responses_invariants.check(response.content, codex=True)
    body = upstream.requests[0].body
    messages = body["messages"]
    strict_template_accepts(messages)
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are Codex")
    assert "<permissions instructions>" in messages[0]["content"]
    assert all(t["type"] == "function" for t in body["tools"])
    assert [t["function"]["name"] for t in body["tools"]] == ["shell", "update_plan", "apply_patch", "mcp_x__get"]
    assert messages[-1] == {"role": "user", "content": "Approval: never.\n\nnow run the tests"}
    assert not {"include", "store", "prompt_cache_key", "text", "reasoning", "instructions", "input"} & set(body)
    assert body["reasoning_effort"] == "medium" and body["response_format"]["json_schema"]["name"] == \
        "codex_output_schema"
    assert b"gAAAAB" not in upstream.requests[0].raw and b"originator" not in upstream.requests[0].raw
    patch = next(m for m in messages if m.get("tool_calls") and m["tool_calls"][0]["id"] == "call_Cd34")
    assert json.loads(patch["tool_calls"][0]["function"]["arguments"])["input"].startswith("*** Begin Patch")


BAD = [
    ("not-json", b"{\"model\": \"m\", \"input\": ", 400, None),
    ("array-body", b"[1, 2]", 400, None),
    ("missing-input", {"model": "m"}, 400, "input"),
    ("input-number", {"model": "m", "input": 5}, 400, "input"),
    ("unknown-item", {"model": "m", "input": [{"type": "telepathy", "content": "x"}]}, 400, "input[0].type"),
    ("item-not-object", {"model": "m", "input": ["hi"]}, 400, "input[0]"),
    ("bad-role", {"model": "m", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
    ("unknown-part", {"model": "m", "input": [{"role": "user", "content": [{"type": "input_video"}]}]}, 400,
     "input[0].content[0].type"),
    ("call-without-id", {"model": "m", "input": [{"type": "function_call", "name": "a", "arguments": "{}"}]}, 400,
     "input[0].call_id"),
    ("tools-object", {"model": "m", "input": "hi", "tools": {"type": "function"}}, 400, "tools"),
    ("tool-without-type", {"model": "m", "input": "hi", "tools": [{"name": "a"}]}, 400, "tools[0]"),
    ("function-without-name", {"model": "m", "input": "hi", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
    ("parameters-string", {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "a",
                                                                  "parameters": "x"}]}, 400, "tools[0].parameters"),
    ("tool-choice-number", {"model": "m", "input": "hi", "tool_choice": 3,
                            "tools": [{"type": "function", "name": "a"}]}, 400, "tool_choice"),
    ("max-output-negative", {"model": "m", "input": "hi", "max_output_tokens": -1}, 400, "max_output_tokens"),
    ("instructions-list", {"model": "m", "input": "hi", "instructions": ["a"]}, 400, "instructions"),
    ("stream-string", {"model": "m", "input": "hi", "stream": "yes"}, 400, "stream"),
    ("previous-id-number", {"model": "m", "input": "hi", "previous_response_id": 7}, 400, "previous_response_id"),
    ("schema-missing", {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "o"}}},
     400, "text.format.schema"),
    ("oversize", {"model": "m", "input": "x" * 5000}, 413, None),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error_and_the_worker_keeps_serving(upstream, serve, name, body, status, param):
    server = serve(make_app(settings_doc(chat_only(upstream), **{"max-request-bytes": 4096})))
    upstream.handler = answer(*TEXT)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(server.url + "/v1/responses", data=data, timeout=10,
                             headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert not upstream.requests
    assert post(server, {"model": "m", "input": "hi"}).json()["status"] == "completed"


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                           st.sampled_from(["type", "role", "content", "text", "name", "call_id", "arguments",
                                            "input", "output", "tools", "summary", "image_url", "namespace"]),
                           inner, max_size=4), max_leaves=12)
ITEM_TYPES = st.sampled_from(["message", "function_call", "function_call_output", "custom_tool_call", "reasoning",
                              "custom_tool_call_output", "additional_tools", "web_search_call", "input_text"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.one_of(JSONISH, st.builds(lambda t, rest: {**rest, "type": t} if isinstance(rest, dict)
                                                   else {"type": t}, ITEM_TYPES, JSONISH)), max_size=4),
       tools=JSONISH)
def test_random_input_items_and_tools_never_cause_a_500(bridged, upstream, items, tools):
    upstream.handler = answer(*TEXT)
    response = post(bridged, {"model": "m", "input": items, "tools": tools})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"]["type"] == "invalid_request_error"
    else:
        assert response.json()["object"] == "response"
        roles = [m["role"] for m in upstream.requests[-1].body["messages"]]
        assert "developer" not in roles and "system" not in roles[1:]
