"""/v1/messages non-stream: what reaches the chat upstream, and the Anthropic message that comes back."""
from __future__ import annotations

import json
import time

import pytest

from tests.anthropic_invariants import check_stream
from tests.conftest import AUTH, CLIENT_KEY, PROVIDER_KEY, make_app, provider, settings_doc
from tests.upstream import Reply, completion, sse, text_chunks

MESSAGES = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
CLAUDE_MODELS = [{"name": "qwen3-coder", "alias": "claude-*"}]


@pytest.fixture
def app(upstream):
    return make_app(settings_doc(provider(upstream, models=CLAUDE_MODELS)))


def sent(client, upstream, body: dict, answer: dict | None = None, headers: dict | None = None):
    """POST /v1/messages; (the chat body the upstream got, the client's response)."""
    upstream.handler = lambda rec: Reply(body=json.dumps(answer or completion()).encode())
    response = client.post("/v1/messages", json=body, headers=headers or AUTH)
    return upstream.requests[-1].body, response


def tool_answer(calls: list[dict], content: str | None = None, finish: str = "tool_calls") -> dict:
    answer = completion()
    answer["choices"][0]["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
    answer["choices"][0]["finish_reason"] = finish
    return answer


def test_a1_plain_text_round_trip_with_glob_alias(client, upstream):
    body, response = sent(client, upstream, MESSAGES)
    assert body == {"model": "qwen3-coder", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    assert upstream.requests[0].path == "/v1/chat/completions"
    assert response.status_code == 200
    message = response.get_json()
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["model"] == "claude-sonnet-4-5"
    assert message["content"] == [{"type": "text", "text": "Hello!"}]
    assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
    assert message["usage"] == {"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}
    assert message["id"].startswith("msg_")


def test_a2_billing_header_dropped_and_system_is_one_leading_string(client, upstream):
    system = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cch=abc;"},
              {"type": "text", "text": "You are X", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "Be brief."}]
    body, _ = sent(client, upstream, dict(MESSAGES, system=system))
    assert body["messages"][0] == {"role": "system", "content": "You are X\n\nBe brief."}
    assert sum(m["role"] == "system" for m in body["messages"]) == 1


def test_a3_tool_results_go_before_the_text_of_the_same_turn(client, upstream):
    messages = [{"role": "user", "content": "list files"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash",
                                                   "input": {"command": "ls"}}]},
                {"role": "user", "content": [{"type": "text", "text": "next"},
                                             {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
    body, _ = sent(client, upstream, dict(MESSAGES, messages=messages))
    assert body["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": "ok"},
                                    {"role": "user", "content": "next"}]


def test_a4_assistant_text_and_tool_use_stay_one_message(client, upstream):
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "text", "text": "let me"},
                                                  {"type": "tool_use", "id": "t1", "name": "Bash",
                                                   "input": {"command": "ls"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                              "content": [{"type": "text", "text": "a.py"}]}]}]
    body, _ = sent(client, upstream, dict(MESSAGES, messages=messages))
    assert body["messages"][1] == {"role": "assistant", "content": "let me", "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]}
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t1", "content": "a.py"}


def test_a5_object_schema_without_properties_gets_empty_properties_and_name_case_kept(client, upstream):
    tools = [{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}},
             {"name": "Edit", "input_schema": {"type": "object", "properties": {
                 "opts": {"type": "object"}, "list": {"type": "array", "items": {"type": "object"}}}}}]
    body, _ = sent(client, upstream, dict(MESSAGES, tools=tools))
    assert body["tools"][0] == {"type": "function", "function": {
        "name": "Read", "description": "read a file", "parameters": {"type": "object", "properties": {}}}}
    params = body["tools"][1]["function"]["parameters"]
    assert params["properties"]["opts"] == {"type": "object", "properties": {}}
    assert params["properties"]["list"]["items"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize("choice,expected", [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}})])
