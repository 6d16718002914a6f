"""chat.completion -> Anthropic message (translation.md §1.2, §1.3); the error shape is ``errors.py``'s.

Pure: dicts in, dicts out. Shared with the stream translator: ``usage``,
``stop_fields`` and ``tool_input``.
"""
from __future__ import annotations

import os
from typing import Any, Collection

import orjson

from ..completion import first_choice, message_calls, message_text, usage_count
from ..tools import ToolNames, repair_json_object, sanitize_tool_id

_FINISH = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "end_turn", "function_call": "end_turn",
           "content_filter": "end_turn"}


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def usage(chat_usage: Any) -> dict:
    """Anthropic usage from a chat ``usage`` (zeros when the upstream sent none)."""
    prompt = completion = cached = 0
    if isinstance(chat_usage, dict):
        prompt = usage_count(chat_usage.get("prompt_tokens"))
        completion = usage_count(chat_usage.get("completion_tokens"))
        details = chat_usage.get("prompt_tokens_details")
        if isinstance(details, dict):
            cached = min(usage_count(details.get("cached_tokens")), prompt)
    return {"input_tokens": prompt - cached, "output_tokens": completion,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


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
