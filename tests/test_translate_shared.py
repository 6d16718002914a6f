"""The bridges' shared layer: chat chunks -> semantic events, and the tool-call helpers."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from proxy.errors import StreamError
from proxy.fold.chat import fold_chat_chunks
from proxy.translate.chat_stream import DONE, ChatStream, iter_chat_chunks
from proxy.translate.tools import ToolNames, repair_json_object, sanitize_tool_id
from tests.chat_streams import chat_streams

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def run(reads: list[bytes]) -> tuple[ChatStream, list[tuple]]:
    stream, events, done = ChatStream(), [], False
    for chunk in iter_chat_chunks(reads, 1 << 20):
        if chunk == DONE:
            done = True
            break
        events += stream.feed(chunk)
    events += stream.close(done)
    return stream, events


def collect(events: list[tuple]) -> dict:
    out = {"reasoning": "", "content": "", "calls": {}}
    for event in events:
        if event[0] == "reasoning":
            out["reasoning"] += event[1]
        elif event[0] == "text":
            out["content"] += event[1]
        elif event[0] == "tool_start":
            out["calls"][id(event[1])] = [event[1].id, event[1].name, ""]
        elif event[0] == "tool_args":
            out["calls"][id(event[1])][2] += event[2]
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams())
def test_events_carry_exactly_what_the_chat_fold_folds(case):
    reads, parts = case
    stream, events = run(reads)
    got = collect(events)
    folded = fold_chat_chunks(reads)["choices"][0]["message"]
    assert got["content"] == (folded["content"] or "")
    assert got["reasoning"] == (folded.get("reasoning_content") or folded.get("reasoning") or "")
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in folded.get("tool_calls", [])]
    assert [tuple(c) for c in got["calls"].values()] == calls
    assert stream.finish_reason == parts["finish"]
    assert stream.usage == parts["usage"]
    assert not stream.ended_early


def test_tool_args_never_precede_their_start_and_follow_text():
    chunks = [
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "c1", "function": {"name": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": "{\"a\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"name": "Bash"}}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi", "tool_calls": [
            {"index": 1, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]},
    ]
    stream = ChatStream()
    kinds = [e[0] for c in chunks for e in stream.feed(c)] + [e[0] for e in stream.close(True)]
    assert kinds == ["tool_start", "tool_args", "text", "tool_args", "finish"]
    assert stream.tools[0].name == "Bash" and stream.tools[0].arguments == '{"a":1}'


def test_a_call_whose_name_never_arrives_is_kept_as_tool_index():
    stream = ChatStream()
    stream.feed({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]})
    events = stream.close(False)
    assert [e[0] for e in events] == ["tool_start", "tool_args"]
    assert stream.tools[0].name == "tool_0" and stream.tools[0].id.startswith("call_")
    assert stream.ended_early


def test_real_capture_without_index_and_with_usage_on_the_tool_chunk():
    stream, events = run([(FIXTURES / "real" / "gemini-tool-call-no-index.sse").read_bytes()])
    assert [e[0] for e in events][:2] == ["tool_start", "tool_args"]
    assert stream.finish_reason == "tool_calls" and stream.usage


@pytest.mark.parametrize("payload", [b'{"choices": [1]}', b'{"choices": [{"delta": [1]}]}',
                                     b'{"choices": [{"delta": {"content": 5}}]}',
                                     b'{"choices": [{"delta": {"tool_calls": [{"index": {}}]}}]}', b"[1, 2]",
                                     b"{not json"])
def test_wrong_shapes_are_stream_errors(payload):
    with pytest.raises(StreamError):
        run([b"data: " + payload + b"\n\n"])


def test_in_stream_errors_keep_the_fold_mapping():
    with pytest.raises(StreamError) as caught:
        run([(FIXTURES / "real" / "openrouter-error-event.sse").read_bytes()])
    assert caught.value.status == 429


def test_sanitized_ids_and_long_names_round_trip():
    assert sanitize_tool_id("functions.Bash:0") == "functions_Bash_0"
    assert sanitize_tool_id("").startswith("toolu_")
    names = ToolNames()
    long = "mcp__server__" + "x" * 60
    short = names.to_upstream(long)
    assert len(short) == 64 and names.to_client(short) == long and names.to_upstream("Bash") == "Bash"


@pytest.mark.parametrize(("text", "expected"), [
    ('{"command":"ls"}', {"command": "ls"}), ('{"command":"ls"', {"command": "ls"}),
    ('{"a":1,"b"', {"a": 1}), ('{"a":[1,2', {"a": [1, 2]}), ('{"a":"x\\', {"a": "x"}),
    ("", {}), ("[1]", {}), ('"text"', {}), ("garbage", {}), (json.dumps({"n": {"m": None}}), {"n": {"m": None}}),
])
def test_tool_arguments_are_repaired_into_an_object(text, expected):
    assert repair_json_object(text) == expected


@pytest.mark.parametrize("forced", [False, True], ids=["json-answer", "forced-stream"])
def test_a_legacy_function_call_reaches_every_bridge_as_its_tool_call_as_a_streamed_one_does(upstream, forced):
    """A server answering with the legacy ``message.function_call``: a streamed answer's reader always made it
    a tool call (fold/tool_calls.py), the bridges' whole answers dropped it (an empty Anthropic content)."""
    from tests.conftest import AUTH, make_app, provider, settings_doc
    from tests.upstream import Reply, completion

    answer = completion(None)
    answer["choices"][0]["message"]["function_call"] = {"name": "lookup", "arguments": '{"q": 1}'}
    answer["choices"][0]["finish_reason"] = "function_call"
    upstream.handler = lambda rec: Reply(body=json.dumps(answer).encode())
    client = make_app(settings_doc(provider(upstream, **{"force-upstream-stream": forced,
                                                         "native-apis": ["chat"]}))).test_client()
    text = [{"role": "user", "content": "look it up"}]
    messages = client.post("/v1/messages", json={"model": "m", "max_tokens": 16, "messages": text},
                           headers=AUTH).get_json()
    assert [(b["type"], b["name"], b["input"]) for b in messages["content"]] == [("tool_use", "lookup", {"q": 1})]
    gemini = client.post("/v1beta/models/m:generateContent", headers=AUTH,
                         json={"contents": [{"role": "user", "parts": [{"text": "look it up"}]}]}).get_json()
    parts = gemini["candidates"][0]["content"]["parts"]
    assert [(p["functionCall"]["name"], p["functionCall"]["args"]) for p in parts] == [("lookup", {"q": 1})]
    responses = client.post("/v1/responses", json={"model": "m", "input": "look it up"}, headers=AUTH).get_json()
    assert [(i["type"], i["name"], json.loads(i["arguments"])) for i in responses["output"]] == [
        ("function_call", "lookup", {"q": 1})]
