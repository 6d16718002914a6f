"""Check an Anthropic Messages body before it is translated: ``BadRequest`` naming the field, or nothing.

Pure. The messages follow Anthropic's wording (``max_tokens: Field
required``) so SDK users see what Anthropic would say. Unknown content block
types are refused; the block types only Anthropic's servers produce (server
tool calls and their results) are accepted here and dropped by ``request``.
"""
from __future__ import annotations

from typing import Any

from ...errors import BadRequest
from ..values import is_int, is_number

# Block types a client may send. Server-side ones (web search results, code
# execution, MCP) only mean something to Anthropic's servers: accepted, dropped.
CLIENT_BLOCKS = frozenset(("text", "image", "document", "tool_use", "tool_result", "thinking",
                           "redacted_thinking", "search_result"))
SERVER_BLOCKS = frozenset(("server_tool_use", "web_search_tool_result", "web_fetch_tool_result",
                           "code_execution_tool_result", "bash_code_execution_tool_result",
                           "text_editor_code_execution_tool_result", "mcp_tool_use", "mcp_tool_result",
                           "container_upload", "tool_search_tool_result", "tool_reference"))
KNOWN_BLOCKS = CLIENT_BLOCKS | SERVER_BLOCKS
ROLES = ("user", "assistant", "system")


def _fail(message: str, param: str | None = None) -> BadRequest:
    return BadRequest(message, param=param)


def validate(body: dict, need_max_tokens: bool = True) -> None:
    """Raise ``BadRequest`` (Anthropic's wording where it has one) for a body Anthropic would refuse.

    ``count_tokens`` bodies have no ``max_tokens`` (``need_max_tokens=False``).
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("model: Field required" if model is None else "model: Input should be a valid string", "model")
    if need_max_tokens and "max_tokens" not in body:
        raise _fail("max_tokens: Field required", "max_tokens")
    if "max_tokens" in body and (not is_int(body["max_tokens"]) or body["max_tokens"] < 1):
        raise _fail("max_tokens: Input should be an integer greater than or equal to 1", "max_tokens")
    messages = body.get("messages")
    if messages is None:
        raise _fail("messages: Field required", "messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages: Input should be a non-empty list", "messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise _fail(f"{where}: Input should be an object", "messages")
        if message.get("role") not in ROLES:
            raise _fail(f"{where}.role: Input should be 'user' or 'assistant'", "messages")
        _check_content(message.get("content"), f"{where}.content")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        _check_blocks(system, "system")
    for name, check in (("stream", lambda v: isinstance(v, bool)), ("temperature", is_number),
                        ("top_p", is_number), ("top_k", is_int),
                        ("stop_sequences", lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v)),
                        ("metadata", lambda v: isinstance(v, dict)), ("thinking", lambda v: isinstance(v, dict)),
                        ("tool_choice", lambda v: isinstance(v, dict) and isinstance(v.get("type"), str))):
        if body.get(name) is not None and not check(body[name]):
            raise _fail(f"{name}: Input has the wrong type", name)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _fail("tools: Input should be a valid list", "tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
                raise _fail(f"tools.{i}.name: Field required", "tools")
            schema = tool.get("input_schema")
            if schema is not None and not isinstance(schema, dict):
                raise _fail(f"tools.{i}.input_schema: Input should be an object", "tools")


def _check_content(content: Any, where: str) -> None:
    if isinstance(content, str):
        return
    if content is None:
        raise _fail(f"{where}: Field required", "messages")
    _check_blocks(content, where)


def _check_blocks(blocks: Any, where: str) -> None:
    if not isinstance(blocks, list):
        raise _fail(f"{where}: Input should be a valid string or list of content blocks", "messages")
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise _fail(f"{where}.{j}: Input should be an object", "messages")
        kind = block.get("type")
        if not isinstance(kind, str):  # a list or an object is no type name (nor hashable)
            raise _fail(f"{where}.{j}.type: Input should be a valid string", "messages")
        if kind not in KNOWN_BLOCKS:
            raise _fail(f"{where}.{j}.type: unknown content block type {kind[:40]!r}", "messages")
        if kind == "text" and not isinstance(block.get("text"), str):
            raise _fail(f"{where}.{j}.text: Input should be a valid string", "messages")
