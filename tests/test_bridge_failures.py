"""Both bridges over HTTP when the content or the proxy itself misbehaves (issue 22, defect 1).

An upstream that escapes an emoji as two UTF-16 halves in consecutive chunks gets the halves joined (a half
with no other half becomes U+FFFD), as the chat fold does, in text, reasoning and tool arguments, stream and
non-stream. And whatever raises inside a bridged stream, the stream ends with that protocol's error event
(``event: error`` on /v1/messages, ``response.failed`` / ``error`` on /v1/responses), never a cut body, and
the access log says what happened.
"""
from __future__ import annotations

import json
import logging

import anthropic
import openai
import pytest
import requests

from proxy import pump
from proxy.fold.chat import fold_chat_chunks
from proxy.translate import chat_reads, chat_stream
from proxy.translate.anthropic import stream as anthropic_stream
from proxy.translate.responses import stream as responses_stream
from tests import responses_invariants
from tests.anthropic_invariants import check_stream
from tests.conftest import AUTH, CLIENT_KEY, make_app, provider, settings_doc
from tests.test_anthropic_stream import MESSAGES, chunk, tool_delta, usage_chunk
from tests.test_responses_bridge import CODEX
from tests.upstream import Reply, sse

BASH = {"name": "Bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}
# An emoji split between chunks in reasoning, text (twice: once joined, once a lone half) and tool arguments.
SPLIT = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "think \ud83d"}),
         chunk({"reasoning_content": "\ude00"}), chunk({"content": "Smile \ud83d"}), chunk({"content": "\ude00 ok"}),
         chunk({"content": " lone\ud83d"}), chunk({"content": "!"}),
         chunk(tool_delta(0, "call_1", "Bash", '{"command":"echo \ud83d')),
         chunk(tool_delta(0, arguments='\ude00"}')), chunk(finish="tool_calls"), usage_chunk()]
TEXT, THINKING, ARGS = "Smile \U0001F600 ok lone\ufffd!", "think \U0001F600", {"command": "echo \U0001F600"}


@pytest.fixture
def bridged(upstream, serve):
    """Both bridges to one chat-only upstream."""
    return serve(make_app(settings_doc(provider(upstream, **{"native-apis": ["chat"]}))))


def upstream_sends(upstream, chunks: list[dict], **reply) -> None:
    """The upstream answers SSE to every request (a non-stream request is then folded by the proxy)."""
    events = sse(*chunks)
    upstream.handler = lambda rec: Reply(events=events, **reply)


