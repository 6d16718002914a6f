"""Property: any completion, streamed the way servers stream it and cut anywhere, folds back to itself."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.fold.chat import fold_chat_chunks

# Text with multi-byte UTF-8 (accents, CJK, emoji) and the line separators
# that break str.splitlines: U+2028, U+0085, plus \r and \n inside JSON strings.
TEXT = st.text(alphabet=st.sampled_from(list("ab é中😀\u2028\u0085\r\n\"\\{}:,")), min_size=1, max_size=40)
IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def completions(draw):
    n = draw(st.integers(1, 3))
    choices = []
    for index in range(n):
        message = {"role": "assistant", "content": draw(st.none() | TEXT)}
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
    sep = draw(st.sampled_from([b"\n\n", b"\r\n\r\n"]))
    prefix = draw(st.sampled_from([b"data: ", b"data:"]))
    body = b"".join(prefix + json.dumps(c, ensure_ascii=False).encode() + sep for c in chunks)
    if draw(st.booleans()):
        body += prefix + b"[DONE]" + sep
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=30))))
    bounds = [0, *cuts, len(body)]
    return expected, [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streamed())
def test_streamed_completion_folds_back_to_itself(case):
    expected, reads = case
    assert fold_chat_chunks(reads) == expected
