"""Property: any chat chunk stream translates to a Gemini stream that keeps the invariants, and its records
joined say exactly what the non-stream translation of the chat fold of the same stream says."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.translate.gemini.errors import status_name
from proxy.translate.gemini.response import to_response
from proxy.translate.gemini.stream import GeminiStream
from proxy.translate.tools import ToolNames
from tests.chat_streams import chat_streams, folded, run_bridge
from tests.gemini_invariants import check_stream


def translate(reads: list[bytes], *, thoughts: bool = True, sse: bool = True) -> bytes:
    return run_bridge(reads, GeminiStream("gemini-x", ToolNames(), thoughts=thoughts, prompt_tokens=42, sse=sse))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.booleans(), st.booleans())
def test_random_chat_streams_join_to_the_non_stream_translation_of_their_fold(drawn, thoughts, sse):
    reads, _ = drawn
    checked = check_stream(translate(reads, thoughts=thoughts, sse=sse), sse=sse)
    answer = folded(reads)
    assert answer is not None
    expected = to_response(answer, "gemini-x", ToolNames(), thoughts=thoughts, prompt_estimate=42)
    candidate = expected["candidates"][0]
    assert checked.merged_parts() == candidate["content"]["parts"]
    assert checked.finish == candidate["finishReason"]
    assert checked.usage == expected["usageMetadata"]
    assert checked.records[-1]["modelVersion"] == expected["modelVersion"]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.floats(0.05, 0.95), st.booleans())
def test_cut_off_streams_end_with_an_error_record_exactly_when_the_fold_refuses_them(drawn, where, sse):
    reads, _ = drawn
    body = b"".join(reads)
    cut = [body[: int(len(body) * where)]]
    answer = folded(cut)
    checked = check_stream(translate(cut, sse=sse), broken=answer is None, sse=sse)
    if answer is None:
        assert checked.error["status"] in {status_name(502), status_name(429)}
    else:
        assert checked.text == (answer["choices"][0]["message"]["content"] or "")
