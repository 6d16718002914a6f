"""/v1/messages streaming: chat chunks from a real loopback upstream -> Anthropic events, every stream checked
by the shared invariant checker (tests/anthropic_invariants.py)."""
from __future__ import annotations

import json
import time

import pytest
import requests

from proxy import pump
from tests.anthropic_invariants import check_stream
from tests.conftest import AUTH, CLIENT_KEY
from tests.upstream import Reply, sse, text_chunks

HEAD = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1764000001, "model": "upstream-model"}
MESSAGES = {"model": "m", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}


def chunk(delta: dict | None = None, finish: str | None = None, **extra) -> dict:
    choice = {"index": 0, "delta": delta if delta is not None else {}, "logprobs": None, "finish_reason": finish}
    return dict(HEAD, choices=[choice], **extra)


def usage_chunk(prompt: int = 10, completion: int = 2) -> dict:
    return dict(HEAD, choices=[], usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                         "total_tokens": prompt + completion})


def tool_delta(index: int | None = None, id: str | None = None, name: str | None = None,
               arguments: str | None = None) -> dict:
    call: dict = {} if index is None else {"index": index}
    if id is not None:
        call.update(id=id, type="function")
    function = {}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    if function:
        call["function"] = function
    return {"tool_calls": [call]}


def stream(server, upstream, events: list[bytes], body: dict | None = None, **reply) -> bytes:
    """POST a streaming /v1/messages while the upstream sends ``events``; the raw SSE body."""
    upstream.handler = lambda rec: Reply(events=events, **reply)
    response = requests.post(server.url + "/v1/messages", json=dict(body or MESSAGES, stream=True),
                             headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}, timeout=20)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response.content


def test_a12_text_stream_events_exactly(live, upstream):
    raw = stream(live, upstream, sse(*text_chunks(["Hel", "lo"]), usage_chunk(10, 2)))
    checked = check_stream(raw)
    assert checked.names == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                             "content_block_stop", "message_delta", "message_stop"]
    assert checked.text == "Hello"
    assert checked.events[0][1]["message"]["model"] == "m"  # the name the client asked for
    assert checked.stop_reason == "end_turn"
    assert checked.usage["input_tokens"] == 10 and checked.usage["output_tokens"] == 2


def test_a11_stream_asks_upstream_for_usage(live, upstream):
    stream(live, upstream, sse(*text_chunks(["x"])))
    sent = upstream.requests[0].body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a13_reasoning_becomes_a_thinking_block_closed_before_text(live, upstream):
    events = sse(chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Let me "}),
                 chunk({"reasoning_content": "think."}), chunk({"content": "Answer"}), chunk(finish="stop"),
                 usage_chunk())
    checked = check_stream(stream(live, upstream, events))
    assert [b["type"] for b in checked.blocks] == ["thinking", "text"]
    assert checked.thinking == "Let me think." and checked.text == "Answer"
    assert checked.events[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}


def test_a14_tool_call_stream_sends_one_valid_input_json_delta(live, upstream):
    events = sse(chunk({"role": "assistant"}), chunk(tool_delta(0, "call_1", "Bash", "")),
                 chunk(tool_delta(0, arguments='{"comm')), chunk(tool_delta(0, arguments='and":"ls"}')),
                 chunk(finish="tool_calls"), usage_chunk())
    checked = check_stream(stream(live, upstream, events))
    assert checked.tools == [{"type": "tool_use", "id": "call_1", "name": "Bash", "input": {"command": "ls"}}]
    deltas = [d for n, d in checked.events if n == "content_block_delta"]
    assert len(deltas) == 1 and json.loads(deltas[0]["delta"]["partial_json"]) == {"command": "ls"}
    assert checked.stop_reason == "tool_use"


def test_a15_parallel_tool_calls_get_distinct_consecutive_blocks(live, upstream):
    events = sse(chunk({"content": "Two things:"}),
                 chunk(tool_delta(0, "call_a", "Read", '{"path":')), chunk(tool_delta(1, "call_b", "Bash", "")),
                 chunk(tool_delta(0, arguments='"a.py"}')), chunk(tool_delta(1, arguments='{"command":"ls"}')),
                 chunk(finish="tool_calls"), usage_chunk())
    checked = check_stream(stream(live, upstream, events))
    assert [(b["type"], b.get("name")) for b in checked.blocks] == [("text", None), ("tool_use", "Read"),
                                                                     ("tool_use", "Bash")]
    assert checked.tools[0]["input"] == {"path": "a.py"} and checked.tools[1]["input"] == {"command": "ls"}