def messages(server, body: dict | None = None, stream: bool = True) -> requests.Response:
    body = dict(body or MESSAGES, tools=[BASH], stream=stream)
    return requests.post(server.url + "/v1/messages", json=body,
                         headers={"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}, timeout=20)


def responses(server, codex: bool = False, stream: bool = True) -> requests.Response:
    body = {"model": "m", "input": "hi", "stream": stream,
            "tools": [{"type": "function", "name": "Bash", "parameters": BASH["input_schema"]}]}
    return requests.post(server.url + "/v1/responses", json=body, headers={**AUTH, **(CODEX if codex else {})},
                         timeout=20)


def test_the_fold_is_the_reference():
    completion = fold_chat_chunks(sse(*SPLIT))
    message = completion["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (TEXT, THINKING)
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == ARGS


def test_split_surrogates_are_joined_on_the_messages_stream(bridged, upstream):
    upstream_sends(upstream, SPLIT)
    response = messages(bridged)
    assert response.status_code == 200
    checked = check_stream(response.content)
    assert (checked.text, checked.thinking) == (TEXT, THINKING)
    assert checked.tools[0]["input"] == ARGS and checked.stop_reason == "tool_use"


def test_split_surrogates_through_the_anthropic_sdk(bridged, upstream):
    upstream_sends(upstream, SPLIT)
    with anthropic.Anthropic(base_url=bridged.url, api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
        with client.messages.stream(model="m", max_tokens=100, tools=[BASH],
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
        assert final.content[1].text == TEXT and final.content[2].input == ARGS
        plain = client.messages.create(model="m", max_tokens=100, tools=[BASH],
                                       messages=[{"role": "user", "content": "hi"}])
        assert plain.content[1].text == TEXT and plain.content[0].thinking == THINKING


@pytest.mark.parametrize("codex", [False, True])
def test_split_surrogates_are_joined_on_the_responses_stream(bridged, upstream, codex):
    upstream_sends(upstream, SPLIT)
    response = responses(bridged, codex)
    assert response.status_code == 200
    terminal = responses_invariants.check(response.content, codex=codex)
    assert terminal["type"] == "response.completed"
    reasoning, message, call = terminal["response"]["output"]
    assert reasoning["summary"][0]["text"] == THINKING and message["content"][0]["text"] == TEXT
    assert json.loads(call["arguments"]) == ARGS


def test_split_surrogates_through_the_openai_sdk(bridged, upstream):
    upstream_sends(upstream, SPLIT)
    with openai.OpenAI(base_url=bridged.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20) as client:
        tools = [{"type": "function", "name": "Bash", "parameters": BASH["input_schema"]}]
        with client.responses.stream(model="m", input="hi", tools=tools) as stream:
            final = stream.get_final_response()
        assert final.output_text == TEXT and json.loads(final.output[2].arguments) == ARGS
        plain = client.responses.create(model="m", input="hi", tools=tools)
        assert plain.output_text == TEXT and json.loads(plain.output[2].arguments) == ARGS


def test_split_surrogates_in_a_stream_that_ends_with_a_lone_half(bridged, upstream):
    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "cut \ud83d"}), chunk(finish="stop")]
    upstream_sends(upstream, chunks)
    assert check_stream(messages(bridged).content).text == "cut \ufffd"
    terminal = responses_invariants.check(responses(bridged).content)
    assert terminal["response"]["output"][0]["content"][0]["text"] == "cut \ufffd"


# -- any exception: the protocol's error event -------------------------------------------------------------
def _broken(*args, **kwargs):
    raise RuntimeError("a bug in a translation step")


def _patch(monkeypatch, owner, name: str, calls_before: int) -> None:
    """``owner.name`` raises, from its call number ``calls_before + 1`` on (0: at once)."""
    original, count = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] > calls_before:
            _broken()
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, patched if calls_before else _broken)


def _ids(steps) -> list[str]:
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in steps]


# Every step a bridged stream runs through, in-process: (module or class, attribute, calls that still work).
# The reader's steps run before the commit point too; they break on a later read, after the 200 went out.
MESSAGES_STEPS = [
    (pump, "chat_events", 0), (chat_reads, "_scan", 1), (chat_reads, "_by_event", 2),
    (chat_stream.ChatStream, "feed", 0), (chat_stream.ChatStream, "close", 0),
    (anthropic_stream.MessageStream, "start", 0), (anthropic_stream.MessageStream, "feed_into", 0),
    (anthropic_stream.MessageStream, "close", 0), (anthropic_stream.MessageStream, "_open", 0),
    (anthropic_stream.MessageStream, "_tool_block", 0), (anthropic_stream, "frame", 0),
    (anthropic_stream, "stop_fields", 0), (anthropic_stream, "usage", 0), (anthropic_stream, "tool_input", 0),
]
RESPONSES_STEPS = [
    (pump, "read_batches", 0), (pump, "chat_events", 0), (chat_reads, "_plain_text", 0), (chat_reads, "_scan", 1),
    (chat_stream.ChatStream, "feed", 0), (chat_stream.ChatStream, "close", 0),
    (responses_stream.ResponsesStream, "start", 0), (responses_stream.ResponsesStream, "feed_into", 0),
    (responses_stream.ResponsesStream, "literals", 0),
    (responses_stream.ResponsesStream, "close_into", 0), (responses_stream.ResponsesStream, "_open", 0),
    (responses_stream.ResponsesStream, "_close_open", 0), (responses_stream.ResponsesStream, "_start_tool", 0),
    (responses_stream.ResponsesStream, "_close_all", 0), (responses_stream.ResponsesStream, "_event", 0),
    (responses_stream.ResponsesStream, "history_parts", 0), (responses_stream, "envelope", 0),
    (responses_stream, "message_item", 0), (responses_stream, "call_item", 0), (responses_stream, "usage_of", 0),
    (responses_stream, "status_of", 0),
]
# Reasoning, text and a tool call; plain text deltas in the fast path's shape and one that is not (an extra
# field), each event its own read: every step runs.
ALL_KINDS = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "hm"}),
             chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({"content": " the"}, x_extra=1),
             chunk({"content": "re"}), chunk(tool_delta(0, "call_1", "Bash", '{"command":"ls"}')),
             chunk(finish="tool_calls"), usage_chunk()]