def test_a6_tool_choice_mapping(client, upstream, choice, expected):
    tools = [{"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
    body, _ = sent(client, upstream, dict(MESSAGES, tools=tools, tool_choice=choice))
    assert body["tool_choice"] == expected
    assert "parallel_tool_calls" not in body


def test_a6_disable_parallel_tool_use_and_no_tool_choice_without_tools(client, upstream):
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]
    body, _ = sent(client, upstream, dict(MESSAGES, tools=tools,
                                          tool_choice={"type": "auto", "disable_parallel_tool_use": True}))
    assert body["parallel_tool_calls"] is False
    body, _ = sent(client, upstream, dict(MESSAGES, tool_choice={"type": "any"}))
    assert "tool_choice" not in body and "tools" not in body


def test_a7_stop_sequences_become_a_stop_array(client, upstream):
    body, _ = sent(client, upstream, dict(MESSAGES, stop_sequences=["END"], temperature=0.2, top_p=0.9, top_k=20,
                                          metadata={"user_id": "user_abc"}))
    assert body["stop"] == ["END"]
    assert (body["temperature"], body["top_p"], body["top_k"], body["user"]) == (0.2, 0.9, 20, "user_abc")
    assert "metadata" not in body and "stop_sequences" not in body


@pytest.mark.parametrize("thinking,effort", [({"type": "enabled", "budget_tokens": 1024}, "low"),
                                             ({"type": "enabled", "budget_tokens": 10000}, "medium"),
                                             ({"type": "enabled", "budget_tokens": 31999}, "high"),
                                             ({"type": "disabled"}, None)])
def test_a8_thinking_budget_becomes_a_bucketed_reasoning_effort(client, upstream, thinking, effort):
    body, _ = sent(client, upstream, dict(MESSAGES, max_tokens=40000, thinking=thinking))
    assert body.get("reasoning_effort") == effort
    assert "thinking" not in body


def test_a9_long_tool_name_shortened_upstream_and_restored_non_stream(client, upstream):
    name = "mcp__server__" + "very_long_tool_name_" * 3
    tools = [{"name": name, "input_schema": {"type": "object"}}]
    upstream.handler = lambda rec: Reply(body=json.dumps(tool_answer([{
        "id": "call_9", "type": "function",
        "function": {"name": rec.body["tools"][0]["function"]["name"], "arguments": "{}"}}])).encode())
    message = client.post("/v1/messages", json=dict(MESSAGES, tools=tools), headers=AUTH).get_json()
    short = upstream.requests[0].body["tools"][0]["function"]["name"]
    assert len(name) > 64 and len(short) <= 64
    assert message["content"] == [{"type": "tool_use", "id": "call_9", "name": name, "input": {}}]


def test_a10_base64_and_url_images_become_image_url_parts(client, upstream):
    content = [{"type": "text", "text": "what is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
               {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]
    body, _ = sent(client, upstream, dict(MESSAGES, messages=[{"role": "user", "content": content}]))
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]


def test_a10_text_only_model_gets_image_omitted_text_instead_of_the_image(upstream):
    models = [{"name": "qwen3-coder", "alias": "claude-*", "vision": False}]
    client = make_app(settings_doc(provider(upstream, models=models))).test_client()
    content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
               {"type": "text", "text": "what is this?"}]
    body, response = sent(client, upstream, dict(MESSAGES, messages=[{"role": "user", "content": content}]))
    assert body["messages"][0] == {"role": "user", "content": "[image omitted]\n\nwhat is this?"}
    assert "iVBORw0KGgo" not in upstream.requests[-1].raw.decode() and response.status_code == 200


def test_a17_sanitised_tool_id_round_trips_to_the_next_turn(client, upstream):
    _, response = sent(client, upstream, MESSAGES, tool_answer([{
        "id": "functions.Bash:0", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]))
    block = response.get_json()["content"][0]
    assert block["id"] == "functions_Bash_0" and response.get_json()["stop_reason"] == "tool_use"
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [block]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "x"}]}]
    body, _ = sent(client, upstream, dict(MESSAGES, messages=history))
    assert body["messages"][1]["tool_calls"][0]["id"] == "functions_Bash_0"
    assert body["messages"][2]["tool_call_id"] == "functions_Bash_0"