def test_a16_tool_name_arriving_late_starts_the_block_once_with_the_real_name(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", "", "")), chunk(tool_delta(0, name="Grep")),
                 chunk(tool_delta(0, arguments='{"pattern":"x"}')), chunk(finish="tool_calls"))
    checked = check_stream(stream(live, upstream, events))
    assert [(t["name"], t["input"]) for t in checked.tools] == [("Grep", {"pattern": "x"})]


def test_a16_tool_whose_name_never_arrives_is_kept_as_tool_index(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", None, '{"a":1}')), chunk(finish="tool_calls"))
    checked = check_stream(stream(live, upstream, events))
    assert [(t["name"], t["id"], t["input"]) for t in checked.tools] == [("tool_0", "call_1", {"a": 1})]


def test_a17_tool_id_is_sanitised_in_the_stream(live, upstream):
    events = sse(chunk(tool_delta(0, "functions.Bash:0", "Bash", "{}")), chunk(finish="tool_calls"))
    assert check_stream(stream(live, upstream, events)).tools[0]["id"] == "functions_Bash_0"


def test_a18_emitted_tool_wins_over_finish_stop_and_tool_calls_without_tools_is_end_turn(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", "Bash", '{"command":"pwd"}')), chunk(finish="stop"))
    assert check_stream(stream(live, upstream, events)).stop_reason == "tool_use"
    checked = check_stream(stream(live, upstream, sse(chunk({"content": "no tools"}), chunk(finish="tool_calls"))))
    assert checked.stop_reason == "end_turn" and not checked.tools


def test_a19_done_without_usage_or_finish_still_sends_message_delta_and_stop(live, upstream):
    events = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "partial answer"}))
    checked = check_stream(stream(live, upstream, events))
    assert checked.names[-2:] == ["message_delta", "message_stop"]
    assert checked.stop_reason == "end_turn"
    assert checked.usage["output_tokens"] == 0
    assert checked.usage["input_tokens"] == checked.events[0][1]["message"]["usage"]["input_tokens"] > 0


def test_a20_content_and_finish_in_one_chunk_keeps_the_content(live, upstream):
    checked = check_stream(stream(live, upstream, sse(chunk({"content": "Hi"}, finish="stop"))))
    assert checked.text == "Hi" and checked.stop_reason == "end_turn"


