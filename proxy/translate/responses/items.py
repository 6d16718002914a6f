"""Turn Responses ``input`` items into chat messages in an order strict chat templates accept.

``Turn`` holds the conversation as it is built: the leading system text,
the messages, the calls still waiting for their outputs (user or assistant
messages arriving meanwhile are deferred until the outputs are in, like CPA's
``deferredMessages``, so tool messages stay right after their call), and
reasoning waiting for the assistant message it belongs to.

Merging is linear in the input: the contents of consecutive messages merged
into one are collected (``_Merged``) and joined once, in ``finish``; joining
at every merge copied all that was merged so far again (a 9 MB input of
short user items took seconds of CPU).
"""
from __future__ import annotations

from typing import Any

import orjson

from ...errors import BadRequest
from .toolmap import ToolMap

# Items a chat upstream cannot use (built-in tool calls, server-side references): dropped.
DROPPED_ITEMS = frozenset((
    "local_shell_call", "local_shell_call_output", "web_search_call", "image_generation_call",
    "file_search_call", "computer_call", "computer_call_output", "code_interpreter_call", "mcp_call",
    "mcp_list_tools", "mcp_approval_request", "mcp_approval_response", "item_reference", "compaction",
    "compaction_summary", "tool_search_call", "tool_search_output", "shell_call", "shell_call_output",
    "apply_patch_call", "apply_patch_call_output", "agent_message", "ghost_snapshot",
))
TEXT_PARTS = frozenset(("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"))
DROPPED_PARTS = frozenset(("input_file", "input_audio"))
ROLES = frozenset(("user", "assistant", "system", "developer"))


class Turn:
    __slots__ = ("toolmap", "system", "stored_system", "leading", "messages", "deferred", "pending", "reasoning")

    def __init__(self, toolmap: ToolMap) -> None:
        self.toolmap = toolmap
        self.system: list[str] = []
        self.stored_system: str | None = None
        self.leading = True              # no user/assistant/tool item seen yet: system text still leads
        self.messages: list[dict] = []
        self.deferred: list[dict] = []
        self.pending: set[str] = set()   # call ids without an output yet
        self.reasoning: list[str] = []

    # -- setup ------------------------------------------------------------------
    def replay(self, system: Any, messages: list[dict]) -> None:
        """Start from a stored turn: its messages are a prefix of this request's."""
        self.stored_system = system if isinstance(system, str) else None
        self.messages = list(messages)
        self.leading = not messages
        last = messages[-1] if messages else None
        if last and last.get("role") == "assistant":
            self.pending = {call["id"] for call in last.get("tool_calls") or ()}

    def instructions(self, text: str | None) -> None:
        if text and text.strip():
            self.system.append(text)

    def system_text(self) -> str | None:
        """This request's system text; without any, the stored turn's.

        The Responses API does not carry ``instructions`` over a
        ``previous_response_id``, so new system text replaces the stored one.
        """
        return "\n\n".join(self.system) if self.system else self.stored_system

    # -- items --------------------------------------------------------------------
    def message(self, role: str, content: str | list) -> None:
        if role in ("system", "developer"):
            if self.leading:
                text = content if isinstance(content, str) else "\n".join(
                    p["text"] for p in content if p.get("type") == "text")
                if text.strip():
                    self.system.append(text)
                return
            role = "user"  # a later system/developer message: strict templates reject it anywhere but first
        self.leading = False
        if role == "assistant":
            self._assistant_text(content if isinstance(content, str) else "")
        else:
            self.reasoning.clear()  # reasoning belongs to the assistant turn it preceded; none follows
            self._emit({"role": "user", "content": content})

    def add_reasoning(self, text: str) -> None:
        if text:
            self.reasoning.append(text)

    def call(self, call_id: str, name: str, arguments: str) -> None:
        self.leading = False
        last = self.messages[-1] if self.messages else None
        if last is None or last.get("role") != "assistant":
            last = {"role": "assistant", "content": ""}
            self.messages.append(last)
        last.setdefault("tool_calls", []).append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        self._take_reasoning(last)
        self.pending.add(call_id)

    def output(self, call_id: str, content: str) -> None:
        self.leading = False
        self.messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        self.pending.discard(call_id)
        if not self.pending:
            self._flush()

    def finish(self) -> list[dict]:
        self._flush()
        for message in self.messages:
            for key in ("content", "reasoning_content"):
                if type(message.get(key)) is _Merged:
                    message[key] = message[key].value()
        return self.messages

    # -- helpers --------------------------------------------------------------------
    def _assistant_text(self, text: str) -> None:
        target = self.deferred if self.pending else self.messages
        last = target[-1] if target else None
        if last is not None and last.get("role") == "assistant" and "tool_calls" not in last:
            if text:
                _merge(last, "content", text, skip_empty=True)
        else:
            last = {"role": "assistant", "content": text}
            target.append(last)
        self._take_reasoning(last)

    def _emit(self, message: dict) -> None:
        target = self.deferred if self.pending else self.messages
        last = target[-1] if target else None
        if last is not None and last.get("role") == "user" == message["role"]:
            _merge(last, "content", message["content"])  # templates that want alternation
        else:
            target.append(message)

    def _flush(self) -> None:
        deferred, self.deferred = self.deferred, []
        for message in deferred:
            if message["role"] == "assistant":
                self.messages.append(message)
            else:
                self._emit(message)

    def _take_reasoning(self, message: dict) -> None:
        if self.reasoning:
            _merge(message, "reasoning_content", "\n\n".join(self.reasoning), skip_empty=True)
            self.reasoning.clear()


