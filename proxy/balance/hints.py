"""What a request says about its session, and the block hashes of its prompt (no tokenizer, no copies kept).

The session key comes from the client's own hints, in this order:
``x-claude-code-session-id`` (Claude Code), Anthropic ``metadata.user_id``
(its ``session_<id>`` part when it has one), Responses ``prompt_cache_key``
(Codex), OpenAI ``user`` / ``safety_identifier``, then the header
``x-session-affinity`` for any other client. Keys are hashed at once; none is
kept or logged.

The prompt is rendered as the text a model would read, in order: system (or
``instructions``), tools, then the messages (or ``input`` items, or a
completions ``prompt``): content text, tool calls and tool results; no
``cache_control``, no sampling fields, so a turn that only moves cache marks or
changes ``max_tokens`` renders the same. It is cut into fixed-size blocks of
``block-chars`` bytes of its UTF-8 form; each block's hash chains the hash of
the block before it (as vLLM's prefix cache and llm-d's approximate scorer do),
so equal hashes at block ``i`` mean equal prompts up to the end of block ``i``.
To stay within microseconds on prompts of hundreds of kilobytes, a block is
hashed from every fourth byte of it (CRC-32 over a strided copy made in one C
call): an edit that changes only bytes between the samples goes unseen and
can only cost a cache miss, never a wrong answer. The trailing partial block
is not indexed: it cannot be a prefix of a later, longer prompt's blocks.
"""
from __future__ import annotations

import zlib
from typing import Any

import orjson

from .table import stable_hash

SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity")
STRIDE = 4
MAX_BLOCKS = 4096  # blocks hashed per prompt (4 MiB at the default block size); the rest is not indexed


def session_key(body: dict, headers: dict[str, str]) -> str | None:
    """The client's session hint (see the module docstring), or None."""
    found = headers.get("x-claude-code-session-id")
    if found:
        return "cc:" + found
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        user = metadata.get("user_id")
        if isinstance(user, str) and user:
            # Claude Code: "user_<hash>_account_<uuid>_session_<uuid>" (or a JSON object naming session_id)
            at = user.rfind("session_")
            if user.startswith("{"):
                try:
                    parsed = orjson.loads(user)
                except orjson.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict) and isinstance(parsed.get("session_id"), str):
                    return "as:" + parsed["session_id"]
            return "as:" + (user[at:] if at >= 0 else user)
    for field in ("prompt_cache_key", "user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return f"{field[:2]}:{value}"
    found = headers.get("x-session-affinity")
    return "sa:" + found if found else None


def session_hash(group: str, key: str) -> int:
    return stable_hash(group + "\x00" + key)


def render(body: dict) -> bytes:
    """The prompt as the model reads it (see the module docstring), UTF-8."""
    parts: list[str] = []
    add = parts.append
    for field in ("system", "instructions"):
        value = body.get(field)
        if value:
            _text(value, add)
    tools = body.get("tools")
    if tools:
        add(orjson.dumps(tools).decode())
    for field in ("messages", "input", "prompt"):
        value = body.get(field)
        if value:
            _text(value, add)
    return "\x1e".join(parts).encode("utf-8", "surrogatepass")


_TEXT_KEYS = frozenset(("content", "text", "output", "input", "arguments", "name", "tool_calls", "function",
                        "refusal", "reasoning_content"))
_OBJECT_KEYS = frozenset(("input", "arguments"))  # a tool call's arguments: any keys, rendered as JSON


def _text(node: Any, add) -> None:
    """Append the text a model sees in ``node`` (strings, content parts, tool calls and results)."""
    if type(node) is str:
        add(node)
    elif type(node) is list:
        for item in node:
            if type(item) is dict:
                content = item.get("content")
                if type(content) is str and len(item) <= 2:  # {"role", "content"}: most of a history
                    add(content)
                    continue
            _text(item, add)
    elif type(node) is dict:
        for key, value in node.items():
            if key in _TEXT_KEYS and value:
                if type(value) is dict and key in _OBJECT_KEYS:
                    add(orjson.dumps(value).decode())
                elif isinstance(value, (str, list, dict)):
                    _text(value, add)
                else:
                    add(str(value))


def block_hashes(data: bytes, block: int) -> list[int]:
    """Chained 64-bit hashes of the full ``block``-byte blocks of ``data`` (never 0)."""
    count = min(len(data) // block, MAX_BLOCKS)
    if not count:
        return []
    sample = memoryview(data[:count * block:STRIDE])
    step = block // STRIDE
    out = []
    add = out.append
    crc32 = zlib.crc32
    crc = 0
    for number, start in enumerate(range(0, count * step, step), 1):
        crc = crc32(sample[start:start + step], crc)
        add(crc | number << 32)
    return out