def test_a21_broken_tool_arguments_repaired_non_stream_never_a_string(client, upstream):
    _, response = sent(client, upstream, MESSAGES, tool_answer([
        {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"'}},
        {"id": "c2", "type": "function", "function": {"name": "Read", "arguments": '"just a string"'}}]))
    content = response.get_json()["content"]
    assert content[0]["input"] == {"command": "ls"} and content[1]["input"] == {}


def test_a18_non_stream_stop_with_tool_calls_is_tool_use_and_reasoning_comes_first(client, upstream):
    answer = tool_answer([{"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}],
                         content="Running.", finish="stop")
    answer["choices"][0]["message"]["reasoning_content"] = "I should list."
    _, response = sent(client, upstream, MESSAGES, answer)
    message = response.get_json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "tool_use"]
    assert message["content"][0] == {"type": "thinking", "thinking": "I should list.", "signature": ""}
    assert message["stop_reason"] == "tool_use"


def test_empty_answer_is_an_empty_content_list_and_length_is_max_tokens(client, upstream):
    answer = completion(content="")
    answer["choices"][0]["finish_reason"] = "length"
    message = sent(client, upstream, MESSAGES, answer)[1].get_json()
    assert message["content"] == [] and message["stop_reason"] == "max_tokens"


def claude_code_request() -> dict:
    """The shape Claude Code sends: billing block, cache_control everywhere, thinking, 20 tools, tool history."""
    schema = {"type": "object", "properties": {"command": {"type": "string", "description": "the command"},
                                               "timeout": {"type": "number"}},
              "required": ["command"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}
    tools = [{"name": name, "description": f"The {name} tool.", "input_schema": schema}
             for name in ("Bash", "Glob", "Grep", "LS", "Read", "Edit", "MultiEdit", "Write", "NotebookEdit",
                          "WebFetch", "TodoWrite", "WebSearch", "BashOutput", "KillShell", "Task", "ExitPlanMode",
                          "SlashCommand", "mcp__ide__getDiagnostics")]
    tools += [{"name": "mcp__ide__executeCode", "input_schema": {"type": "object"},
               "cache_control": {"type": "ephemeral"}},
              {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
    ephemeral = {"type": "ephemeral"}
    return {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 32000, "stream": False,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.0.14.abc; cc_entrypoint=cli"},
                   {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                    "cache_control": ephemeral},
                   {"type": "text", "text": "Working directory: /src/app", "cache_control": ephemeral}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nAs you answer, use the context.\n</system-reminder>"},
                {"type": "text", "text": "run the tests", "cache_control": ephemeral}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I will run pytest.", "signature": "EqQBCkYIBxgCKkB"},
                {"type": "text", "text": "Running the tests."},
                {"type": "tool_use", "id": "toolu_01A", "name": "Bash", "input": {"command": "pytest -q"},
                 "cache_control": ephemeral}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "cache_control": ephemeral,
                 "content": [{"type": "text", "text": "3 passed"}]},
                {"type": "text", "text": "great, now commit"}]},
            {"role": "system", "content": "The user changed directory."},
        ],
        "tools": tools, "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "metadata": {"user_id": "user_8a3f_account__session_1b2c"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015"}]},
    }


def test_claude_code_shaped_request_reaches_upstream_as_a_clean_chat_request(upstream):
    models = [{"name": "qwen3-coder", "alias": "claude-*", "max-output-tokens": 16384, "context-length": 65536}]
    client = make_app(settings_doc(provider(upstream, models=models))).test_client()
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming",
               "x-stainless-lang": "js", "x-stainless-retry-count": "0", "x-app": "cli",
               "user-agent": "claude-cli/2.0.14 (external, cli)"}
    body, response = sent(client, upstream, claude_code_request(), headers=headers)
    assert response.status_code == 200
    raw = upstream.requests[-1].raw.decode()
    assert "cache_control" not in raw and "billing-header" not in raw and "signature" not in raw
    assert "context_management" not in body and "thinking" not in body and "metadata" not in body
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "user"]  # the later system message joins the user turn
    assert body["messages"][0]["content"] == ("You are Claude Code, Anthropic's official CLI for Claude.\n\n"
                                              "Working directory: /src/app")
    assert body["messages"][3] == {"role": "tool", "tool_call_id": "toolu_01A", "content": "3 passed"}
    assert body["messages"][4] == {"role": "user", "content": "great, now commit\n\n<system-reminder>\n"
                                                              "The user changed directory.\n</system-reminder>"}
    assert "reasoning_content" not in body["messages"][2]  # reasoning-replay is off
    assert len(body["tools"]) == 19  # the server tool (web_search) is dropped
    assert all(t["type"] == "function" for t in body["tools"])
    assert body["tools"][18]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert body["max_tokens"] == 16384 and body["reasoning_effort"] == "high"
    sent_headers = upstream.requests[-1].headers
    assert not [k for k in sent_headers if k.startswith(("anthropic-", "x-stainless-", "x-app", "x-api-key"))]
    assert sent_headers["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_reasoning_replay_sends_thinking_back_as_reasoning_content(upstream):
    app = make_app(settings_doc(provider(upstream, models=CLAUDE_MODELS, **{"reasoning-replay": True})))
    body, _ = sent(app.test_client(), upstream, claude_code_request())
    assert body["messages"][2]["reasoning_content"] == "I will run pytest."


LONG = "The quick brown fox jumps over the lazy dog. " * 800  # ~36,000 characters, ~10,000 tokens


@pytest.mark.parametrize("spec,asked,prompt,expected", [
    ({"max-output-tokens": 4096}, 32000, "hi", 4096),
    ({"context-length": 8192}, 32000, "hi", 8192 - 10),     # the prompt estimate of "hi" is about 10 tokens
    ({"context-length": 1000}, 32000, "hi", 1000 - 10),
    ({"context-length": 8192}, 32000, LONG, 1024),           # no room left: the floor, and the upstream decides
    ({"context-length": 2048}, 32000, LONG, 512),            # the floor is at most a quarter of the context
    ({"max-output-tokens": 4096, "context-length": 131072}, 100, "hi", 100)])
def test_max_tokens_clamped_by_model_limits(upstream, spec, asked, prompt, expected):
    models = [{"name": "qwen3-coder", "alias": "claude-*", **spec}]
    client = make_app(settings_doc(provider(upstream, models=models))).test_client()
    body, _ = sent(client, upstream, dict(MESSAGES, max_tokens=asked, messages=[{"role": "user", "content": prompt}]))
    assert abs(body["max_tokens"] - expected) <= 5


def test_forced_provider_folds_the_stream_then_translates_once(upstream):
    app = make_app(settings_doc(provider(upstream, models=CLAUDE_MODELS, **{"force-upstream-stream": True})))
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fol", "ded"], usage={
        "prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})))
    message = app.test_client().post("/v1/messages", json=MESSAGES, headers=AUTH).get_json()
    assert upstream.requests[0].body["stream"] is True
    assert upstream.requests[0].body["stream_options"] == {"include_usage": True}
    assert message["content"] == [{"type": "text", "text": "folded"}]
    assert message["usage"]["input_tokens"] == 7 and message["model"] == "claude-sonnet-4-5"


def test_upstream_that_answers_sse_to_a_non_stream_request_is_folded(client, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["sse", " anyway"])))
    message = client.post("/v1/messages", json=MESSAGES, headers=AUTH).get_json()
    assert message["content"] == [{"type": "text", "text": "sse anyway"}]


