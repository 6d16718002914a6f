"""Build Responses API objects from a chat answer (translation.md §2.2, §2.3).

``from_completion`` translates a whole ``chat.completion`` (relayed or
folded); the stream translator builds its items and its terminal object
with the same functions, so a streamed answer ends with exactly the object
the non-stream translation of its fold would give.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import orjson

from ...errors import BadRequest
from ..completion import first_choice, message_functions
from ..tools import is_context_overflow as overflow  # noqa: F401 - the stream and route ask it here
from ..tools import repair_json_object
from .toolmap import ToolMap

# Request fields a Response object echoes, with the value it shows when the client left one out.
ECHO_DEFAULTS: dict[str, Any] = {
    "instructions": None, "max_output_tokens": None, "parallel_tool_calls": True, "previous_response_id": None,
    "prompt_cache_key": None, "reasoning": {"effort": None, "summary": None}, "safety_identifier": None,
    "service_tier": "auto", "store": True, "temperature": None, "text": {"format": {"type": "text"}},
    "tool_choice": "auto", "tools": [], "top_p": None, "truncation": "disabled", "user": None, "metadata": {},
}
INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass(frozen=True, slots=True)
class Context:
    """What one request's Response objects share: ids, the client's model, the echoed request fields."""

    id: str
    created_at: int
    model: str
    echo: dict
    toolmap: ToolMap

    @property
    def suffix(self) -> str:
        return self.id[5:]  # without "resp_": item ids are built from it


def new_context(body: dict, toolmap: ToolMap) -> Context:
    echo = ECHO_DEFAULTS.copy()
    for key in ECHO_DEFAULTS.keys() & body.keys():  # a client sends few of them
        if body[key] is not None:
            echo[key] = body[key]
    try:  # checked before any upstream is asked: the echo is written inside an event's "response"
        orjson.dumps({"response": echo})
    except orjson.JSONEncodeError:  # orjson reads 1024 levels but writes 254
        raise BadRequest("A request field the response repeats (metadata, tools, text, ...) nests JSON too "
                         "deeply to be written back (at most 252 levels).") from None
    return Context(f"resp_{os.urandom(16).hex()}", int(time.time()), body["model"], echo, toolmap)


def envelope(ctx: Context, status: str, output: list[dict], usage: dict | None = None,
             incomplete: str | None = None, error: dict | None = None) -> dict:
    """A Response object: ``status`` in_progress / completed / incomplete / failed."""
    out: dict[str, Any] = {
        "id": ctx.id, "object": "response", "created_at": ctx.created_at, "status": status, "background": False,
        "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
        "model": ctx.model, "output": output,
    }
    out.update(ctx.echo)
    if usage is not None:
        out["usage"] = usage  # complete or absent: Codex fails to parse a partial usage object
    return out


def status_of(finish: str | None) -> tuple[str, str | None]:
    """``(status, incomplete reason)`` for a chat ``finish_reason``."""
    reason = INCOMPLETE.get(finish or "")
    return ("incomplete", reason) if reason else ("completed", None)


def usage_of(usage: Any) -> dict | None:
    """Chat usage as Responses usage: every field, or ``None`` when the upstream gave too little."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is not int or type(completion) is not int:
        return None
    total = usage.get("total_tokens")
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": _detail(usage, "prompt", "cached")},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _detail(usage, "completion", "reasoning")},
            "total_tokens": total if type(total) is int else prompt + completion}


def _detail(usage: dict, side: str, name: str) -> int:
    details = usage.get(f"{side}_tokens_details")
    value = details.get(f"{name}_tokens") if isinstance(details, dict) else None
    return value if type(value) is int else 0


# -- items ----------------------------------------------------------------------
def reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "status": status,
            "summary": [{"type": "summary_text", "text": text}], "encrypted_content": None}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(ctx: Context, call_id: str, upstream_name: str, arguments: str, status: str) -> dict:
    """A ``function_call`` item, or a ``custom_tool_call`` for a declared freeform tool."""
    name, namespace, custom = ctx.toolmap.client(upstream_name)
    if custom:
        item = {"id": f"ctc_{call_id}", "type": "custom_tool_call", "status": status, "call_id": call_id,
                "name": name, "input": unwrap_input(arguments)}
    else:
        item = {"id": f"fc_{call_id}", "type": "function_call", "status": status, "call_id": call_id,
                "name": name, "arguments": arguments or "{}"}
    if namespace:
        item["namespace"] = namespace
    return item


def unwrap_input(arguments: str) -> str:
    """The freeform text of a custom tool call, sent up as ``{"input": text}``.

    Models do not always keep to the wrapper: broken JSON is repaired, an
    object with one other string field gives that string, and text that is
    not JSON at all is taken as the input itself (a patch written directly).
    """
    text = arguments.strip()
    if not text:
        return ""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if not text.startswith("{"):
            return arguments
        value = repair_json_object(text)
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if isinstance(value.get("input"), str):
            return value["input"]
        strings = [v for v in value.values() if isinstance(v, str)]
        if len(strings) == 1:
            return strings[0]
    return arguments


def output_items(ctx: Context, reasoning: str, text: str, calls: list[tuple[str, str, str]],
                 final: str) -> list[dict]:
    """The output list in stream order: reasoning, message, calls (``calls``: (id, upstream name, args)).

    An item ends ``completed`` when a later kind of item follows it (the
    stream closes it there); the last kind ends with ``final``, the status
    the finish gave (``incomplete`` when the answer was cut at max tokens).
    """
    out = []
    if reasoning:
        out.append(reasoning_item(f"rs_{ctx.suffix}", reasoning, final if not (text or calls) else "completed"))
    if text:
        out.append(message_item(f"msg_{ctx.suffix}", text, final if not calls else "completed"))
    for call_id, name, args in calls:
        out.append(call_item(ctx, call_id, name, args, final))
    return out


# -- a whole answer ------------------------------------------------------------------
def answer_parts(completion: Any, ctx: Context) -> tuple[str, str, list[tuple[str, str, str]], str | None]:
    """``(reasoning, text, calls, finish_reason)`` of a ``chat.completion``'s first choice."""
    choice, message = first_choice(completion)
    reasoning = _text(message.get("reasoning_content")) or _text(message.get("reasoning"))
    calls = []
    for i, call_id, function in message_functions(message):
        args = function.get("arguments")
        args = args if isinstance(args, str) else (orjson.dumps(args).decode() if args is not None else "")
        call_id = call_id if isinstance(call_id, str) and call_id else f"call_{ctx.suffix}_{i}"
        name = function.get("name") if isinstance(function.get("name"), str) and function.get("name") else f"tool_{i}"
        calls.append((call_id, name, args))
    finish = choice.get("finish_reason")
    return reasoning, _text(message.get("content")), calls, finish if isinstance(finish, str) else None


def from_completion(completion: dict, ctx: Context) -> dict:
    """The Response object for a ``chat.completion``."""
    reasoning, text, calls, finish = answer_parts(completion, ctx)
    status, incomplete = status_of(finish)
    return envelope(ctx, status, output_items(ctx, reasoning, text, calls, status),
                    usage_of(completion.get("usage")), incomplete)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content or reasoning as a list of parts
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""
