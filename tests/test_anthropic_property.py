"""Property: any chat chunk stream translates to an Anthropic stream that keeps the invariants and says
exactly what the chat fold of the same stream says (text, reasoning, tool calls, stop reason, usage)."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.translate.anthropic.errors import error_type
from proxy.translate.anthropic.response import stop_reason, usage
from proxy.translate.anthropic.stream import MessageStream
from proxy.translate.tools import ToolNames, sanitize_tool_id
from tests.anthropic_invariants import check_stream
from tests.chat_streams import chat_streams, folded, run_bridge


def translate(reads: list[bytes], message_id: str | None = None) -> bytes:
    """The Anthropic stream for the reads (also tests/test_bridge_fast_path.py's reference; ``message_id``
    fixes the random one)."""
    out = MessageStream("claude-x", ToolNames(), 42)
    if message_id is not None:
        out.message_id = message_id
    return run_bridge(reads, out)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams())
def test_random_chat_streams_translate_to_valid_anthropic_streams_with_the_folds_content(drawn):
    reads, _ = drawn
    checked = check_stream(translate(reads))
    answer = folded(reads)
    assert answer is not None
    message = answer["choices"][0]["message"]
    assert checked.text == (message["content"] or "")
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    assert checked.thinking == reasoning
    calls = message.get("tool_calls") or []
    assert [(t["id"], t["name"], t["input"]) for t in checked.tools] == [
        (sanitize_tool_id(c["id"]), c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"))
        for c in calls]
    finish = answer["choices"][0]["finish_reason"]
    assert checked.stop_reason == stop_reason(finish, bool(calls))
    if "usage" in answer:
        assert checked.usage == usage(answer["usage"])
    else:
        assert checked.usage["output_tokens"] == 0 and checked.usage["input_tokens"] == 42
    # the blocks come in Anthropic's order: thinking, text, then the tools
    kinds = [b["type"] for b in checked.blocks]
    assert kinds == sorted(kinds, key=["thinking", "text", "tool_use"].index)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.floats(0.05, 0.95))
def test_cut_off_streams_end_with_an_error_exactly_when_the_fold_refuses_them(drawn, where):
    reads, parts = drawn
    body = b"".join(reads)
    cut = [body[: int(len(body) * where)]]
    answer = folded(cut)
    checked = check_stream(translate(cut), broken=answer is None)
    if answer is None:
        assert checked.error["type"] in {error_type(502), error_type(429)}
    else:
        assert checked.text == (answer["choices"][0]["message"]["content"] or "")
