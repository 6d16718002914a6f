"""The Responses bridge over HTTP: /v1/responses against a chat-only loopback upstream (issue 16).

Test ids name translation.md §4.2's cases (r1 ... r25). Every streamed answer goes through
tests/responses_invariants.check.
"""
from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import requests

from proxy.fold.chat import fold_chat_chunks
from tests import responses_invariants
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, sse

HEAD = {"id": "chatcmpl-br1", "object": "chat.completion.chunk", "created": 1764000001, "model": "upstream-model"}
CODEX = {"originator": "codex_cli_rs", "User-Agent": "codex_cli_rs/0.63.0 (Debian 13; x86_64) xterm-256color"}


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    return dict(HEAD, choices=[{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
                **extra)


def usage(prompt: int = 12, completion: int = 5, **extra) -> dict:
    return dict(HEAD, choices=[], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion, **extra})


def call(index: int, call_id: str | None, name: str, args: str) -> dict:
    out = {"index": index, "type": "function", "function": {"name": name, "arguments": args}}
    if call_id:
        out["id"] = call_id
    return out


def answer(*chunks: dict, done: bool = True):
    """An upstream handler: these chunks as SSE when streamed, their fold as a chat.completion otherwise."""
    events = sse(*chunks, done=done)

    def handler(rec):
        if rec.body.get("stream"):
            return Reply(events=events)
        return Reply(body=json.dumps(fold_chat_chunks(events)).encode())
    return handler


TEXT = (chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk(finish="stop"), usage())


def chat_only(upstream, **extra) -> dict:
    return provider(upstream, **{"native-apis": ["chat"], **extra})


@pytest.fixture
def bridged(upstream, serve):
    return serve(make_app(settings_doc(chat_only(upstream))))


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_sdk_clients():
    """SDK clients hold pooled sockets; close them, or their garbage collection warns (and fails the run)."""
    yield
    while _clients:
        _clients.pop().close()


def sdk(server) -> openai.OpenAI:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)
    _clients.append(client)
    return client


def post(server, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(server.url + "/v1/responses", json=body, headers={**AUTH, **(headers or {})}, timeout=10)


def stream(server, body: dict, headers: dict | None = None, codex: bool = False) -> dict:
    """POST a streamed request; check its events; return the terminal payload (and ``events``)."""
    response = post(server, {**body, "stream": True}, {**(CODEX if codex else {}), **(headers or {})})
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    terminal = responses_invariants.check(response.content, codex=codex)
    terminal["events"] = responses_invariants.parse(response.content)
    return terminal


def sent(upstream, n: int = -1) -> dict:
    rec = upstream.requests[n]
    assert rec.path == "/v1/chat/completions"
    return rec.body


# -- request side ---------------------------------------------------------------------------------------
def test_r1_plain_input_becomes_one_user_message_and_text_comes_back(bridged, upstream):
    upstream.handler = answer(*TEXT)
    result = sdk(bridged).responses.create(model="m", input="hi")
    body = sent(upstream)
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["model"] == "upstream-model"
    assert "stream" not in body
    assert result.object == "response" and result.status == "completed" and result.model == "m"
    assert result.output_text == "Hello" and result.output[0].type == "message"
    assert result.id.startswith("resp_") and result.output[0].id.startswith("msg_")


def test_r2_instructions_and_leading_developer_items_become_one_system_message(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", instructions="A", input=[
        {"role": "developer", "content": "B"},
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "C"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    messages = sent(upstream)["messages"]
    assert messages == [{"role": "system", "content": "A\n\nB\n\nC"}, {"role": "user", "content": "hi"}]


def test_r3_a_later_developer_message_goes_up_as_user_never_a_late_system(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "ok"},
        {"role": "developer", "content": "be brief"}, {"role": "user", "content": "two"}])
    messages = sent(upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[2]["content"] == "be brief\n\ntwo"  # merged: strict templates want alternation


def test_r4_function_call_and_its_output_are_adjacent(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input=[
        {"role": "user", "content": "list"},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{\"cmd\":[\"ls\"]}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done"}])
    messages = sent(upstream)["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "shell", "arguments": "{\"cmd\":[\"ls\"]}"}}]}
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "done"}


