"""Hypothesis strategies for random chat chunk streams, shared by the bridges' property tests.

``chat_streams()`` draws one answer (choice 0): optional reasoning, optional
text, 0-3 tool calls with arguments split anywhere (sometimes without
``index``, sometimes the whole call in one delta, its arguments then
sometimes sent as an object, sometimes the name late),
a finish_reason or none (sometimes a second, different one after it: the
last is the answer's), usage on a trailer chunk or on the finish chunk or
not at all, ``[DONE]`` or not; framed as SSE and cut into network reads at
random byte offsets. It returns ``(reads, parts)`` where ``parts`` says what
was streamed, so a test can check what any translator produced.
"""
from __future__ import annotations

import json

from hypothesis import strategies as st

from proxy.errors import ProxyError
from proxy.fold.chat import fold_chat_chunks
from proxy.translate.chat_stream import DONE, ChatStream, iter_chat_chunks

TEXT = st.text(alphabet=st.sampled_from(list("ab é中😀\u2028\r\n\"\\{}:,")), min_size=1, max_size=30)
NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True)
ARGS = st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True),
                       st.integers() | st.text(max_size=12) | st.booleans(), max_size=3)


def _split(draw, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=4)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@st.composite
def chat_streams(draw):
    reasoning = draw(st.none() | TEXT)
    content = draw(st.none() | TEXT)
    calls = [{"id": f"call_{draw(NAME)}_{k}", "name": draw(NAME), "arguments": json.dumps(draw(ARGS))}
             for k in range(draw(st.integers(0, 3)))]
    finish = draw(st.sampled_from([None, "stop", "length", "tool_calls" if calls else "stop"]))
    # a second, different finish_reason after the first (a layer's trailing stop): the last is the answer's
    later = draw(st.sampled_from([None, *(r for r in ("stop", "length", "tool_calls") if r != finish)])) \
        if finish else None
    usage = None
    if draw(st.booleans()):
        p, c = draw(st.integers(0, 10**5)), draw(st.integers(0, 10**5))
        usage = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    usage_on_finish = draw(st.booleans())
    no_index = draw(st.booleans())
    head = {"id": "chatcmpl-" + draw(NAME), "object": "chat.completion.chunk", "created": 1764000000,
            "model": "upstream-model"}
    deltas: list[dict] = [{"role": "assistant", "content": ""}]
    if reasoning is not None:
        key = draw(st.sampled_from(["reasoning_content", "reasoning"]))
        deltas += [{key: p} for p in _split(draw, reasoning)]
    if content is not None:
        deltas += [{"content": p} for p in _split(draw, content)]
    for k, call in enumerate(calls):
        index = {} if no_index else {"index": k}
        args = _split(draw, call["arguments"])
        if draw(st.booleans()):  # the whole call in one delta (Groq, Ollama), the arguments sometimes an object
            arguments = call["arguments"] if draw(st.booleans()) else json.loads(call["arguments"])
            deltas.append({"tool_calls": [{**index, "id": call["id"], "type": "function",
                                           "function": {"name": call["name"], "arguments": arguments}}]})
            continue
        late_name = not no_index and draw(st.booleans())
        first = {**index, "id": call["id"], "type": "function",
                 "function": {"name": "" if late_name else call["name"]}}
        deltas.append({"tool_calls": [first]})
        if late_name:
            deltas.append({"tool_calls": [{**index, "function": {"name": call["name"]}}]})
        deltas += [{"tool_calls": [{**index, "function": {"arguments": a}}]} for a in args]
    chunks = [dict(head, choices=[{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}])
              for d in deltas]
    if finish is not None:
        last = dict(head, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}])
        if usage is not None and usage_on_finish:
            last["usage"] = usage
        chunks.append(last)
        if later is not None:
            chunks.append(dict(head, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": later}]))
    if usage is not None and not (finish is not None and usage_on_finish):
        chunks.append(dict(head, choices=[], usage=usage))
    done = finish is None or draw(st.booleans())  # without a finish_reason only [DONE] ends it honestly
    body = b"".join(b"data: " + json.dumps(c, ensure_ascii=False).encode() + b"\n\n" for c in chunks)
    if done:
        body += b"data: [DONE]\n\n"
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=20))))
    bounds = [0, *cuts, len(body)]
    reads = [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    parts = {"reasoning": reasoning, "content": content, "calls": calls, "finish": later or finish, "usage": usage,
             "done": done}
    return reads, parts


def run_bridge(reads: list[bytes], out) -> bytes:
    """What a bridge's stream does with the reads, minus the threads: decode each chunk, feed ``ChatStream``,
    write with ``out`` (a bridge's stream writer: ``start``/``feed``/``close``/``fail``)."""
    chat, done = ChatStream(), False
    parts = [out.start()]
    try:
        for chunk in iter_chat_chunks(reads, 1 << 20):
            if chunk == DONE:
                done = True
                break
            parts.append(out.feed(chat.feed(chunk)))
        parts.append(out.close(chat.close(done), chat.ended_early))
    except ProxyError as exc:
        parts.append(out.fail(exc.status, exc.message))
    return b"".join(parts)


def folded(reads: list[bytes]) -> dict | None:
    """The chat fold's answer for the reads, or None where it refuses them."""
    try:
        return fold_chat_chunks(reads, 1 << 20)
    except ProxyError:
        return None
