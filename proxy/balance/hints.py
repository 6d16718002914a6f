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
``block-chars`` characters. A block's key is the CRC-32 of its text with its
position (``Blocks.key``), as llm-d's approximate scorer keys blocks of
characters; unlike vLLM's prefix cache the keys are not chained through every
earlier block, so a request hashes only the blocks it looks at: the dozen or
so a binary search for the longest run the index holds probes, and the new
blocks a replica is sent (the tail a conversation added since its last
turn), not the whole prompt every time. Two prompts that differ only inside
blocks the search skipped are taken as sharing them: that can cost a cache
miss, never a wrong answer. The trailing partial block is not indexed: it
cannot be a prefix of a later, longer prompt's blocks.
"""
from __future__ import annotations

import operator
import zlib
from bisect import bisect_right
from typing import Any

import orjson

from .table import stable_hash

SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity")
MAX_BLOCKS = 4096  # blocks indexed per prompt (8 M characters at the default block size); the rest is not


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


def render(body: dict) -> tuple[list[str], int]:
    """The prompt as the model reads it (see the module docstring): its parts, read joined by U+001E, and
    their characters (separators not counted)."""
    parts: list[str] = []
    add = parts.append
    for field in ("system", "instructions"):
        value = body.get(field)
        if value:
            _text(value, add)
    tools = body.get("tools")
    if tools:
        add(orjson.dumps(tools).decode())
    chars, counted = 0, []  # characters of plain histories, and where their parts are
    for field in ("messages", "input", "prompt"):
        value = body.get(field)
        if value:
            if type(value) is list:
                start = len(parts)
                found = _plain(value, parts)
                if found >= 0:
                    chars += found
                    counted.append((start, len(parts)))
                    continue
            _text(value, add)
    at = 0
    for start, end in counted:
        chars += sum(map(len, parts[at:start]))
        at = end
    return parts, chars + sum(map(len, parts[at:]))


_CONTENT = operator.itemgetter("content")
_LENGTH = str.__len__  # TypeError for anything but a string


def _plain(messages: list, parts: list[str]) -> int:
    """A history of ``{"role", "content": str}`` messages only (most of a chat history), rendered in a few C
    calls exactly as ``_text`` renders it message by message: its characters; -1 (nothing added) for any
    other shape."""
    try:
        if max(map(len, messages)) > 2:
            return -1
        contents = list(map(_CONTENT, messages))
        chars = sum(map(_LENGTH, contents))
    except (TypeError, KeyError, IndexError):
        return -1
    parts += contents
    return chars


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


class Blocks:
    """The full ``size``-character blocks of a rendered prompt, each keyed when first asked for.

    The prompt is its parts joined by U+001E, but never joined here (a
    history of a few hundred kilobytes would be copied on every request): a
    block is cut from the parts it spans, found from where each part starts,
    worked out from the end back only as far as a block asked for needs (the
    blocks looked at are mostly the last few).
    """

    __slots__ = ("parts", "size", "length", "count", "_keys", "_starts", "_from")

    def __init__(self, parts: list[str], chars: int, size: int) -> None:
        """``parts`` as ``render`` returns them, ``chars`` their characters."""
        self.parts, self.size = parts, size
        self.length = chars + len(parts) - 1 if parts else 0
        self.count = min(self.length // size, MAX_BLOCKS)
        self._keys = [0] * self.count
        self._starts = [0] * len(parts) + [self.length + 1]  # where part j starts, known for j >= _from
        self._from = len(parts)

    def _part(self, position: int) -> int:
        """The part holding ``position`` of the joined text (a separator belongs to the part before it)."""
        starts, at = self._starts, self._from
        if starts[at] <= position:
            return bisect_right(starts, position, at) - 1
        parts = self.parts
        while starts[at] > position:
            at -= 1
            starts[at] = starts[at + 1] - len(parts[at]) - 1
        self._from = at
        return at

    def text(self, index: int) -> str:
        """Block ``index``'s characters."""
        parts, starts, size = self.parts, self._starts, self.size
        begin = index * size
        last = self._part(begin + size - 1)  # the end first: the walk back then covers the beginning too
        first = self._part(begin)
        if first == last:
            text = parts[first][begin - starts[first]:begin + size - starts[first]]
        else:
            text = "\x1e".join([parts[first][begin - starts[first]:], *parts[first + 1:last],
                                 parts[last][:begin + size - starts[last]]])
        return text if len(text) == size else text + "\x1e"  # it ends with the separator after a part

    def key(self, index: int) -> int:
        """Block ``index``'s key (never 0): the CRC-32 of its UTF-8 text, and its position above it."""
        found = self._keys[index]
        if not found:
            data = self.text(index).encode("utf-8", "surrogatepass")
            found = self._keys[index] = zlib.crc32(data) | (index + 1) << 32
        return found

    def keys_from(self, start: int) -> list[int]:
        """The keys of blocks ``start`` to the last; many at once are cut from the parts they span joined
        once (the first turn of a conversation enters all its blocks)."""
        if self.count - start < 8:
            return [self.key(index) for index in range(start, self.count)]
        size, keys, crc32 = self.size, self._keys, zlib.crc32
        first = self._part(start * size)
        text = "\x1e".join(self.parts[first:])
        offset = start * size - self._starts[first]
        if text.isascii():
            # a character is a byte: encoded once, each block's CRC read from a view of its bytes (no copies)
            data = memoryview(text.encode("ascii"))
            for index in range(start, self.count):
                if not keys[index]:
                    keys[index] = crc32(data[offset:offset + size]) | (index + 1) << 32
                offset += size
            return keys[start:]
        for index in range(start, self.count):
            if not keys[index]:
                data = text[offset:offset + size].encode("utf-8", "surrogatepass")
                keys[index] = crc32(data) | (index + 1) << 32
            offset += size
        return keys[start:]