def test_r5_parallel_calls_share_one_assistant_message_and_a_user_message_waits_for_the_outputs(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input=[
        {"role": "user", "content": "go"},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{}"},
        {"role": "user", "content": "meanwhile"},
        {"type": "function_call_output", "call_id": "c1", "output": "1"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "2"}]}])
    messages = sent(upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert messages[3]["content"] == "2" and messages[4]["content"] == "meanwhile"


def test_r6_assistant_text_then_function_call_is_one_assistant_message(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input=[
        {"role": "user", "content": "go"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me"}]},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}])
    messages = sent(upstream)["messages"]
    assert messages[1]["content"] == "let me" and messages[1]["tool_calls"][0]["id"] == "c1"
    assert len(messages) == 3


REASONING_INPUT = [
    {"role": "user", "content": "go"},
    {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "S"}],
     "encrypted_content": "gAAAAB-opaque"},
    {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "ok"}]


def test_r7_reasoning_items_are_dropped_by_default(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input=REASONING_INPUT)
    assert "reasoning_content" not in sent(upstream)["messages"][1]
    assert b"gAAAAB" not in upstream.requests[-1].raw


def test_r7_reasoning_replay_sends_the_summary_back_as_reasoning_content(upstream, serve):
    server = serve(make_app(settings_doc(chat_only(upstream, **{"reasoning-replay": True}))))
    upstream.handler = answer(*TEXT)
    sdk(server).responses.create(model="m", input=REASONING_INPUT)
    assert sent(upstream)["messages"][1]["reasoning_content"] == "S"
    assert b"gAAAAB" not in upstream.requests[-1].raw


APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Use the `apply_patch` tool to edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}}
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"


def test_r8_custom_tool_becomes_a_function_with_one_string_input(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input="patch it", tools=[APPLY_PATCH])
    (tool,) = sent(upstream)["tools"]
    assert tool["type"] == "function" and tool["function"]["name"] == "apply_patch"
    assert tool["function"]["parameters"] == {"type": "object", "properties": {"input": {"type": "string"}},
                                              "required": ["input"]}
    assert "start: begin_patch" in tool["function"]["description"]


PATCH_CALL = (chunk({"role": "assistant", "content": None}),
              chunk({"tool_calls": [call(0, "call_p1", "apply_patch", "")]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": json.dumps({"input": PATCH})[:20]}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": json.dumps({"input": PATCH})[20:]}}]}),
              chunk(finish="tool_calls"), usage())


def test_r9_upstream_apply_patch_call_comes_back_as_custom_tool_call(bridged, upstream):
    upstream.handler = answer(*PATCH_CALL)
    result = sdk(bridged).responses.create(model="m", input="patch it", tools=[APPLY_PATCH])
    (item,) = result.output
    assert item.type == "custom_tool_call" and item.input == PATCH and item.call_id == "call_p1"
    assert item.name == "apply_patch"
    terminal = stream(bridged, {"model": "m", "input": "patch it", "tools": [APPLY_PATCH]}, codex=True)
    (item,) = terminal["response"]["output"]
    assert item["type"] == "custom_tool_call" and item["input"] == PATCH
    names = [name for name, _ in terminal["events"]]
    assert "response.custom_tool_call_input.done" in names and "response.function_call_arguments.delta" not in names


def test_r10_custom_tool_call_history_goes_up_wrapped_in_input(bridged, upstream):
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", tools=[APPLY_PATCH], input=[
        {"role": "user", "content": "patch"},
        {"type": "custom_tool_call", "call_id": "c9", "name": "apply_patch", "input": "P"},
        {"type": "custom_tool_call_output", "call_id": "c9", "output": "ok"}])
    messages = sent(upstream)["messages"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "apply_patch", "arguments": "{\"input\":\"P\"}"}
    assert messages[2] == {"role": "tool", "tool_call_id": "c9", "content": "ok"}


