"""Measure the fold alone: chunks/s on a 2,000-chunk stream with reasoning and tool calls.

    python bench/fold_bench.py [--seconds 3] [--json]

The stream imitates vLLM's bytes (ids, ``created``, ``logprobs: null``,
``\\n\\n`` separators, a final usage chunk, ``[DONE]``). When ``litellm`` is
importable, ``litellm.stream_chunk_builder`` folds the same chunks in the same
process for comparison (it is an optional bench dependency, never a runtime one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.fold.chat import fold_chat_chunks  # noqa: E402

CHUNKS = 2000


def make_stream(n: int = CHUNKS) -> bytes:
    """A realistic stream: 40% reasoning, 40% content, 20% two parallel tool calls, then usage."""
    head = {"id": "chatcmpl-bench0123456789abcdef", "object": "chat.completion.chunk",
            "created": 1764664568, "model": "qwen2.5-72b-instruct"}
    events = []

    def emit(choice_delta: dict, finish=None) -> None:
        chunk = dict(head, choices=[{"index": 0, "delta": choice_delta, "logprobs": None,
                                     "finish_reason": finish}])
        events.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")

    emit({"role": "assistant", "content": ""})
    body = n - 3
    for i in range(body):
        part = i * 5 // body
        if part < 2:
            emit({"reasoning_content": f" think{i}"})
        elif part < 4:
            emit({"content": f" word{i} é"})
        elif (i - body * 4 // 5) < 2:
            k = i - body * 4 // 5
            emit({"tool_calls": [{"index": k, "id": f"call_{k}", "type": "function",
                                  "function": {"name": f"tool_{k}", "arguments": ""}}]})
        else:
            emit({"tool_calls": [{"index": i % 2, "function": {"arguments": f"\"a{i}\","}}]})
    emit({}, finish="tool_calls")
    usage = dict(head, choices=[], usage={"prompt_tokens": 100, "completion_tokens": n,
                                          "total_tokens": 100 + n})
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def network_reads(stream: bytes, size: int = 16384) -> list[bytes]:
    return [stream[i:i + size] for i in range(0, len(stream), size)]


def measure(fn, seconds: float) -> float:
    """Runs of ``fn`` per second, best of a few rounds."""
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.5:
            fn()
            runs += 1
        best = max(best, runs / (time.perf_counter() - start))
    return best


def litellm_rate(stream: bytes, seconds: float) -> float | None:
    # no network fetch of LiteLLM's price list, no banner per call
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("LITELLM_LOG", "ERROR")
    try:
        import litellm  # noqa: PLC0415
    except ImportError:
        return None
    litellm.suppress_debug_info = True
    chunks = []
    for line in stream.split(b"\n"):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(litellm.ModelResponseStream(**json.loads(line[6:])))
    return measure(lambda: litellm.stream_chunk_builder(chunks), seconds) * len(chunks)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    stream = make_stream()
    reads = network_reads(stream)
    result = fold_chat_chunks(reads)
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    ours = measure(lambda: fold_chat_chunks(reads), args.seconds) * CHUNKS
    theirs = litellm_rate(stream, args.seconds)
    row = {"scenario": "fold alone, 2,000 chunks", "streamfold_chunks_per_s": round(ours),
           "litellm_chunks_per_s": round(theirs) if theirs else None,
           "ratio": round(ours / theirs, 1) if theirs else None}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"streamfold fold: {ours:,.0f} chunks/s")
        print(f"litellm.stream_chunk_builder: {theirs:,.0f} chunks/s (x{ours / theirs:.1f})"
              if theirs else "litellm.stream_chunk_builder: not installed (pip install litellm)")
    return row


if __name__ == "__main__":
    main()
