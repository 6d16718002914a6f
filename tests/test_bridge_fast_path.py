"""Property: the bridges' no-decode fast path (proxy/translate/chat_reads.py) writes exactly the bytes the
full decode writes, for every bridge, over random chat streams, every captured stream and crafted near-misses.

Random ids (a message id, ``call_<random>`` for calls that never got one) are fixed or masked first: they
differ between any two runs, fast or not.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.translate.anthropic.stream import MessageStream
from proxy.translate.chat_reads import TextRun, raw, read_batches
from proxy.translate.gemini.stream import GeminiStream
from proxy.translate.responses.response import new_context
from proxy.translate.responses.stream import ResponsesStream
from proxy.translate.responses.toolmap import ToolMap
from proxy.translate.tools import ToolNames
from tests.bridge_run import anthropic_written, machine_written, responses_written
from tests.chat_streams import chat_streams
from tests.test_anthropic_property import translate as translate_per_chunk

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("*/*.sse"))
RANDOM_CALL_ID = re.compile(rb"call_[0-9a-f]{16}")
HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1764000000,"model":"m","choices":['


def bridged(reads: list[bytes], fast: bool, stream) -> bytes:
    """What a bridged stream route writes for the reads (the runner's loop), minus the reader thread
    (``stream``: a bridge's stream state machine shaped like ``MessageStream``)."""
    return RANDOM_CALL_ID.sub(b"call_random", machine_written(stream, reads, fast))


def anthropic(reads: list[bytes], fast: bool) -> bytes:
    stream = MessageStream("claude-x", ToolNames(), 42)
    stream.message_id = "msg_fixed"
    return RANDOM_CALL_ID.sub(b"call_random", anthropic_written(stream, reads, fast))


def gemini(reads: list[bytes], fast: bool, sse: bool) -> bytes:
    return bridged(reads, fast, GeminiStream("gemini-x", ToolNames(), thoughts=True, sse=sse, response_id="fixed"))


def anthropic_per_chunk(reads: list[bytes]) -> bytes:
    """The reference: every chunk decoded by the stateful ``iter_chat_chunks``, as the route did before."""
    return RANDOM_CALL_ID.sub(b"call_random", translate_per_chunk(reads, "msg_fixed"))


def responses(reads: list[bytes], fast: bool, ctx, codex: bool) -> bytes:
    return RANDOM_CALL_ID.sub(b"call_random", responses_written(ResponsesStream(ctx, codex), reads, fast))


def assert_same_both_ways(reads: list[bytes], codex: bool = False) -> None:
    assert anthropic(reads, True) == anthropic(reads, False)
    assert gemini(reads, True, True) == gemini(reads, False, True)
    assert gemini(reads, True, False) == gemini(reads, False, False)
    ctx = new_context({"model": "m"}, ToolMap())
    assert responses(reads, True, ctx, codex) == responses(reads, False, ctx, codex)


def relaid(body: bytes, draw, ascii_only: bool) -> list[bytes]:
    """The events of ``body`` re-encoded compactly as vLLM/OpenAI write them, cut into random reads."""
    events = []
    for event in body.split(b"\n\n"):
        if event.startswith(b"data: {"):
            chunk = json.loads(event[6:])
            event = b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=ascii_only).encode()
        if event:
            events.append(event + b"\n\n")
    out = b"".join(events)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(out) - 1)), max_size=12))))
    bounds = [0, *cuts, len(out)]
    return [out[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat_streams(), st.data())
def test_fast_path_writes_the_same_bytes_as_the_full_decode_for_random_streams(case, data):
    reads, _ = case
    compact = relaid(b"".join(reads), data.draw, data.draw(st.booleans()))
    codex = data.draw(st.booleans())
    assert_same_both_ways(reads, codex)
    assert_same_both_ways(compact, codex)
    assert anthropic(compact, True) == anthropic_per_chunk(compact)


def test_plain_deltas_take_the_fast_path_with_their_literals_as_sent():
    texts = [b'caf\xc3\xa9 \\"\\n', b"\xf0\x9f\x98\x80", b"", b"plain"]
    events = [HEAD + b'{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}]}\n\n' % t
              for t in texts]
    [batch] = list(read_batches([b"".join(events)], 1 << 20))
    assert all(type(item) is TextRun and item.kind == "text" for item in batch)
    assert [body for item in batch for body in item.bodies] == texts
    assert b"".join(raw(item) for item in batch) == b"".join(events)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fast_path_writes_the_same_bytes_as_the_full_decode_for_every_capture(path):
    body = path.read_bytes()
    assert_same_both_ways([body])
    assert_same_both_ways([body[i:i + 97] for i in range(0, len(body), 97)], codex=True)


NEAR_MISSES = {
    "escaped slash": b'{"index":0,"delta":{"content":"a\\/b"},"logprobs":null,"finish_reason":null}]}',
    "unicode escape": b'{"index":0,"delta":{"content":"caf\\u00e9"},"logprobs":null,"finish_reason":null}]}',
    "invalid utf-8": b'{"index":0,"delta":{"content":"caf\xc3"},"logprobs":null,"finish_reason":null}]}',
    "raw control character": b'{"index":0,"delta":{"content":"a\tb"},"logprobs":null,"finish_reason":null}]}',
    "finish in the same chunk": b'{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":"stop"}]}',
    "usage in the same chunk": b'{"index":0,"delta":{"content":"a"},"finish_reason":null}],'
                               b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    "two delta keys": b'{"index":0,"delta":{"content":"a","reasoning_content":"b"},"finish_reason":null}]}',
    "choice 1": b'{"index":1,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}]}',
    "two choices": b'{"index":0,"delta":{"content":"a"},"finish_reason":null},'
                   b'{"index":1,"delta":{"content":"b"},"finish_reason":null}]}',
    "error member": b'{"index":0,"delta":{"content":"a"},"finish_reason":null}],"error":{"message":"boom"}}',
    "empty content": b'{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":null}]}',
    "reasoning": b'{"index":0,"delta":{"reasoning":"hm \xf0\x9f\x98\x80"},"logprobs":null,"finish_reason":null}]}',
    "content not a string": b'{"index":0,"delta":{"content":["a"]},"logprobs":null,"finish_reason":null}]}',
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
@pytest.mark.parametrize("framing", ["lf", "crlf", "nospace", "event error", "cut"])
def test_fast_path_writes_the_same_bytes_as_the_full_decode_for_near_misses(name, framing):
    first = HEAD + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    text = HEAD + b'{"index":0,"delta":{"content":"x"},"logprobs":null,"finish_reason":null}]}\n\n'
    odd = HEAD + NEAR_MISSES[name] + b"\n\n"
    if framing == "crlf":
        odd = odd.replace(b"\n", b"\r\n")
    elif framing == "nospace":
        odd = odd.replace(b"data: ", b"data:", 1)
    elif framing == "event error":
        odd = b"event: error\n" + odd
    last = HEAD + b'{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    body = first + text + odd + text + last
    reads = [body[i:i + 61] for i in range(0, len(body), 61)] if framing == "cut" else [body]
    assert_same_both_ways(reads)
    assert_same_both_ways(reads, codex=True)


def test_fast_path_writes_the_same_bytes_past_the_precomputed_sequence_numbers():
    # the Responses writer takes sequence_number digits from a table for a stream's first 4,096 events and
    # formats them past it: a run that crosses the end of the table, and runs after it, must not differ
    first = HEAD + b'{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    texts = [HEAD + b'{"index":0,"delta":{"content":"t%d "},"logprobs":null,"finish_reason":null}]}\n\n' % i
             for i in range(5000)]
    last = HEAD + b'{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    body = first + b"".join(texts) + last
    reads = [body[i:i + 150_000] for i in range(0, len(body), 150_000)]
    assert_same_both_ways(reads)
    ctx = new_context({"model": "m"}, ToolMap())
    numbers = re.findall(rb'"sequence_number":(\d+)', responses(reads, True, ctx, False))
    assert [int(n) for n in numbers] == list(range(len(numbers))) and len(numbers) > 5000
