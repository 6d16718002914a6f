"""What one choice of a chat stream accumulates, and the ``choices[i]`` it renders to.

Plain state holders for ``chat.ChatFold`` (``__slots__``: one per choice and
tool call of every folded stream). Text arrives in fragments kept in lists
and joined once, when the answer is rendered.
"""
from __future__ import annotations

from typing import Any


class ToolCall:
    """One tool call (or legacy function_call) of a choice, merged over its deltas."""

    __slots__ = ("id", "type", "name", "args", "extra")

    def __init__(self) -> None:
        self.id = None
        self.type = None
        self.name = None
        self.args: list[str] = []
        self.extra: dict[str, Any] = {}

    def render(self) -> dict:
        out = {} if self.id is None else {"id": self.id}
        out["type"] = self.type or "function"
        out["function"] = {"name": self.name, "arguments": "".join(self.args)}
        out.update(self.extra)
        return out


class Choice:
    """What one choice ``index`` has accumulated so far."""

    __slots__ = ("role", "content", "texts", "refusal", "calls", "last_call", "function_call",
                 "finish", "logprobs", "extra", "message_extra", "audio")

    def __init__(self) -> None:
        self.role = None
        self.content: list[str] = []
        self.texts: dict[str, list[str]] = {}  # reasoning_content / reasoning, as the upstream named it
        self.refusal: list[str] | None = None
        self.calls: dict[int, ToolCall] = {}
        self.last_call: ToolCall | None = None
        self.function_call: ToolCall | None = None
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
    if state.calls:
        message["tool_calls"] = [state.calls[i].render() for i in sorted(state.calls)]
    if state.function_call is not None:
        call = state.function_call
        message["function_call"] = {"name": call.name, "arguments": "".join(call.args)}
    for key, value in state.message_extra.items():
        message.setdefault(key, value)
    finish = state.finish
    if finish is None:
        # The SPEC's rule: a choice that only called tools finished with tool_calls, not stop.
        finish = "tool_calls" if state.calls else "function_call" if state.function_call else "stop"
    choice = {"index": index, "message": message, "logprobs": state.logprobs, "finish_reason": finish}
    for key, value in state.extra.items():
        choice.setdefault(key, value)
    return choice