NATIVE_MESSAGE = {"id": "msg_native1", "type": "message", "role": "assistant", "model": "claude-upstream",
                  "content": [{"type": "text", "text": "native"}], "stop_reason": "end_turn",
                  "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}


def test_native_messages_provider_gets_the_request_as_is(upstream):
    app = make_app(settings_doc(provider(upstream, models=CLAUDE_MODELS,
                                         **{"native-apis": ["chat", "messages"]})))
    upstream.handler = lambda rec: Reply(body=json.dumps(NATIVE_MESSAGE).encode())
    request = dict(MESSAGES, system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}])
    response = app.test_client().post("/v1/messages", json=request, headers={
        "x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching"})
    rec = upstream.requests[0]
    assert rec.path == "/v1/messages"
    assert rec.body == dict(request, model="qwen3-coder")  # cache_control and all, only the model rewritten
    assert rec.headers["anthropic-version"] == "2023-06-01" and rec.headers["anthropic-beta"] == "prompt-caching"
    assert rec.headers["x-api-key"] == PROVIDER_KEY and rec.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert response.get_json() == NATIVE_MESSAGE


def test_native_messages_stream_is_relayed_byte_for_byte(upstream, serve):
    import requests

    app = make_app(settings_doc(provider(upstream, models=CLAUDE_MODELS, **{"native-apis": ["messages"]})))
    live = serve(app)
    events = [b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_n","type":"message",'
              b'"role":"assistant","model":"x","content":[],"stop_reason":null,"stop_sequence":null,'
              b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n',
              b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
              b'"content_block":{"type":"text","text":""}}\n\n',
              b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
              b'"delta":{"type":"text_delta","text":"hi"}}\n\n',
              b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
              b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn",'
              b'"stop_sequence":null},"usage":{"output_tokens":1}}\n\n',
              b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
    upstream.handler = lambda rec: Reply(events=events)
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    assert response.content == b"".join(events)
    check_stream(response.content)


def test_glob_aliases_route_claude_codes_small_and_main_models(upstream):
    small = provider(upstream, name="small", models=[{"name": "qwen2.5-coder-7b", "alias": "claude-*haiku*"}])
    main = provider(upstream, name="gpu", models=[{"name": "qwen3-coder-30b", "alias": "claude-*"}])
    client = make_app(settings_doc(small, main)).test_client()
    for asked, expected in (("claude-haiku-4-5-20251001", "qwen2.5-coder-7b"), ("claude-sonnet-4-6", "qwen3-coder-30b"),
                            ("claude-opus-4-1", "qwen3-coder-30b")):
        body, response = sent(client, upstream, dict(MESSAGES, model=asked))
        assert body["model"] == expected and response.get_json()["model"] == asked


def test_metrics_and_access_log_cover_messages_with_the_chat_usage(live, upstream, caplog):
    import requests
    from prometheus_client import REGISTRY

    def sample(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def prompt_tokens() -> float:
        # the unnamed client key's label is "key-" and 8 digits of its identity, never characters of the key
        return sum(s.value for metric in REGISTRY.collect() if metric.name == "streamfold_tokens"
                   for s in metric.samples if s.name == "streamfold_tokens_total" and s.labels["kind"] == "prompt"
                   and s.labels["client"].startswith("key-"))

    before = prompt_tokens()
    # the model label is the routed name (here the glob alias), so clients cannot grow the series
    requests_before = sample("streamfold_requests_total", route="/v1/messages", model="claude-*",
                             provider="up", status="200")
    answer = completion()
    answer["usage"] = {"prompt_tokens": 30, "completion_tokens": 4, "total_tokens": 34,
                       "prompt_tokens_details": {"cached_tokens": 20}}
    upstream.handler = lambda rec: Reply(body=json.dumps(answer).encode()) if not rec.body.get("stream") else \
        Reply(events=sse(*text_chunks(["a"], usage={"prompt_tokens": 30, "completion_tokens": 4,
                                                    "total_tokens": 34})))
    assert requests.post(live.url + "/v1/messages", json=MESSAGES, headers=AUTH, timeout=10).status_code == 200
    streamed = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    check_stream(streamed.content)
    deadline = time.monotonic() + 2  # a stream's log line and tokens are written when it ends
    while prompt_tokens() < before + 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    # the chat usage (30 prompt tokens each), not the Anthropic one (10 uncached input tokens)
    assert prompt_tokens() == before + 60
    assert sample("streamfold_requests_total", route="/v1/messages", model="claude-*", provider="up",
                  status="200") == requests_before + 2
    lines = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"]
    assert sum("route=/v1/messages model=claude-sonnet-4-5 provider=up status=200" in line for line in lines) == 2
    assert not any("Hello!" in r.getMessage() for r in caplog.records)  # no message content in any log


def test_structured_output_and_documents_translate(client, upstream):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    content = [{"type": "document", "title": "notes.txt", "source": {"type": "text", "media_type": "text/plain",
                                                                     "data": "the build is green"}},
               {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
               {"type": "text", "text": "summarise"}]
    body, _ = sent(client, upstream, dict(MESSAGES, output_format={"type": "json_schema", "schema": schema},
                                          messages=[{"role": "user", "content": content}]))
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "structured_output", "schema": schema, "strict": True}}
    assert body["messages"][0]["content"] == "notes.txt\n\nthe build is green\n\n[document omitted]\n\nsummarise"


def test_whitespace_only_text_blocks_and_server_tool_blocks_never_reach_the_upstream(client, upstream):
    history = [{"role": "user", "content": [{"type": "text", "text": "  \n"}, {"type": "text", "text": "search"}]},
               {"role": "assistant", "content": [
                   {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "x"}},
                   {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                   {"type": "redacted_thinking", "data": "abc"},
                   {"type": "text", "text": "Found nothing."}]},
               {"role": "user", "content": "ok"}]
    body, _ = sent(client, upstream, dict(MESSAGES, messages=history))
    assert body["messages"] == [{"role": "user", "content": "search"},
                                {"role": "assistant", "content": "Found nothing."},
                                {"role": "user", "content": "ok"}]


@pytest.mark.parametrize("matched,stops,reason,sequence", [
    ("END", ["END", "STOP"], "stop_sequence", "END"),   # vLLM names the client's stop string
    ("OTHER", ["END"], "end_turn", None),                # a string the client did not ask for
    (128008, ["END"], "end_turn", None),                 # a stop token (vLLM writes its id)
    (None, ["END"], "end_turn", None),
])
def test_vllm_stop_reason_becomes_stop_sequence_when_it_is_one_of_the_clients(client, upstream, matched, stops,
                                                                              reason, sequence):
    answer = completion("Here it")
    answer["choices"][0]["stop_reason"] = matched  # vllm-project/vllm#2976
    _, response = sent(client, upstream, dict(MESSAGES, stop_sequences=stops), answer)
    message = response.get_json()
    assert (message["stop_reason"], message["stop_sequence"]) == (reason, sequence)


def test_a_tool_call_wins_over_a_matched_stop_sequence(client, upstream):
    answer = tool_answer([{"id": "call_1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}],
                         finish="stop")
    answer["choices"][0]["stop_reason"] = "END"
    _, response = sent(client, upstream, dict(MESSAGES, stop_sequences=["END"]), answer)
    message = response.get_json()
    assert (message["stop_reason"], message["stop_sequence"]) == ("tool_use", None)
