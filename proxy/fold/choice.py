"""What one choice of a chat stream accumulates, and the ``choices[i]`` it renders to.

Plain state holders for ``chat.ChatFold`` (``__slots__``: one per choice of
every folded stream; its tool calls are the one assembler's, ``tool_calls.py``).
Text arrives in fragments kept in lists and joined once, when the answer is
rendered.
"""
from __future__ import annotations

from typing import Any

from .tool_calls import ToolCalls


class Choice:
    """What one choice ``index`` has accumulated so far."""

    __slots__ = ("role", "content", "texts", "refusal", "tools", "finish", "logprobs", "extra",
                 "message_extra", "audio")

    def __init__(self) -> None:
        self.role = None
        self.content: list[str] = []
        self.texts: dict[str, list[str]] = {}  # reasoning_content / reasoning, as the upstream named it
        self.refusal: list[str] | None = None
        self.tools: ToolCalls | None = None  # tool calls and the legacy function_call, once one arrives
        self.finish = None
        self.logprobs: dict[str, list | None] | None = None
        self.extra: dict[str, Any] = {}
        self.message_extra: dict[str, Any] = {}
        self.audio: tuple[dict[str, list[str]], dict[str, Any]] | None = None  # (text parts, other fields)


def render_choice(index: int, state: Choice) -> dict:
    """The ``choices[i]`` of the answer: message, logprobs, finish_reason and unknown fields."""
    # refusal is a required nullable field of the schema: present even when none was streamed
    message: dict[str, Any] = {"role": state.role or "assistant",
                               "content": "".join(state.content) or None,
                               "refusal": "".join(state.refusal) or None if state.refusal else None}
    for name, parts in state.texts.items():
        message[name] = "".join(parts) or None
    if state.audio is not None:
        texts, other = state.audio
        message["audio"] = {**other, **{key: "".join(parts) for key, parts in texts.items()}}
    tools = state.tools
    calls = legacy = None
    if tools is not None:
        calls, legacy = tools.calls, tools.function_call
        if calls:
            message["tool_calls"] = [calls[i].render() for i in sorted(calls)]
        if legacy is not None:
            message["function_call"] = {"name": legacy.name, "arguments": legacy.arguments}
    for key, value in state.message_extra.items():
        message.setdefault(key, value)
    finish = state.finish
    if finish is None:
        # The SPEC's rule: a choice that only called tools finished with tool_calls, not stop.
        finish = "tool_calls" if calls else "function_call" if legacy is not None else "stop"
    choice = {"index": index, "message": message, "logprobs": state.logprobs, "finish_reason": finish}
    for key, value in state.extra.items():
        choice.setdefault(key, value)
    return choice