def test_r11_built_in_tools_are_not_sent_and_the_request_succeeds(bridged, upstream):
    upstream.handler = answer(*TEXT)
    result = sdk(bridged).responses.create(model="m", input="hi", tools=[
        {"type": "web_search"}, {"type": "local_shell"}, {"type": "image_generation"}, {"type": "tool_search"},
        {"type": "function", "name": "shell", "parameters": {"type": "object"}}])
    assert result.status == "completed"
    body = sent(upstream)
    assert [t["function"]["name"] for t in body["tools"]] == ["shell"]
    assert body["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}
    upstream.handler = answer(*TEXT)
    sdk(bridged).responses.create(model="m", input="hi", tools=[{"type": "web_search"}], tool_choice="auto")
    assert "tools" not in sent(upstream) and "tool_choice" not in sent(upstream)


NAMESPACE = {"type": "namespace", "name": "mcp_x", "description": "x server",
             "tools": [{"type": "function", "name": "get", "parameters": {"type": "object", "properties": {}}}]}


def test_r12_namespace_tools_are_flattened_and_split_back(bridged, upstream):
    upstream.handler = answer(chunk({"tool_calls": [call(0, "call_n1", "mcp_x__get", "{}")]}),
                              chunk(finish="tool_calls"), usage())
    result = post(bridged, {"model": "m", "input": "get it", "tools": [NAMESPACE]}).json()
    assert sent(upstream)["tools"][0]["function"]["name"] == "mcp_x__get"
    (item,) = result["output"]
    assert (item["type"], item["name"], item["namespace"], item["call_id"]) == ("function_call", "get", "mcp_x",
                                                                                "call_n1")
    terminal = stream(bridged, {"model": "m", "input": "get it", "tools": [NAMESPACE]})
    assert terminal["response"]["output"][0]["namespace"] == "mcp_x"


def test_r13_json_schema_text_format_becomes_response_format(bridged, upstream):
    upstream.handler = answer(*TEXT)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    post(bridged, {"model": "m", "input": "hi", "text": {"format": {"type": "json_schema", "name": "o",
                                                                      "schema": schema, "strict": True}}})
    assert sent(upstream)["response_format"] == {"type": "json_schema",
                                                 "json_schema": {"name": "o", "schema": schema, "strict": True}}


def test_r14_max_output_tokens_reasoning_effort_and_tool_choice_map_to_chat(bridged, upstream):
    upstream.handler = answer(*TEXT)
    post(bridged, {"model": "m", "input": "hi", "max_output_tokens": 500, "reasoning": {"effort": "high"},
                   "tool_choice": {"type": "function", "name": "shell"}, "parallel_tool_calls": False,
                   "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]})
    body = sent(upstream)
    assert body["max_tokens"] == 500 and body["reasoning_effort"] == "high"
    assert body["tool_choice"] == {"type": "function", "function": {"name": "shell"}}
    assert body["parallel_tool_calls"] is False


def test_max_output_tokens_is_clamped_by_the_model_limits(upstream, serve):
    models = [{"name": "upstream-model", "alias": "m", "max-output-tokens": 300, "context-length": 1000}]
    server = serve(make_app(settings_doc(chat_only(upstream, models=models))))
    upstream.handler = answer(*TEXT)
    post(server, {"model": "m", "input": "hi", "max_output_tokens": 32000})
    assert sent(upstream)["max_tokens"] == 300
    post(server, {"model": "m", "input": "x" * 3000, "max_output_tokens": 32000})
    assert 1 <= sent(upstream)["max_tokens"] < 300  # what the context leaves after a ~750-token prompt


# -- event streams ------------------------------------------------------------------------------------------
def test_r15_text_stream_events_in_order_with_one_response_id(bridged, upstream):
    upstream.handler = answer(*TEXT)
    terminal = stream(bridged, {"model": "m", "input": "hi"})
    names = [name for name, _ in terminal["events"]]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    body = sent(upstream)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert terminal["response"]["output"][0]["content"][0]["text"] == "Hello"


REASONING_TEXT = (chunk({"role": "assistant", "reasoning_content": "Think"}), chunk({"reasoning_content": "ing."}),
                  chunk({"content": "Answer"}), chunk(finish="stop"), usage())


def test_r16_reasoning_item_is_closed_before_the_message_starts(bridged, upstream):
    upstream.handler = answer(*REASONING_TEXT)
    terminal = stream(bridged, {"model": "m", "input": "hi"})
    names = [name for name, _ in terminal["events"]]
    assert names.index("response.output_item.done") < names.index("response.content_part.added")
    reasoning, message = terminal["response"]["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"][0]["text"] == "Thinking."
    assert message["type"] == "message" and message["content"][0]["text"] == "Answer"
    added = [p["output_index"] for n, p in terminal["events"] if n == "response.output_item.added"]
    assert added == [0, 1]


def test_r17_message_is_done_before_the_function_call_and_arguments_add_up(bridged, upstream):
    upstream.handler = answer(chunk({"role": "assistant", "content": "Let me look."}),
                              chunk({"tool_calls": [call(0, "call_a", "shell", "")]}),
                              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"cmd\":"}}]}),
                              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "[\"ls\"]}"}}]}),
                              chunk(finish="tool_calls"), usage())
    terminal = stream(bridged, {"model": "m", "input": "hi"})
    events = terminal["events"]
    message_done = next(i for i, (n, p) in enumerate(events) if n == "response.output_item.done")
    call_added = next(i for i, (n, p) in enumerate(events)
                      if n == "response.output_item.added" and p["item"]["type"] == "function_call")
    assert message_done < call_added
    fc = terminal["response"]["output"][1]
    assert fc["arguments"] == "{\"cmd\":[\"ls\"]}" and fc["id"] == "fc_call_a" and fc["status"] == "completed"