def _access_result(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if r.name == "streamfold.access"]
    assert lines, "no access log line"
    return lines[-1].split(" result=", 1)[1]


@pytest.mark.parametrize("owner,name,calls_before", MESSAGES_STEPS, ids=_ids(MESSAGES_STEPS))
def test_an_exception_in_any_messages_step_ends_the_stream_with_event_error(bridged, upstream, monkeypatch,
                                                                           caplog, owner, name, calls_before):
    upstream_sends(upstream, ALL_KINDS, delay=0.01)
    assert check_stream(messages(bridged).content).tools  # the whole stream reaches every step
    _patch(monkeypatch, owner, name, calls_before)
    caplog.clear()
    response = messages(bridged)
    assert response.status_code == 200
    checked = check_stream(response.content, broken=True)  # message_start first, error last, nothing cut
    assert checked.error["type"] == "api_error"
    assert _access_result(caplog).strip('"') == "internal error: RuntimeError"
    monkeypatch.undo()
    assert check_stream(messages(bridged).content).stop_reason == "tool_use"  # the worker is fine


@pytest.mark.parametrize("codex", [False, True])
@pytest.mark.parametrize("owner,name,calls_before", RESPONSES_STEPS, ids=_ids(RESPONSES_STEPS))
def test_an_exception_in_any_responses_step_ends_the_stream_with_its_failure_event(
        bridged, upstream, monkeypatch, caplog, owner, name, calls_before, codex):
    upstream_sends(upstream, ALL_KINDS, delay=0.01)
    assert responses_invariants.check(responses(bridged, codex).content)["type"] == "response.completed"
    _patch(monkeypatch, owner, name, calls_before)
    caplog.clear()
    response = responses(bridged, codex)
    assert response.status_code == 200
    terminal = responses_invariants.check(response.content, codex=codex)
    if codex:
        assert terminal["type"] == "response.failed" and terminal["response"]["error"]["code"] == "server_error"
    else:
        assert terminal["type"] == "error" and terminal["code"] == "server_error"
    assert _access_result(caplog).strip('"') == "internal error: RuntimeError"
    monkeypatch.undo()
    assert responses_invariants.check(responses(bridged, codex).content)["type"] == "response.completed"


def test_the_failure_handler_cannot_fail_on_what_it_reports(bridged, upstream, monkeypatch, caplog):
    """A step breaks, and so does writing the error event: fixed bytes still end the stream properly."""
    upstream_sends(upstream, ALL_KINDS)
    monkeypatch.setattr(anthropic_stream.MessageStream, "feed_into", _broken)
    monkeypatch.setattr(anthropic_stream, "error_event", _broken)
    checked = check_stream(messages(bridged).content, broken=True)
    assert checked.error["type"] == "api_error"
    monkeypatch.setattr(anthropic_stream, "frame", _broken)  # message_start cannot be written either
    checked = check_stream(messages(bridged).content, broken=True)
    assert checked.error["type"] == "api_error"
    monkeypatch.setattr(responses_stream.ResponsesStream, "feed_into", _broken)
    monkeypatch.setattr(responses_stream, "envelope", _broken)  # not even response.created
    for codex in (False, True):
        terminal = responses_invariants.check(responses(bridged, codex).content, codex=codex)
        assert (terminal["type"], terminal.get("code") or terminal["response"]["error"]["code"]) == (
            "response.failed" if codex else "error", "server_error")
    assert "internal error: RuntimeError" in _access_result(caplog)


