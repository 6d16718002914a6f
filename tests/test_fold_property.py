"""Property: any completion, streamed the way servers stream it and cut anywhere, folds back to itself.

And a hostile variant (issue 12): the same streams with wrong JSON types, emoji
split into surrogate halves, audio, oversized fields and very deep lines either
fold to exactly what they encode or are a 502 ``StreamError``, never another
exception, and the fold's allocations stay within ``max_bytes`` plus a constant.
"""
from __future__ import annotations

import json
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import StreamError
from proxy.fold.chat import ChatFold, fold_chat_chunks, run_fold
from proxy.fold.sse import iter_event_batches

# Text with multi-byte UTF-8 (accents, CJK, emoji) and the line separators
# that break str.splitlines: U+2028, U+0085, plus \r and \n inside JSON strings.
TEXT = st.text(alphabet=st.sampled_from(list("ab é中😀\u2028\u0085\r\n\"\\{}:,")), min_size=1, max_size=40)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def completions(draw):
    n = draw(st.integers(1, 3))
    choices = []
    for index in range(n):
        message = {"role": "assistant", "content": draw(st.none() | TEXT), "refusal": None}
        if draw(st.booleans()):
            message[draw(st.sampled_from(["reasoning_content", "reasoning"]))] = draw(TEXT)
        calls = [{"id": f"call_{index}_{k}", "type": "function",
                  "function": {"name": draw(IDENT), "arguments": draw(st.text(max_size=30))}}
                 for k in range(draw(st.integers(0, 3)))]
        if calls:
            message["tool_calls"] = calls
        finish = draw(st.sampled_from(["stop", "length", "tool_calls", "content_filter"]))
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
    result = {"id": "chatcmpl-" + draw(IDENT), "object": "chat.completion", "created": draw(st.integers(1, 2**31)),
              "model": draw(IDENT), "choices": choices}
    if draw(st.booleans()):
        p, c = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
        result["usage"] = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                           "completion_tokens_details": {"reasoning_tokens": draw(st.integers(0, 100))}}
    return result


def pieces(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@st.composite
def streamed(draw):
    """(completion, its SSE bytes cut into network reads at random byte offsets)."""
    expected = draw(completions())
    chunks = chunks_of(draw, expected)
    return expected, reads_of(draw, chunks)


def chunks_of(draw, expected: dict) -> list[dict]:
    """The chunks a server would stream for ``expected``, choices interleaved at random."""
    head = {"id": expected["id"], "object": "chat.completion.chunk", "created": expected["created"],
            "model": expected["model"]}
    per_choice = []
    for choice in expected["choices"]:
        i, message, deltas = choice["index"], choice["message"], [{"role": "assistant"}]
        for name in ("reasoning_content", "reasoning"):
            if name in message:
                deltas += [{name: p} for p in pieces(draw, message[name])]
        if message["content"] is not None:
            deltas += [{"content": p} for p in pieces(draw, message["content"])]
        for k, tc in enumerate(message.get("tool_calls", [])):
            first = {"index": k, "id": tc["id"], "type": "function", "function": {"name": tc["function"]["name"]}}
            args = pieces(draw, tc["function"]["arguments"])
            if args and draw(st.booleans()):
                first["function"]["arguments"] = args.pop(0)
            deltas.append({"tool_calls": [first]})
            deltas += [{"tool_calls": [{"index": k, "function": {"arguments": a}}]} for a in args]
        events = [{"index": i, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas]
        events.append({"index": i, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]})
        per_choice.append(events)
    order = []  # interleave the choices, keeping each one's own order
    while any(per_choice):
        live = [q for q in per_choice if q]
        order.append(live[draw(st.integers(0, len(live) - 1))].pop(0))
    chunks = [dict(head, choices=[c]) for c in order]
    if "usage" in expected:
        chunks.append(dict(head, choices=[], usage=expected["usage"]))
    return chunks


def reads_of(draw, chunks: list, raw: dict[int, bytes] | None = None, max_read: int | None = None) -> list[bytes]:
    """SSE bytes for the chunks (``raw`` replaces chunk i's JSON), cut at random offsets."""
    sep = draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
    prefix = draw(st.sampled_from([b"data: ", b"data:"]))
    ascii_only = draw(st.booleans())
    def encode(chunk: dict) -> bytes:
        text = json.dumps(chunk, ensure_ascii=ascii_only)
        # a lone surrogate can only be sent escaped ("\ud83d"), as a server writing JSON would
        return (text if text.isascii() or not any("\ud800" <= ch <= "\udfff" for ch in text)
                else json.dumps(chunk)).encode()

    body = b"".join(prefix + ((raw or {}).get(i) or encode(c)) + sep for i, c in enumerate(chunks))
    if draw(st.booleans()):
        body += prefix + b"[DONE]" + sep
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=30))))
    if max_read:
        cuts = sorted(set(cuts) | set(range(max_read, len(body), max_read)))
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streamed())
def test_streamed_completion_folds_back_to_itself(case):
    expected, reads = case
    assert fold_chat_chunks(reads) == expected


