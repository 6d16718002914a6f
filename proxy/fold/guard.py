"""What a fold may hold and what it refuses: the ``Budget``, memory estimates, shape problems, surrogates.

Pure helpers for the folds (no Flask, no requests), kept apart so the per-chunk
loops in ``chat.py`` stay short. Little here runs per ordinary chunk: the
``Budget`` charges values a fold keeps besides text fragments (unknown fields,
logprobs, usage), cheaply for small events; the shape check runs once a chunk
has already failed, and the surrogate repair only after the slow JSON path.

``max-aggregate-bytes`` is a bound on memory, so what is charged against it is
an estimate of what Python holds, not of the JSON text: a parsed ``[{}]``
takes ~120 bytes for 4 bytes of JSON, a 1-character text fragment ~57.
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import StreamError

FRAGMENT = 50       # per text fragment kept in a list: str header and list slot
CHOICE_COST = 512   # a new choice index: its state object and empty containers
CALL_COST = 256     # a new tool call index
SLOT_COST = 160     # a new unknown field: its key in the dict, and the fold's note of its charge
_OBJECT = 64        # any other parsed JSON value (dict/list header, float, int)
# A container from an event of at most EXACT_ABOVE bytes is charged CONTAINER_FACTOR
# times the event's size instead of being walked: parsed JSON takes up to ~20x its
# text ([{}, {}] is 64 bytes an element), so this is an upper bound, and cheap.
EXACT_ABOVE = 16 * 1024
CONTAINER_FACTOR = 24


def held(value: Any) -> int:
    """Estimated bytes Python holds for a parsed JSON value (iterative: depth cannot overflow)."""
    kind = type(value)
    if kind is str:
        return FRAGMENT + len(value)
    if kind is not dict and kind is not list:
        return 32
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            total += FRAGMENT + len(item)
        elif kind is dict:
            total += _OBJECT + 16 * len(item)
            stack.extend(item)  # keys
            stack.extend(item.values())
        elif kind is list:
            total += _OBJECT + 8 * len(item)
            stack.extend(item)
        else:
            total += 32
    return total


def estimate(raw: bytes) -> int:
    """What parsing ``raw`` JSON holds, estimated by counting its punctuation (C speed, no walk).

    Containers (``[``, ``{``) as ``held`` charges them, a slot per ``,``
    (a float or a dict entry), string objects as quote pairs minus keys (the
    ``:`` count: orjson shares key strings), plus the text itself. Within ~1.6x
    of the truth for the worst shapes (arrays of floats); charged to logprobs,
    which accumulate with every token.
    """
    strings = max(0, raw.count(b'"') // 2 - raw.count(b":"))
    containers = raw.count(b"[") + raw.count(b"{")
    return len(raw) + _OBJECT * containers + 24 * raw.count(b",") + FRAGMENT * strings


def too_large(max_bytes: int) -> StreamError:
    return StreamError(f"folded answer exceeds max-aggregate-bytes ({max_bytes} bytes)",
                       code="aggregate_too_large")


def wrong_shape(chunk: Any) -> StreamError:
    """The 502 for a chunk that is valid JSON of the wrong shape, naming the first problem found."""
    return StreamError(f"upstream sent a chunk of the wrong shape: {shape_problem(chunk)}",
                       code="upstream_bad_chunk")


def shape_problem(chunk: Any) -> str:
    """Describe where a decoded chat chunk departs from the OpenAI schema (called only after a failure)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if choices is not None and not isinstance(choices, list):
        return f"choices is {_kind(choices)}, not an array"
    for i, choice in enumerate(choices or ()):
        where = f"choices[{i}]"
        if not isinstance(choice, dict):
            return f"{where} is {_kind(choice)}, not an object"
        index = choice.get("index", 0)
        if type(index) is not int:
            return f"{where}.index is {_kind(index)}, not an integer"
        for name in ("delta", "logprobs"):
            value = choice.get(name)
            if value is not None and not isinstance(value, dict):
                return f"{where}.{name} is {_kind(value)}, not an object"
        delta = choice.get("delta") or {}
        for name in ("content", "reasoning_content", "reasoning", "refusal"):
            value = delta.get(name)
            if value is not None and not isinstance(value, str):
                return f"{where}.delta.{name} is {_kind(value)}, not a string"
        for name in ("function_call", "audio"):
            value = delta.get(name)
            if value is not None and not isinstance(value, dict):
                return f"{where}.delta.{name} is {_kind(value)}, not an object"
        calls = delta.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            return f"{where}.delta.tool_calls is {_kind(calls)}, not an array"
        for k, call in enumerate(calls or ()):
            if not isinstance(call, dict):
                return f"{where}.delta.tool_calls[{k}] is {_kind(call)}, not an object"
            if call.get("index") is not None and type(call["index"]) is not int:
                return f"{where}.delta.tool_calls[{k}].index is {_kind(call['index'])}, not an integer"
            if call.get("id") and not isinstance(call["id"], str):
                return f"{where}.delta.tool_calls[{k}].id is {_kind(call['id'])}, not a string"
            function = call.get("function")
            if function is not None and not isinstance(function, dict):
                return f"{where}.delta.tool_calls[{k}].function is {_kind(function)}, not an object"
            name = (function or {}).get("name")
            if name and not isinstance(name, str):
                return f"{where}.delta.tool_calls[{k}].function.name is {_kind(name)}, not a string"
        legacy = delta.get("function_call")
        if legacy and isinstance(legacy, dict) and legacy.get("name") and not isinstance(legacy["name"], str):
            return f"{where}.delta.function_call.name is {_kind(legacy['name'])}, not a string"
        for name in ("content", "refusal"):
            items = (choice.get("logprobs") or {}).get(name)
            if items is not None and not isinstance(items, list):
                return f"{where}.logprobs.{name} is {_kind(items)}, not an array"
    return "a field has a type the OpenAI schema does not allow"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def has_surrogates(text: str) -> bool:
    """Whether ``text`` holds a UTF-16 surrogate half (only the slow JSON path produces them)."""
    return not text.isascii() and _SURROGATE.search(text) is not None


def clean(text: str) -> str:
    """``text`` with surrogate halves joined or replaced (``repair_surrogates``), so ``orjson`` can write it."""
    return repair_surrogates(text) if has_surrogates(text) else text


class Halves:
    """Surrogate halves split between the fragments of one streamed field: the joining a reader that passes
    fragments on as they come needs (the fold joins its whole answer once, with ``repair_surrogates``).

    A fragment that ends with the first half of a pair (an emoji escaped as ``"\\ud83d"`` at the end of one
    chunk, ``"\\ude00"`` at the start of the next) has that half held back in ``waiting`` under the field's
    key until the field's next fragment; what cannot be joined becomes U+FFFD, as ``repair_surrogates``
    makes it. A caller asks ``join`` only when something waits or the fragment is not ASCII.
    """

    __slots__ = ("waiting",)

    def __init__(self) -> None:
        self.waiting: dict[Any, str] = {}

    def join(self, key: Any, text: str) -> str:
        """``text`` with a waiting half before it joined, its own last half held back, lone halves replaced."""
        half = self.waiting.pop(key, None)
        if half is not None:
            text = half + text
        elif _SURROGATE.search(text) is None:
            return text
        if "\ud800" <= text[-1] <= "\udbff":
            self.waiting[key] = text[-1]
            text = text[:-1]
        return repair_surrogates(text)

    def flush(self) -> list:
        """The keys whose half still waits, forgotten: the field has ended, each half is one U+FFFD."""
        waiting, self.waiting = self.waiting, {}
        return list(waiting)


def repair_surrogates(value: Any) -> Any:
    """Join UTF-16 surrogate pairs in every string (an emoji sent as ``"\\ud83d"`` + ``"\\ude00"``).

    Lone halves become U+FFFD, as the openai SDK's accumulated text shows them
    once printed. Only the slow JSON path (``json.loads``) can produce surrogates.
    """
    kind = type(value)
    if kind is str:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if kind is dict:
        return {repair_surrogates(k): repair_surrogates(v) for k, v in value.items()}
    if kind is list:
        return [repair_surrogates(v) for v in value]
    return value


class Budget:
    """The part of a fold that keeps count of what it holds against ``max_bytes`` (``size``).

    ``event`` is the raw event being fed while its values are charged; its size
    bounds what any one value from it can hold. ``costs`` remembers what each
    replaceable unknown field was charged, so a replacement credits it back.
    """

    __slots__ = ("size", "max_bytes", "event", "costs", "usage_cost")

    def __init__(self, max_bytes: int) -> None:
        self.size = 0
        self.max_bytes = max_bytes
        self.event = b""
        self.costs: dict[tuple[int, str], int] = {}
        self.usage_cost = 0

    def _keep(self, extra: dict, key: str, value: Any) -> None:
        """An unknown field: the last non-null value wins; charge what it holds, credit what it replaces."""
        costs = self.costs
        slot = (id(extra), key)
        if key in extra:
            if value is None:
                return
            self.size -= costs[slot]
        else:
            self.size += SLOT_COST + len(key)
        kind = type(value)  # self._cost, inlined: this runs per choice per chunk for Azure
        if kind is str:
            cost = FRAGMENT + len(value)
        elif kind is dict or kind is list:
            size = len(self.event)
            cost = held(value) if size > EXACT_ABOVE else CONTAINER_FACTOR * size
        else:
            cost = 32
        costs[slot] = cost
        self.size += cost
        extra[key] = value

    def _accumulated(self, items: list) -> int:
        """What appending ``items`` (logprobs) holds: counted from the event's text unless the event is big."""
        if len(self.event) > EXACT_ABOVE:
            return held(items)
        return estimate(self.event)

    def _cost(self, value: Any) -> int:
        """What a replaceable value holds: exact for big events, a cheap upper bound for the usual small ones.

        Azure sends content filter results on every choice and NIM usage on
        every chunk; walking those each time would halve the fold's speed.
        """
        kind = type(value)
        if kind is str:
            return FRAGMENT + len(value)
        if kind is dict or kind is list:
            size = len(self.event)
            return held(value) if size > EXACT_ABOVE else CONTAINER_FACTOR * size
        return 32