PARALLEL = (chunk({"role": "assistant", "content": None}),
            chunk({"tool_calls": [call(0, "call_1", "read", ""), call(1, "call_2", "read", "")]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"path\":\"a\"}"}}]}),
            chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{\"path\":\"b\"}"}}]}),
            chunk(finish="tool_calls"), usage())


def test_r18_parallel_tool_calls_are_two_items_in_output_index_order(bridged, upstream):
    upstream.handler = answer(*PARALLEL)
    terminal = stream(bridged, {"model": "m", "input": "read both"})
    output = terminal["response"]["output"]
    assert [(o["call_id"], o["arguments"]) for o in output] == [("call_1", "{\"path\":\"a\"}"),
                                                                ("call_2", "{\"path\":\"b\"}")]


def test_r19_a_call_without_id_gets_one_used_everywhere_and_accepted_next_turn(bridged, upstream):
    upstream.handler = answer(chunk({"tool_calls": [call(0, None, "shell", "{\"cmd\":[\"ls\"]}")]}),
                              chunk(finish="tool_calls"))
    terminal = stream(bridged, {"model": "m", "input": "ls"})
    ids = {p["item"]["call_id"] for n, p in terminal["events"] if n.startswith("response.output_item")}
    (call_id,) = ids
    assert call_id.startswith("call_") and terminal["response"]["output"][0]["call_id"] == call_id
    result = post(bridged, {"model": "m", "input": "ls"}).json()
    assert result["output"][0]["call_id"].startswith("call_") and result["output"][0]["id"].startswith("fc_call_")
    upstream.handler = answer(*TEXT)
    post(bridged, {"model": "m", "input": [
        {"role": "user", "content": "ls"},
        {"type": "function_call", "call_id": call_id, "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": call_id, "output": "a.txt"}]})
    messages = sent(upstream)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == call_id and messages[2]["tool_call_id"] == call_id