def test_a_second_finish_reason_ends_the_stream_and_the_folded_message_alike(live, upstream):
    # length, then a layer's trailing stop: the stream kept the first (max_tokens) while the folded answer of a
    # non-stream request (the upstream answers SSE anyway) kept the last; both keep the last now (the SPEC's rule)
    events = sse(chunk({"role": "assistant", "content": "cut sh"}), chunk(finish="length"), chunk(finish="stop"),
                 usage_chunk())
    assert check_stream(stream(live, upstream, events)).stop_reason == "end_turn"
    response = requests.post(live.url + "/v1/messages", json=MESSAGES, headers=AUTH, timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["stop_reason"] == "end_turn" and response.json()["content"][0]["text"] == "cut sh"


def test_broken_tool_argument_json_is_repaired_in_the_stream(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", "Bash", '{"command":"ls')), chunk(finish="tool_calls"))
    assert check_stream(stream(live, upstream, events)).tools[0]["input"] == {"command": "ls"}


def test_hopeless_tool_arguments_become_an_empty_object(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", "Bash", "not json at all")), chunk(finish="tool_calls"))
    assert check_stream(stream(live, upstream, events)).tools[0]["input"] == {}


def test_tool_arguments_with_a_raw_tab_and_a_number_past_64_bits_become_the_tool_input(live, upstream):
    # llama.cpp writes raw control characters into strings; orjson refuses those, and the repair read the text
    # with its own json.loads, which keeps 12345678901234567890123 an int no JSON writer takes: the stream
    # ended with an internal error. The one slow path (fold/base.slow_json) reads the number as orjson does.
    arguments = '{"command": "ls\t-l", "limit": 12345678901234567890123}'
    events = sse(chunk(tool_delta(0, "call_1", "Bash", arguments)), chunk(finish="tool_calls"))
    assert check_stream(stream(live, upstream, events)).tools[0]["input"] == {"command": "ls\t-l",
                                                                              "limit": 1.2345678901234568e22}


def test_tool_only_stream_without_finish_reason_ends_with_tool_use(live, upstream):
    events = sse(chunk(tool_delta(0, "call_1", "Bash", '{"command":"ls"}')),
                 chunk(tool_delta(1, "call_2", "Read", '{"path":"x"}')), usage_chunk(30, 9))
    checked = check_stream(stream(live, upstream, events))
    assert [t["name"] for t in checked.tools] == ["Bash", "Read"]
    assert checked.stop_reason == "tool_use" and checked.usage["output_tokens"] == 9


def test_reasoning_text_and_tool_in_one_answer(live, upstream):
    events = sse(chunk({"reasoning": "plan"}), chunk({"content": "Running it."}),
                 chunk(tool_delta(0, "call_1", "Bash", '{"command":"ls"}')), chunk(finish="tool_calls"),
                 usage_chunk(100, 20))
    checked = check_stream(stream(live, upstream, events))
    assert [b["type"] for b in checked.blocks] == ["thinking", "text", "tool_use"]
    assert checked.stop_reason == "tool_use" and checked.usage["input_tokens"] == 100


def test_usage_with_cached_prompt_tokens_in_the_finish_chunk(live, upstream):
    usage = {"prompt_tokens": 50, "completion_tokens": 3, "total_tokens": 53,
             "prompt_tokens_details": {"cached_tokens": 40}}
    checked = check_stream(stream(live, upstream, sse(chunk({"content": "ok"}), chunk(finish="length", usage=usage))))
    assert checked.usage["input_tokens"] == 10 and checked.usage["cache_read_input_tokens"] == 40
    assert checked.stop_reason == "max_tokens"


def test_a9_long_tool_name_goes_up_short_and_comes_back_whole(live, upstream):
    name = "mcp__" + "x" * 65
    body = dict(MESSAGES, tools=[{"name": name, "input_schema": {"type": "object"}}])
    events = sse(chunk({"role": "assistant"}))  # answered below, once the upstream name is known
    upstream.handler = lambda rec: Reply(events=events)
    requests.post(live.url + "/v1/messages", json=dict(body, stream=True), headers=AUTH, timeout=10)
    short = upstream.requests[0].body["tools"][0]["function"]["name"]
    assert len(short) <= 64 and short != name
    events = sse(chunk(tool_delta(0, "call_1", short, '{"q":1}')), chunk(finish="tool_calls"))
    assert check_stream(stream(live, upstream, events, body)).tools[0]["name"] == name


def test_a23_upstream_error_after_text_deltas_ends_with_error_event(live, upstream):
    events = sse(*text_chunks(["a", "b", "c"])[:4], done=False) + [
        b'data: {"error":{"message":"CUDA out of memory","type":"server_error","code":500}}\n\n']
    checked = check_stream(stream(live, upstream, events), broken=True)
    assert checked.text == "abc"
    assert checked.error["type"] == "api_error" and "CUDA out of memory" in checked.error["message"]
    assert "message_stop" not in checked.names


def test_stream_cut_off_upstream_ends_with_error_not_message_stop(live, upstream):
    events = sse(*text_chunks(["one", "two", "three"]))
    # close-delimited: a clean EOF without [DONE] or finish_reason
    checked = check_stream(stream(live, upstream, events, drop_after=3, chunked=False), broken=True)
    assert checked.text == "onetwo"
    assert "ended early" in checked.error["message"] and checked.error["type"] == "api_error"


def test_connection_dropped_mid_chunked_stream_ends_with_error(live, upstream):
    events = sse(*text_chunks(["one", "two", "three"]))
    checked = check_stream(stream(live, upstream, events, drop_after=3), broken=True)
    assert checked.text.startswith("one") and "three" not in checked.text


def test_in_stream_rate_limit_before_the_first_event_is_an_ordinary_429(live, upstream):
    upstream.handler = lambda rec: Reply(events=[b'data: {"error":{"message":"slow down","code":429}}\n\n'])
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    assert response.status_code == 429
    assert response.json() == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}


@pytest.fixture
def fast_pings(monkeypatch):
    monkeypatch.setattr(pump, "KEEPALIVE_INTERVAL", 0.3)


def test_a25_pings_while_the_upstream_is_silent_mid_stream(live, upstream, fast_pings):
    events = sse(*text_chunks(["slow", " answer"]))
    checked = check_stream(stream(live, upstream, events, delays={2: 1.2}))
    assert checked.pings >= 2 and checked.text == "slow answer"
    assert checked.names.index("ping") > checked.names.index("content_block_delta")


def test_a25_pings_before_the_first_upstream_byte_commit_early(live, upstream, fast_pings):
    checked = check_stream(stream(live, upstream, sse(*text_chunks(["late"])), hang=1.2))
    assert checked.names[0] == "message_start" and checked.names[1] == "ping"
    assert checked.text == "late"


def test_the_first_ping_goes_out_with_message_start_when_the_silence_commits(live, upstream, monkeypatch):
    # Issue 21: after PING_INTERVAL of silence message_start went out alone and the first ping only after
    # another interval, so a first token between the two came with no ping before it (README: a ping
    # before the first token). Silence of 1.5 intervals: exactly one ping, right after message_start.
    monkeypatch.setattr(pump, "KEEPALIVE_INTERVAL", 1.0)
    checked = check_stream(stream(live, upstream, sse(*text_chunks(["late"])), hang=1.5))
    assert checked.names[:2] == ["message_start", "ping"] and checked.pings == 1
    assert checked.text == "late"


def test_upstream_error_after_an_early_commit_is_an_error_event(live, upstream, fast_pings):
    upstream.handler = lambda rec: Reply(status=400, hang=1.0, body=json.dumps(
        {"error": {"message": "This model's maximum context length is 8192 tokens", "type": "BadRequestError",
                   "code": 400}}).encode())
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    checked = check_stream(response.content, broken=True)
    assert checked.error["type"] == "invalid_request_error"
    assert checked.error["message"].startswith("prompt is too long:")


def test_a25_both_auth_headers_accepted_and_anthropic_headers_not_forwarded(live, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["ok"])))
    headers = {"x-api-key": CLIENT_KEY, "Authorization": f"Bearer {CLIENT_KEY}", "anthropic-version": "2023-06-01",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
               "x-stainless-lang": "js", "x-app": "cli", "x-claude-code-session-id": "abc"}
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=headers, timeout=10)
    check_stream(response.content)
    sent = upstream.requests[0].headers
    assert not [k for k in sent if k.startswith(("anthropic-", "x-stainless-", "x-claude-", "x-app", "x-api-key"))]
    assert sent["authorization"].startswith("Bearer sk-provider")