def test_an_upstream_error_message_with_a_lone_half_still_reaches_the_client(bridged, upstream, caplog):
    chunks = [chunk({"content": "par"}), {"error": {"message": "upstream broke \ud83d", "type": "server_error"}}]
    upstream.handler = lambda rec: Reply(events=sse(*chunks, done=False))
    checked = check_stream(messages(bridged).content, broken=True)
    assert checked.error["message"].endswith("upstream broke \ufffd")
    terminal = responses_invariants.check(responses(bridged, codex=True).content, codex=True)
    assert terminal["response"]["error"]["message"] == "upstream broke \ufffd"
    assert "upstream failed mid-stream" in _access_result(caplog)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


# -- a failed Codex turn leaves nothing in the history (defect 3) --------------------------------------------
def codex_turn(server, items: list) -> tuple[list[dict], dict]:
    """One Codex request as codex-rs reads the answer: the items of ``response.output_item.done`` events are
    what it records in its history (also for an attempt that fails); returns them and the terminal event."""
    response = requests.post(server.url + "/v1/responses", headers={**AUTH, **CODEX}, timeout=20,
                             json={"model": "m", "input": items, "stream": True, "store": False})
    events = responses_invariants.parse(response.content)
    terminal = responses_invariants.check(events, codex=True)
    return [p["item"] for name, p in events if name == "response.output_item.done"], terminal


@pytest.mark.parametrize("cut", ["mid-text", "mid-reasoning", "mid-tool-call", "upstream error"])
def test_a_failed_codex_turn_leaves_no_fragment_for_its_retry(bridged, upstream, cut):
    head = [chunk({"role": "assistant", "content": ""})]
    partial = {"mid-text": [chunk({"content": "I'll run "}), chunk({"content": "that"})],
               "mid-reasoning": [chunk({"reasoning_content": "I'll run "})],
               "mid-tool-call": [chunk(tool_delta(0, "call_9", "shell", '{"command":"l'))],
               "upstream error": [chunk({"content": "I'll run "})]}[cut]
    tail = [{"error": {"message": "upstream overloaded", "type": "server_error"}}] if cut == "upstream error" else []
    failing = sse(*head, *partial, *tail, done=False)
    answers = iter([Reply(events=failing, drop_after=len(failing)),
                    Reply(events=sse(*head, chunk({"content": "Done."}), chunk(finish="stop"), usage_chunk()))])
    upstream.handler = lambda rec: next(answers)
    history = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "run ls"}]}]
    recorded, terminal = codex_turn(bridged, history)
    assert terminal["type"] == "response.failed" and terminal["response"]["output"] == []
    assert recorded == []  # nothing of the broken answer is a finished item
    recorded, terminal = codex_turn(bridged, history + recorded)  # Codex's automatic retry
    assert terminal["type"] == "response.completed" and recorded[-1]["content"][0]["text"] == "Done."
    retry = upstream.requests[-1].body["messages"]
    assert retry == [{"role": "user", "content": "run ls"}]


def test_a_json_answer_with_a_lone_surrogate_half_is_read_as_the_fold_reads_it(bridged, upstream):
    """Not split over chunks this time: a JSON answer (to a stream request too) whose text ends with half an
    emoji; orjson refuses it, the fold's slow path reads it, the half becomes U+FFFD (was a 502)."""
    body = (b'{"id":"c1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
            b'"message":{"role":"assistant","content":"cut \\ud83d"},"finish_reason":"stop"}]}')
    upstream.handler = lambda rec: Reply(body=body)
    assert messages(bridged, stream=False).json()["content"][0]["text"] == "cut \ufffd"
    assert check_stream(messages(bridged).content).text == "cut \ufffd"
    assert responses(bridged, stream=False).json()["output"][0]["content"][0]["text"] == "cut \ufffd"
    terminal = responses_invariants.check(responses(bridged).content)
    assert terminal["response"]["output"][0]["content"][0]["text"] == "cut \ufffd"