def test_r20_usage_is_complete_or_absent(bridged, upstream):
    upstream.handler = answer(chunk({"content": "hi"}), chunk(finish="stop"),
                              dict(HEAD, choices=[], usage={"prompt_tokens": 100, "completion_tokens": 20}))
    expected = {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 20,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 120}
    assert stream(bridged, {"model": "m", "input": "hi"})["response"]["usage"] == expected
    assert post(bridged, {"model": "m", "input": "hi"}).json()["usage"] == expected
    upstream.handler = answer(chunk({"content": "hi"}), chunk(finish="stop"),
                              dict(HEAD, choices=[], usage={"prompt_tokens": 100}))
    assert "usage" not in stream(bridged, {"model": "m", "input": "hi"})["response"]
    assert "usage" not in post(bridged, {"model": "m", "input": "hi"}).json()


LENGTH = (chunk({"content": "cut sh"}), chunk(finish="length"), usage())


def test_r21_length_is_incomplete_and_codex_still_gets_response_completed(bridged, upstream):
    upstream.handler = answer(*LENGTH)
    result = post(bridged, {"model": "m", "input": "hi"}).json()
    assert result["status"] == "incomplete" and result["incomplete_details"] == {"reason": "max_output_tokens"}
    assert result["output"][0]["status"] == "incomplete"
    plain = stream(bridged, {"model": "m", "input": "hi"})
    assert plain["type"] == "response.incomplete" and plain["response"]["status"] == "incomplete"
    codex = stream(bridged, {"model": "m", "input": "hi"}, codex=True)
    assert codex["type"] == "response.completed" and codex["response"]["status"] == "incomplete"
    assert codex["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_trailing_stop_after_length_ends_the_answer_as_the_last_finish_says_streamed_or_folded(bridged, upstream):
    # the last explicit finish_reason is the answer's (SPEC; fold/base.kept_finish), streamed or folded alike:
    # the stream had closed its items as incomplete at the length and still ended completed
    events = sse(*LENGTH[:2], chunk(finish="stop"), LENGTH[2])
    upstream.handler = lambda rec: Reply(events=events)
    result = post(bridged, {"model": "m", "input": "hi"}).json()
    assert result["status"] == "completed" and result["output"][0]["status"] == "completed"
    terminal = stream(bridged, {"model": "m", "input": "hi"})
    assert terminal["type"] == "response.completed"
    assert terminal["response"]["output"][0]["status"] == "completed"


def test_r22_an_answer_without_deltas_still_completes_with_empty_output(bridged, upstream):
    upstream.handler = answer(chunk({"role": "assistant", "content": ""}))
    for codex in (False, True):
        terminal = stream(bridged, {"model": "m", "input": "hi"}, codex=codex)
        assert terminal["type"] == "response.completed" and terminal["response"]["output"] == []
    assert post(bridged, {"model": "m", "input": "hi"}).json()["output"] == []


OVERFLOW = {"object": "error", "message": "This model's maximum context length is 8192 tokens. However, you "
            "requested 9000 tokens (8000 in the messages, 1000 in the completion).", "type": "BadRequestError",
            "param": None, "code": 400}


def test_r23_context_overflow_before_the_first_byte_is_a_400_with_its_code(bridged, upstream):
    upstream.handler = lambda rec: Reply(status=400, body=json.dumps(OVERFLOW).encode())
    for body in ({"model": "m", "input": "hi"}, {"model": "m", "input": "hi", "stream": True}):
        response = post(bridged, body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and "maximum context length" in error["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(bridged).responses.create(model="m", input="hi")
    assert raised.value.code == "context_length_exceeded"


def test_r23_context_overflow_after_the_stream_started_fails_in_the_stream(bridged, upstream):
    upstream.handler = lambda rec: Reply(events=sse(chunk({"content": "par"}), {"error": {
        "message": "prompt is too long for the context window", "type": "invalid_request_error"}}, done=False))
    codex = stream(bridged, {"model": "m", "input": "hi"}, codex=True)
    assert codex["type"] == "response.failed"
    assert codex["response"]["error"]["code"] == "context_length_exceeded"
    plain = stream(bridged, {"model": "m", "input": "hi"})
    assert plain["type"] == "error" and plain["code"] == "context_length_exceeded"


def test_a_stream_cut_off_upstream_never_ends_cleanly(bridged, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*TEXT[:3], done=False), drop_after=3)
    codex = stream(bridged, {"model": "m", "input": "hi"}, codex=True)
    assert codex["type"] == "response.failed" and codex["response"]["output"] == []  # the cut message is not done
    assert "response.output_item.done" not in [name for name, _ in codex["events"]]
    plain = stream(bridged, {"model": "m", "input": "hi"})
    assert plain["type"] == "error"
    upstream.handler = answer(*TEXT)
    assert post(bridged, {"model": "m", "input": "hi"}).json()["status"] == "completed"


def test_r24_unknown_previous_response_id_is_400_and_store_false_is_echoed(bridged, upstream):
    upstream.handler = answer(*TEXT)
    response = post(bridged, {"model": "m", "input": "hi", "previous_response_id": "resp_unknown"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "previous_response_not_found"
    assert response.json()["error"]["param"] == "previous_response_id"
    assert not upstream.requests
    first = post(bridged, {"model": "m", "input": "hi", "store": False}).json()
    assert first["store"] is False
    again = post(bridged, {"model": "m", "input": "more", "previous_response_id": first["id"]})
    assert again.status_code == 400 and again.json()["error"]["code"] == "previous_response_not_found"


def test_r24_previous_response_id_replays_the_stored_turn_as_history(bridged, upstream):
    upstream.handler = answer(*TEXT)
    client = sdk(bridged)
    first = client.responses.create(model="m", instructions="Be terse.", input="hi")
    second = client.responses.create(model="m", input="and then?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert sent(upstream)["messages"] == [{"role": "system", "content": "Be terse."},
                                          {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "and then?"}]
    upstream.handler = answer(*PARALLEL)  # a streamed turn that ends in calls: outputs continue it
    with client.responses.stream(model="m", input="read", previous_response_id=second.id) as events:
        third = events.get_final_response()
    upstream.handler = answer(*TEXT)
    client.responses.create(model="m", previous_response_id=third.id, instructions="New rules.", input=[
        {"type": "function_call_output", "call_id": "call_1", "output": "A"},
        {"type": "function_call_output", "call_id": "call_2", "output": "B"}])
    messages = sent(upstream)["messages"]
    assert messages[0] == {"role": "system", "content": "New rules."}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                             "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[6]["tool_calls"]] == ["call_1", "call_2"]


def test_r25_non_stream_reasoning_and_call_with_echoed_request_fields(bridged, upstream):
    upstream.handler = answer(chunk({"reasoning_content": "I should list."}),
                              chunk({"tool_calls": [call(0, "call_z", "shell", "{\"cmd\":[\"ls\"]}")]}),
                              chunk(finish="tool_calls"), usage(completion_tokens_details={"reasoning_tokens": 4}))
    tools = [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {}}}]
    result = post(bridged, {"model": "m", "tools": tools, "tool_choice": "auto", "parallel_tool_calls": True,
                            "input": [{"role": "user", "content": [
                                {"type": "input_text", "text": "what is this?"},
                                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=",
                                 "detail": "original"}]}]}).json()
    reasoning, fc = result["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert fc["type"] == "function_call" and fc["id"] == "fc_call_z" and result["status"] == "completed"
    assert result["tools"] == tools and result["tool_choice"] == "auto" and result["parallel_tool_calls"] is True
    assert result["usage"]["output_tokens_details"] == {"reasoning_tokens": 4}
    image = sent(upstream)["messages"][0]["content"][1]
    assert image == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=",
                                                        "detail": "high"}}


