"""Property: any chat stream, translated to Responses events, keeps the invariants and ends with the
object the non-stream translation of its fold gives (issue 16, acceptance 3).

The streams come from tests/chat_streams.py (reasoning, text, then tool calls, in that order as
servers send them, cut at random bytes with the usual server quirks); each call is declared to the
translator as a plain function, a custom (freeform) tool or a namespaced one at random.
"""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.fold.chat import fold_chat_chunks
from proxy.translate.responses.response import from_completion, new_context
from proxy.translate.responses.stream import ResponsesStream
from proxy.translate.responses.toolmap import ToolMap
from tests import responses_invariants
from tests.bridge_run import responses_written
from tests.chat_streams import chat_streams


def translate(reads: list[bytes], toolmap: ToolMap, codex: bool):
    ctx = new_context({"model": "m"}, toolmap)
    return ctx, responses_written(ResponsesStream(ctx, codex), reads)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.data())
def test_stream_translation_keeps_invariants_and_ends_with_the_folded_translation(case, data):
    reads, parts = case
    toolmap = ToolMap()
    for call in parts["calls"]:
        kind = data.draw(st.sampled_from(["function", "custom", "namespace"]))
        if kind == "custom":
            toolmap.custom.add(call["name"])
        elif kind == "namespace":  # as if the client declared namespace "mcp" holding this function
            toolmap.spaces[call["name"]] = ("mcp", call["name"])
    codex = data.draw(st.booleans())
    ctx, raw = translate(reads, toolmap, codex)
    terminal = responses_invariants.check(raw, codex=codex)
    expected = from_completion(fold_chat_chunks(reads), ctx)
    assert terminal["response"] == expected
    if parts["finish"] == "length":
        assert expected["status"] == "incomplete"
        assert terminal["type"] == ("response.completed" if codex else "response.incomplete")
    else:
        assert terminal["type"] == "response.completed" and expected["status"] == "completed"
    custom = [item for item in expected["output"] if item["type"] == "custom_tool_call"]
    assert len(custom) == sum(1 for c in parts["calls"] if c["name"] in toolmap.custom)
    spaced = [item for item in expected["output"] if item.get("namespace") == "mcp"]
    assert len(spaced) == sum(1 for c in parts["calls"] if c["name"] in toolmap.spaces)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.integers(min_value=1))
def test_a_stream_cut_anywhere_still_ends_with_exactly_one_terminal_event(case, cut):
    reads, _ = case
    body = b"".join(reads)
    cut_reads = [body[: cut % max(1, len(body))]] if body else []
    for codex in (False, True):
        _, raw = translate(cut_reads, ToolMap(), codex)
        terminal = responses_invariants.check(raw, codex=codex)
        assert terminal["type"] in ("response.completed", "response.incomplete", "response.failed", "error")


def test_an_upstream_error_inside_a_read_keeps_the_events_translated_before_it():
    # one read: the answer's first chunk, two text deltas, then a chunk the chat layer refuses (choices not a
    # list): the message item opened by the deltas must reach the client before the failure ends the stream
    head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764000000,"model":"m","choices":'
    read = (head + b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
            + head + b'[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}\n\n'
            + head + b'[{"index":0,"delta":{"content":"lo"},"logprobs":null,"finish_reason":null}]}\n\n'
            + head + b'{"index":0}}\n\n')
    for codex in (False, True):
        _, raw = translate([read], ToolMap(), codex)
        events = responses_invariants.parse(raw)
        terminal = responses_invariants.check(events, codex=codex)
        assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
        assert "".join(p["delta"] for name, p in events if name == "response.output_text.delta") == "Hello"
        if codex:  # the message the failure cut off is not done, nor listed
            assert terminal["response"]["output"] == []
        else:
            assert terminal["code"] == "upstream_stream_error"