def test_client_disconnect_closes_the_upstream_stream(live, upstream):
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks([f"w{i} " for i in range(200)])), delay=0.03)
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH,
                             stream=True, timeout=10)
    got = b""
    for data in response.iter_content(None):
        got += data
        if got.count(b"text_delta") >= 2:
            break
    response.close()
    rec = upstream.requests[0]
    deadline = time.monotonic() + 3
    while rec.disconnected_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rec.disconnected_at is not None
    assert rec.events_sent < 200


def test_client_leaving_during_upstream_silence_stops_the_reader_at_once(live, upstream, fast_pings):
    import threading

    def readers() -> int:
        return sum(t.name == "streamfold-messages" and t.is_alive() for t in threading.enumerate())

    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["first", "never"])), delays={2: 8.0})
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH,
                             stream=True, timeout=10)
    got = b""
    for data in response.iter_content(None):
        got += data
        if b"first" in got:
            break
    settle = time.monotonic() + 2  # the next read goes to a helper once it would wait: give it the moment
    while readers() != 1 and time.monotonic() < settle:
        time.sleep(0.01)
    assert readers() == 1  # blocked on the silent upstream
    response.close()
    deadline = time.monotonic() + 4  # well before the upstream's next event (8 s)
    while readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert readers() == 0


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
CAPTURES = sorted(p for d in ("real", "crafted") for p in (FIXTURES / d).glob("*.sse")
                  if not p.name.startswith(("openai-responses", "vllm-completions")))


@pytest.mark.parametrize("path", CAPTURES, ids=[p.name for p in CAPTURES])
def test_real_server_captures_translate_like_the_chat_fold_says(live, upstream, path):
    from proxy.errors import ProxyError
    from proxy.fold.chat import fold_chat_chunks
    from proxy.translate.tools import sanitize_tool_id

    data = path.read_bytes()
    try:
        folded = fold_chat_chunks([data])
    except ProxyError:
        folded = None  # a cut-off or failing stream: the translation must end with an error too
    upstream.handler = lambda rec: Reply(events=[data])
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    if response.status_code != 200:  # failed before its first event: an ordinary Anthropic error
        assert folded is None and response.json()["type"] == "error"
        return
    checked = check_stream(response.content, broken=folded is None)
    if folded is None:
        return
    message = folded["choices"][0]["message"]
    assert checked.text == (message["content"] or "")
    assert checked.thinking == (message.get("reasoning_content") or message.get("reasoning") or "")
    calls = message.get("tool_calls") or []
    if message.get("function_call"):  # the legacy single call becomes a tool_use block too
        calls = [{"function": message["function_call"]}, *calls]
    assert [(t["id"], t["name"]) for t in checked.tools] == [
        (sanitize_tool_id(c.get("id") or t["id"]), c["function"]["name"] or t["name"])
        for c, t in zip(calls, checked.tools, strict=True)]


