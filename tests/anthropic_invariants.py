"""The one checker every Anthropic streaming test uses: parse the SSE bytes, assert the SPEC's invariants.

Invariants (SPEC "Anthropic Messages", translation.md §1.4): one
``message_start``, first; block indices 0..k in order, never reused; at most
one block open; every delta refers to the open block and matches its type
(text_delta -> text, thinking_delta/signature_delta -> thinking,
input_json_delta -> tool_use); no text block is empty; each tool_use block's
concatenated ``partial_json`` is one valid JSON object; a successful stream
has exactly one ``message_delta`` then one ``message_stop`` and nothing after
it; a broken one ends with ``event: error`` and has no ``message_stop``.
``ping`` may come anywhere after ``message_start``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

DELTA_FOR = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "thinking",
             "input_json_delta": "tool_use"}


@dataclass
class Checked:
    """What a valid stream said, for the test's own assertions."""

    events: list[tuple[str, dict]]
    blocks: list[dict] = field(default_factory=list)  # content blocks as a client accumulates them
    stop_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None  # the error event's payload when the stream broke
    pings: int = 0

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    @property
    def text(self) -> str:
        return "".join(b["text"] for b in self.blocks if b["type"] == "text")

    @property
    def thinking(self) -> str:
        return "".join(b["thinking"] for b in self.blocks if b["type"] == "thinking")

    @property
    def tools(self) -> list[dict]:
        return [b for b in self.blocks if b["type"] == "tool_use"]


def parse_sse(raw: bytes) -> list[tuple[str, dict]]:
    """``event:``/``data:`` frames -> ``[(event, data dict)]``; the event name must equal data.type."""
    events = []
    for frame in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not frame.strip():
            continue
        name, data = None, None
        for line in frame.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = json.loads(line[5:])
        assert name is not None and data is not None, f"frame without event or data: {frame[:200]!r}"
        assert data.get("type") == name, f"event {name!r} carries data.type {data.get('type')!r}"
        events.append((name, data))
    return events


def check_stream(raw: bytes, *, broken: bool = False) -> Checked:
    """Assert the invariants on a raw Anthropic SSE body; ``broken``: it must end with ``event: error``."""
    events = parse_sse(raw)
    checked = Checked(events)
    assert events, "empty stream"
    assert events[0][0] == "message_start", f"first event is {events[0][0]}"
    message = events[0][1]["message"]
    assert message["role"] == "assistant" and message["content"] == [] and message["type"] == "message"
    assert isinstance(message["usage"]["input_tokens"], int)
    open_index, next_index, partial = None, 0, {}
    deltas = stops = 0
    for position, (name, data) in enumerate(events[1:], start=1):
        assert stops == 0, f"{name} after message_stop"
        if name == "ping":
            checked.pings += 1
        elif name == "message_start":
            raise AssertionError("second message_start")
        elif name == "content_block_start":
            assert deltas == 0, "block started after message_delta"
            assert open_index is None, f"block {data['index']} started while {open_index} is open"
            assert data["index"] == next_index, f"block index {data['index']}, expected {next_index}"
            block = dict(data["content_block"])
            assert block["type"] in ("text", "thinking", "tool_use"), block
            if block["type"] == "tool_use":
                assert block["input"] == {} and block["id"] and block["name"]
                assert all(c.isalnum() or c in "_-" for c in block["id"]), block["id"]
                partial[data["index"]] = ""
            checked.blocks.append(block)
            open_index, next_index = data["index"], next_index + 1
        elif name == "content_block_delta":
            assert data["index"] == open_index, f"delta for block {data['index']}, open is {open_index}"
            block = checked.blocks[open_index]
            kind = data["delta"]["type"]
            assert DELTA_FOR[kind] == block["type"], f"{kind} into a {block['type']} block"
            if kind == "text_delta":
                block["text"] += data["delta"]["text"]
            elif kind == "thinking_delta":
                block["thinking"] += data["delta"]["thinking"]
            elif kind == "input_json_delta":
                partial[open_index] += data["delta"]["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == open_index, f"stop for block {data['index']}, open is {open_index}"
            block = checked.blocks[open_index]
            if block["type"] == "text":
                assert block["text"], "empty text block"
            if block["type"] == "tool_use":
                value = json.loads(partial[open_index] or "{}")
                assert isinstance(value, dict), "tool input is not a JSON object"
                block["input"] = value
            open_index = None
        elif name == "message_delta":
            assert open_index is None, "message_delta while a block is open"
            deltas += 1
            assert deltas == 1, "second message_delta"
            checked.stop_reason = data["delta"]["stop_reason"]
            sequence = data["delta"]["stop_sequence"]
            assert (checked.stop_reason == "stop_sequence") == isinstance(sequence, str), \
                f"stop_sequence {sequence!r} with stop_reason {checked.stop_reason!r}"
            checked.usage = data["usage"]
            assert isinstance(data["usage"]["output_tokens"], int)
        elif name == "message_stop":
            assert deltas == 1, "message_stop without message_delta"
            stops += 1
        elif name == "error":
            assert position == len(events) - 1, "events after error"
            assert set(data["error"]) >= {"type", "message"}
            checked.error = data["error"]
        else:
            raise AssertionError(f"unknown event {name}")
    if broken:
        assert checked.error is not None and stops == 0, "a broken stream must end with error, no message_stop"
    else:
        assert checked.error is None, f"stream ended with error {checked.error}"
        assert stops == 1, "no message_stop"
        assert checked.stop_reason in ("end_turn", "max_tokens", "tool_use", "stop_sequence", "refusal")
        if checked.tools:
            assert checked.stop_reason == "tool_use", "tool_use blocks but stop_reason " + str(checked.stop_reason)
    return checked