def test_forced_provider_folds_the_chat_stream_then_translates(upstream, serve):
    server = serve(make_app(settings_doc(chat_only(upstream, **{"force-upstream-stream": True}))))
    upstream.handler = answer(*REASONING_TEXT)
    result = sdk(server).responses.create(model="m", input="hi")
    assert sent(upstream)["stream"] is True and sent(upstream)["stream_options"] == {"include_usage": True}
    assert [o.type for o in result.output] == ["reasoning", "message"] and result.output_text == "Answer"
    assert result.usage.total_tokens == 17


def test_an_upstream_that_answers_json_to_a_stream_request_is_still_streamed(bridged, upstream):
    completion = fold_chat_chunks(sse(*PARALLEL))
    upstream.handler = lambda rec: Reply(body=json.dumps(completion).encode())
    terminal = stream(bridged, {"model": "m", "input": "read"})
    assert [o["call_id"] for o in terminal["response"]["output"]] == ["call_1", "call_2"]


def test_native_responses_providers_still_get_the_request_as_is(upstream, serve):
    server = serve(make_app(settings_doc(provider(upstream))))  # default native-apis include responses
    native = {"id": "resp_up", "object": "response", "status": "completed", "output": [], "model": "upstream-model"}
    upstream.handler = lambda rec: Reply(body=json.dumps(native).encode())
    assert post(server, {"model": "m", "input": "hi"}).json()["id"] == "resp_up"
    result = post(server, {"model": "m", "input": "hi", "previous_response_id": "resp_up"}).json()
    assert result["id"] == "resp_up" and upstream.requests[1].path == "/v1/responses"
    assert upstream.requests[1].body == {"model": "upstream-model", "input": "hi", "previous_response_id": "resp_up"}


