"""chat.completion -> Anthropic message, and the Anthropic error shape (translation.md §1.2, §1.3, §1.7).

Pure: dicts in, dicts or bytes out. Shared with the stream translator:
``usage``, ``stop_reason``, ``error_type`` and ``error_event``.
"""
from __future__ import annotations

import os
from typing import Any, Collection

import orjson

from ..chat_stream import clean
from ..completion import first_choice, message_calls, message_text, upstream_message
from ..tools import ToolNames, is_context_overflow, repair_json_object, sanitize_tool_id

# HTTP status -> Anthropic error type (Anthropic's docs, CLIProxyAPI claudeErrorTypeFromStatus).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}
_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "end_turn", "function_call": "end_turn",
           "content_filter": "end_turn"}


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def error_type(status: int) -> str:
    """The Anthropic error ``type`` for an HTTP status."""
    kind = ERROR_TYPES.get(status)
    if kind is not None:
        return kind
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    """``{"type":"error","error":{"type","message"}}`` (surrogate halves in an upstream's message replaced)."""
    return orjson.dumps({"type": "error", "error": {"type": kind or error_type(status), "message": clean(message)}})


def error_event(status: int, message: str) -> bytes:
    """The ``event: error`` frame that ends a stream that broke after it was committed."""
    return b"event: error\ndata: " + error_body(status, message) + b"\n\n"


def upstream_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An upstream error answer as an Anthropic one: ``(status, body)``.

    A prompt that does not fit becomes 400 ``prompt is too long: ...``
    whatever status the upstream used: that is Anthropic's own wording, and
    what makes Claude Code compact the conversation instead of resending it.
    An upstream 503 (overloaded) becomes 529, which Anthropic clients retry.
    """
    message = upstream_message(status, body)
    if status >= 400 and status != 429 and is_context_overflow(message):
        text = message if message.lower().startswith("prompt is too long") else f"prompt is too long: {message}"
        return 400, error_body(400, text, "invalid_request_error")
    if status == 503:
        status = 529
    return status, error_body(status, message)


def usage(chat_usage: Any) -> dict:
    """Anthropic usage from a chat ``usage`` (zeros when the upstream sent none)."""
    prompt = completion = cached = 0
    if isinstance(chat_usage, dict):
        prompt = _int(chat_usage.get("prompt_tokens"))
        completion = _int(chat_usage.get("completion_tokens"))
        details = chat_usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = min(_int(details.get("cached_tokens")), prompt)
    return {"input_tokens": prompt - cached, "output_tokens": completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def stop_reason(finish: Any, emitted_tool: bool) -> str:
    """§1.3: any tool_use block emitted means ``tool_use``, whatever the upstream said."""
    if emitted_tool:
        return "tool_use"
    return _FINISH.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


def stop_fields(finish: Any, emitted_tool: bool, matched: Any, stops: Collection[str]) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)``: ``stop_sequence`` when one of the client's ``stop_sequences`` ended
    the answer (no tool call), as vLLM says in the choice's non-standard ``stop_reason`` (the matched
    string; an int for a stop token), vllm-project/vllm#2976; else ``stop_reason`` and None."""
    if not emitted_tool and finish == "stop" and type(matched) is str and matched in stops:
        return "stop_sequence", matched
    return stop_reason(finish, emitted_tool), None


def tool_input(arguments: Any) -> dict:
    """Tool arguments as an object: parsed, repaired when the model wrote broken JSON, ``{}`` when hopeless."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return repair_json_object(arguments)
    return value if isinstance(value, dict) else {}


def to_message(completion: dict, model: str, names: ToolNames, stops: Collection[str] = ()) -> dict:
    """The Anthropic ``message`` for a ``chat.completion`` (choice 0); ``model`` is what the client asked for,
    ``stops`` its ``stop_sequences``."""
    choice, message = first_choice(completion)
    content: list[dict] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message_text(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    for _, call_id, name, arguments in message_calls(message, names):
        content.append({"type": "tool_use", "id": sanitize_tool_id(call_id), "name": name,
                        "input": tool_input(arguments)})
    emitted_tool = any(block["type"] == "tool_use" for block in content)
    reason, sequence = stop_fields(choice.get("finish_reason"), emitted_tool, choice.get("stop_reason"), stops)
    return {"id": new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage(completion.get("usage"))}
