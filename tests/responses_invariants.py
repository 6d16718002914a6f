"""The one checker every streamed Responses answer in the tests goes through (SPEC "Responses bridge").

``check(raw or events)`` asserts: every event's ``type`` matches its SSE
``event:`` name; ``sequence_number`` strictly increasing; one response id;
items added at fresh, increasing ``output_index``es, then deltas, then their
``*.done`` events, then ``output_item.done`` with the complete item (text,
arguments, input equal to what the deltas added up to); exactly one terminal
event, last; a completed/incomplete response lists exactly the done items,
in order, with usage complete or absent (a failed one lists only done items,
and may leave the item the failure cut off without its done events). It
returns the terminal payload.
"""
from __future__ import annotations

import json

TERMINAL = {"response.completed", "response.incomplete", "response.failed", "error"}
DELTAS = {  # delta event -> (field the deltas add to in the finished item)
    "response.output_text.delta": "text",
    "response.reasoning_summary_text.delta": "summary",
    "response.function_call_arguments.delta": "arguments",
    "response.custom_tool_call_input.delta": "input",
}
PART_DONE = {"response.output_text.done", "response.content_part.done", "response.reasoning_summary_text.done",
             "response.reasoning_summary_part.done", "response.function_call_arguments.done",
             "response.custom_tool_call_input.done"}
PART_ADDED = {"response.content_part.added", "response.reasoning_summary_part.added"}


def parse(raw: bytes) -> list[tuple[str, dict]]:
    """SSE bytes -> ``[(event name, payload)]``."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
        assert data, f"an SSE block without data: {block[:80]!r}"
        events.append((name, json.loads(b"\n".join(data))))
    return events


def check(events: bytes | list[tuple[str, dict]], codex: bool = False) -> dict:
    if isinstance(events, (bytes, bytearray)):
        events = parse(bytes(events))
    assert events, "no events"
    seqs = [payload["sequence_number"] for _, payload in events]
    assert all(b > a for a, b in zip(seqs, seqs[1:], strict=False)), f"sequence_number not increasing: {seqs}"
    for name, payload in events:
        assert payload["type"] == name, (name, payload["type"])
    assert events[0][0] == "response.created" and "response" in events[0][1]
    response_id = events[0][1]["response"]["id"]
    assert response_id.startswith("resp_")
    terminals = [i for i, (name, _) in enumerate(events) if name in TERMINAL]
    assert len(terminals) == 1, f"terminal events: {[events[i][0] for i in terminals]}"
    assert terminals[0] == len(events) - 1, "events after the terminal event"
    if codex:
        assert events[-1][0] != "response.incomplete", "Codex ends a turn on response.completed only"
    items: dict[int, dict] = {}  # output_index -> state
    done: list[tuple[int, dict]] = []
    for name, payload in events[:-1]:
        if "response" in payload:
            assert payload["response"]["id"] == response_id, "response id changed"
        if name == "response.output_item.added":
            index = payload["output_index"]
            assert index not in items and index == len(items), f"output_index {index} reused or skipped"
            item = payload["item"]
            items[index] = {"id": item["id"], "type": item["type"], "added": item, "acc": [], "parts_done": 0,
                            "done": False}
        elif name in DELTAS or name in PART_DONE or name in PART_ADDED:
            state = _open(items, payload)
            if name in DELTAS:
                assert state["parts_done"] == 0, f"{name} after its part was done"
                state["acc"].append(payload["delta"])  # joined when compared: += is quadratic on big answers
            elif name in PART_DONE:
                state["parts_done"] += 1
                value = payload.get("text", payload.get("arguments", payload.get("input")))
                if value is None and "part" in payload:
                    value = payload["part"]["text"]
                added = _joined(state)
                assert value == added, f"{name} says {value[:200]!r}, deltas gave {added[:200]!r}"
        elif name == "response.output_item.done":
            state = _open(items, payload)
            item = payload["item"]
            assert item["id"] == state["id"] and item["type"] == state["type"]
            _complete(item, state)
            state["done"] = True
            done.append((payload["output_index"], item))
        else:
            assert name in ("response.in_progress", "response.created") and events.index((name, payload)) < 2, name
    name, terminal = events[-1]
    if name == "error":
        assert terminal.get("code") and terminal.get("message")
        return terminal
    response = terminal["response"]
    assert response["id"] == response_id
    done_items = [item for _, item in sorted(done, key=lambda pair: pair[0])]
    if name == "response.failed":
        # an item cut off by the failure is never done (a client would keep it as a finished item), and the
        # failed response lists only items that were done
        assert response["status"] == "failed" and response["error"]["code"]
        assert all(item in done_items for item in response["output"]), "response.failed lists an item never done"
        return terminal
    assert all(state["done"] for state in items.values()), "an item was added and never done"
    if name == "response.completed":
        assert response["status"] in ("completed", "incomplete") and (codex or response["status"] == "completed")
    else:
        assert response["status"] == "incomplete" and response["incomplete_details"]["reason"]
    assert response["output"] == done_items
    usage = response.get("usage")
    if usage is not None:
        assert {"input_tokens", "output_tokens", "total_tokens", "input_tokens_details",
                "output_tokens_details"} <= set(usage), usage
        assert isinstance(usage["input_tokens_details"]["cached_tokens"], int)
        assert isinstance(usage["output_tokens_details"]["reasoning_tokens"], int)
    return terminal


def _open(items: dict, payload: dict) -> dict:
    index = payload["output_index"]
    assert index in items, f"event for output_index {index} before output_item.added"
    state = items[index]
    assert not state["done"], f"event for output_index {index} after output_item.done"
    if "item_id" in payload:
        assert payload["item_id"] == state["id"], "item_id does not match its output_index"
    return state


def _complete(item: dict, state: dict) -> None:
    kind = item["type"]
    if kind == "message":
        assert item["content"][0]["text"] == _joined(state) and state["parts_done"] == 2
    elif kind == "reasoning":
        assert item["summary"][0]["text"] == _joined(state) and state["parts_done"] == 2
    elif kind == "function_call":
        assert item["arguments"] == _joined(state) and state["parts_done"] == 1
        assert item["call_id"] and item["id"] == state["added"]["id"]
    elif kind == "custom_tool_call":
        assert item["input"] == _joined(state) and state["parts_done"] == 1 and item["call_id"]
    else:
        raise AssertionError(f"unexpected item type {kind}")


def _joined(state: dict) -> str:
    """What the deltas of an item added up to (kept joined, so each comparison costs one join at most)."""
    if len(state["acc"]) != 1:
        state["acc"][:] = ["".join(state["acc"])]
    return state["acc"][0]