def test_bridged_events_go_out_as_the_upstream_sends_them_not_at_the_end(bridged, upstream):
    events = sse(*[chunk({"content": f"w{i} "}) for i in range(6)], chunk(finish="stop"))
    gate = threading.Event()

    def gated():  # the upstream sends 3 events, then waits until the test has seen them through the proxy
        yield from events[:3]
        gate.wait(30)
        yield from events[3:]
    upstream.handler = lambda rec: Reply(events=gated())
    with requests.post(bridged.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                       headers=AUTH, stream=True, timeout=10) as response:
        received = b""
        pieces = response.iter_content(chunk_size=None)
        while received.count(b'"type":"response.output_text.delta"') < 3:
            received += next(pieces)
        assert upstream.requests[0].events_sent == 3 and b'"delta":"w2 "' in received
        gate.set()
        received += b"".join(pieces)
    terminal = responses_invariants.check(received)
    assert terminal["response"]["output"][0]["content"][0]["text"] == "w0 w1 w2 w3 w4 w5 "


def test_client_disconnect_closes_the_bridged_upstream_connection(bridged, upstream):
    chunks = [chunk({"content": f"w{i} "}) for i in range(100)] + [chunk(finish="stop")]
    upstream.handler = lambda rec: Reply(events=sse(*chunks), delay=0.05)
    with requests.post(bridged.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                       headers=AUTH, stream=True, timeout=10) as response:
        for line in response.iter_lines():
            if b'"response.output_text.delta"' in line:
                break
    rec = upstream.requests[0]
    for _ in range(100):
        if rec.disconnected_at is not None:
            break
        time.sleep(0.02)
    assert rec.disconnected_at is not None and rec.events_sent < 60


def test_a_stored_response_cannot_be_continued_with_another_client_key(upstream, serve):
    doc = settings_doc(chat_only(upstream), **{"api-keys": [{"key": CLIENT_KEY, "name": "team-a"},
                                                            {"key": "sk-client-other-0002", "name": "team-b"}]})
    server = serve(make_app(doc))
    upstream.handler = answer(*TEXT)
    first = post(server, {"model": "m", "input": "secret plan"}).json()
    other = requests.post(server.url + "/v1/responses", timeout=10, headers={"x-api-key": "sk-client-other-0002"},
                          json={"model": "m", "input": "more", "previous_response_id": first["id"]})
    assert other.status_code == 400 and other.json()["error"]["code"] == "previous_response_not_found"
    assert post(server, {"model": "m", "input": "more", "previous_response_id": first["id"]}).status_code == 200