def read_items(value: Any, turn: Turn) -> list:
    """Feed the body's ``input`` to ``turn``; returns tools declared by ``additional_tools`` items."""
    if isinstance(value, str):
        turn.message("user", value)
        return []
    if value is None:
        raise BadRequest("Missing required parameter: 'input'.", param="input")
    if not isinstance(value, list):
        raise BadRequest("input must be a string or an array of items", param="input")
    extra_tools: list = []
    toolmap = turn.toolmap
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            raise BadRequest(f"{where} needs a string `type`", param=f"{where}.type")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise BadRequest(f"{where}.role must be one of user, assistant, system, developer",
                                 param=f"{where}.role")
            turn.message(role, _content(item.get("content"), f"{where}.content", role))
        elif kind == "reasoning":
            turn.add_reasoning(_reasoning_text(item))
        elif kind in ("function_call", "custom_tool_call"):
            call_id = _string(item, "call_id", where)
            namespace = item.get("namespace")
            if namespace is not None and not isinstance(namespace, str):
                raise BadRequest(f"{where}.namespace must be a string", param=f"{where}.namespace")
            name = toolmap.upstream(_string(item, "name", where), namespace)
            if kind == "custom_tool_call":
                raw = item.get("input")
                arguments = orjson.dumps({"input": raw if isinstance(raw, str) else ""}).decode()
            else:
                raw = item.get("arguments")
                arguments = raw if isinstance(raw, str) else _json_text(raw, f"{where}.arguments")
            turn.call(call_id, name, arguments)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            turn.output(_string(item, "call_id", where), _output_text(item.get("output"), f"{where}.output"))
        elif kind == "additional_tools":
            tools = item.get("tools")
            if not isinstance(tools, list):
                raise BadRequest(f"{where}.tools must be an array", param=f"{where}.tools")
            extra_tools += tools
        elif kind not in DROPPED_ITEMS:
            raise BadRequest(f"{where}.type {loggable_type(kind)} is not a supported input item type",
                             param=f"{where}.type")
    return extra_tools


def _content(content: Any, where: str, role: str) -> str | list:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts", param=where)
    texts: list[str] = []
    parts: list[dict] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise BadRequest(f"{where}[{j}] must be an object with a string `type`", param=f"{where}[{j}].type")
        if kind in TEXT_PARTS:
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise BadRequest(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
            texts.append(text)
            parts.append({"type": "text", "text": text})
        elif kind == "input_image":
            url = part.get("image_url")
            if isinstance(url, str) and url and role == "user":
                detail = part.get("detail")
                image = {"url": url}
                if detail in ("low", "high", "auto", "original"):
                    image["detail"] = "high" if detail == "original" else detail  # chat has no "original"
                parts.append({"type": "image_url", "image_url": image})
        elif kind not in DROPPED_PARTS:
            raise BadRequest(f"{where}[{j}].type {loggable_type(kind)} is not a supported content part",
                             param=f"{where}[{j}].type")
    if len(parts) == len(texts):
        return "\n".join(texts)  # a plain string: many chat templates concatenate content as text
    return parts


def loggable_type(kind: str) -> str:
    """A client's type name quoted for an error message, bounded (it is echoed back, never logged)."""
    return repr(kind[:64] + ("..." if len(kind) > 64 else ""))


def _reasoning_text(item: dict) -> str:
    # The full reasoning (`content`) if the client kept it, else its summary; never encrypted_content.
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]
            if any(texts):
                return "\n\n".join(texts)
    return ""


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):  # content parts: a chat tool message carries text only
        texts = []
        for part in output:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("input_image", "input_file"):
                texts.append("[image omitted]" if part["type"] == "input_image" else "[file omitted]")
        return "\n".join(texts)
    if output is None:
        return ""
    raise BadRequest(f"{where} must be a string or an array of content parts", param=where)


def _json_text(value: Any, where: str) -> str:
    """Arguments a client sent as JSON instead of a string, as the string chat wants."""
    try:
        return orjson.dumps(value if value is not None else {}).decode()
    except orjson.JSONEncodeError:  # orjson reads 1024 levels but writes 254
        raise BadRequest(f"{where} nests JSON too deeply (at most 254 levels)", param=where) from None


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}.{key} must be a non-empty string", param=f"{where}.{key}")
    return value


class _Merged:
    """The contents of consecutive messages merged into one, joined once by ``Turn.finish``.

    Strings are joined with a blank line while there are only strings; from
    the first list of parts on, each string becomes a text part of its own
    (as joining them two at a time did). ``skip_empty``: empty strings are
    left out (assistant text, reasoning).
    """

    __slots__ = ("items", "skip_empty")

    def __init__(self, items: list, skip_empty: bool) -> None:
        self.items = items
        self.skip_empty = skip_empty

    def value(self) -> str | list:
        items = [item for item in self.items if item] if self.skip_empty else self.items
        first_list = next((i for i, item in enumerate(items) if not isinstance(item, str)), len(items))
        joined = "\n\n".join(items[:first_list])
        if first_list == len(items):
            return joined
        parts = [{"type": "text", "text": joined}] if first_list else []
        for item in items[first_list:]:
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
            else:
                parts += item
        return parts


def _merge(message: dict, key: str, content: str | list, skip_empty: bool = False) -> None:
    """Add ``content`` to ``message[key]``, to be joined by ``Turn.finish``."""
    have = message.get(key)
    if type(have) is _Merged:
        have.items.append(content)
    else:
        message[key] = _Merged([have, content] if have is not None else [content], skip_empty)