def test_upstream_that_ignores_stream_true_and_answers_json_still_streams(live, upstream):
    from tests.upstream import completion

    answer = completion("Plain JSON answer")
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_j", "type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]
    upstream.handler = lambda rec: Reply(body=json.dumps(answer).encode())
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    checked = check_stream(response.content)
    assert checked.text == "Plain JSON answer"
    assert [(t["id"], t["name"], t["input"]) for t in checked.tools] == [("call_j", "Bash", {"command": "ls"})]
    assert checked.stop_reason == "tool_use" and checked.usage["input_tokens"] == 5


def test_vllm_stop_reason_in_a_stream_becomes_stop_sequence(live, upstream):
    finish = chunk(finish="stop")
    finish["choices"][0]["stop_reason"] = "END"  # vLLM, in the finish chunk (vllm-project/vllm#2976)
    events = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Here it"}), finish, usage_chunk())
    checked = check_stream(stream(live, upstream, events, dict(MESSAGES, stop_sequences=["END"])))
    assert checked.stop_reason == "stop_sequence"
    [delta] = [payload for name, payload in checked.events if name == "message_delta"]
    assert delta["delta"]["stop_sequence"] == "END"
    # the same stream to a client that asked no stop sequences ends as an ordinary turn
    checked = check_stream(stream(live, upstream, events))
    assert checked.stop_reason == "end_turn"
    [delta] = [payload for name, payload in checked.events if name == "message_delta"]
    assert delta["delta"]["stop_sequence"] is None


def test_vllm_stop_reason_survives_an_upstream_that_answers_json_to_a_stream_request(live, upstream):
    answer = {"id": "chatcmpl-j1", "object": "chat.completion", "created": 1764000001, "model": "upstream-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Here it"}, "logprobs": None,
                           "finish_reason": "stop", "stop_reason": "END"}],
              "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}}
    upstream.handler = lambda rec: Reply(body=json.dumps(answer).encode())
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stop_sequences=["END"], stream=True),
                             headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}, timeout=10)
    checked = check_stream(response.content)
    assert checked.text == "Here it" and checked.stop_reason == "stop_sequence"


def test_an_upstream_answering_json_to_a_stream_request_keeps_tool_calls_without_ids_apart(live, upstream):
    # llama.cpp/Ollama-style calls with no id: each is its own call (they were merged into one, their
    # arguments run together, when the JSON answer was replayed as a stream without the calls' places)
    calls = [{"type": "function", "function": {"name": "Read", "arguments": '{"path":"a"}'}},
             {"type": "function", "function": {"name": "Bash", "arguments": '{"command":"ls"}'}}]
    answer = {"id": "chatcmpl-j2", "object": "chat.completion", "created": 1764000001, "model": "upstream-model",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                           "finish_reason": "tool_calls"}]}
    upstream.handler = lambda rec: Reply(body=json.dumps(answer).encode())
    response = requests.post(live.url + "/v1/messages", json=dict(MESSAGES, stream=True), headers=AUTH, timeout=10)
    checked = check_stream(response.content)
    assert [(t["name"], t["input"]) for t in checked.tools] == [("Read", {"path": "a"}), ("Bash", {"command": "ls"})]
    assert checked.stop_reason == "tool_use"


def test_text_before_a_refused_chunk_in_the_same_read_still_reaches_the_client(live, upstream):
    # one upstream write: text deltas, then a chunk the chat reader refuses (choices not a list); the text
    # must go out before the error event (it was dropped with the rest of the read)
    read = b"".join(sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}),
                        chunk({"content": "lo"}), done=False))
    read += b'data: {"id":"chatcmpl-s1","object":"chat.completion.chunk","choices":{"index":0}}\n\n'
    checked = check_stream(stream(live, upstream, [read]), broken=True)
    assert checked.text == "Hello"
    assert checked.error["type"] == "api_error" and "choices" in checked.error["message"]


def test_a_usage_count_no_number_can_hold_does_not_break_the_stream(live, upstream):
    # 400 digits: orjson refuses it, the slow JSON path reads it; its guards make it no count (as the fold
    # does) instead of an integer no JSON writer can write back (the stream ended in an internal error)
    huge = b'data: {"id":"chatcmpl-s1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":' \
           + b"9" * 400 + b',"completion_tokens":2}}\n\n'
    events = [*sse(*text_chunks(["Hi"]), done=False), huge, b"data: [DONE]\n\n"]
    checked = check_stream(stream(live, upstream, events))
    assert checked.text == "Hi" and checked.stop_reason == "end_turn"
    assert checked.usage["input_tokens"] == 0 and checked.usage["output_tokens"] == 2