def test_a_tool_name_over_64_chars_is_shortened_upstream_and_restored_in_the_answer(bridged, upstream):
    long_name = "mcp__" + "really_long_tool_name_" * 3 + "x" * 10
    tool = {"type": "function", "name": long_name, "parameters": {"type": "object", "properties": {}}}
    upstream.handler = answer(*TEXT)
    post(bridged, {"model": "m", "input": "go", "tools": [tool]})
    short = sent(upstream)["tools"][0]["function"]["name"]
    assert len(long_name) > 64 >= len(short) and short.startswith(long_name[:55])
    upstream.handler = answer(chunk({"tool_calls": [call(0, "call_l", short, "{}")]}), chunk(finish="tool_calls"))
    assert post(bridged, {"model": "m", "input": "go", "tools": [tool]}).json()["output"][0]["name"] == long_name
    terminal = stream(bridged, {"model": "m", "input": "go", "tools": [tool]})
    assert terminal["response"]["output"][0]["name"] == long_name


def test_an_upstream_that_answers_json_to_a_stream_request_gets_response_created_before_its_body_ends(
        bridged, upstream):
    # a JSON answer (chunked) whose second half comes only once the test has seen response.created
    body = json.dumps(fold_chat_chunks(sse(*TEXT))).encode()
    gate = threading.Event()

    def gated():
        yield body[:40]
        gate.wait(30)
        yield body[40:]
    upstream.handler = lambda rec: Reply(events=gated(), content_type="application/json; charset=utf-8")
    with requests.post(bridged.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                       headers=AUTH, stream=True, timeout=10) as response:
        pieces = response.iter_content(chunk_size=None)
        received = next(pieces)
        assert received.startswith(b"event: response.created\n") and upstream.requests[0].events_sent == 1
        gate.set()
        received += b"".join(pieces)
    terminal = responses_invariants.check(received)
    assert terminal["response"]["output"][0]["content"][0]["text"] == "Hello"


def test_an_internal_error_mid_stream_still_opens_with_response_created(bridged, upstream, monkeypatch):
    from proxy.translate.responses.stream import ResponsesStream

    def broken(self, out, kind, bodies):
        raise RuntimeError("a bug in the writer")
    monkeypatch.setattr(ResponsesStream, "literals", broken)
    upstream.handler = lambda rec: Reply(events=[b"".join(sse(*TEXT))])  # one read: the first batch breaks
    for codex in (False, True):
        terminal = stream(bridged, {"model": "m", "input": "hi"}, codex=codex)  # the invariant checker ran
        assert terminal["events"][0][0] == "response.created"
        assert [p["sequence_number"] for _, p in terminal["events"]] == list(range(len(terminal["events"])))
        assert terminal["events"][-1][0] == ("response.failed" if codex else "error")
    assert post(bridged, {"model": "m", "input": "hi"}).status_code == 200  # the worker is fine


def test_deltas_after_a_finish_reason_stay_in_their_open_items_streamed_and_folded_alike(bridged, upstream):
    """An upstream that goes on after its finish_reason (arguments, a second call, text, then a second finish):
    items close only at the end, so the late arguments are deltas of the call's open item and every item ends
    with the last finish's status, streamed (plain and Codex) as folded."""
    chunks = (chunk({"role": "assistant", "tool_calls": [call(0, "call_a", "read", '{"pa')]}),
              chunk(finish="tool_calls"),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'th":"x"}'}}]}),
              chunk({"tool_calls": [call(1, "call_b", "grep", '{"q":1}')]}),
              chunk({"content": "late"}),
              chunk(finish="length"), usage())
    upstream.handler = answer(*chunks)
    folded = post(bridged, {"model": "m", "input": "hi"}).json()
    for codex in (False, True):
        terminal = stream(bridged, {"model": "m", "input": "hi"}, codex=codex)
        assert terminal["response"]["status"] == folded["status"] == "incomplete"
        calls = [(item["call_id"], item["arguments"], item["status"]) for item in terminal["response"]["output"]
                 if item["type"] == "function_call"]
        assert calls == [(item["call_id"], item["arguments"], item["status"]) for item in folded["output"]
                         if item["type"] == "function_call"]
        assert calls == [("call_a", '{"path":"x"}', "incomplete"), ("call_b", '{"q":1}', "incomplete")]