MAX_BYTES = 64 * 1024
EMOJI = "\U0001F600"
WRONG = {  # (chunk mutation, what the 502 must say)
    "choices-item": (lambda c: c.update(choices=[1]), "wrong shape"),
    "delta-list": (lambda c: c["choices"][0].update(delta=["a"]), "wrong shape"),
    "index-object": (lambda c: c["choices"][0].update(index={"i": 0}), "wrong shape"),
    "content-number": (lambda c: c["choices"][0].update(delta={"content": 7}), "wrong shape"),
    "content-list": (lambda c: c["choices"][0].update(delta={"content": ["a"]}), "wrong shape"),
    "tool-index-string": (lambda c: c["choices"][0].update(delta={"tool_calls": [{"index": "0"}]}), "wrong shape"),
    "oversized-field": (lambda c: c.update(x_padding="p" * (MAX_BYTES + 1)), "max-aggregate-bytes"),
    "oversized-content": (lambda c: c["choices"][0].update(delta={"content": "c" * (MAX_BYTES + 1)}),
                          "max-aggregate-bytes"),
}


@st.composite
def hostile(draw):
    """(expected completion or the 502 message it must give, reads of at most 16 KB each)."""
    expected = draw(completions())
    chunks = chunks_of(draw, expected)
    with_choice = [i for i, c in enumerate(chunks) if c["choices"]]
    at = draw(st.sampled_from(with_choice))
    index = chunks[at]["choices"][0]["index"]
    message = expected["choices"][index]["message"]
    raw: dict[int, bytes] = {}
    kind = draw(st.sampled_from(["surrogates", "audio", "deep", *WRONG]))
    # new content goes right before the choice's finish chunk, after its other pieces
    finish = next(i for i, c in enumerate(chunks)
                  if c["choices"] and c["choices"][0]["index"] == index and c["choices"][0]["finish_reason"])
    if kind == "surrogates":  # an emoji sent as two escaped halves in two chunks, then a lone half
        chunks[finish:finish] = [dict(chunks[finish], choices=[{"index": index, "delta": {"content": text}}])
                                 for text in ("\ud83d", "\ude00", "\udc00")]
        message["content"] = (message["content"] or "") + EMOJI + "\ufffd"
        return expected, reads_of(draw, chunks, max_read=16384)
    if kind == "audio":
        parts = draw(st.lists(st.sampled_from(["QUJD", "REVG", "R0g="]), min_size=1, max_size=4))
        audio = [dict(chunks[finish], choices=[{"index": index, "delta": {"audio": {"data": p, "transcript": "t"}}}])
                 for p in parts]
        audio[0]["choices"][0]["delta"]["audio"]["id"] = "audio_1"
        audio[-1]["choices"][0]["delta"]["audio"]["expires_at"] = 1764000999
        chunks[finish:finish] = audio
        message["audio"] = {"id": "audio_1", "data": "".join(parts), "transcript": "t" * len(parts),
                            "expires_at": 1764000999}
        return expected, reads_of(draw, chunks, max_read=16384)
    if kind == "deep":
        depth = draw(st.sampled_from([1025, 5000, 100_000]))
        raw[at] = b"[" * depth + b"]" * depth
        # deeper than orjson reads; a line over the budget may be refused before it is parsed
        return "nested|max-aggregate-bytes", reads_of(draw, chunks, raw, max_read=16384)
    mutate, says = WRONG[kind]
    mutate(chunks[at])
    return says, reads_of(draw, chunks, max_read=16384)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile())
def test_hostile_stream_folds_exactly_or_is_a_502_within_the_memory_bound(case):
    expected, reads = case
    fold, folded = ChatFold(MAX_BYTES), None
    tracemalloc.start()
    try:
        try:
            folded = run_fold(fold, iter_event_batches(reads, fold))
        except StreamError as exc:
            assert exc.status == 502
            assert isinstance(expected, str), exc.message
            assert any(says in exc.message for says in expected.split("|")), exc.message
        else:
            assert not isinstance(expected, str), f"expected a 502 ({expected}), got an answer"
            assert folded == expected
        # What the fold (and its answer) still hold, not the parser's transient buffers:
        # orjson reserves ~13x a line while parsing it, pages it never touches (RSS is
        # measured under gunicorn in test_hardening_data.py).
        holding, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert holding < MAX_BYTES + 64 * 1024, holding
