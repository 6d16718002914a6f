"""The first choice of an upstream ``chat.completion``, checked before a bridge translates it.

A bridge has to understand a JSON answer to translate it. An answer that is
JSON but not a chat completion (no choices, a choice or message that is no
object, content that is a number, tool calls that are no list) is the
upstream's fault: a 502 naming the field, never an empty answer sent as a 200.
Pure; both bridges' non-stream translations call ``first_choice``.
"""
from __future__ import annotations

from typing import Any

from ..errors import StreamError

_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def first_choice(completion: Any) -> tuple[dict, dict]:
    """``(choice, message)`` of choice 0, or ``StreamError`` (502 ``upstream_bad_answer``) naming what is wrong."""
    if not isinstance(completion, dict):
        raise _bad("the answer is not a JSON object")
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _bad("choices is not a non-empty list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _bad("choices[0] is not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _bad("choices[0].message is not an object")
    for name in _TEXT_FIELDS:
        value = message.get(name)
        if value is not None and not isinstance(value, (str, list)):
            raise _bad(f"choices[0].message.{name} is neither text nor a list of parts")
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise _bad("choices[0].message.tool_calls is not a list")
        for i, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise _bad(f"choices[0].message.tool_calls[{i}].function is not an object")
            if not isinstance(function.get("name"), (str, type(None))):
                raise _bad(f"choices[0].message.tool_calls[{i}].function.name is not a string")
    finish = choice.get("finish_reason")
    if finish is not None and not isinstance(finish, str):
        raise _bad("choices[0].finish_reason is not a string")
    usage = completion.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise _bad("usage is not an object")
    return choice, message


def _bad(what: str) -> StreamError:
    return StreamError(f"upstream answer is not a chat completion: {what}", code="upstream_bad_answer")
