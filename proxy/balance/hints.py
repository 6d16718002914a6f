"""What a request says about its session, and the block hashes of its body (no tokenizer, no copies kept).

The session key comes from the client's own hints, in this order:
``x-claude-code-session-id`` (Claude Code), Anthropic ``metadata.user_id``
(its ``session_<id>`` part when it has one), Responses ``prompt_cache_key``
(Codex), OpenAI ``user`` / ``safety_identifier``, then the header
``x-session-affinity`` for any other client. Keys are hashed at once; none is
kept or logged.

The prompt is the request body exactly as the client sent it, as bytes: a
client serialises a conversation the same way on every turn, so a next turn's
body starts with the bytes of the last one up to where the new messages (or
moved cache marks) begin, and conversations sharing a system prompt sent as
their first message share the bytes of it. Nothing is parsed, rendered or
copied for it: the body's history, from where the body names it to where it
names the field after it (``history_span``), is cut into fixed-size blocks of
``block-chars`` bytes, and a block's key is the CRC-32 of its bytes with its position
(``Blocks.key``), llm-d's approximate scorer keying blocks of the rendered
prompt, done on the bytes the proxy already holds. Unlike vLLM's prefix cache
the keys are not chained through every earlier block, so a request hashes
only the blocks it looks at: the few a search for the longest run the index
holds probes, and the new blocks a replica is sent (the tail a conversation
added since its last turn), not the whole prompt every time. Two prompts that
differ only inside blocks the search skipped are taken as sharing them:
that can cost a cache miss, never a wrong answer. The
trailing partial block is not indexed: it cannot be a prefix of a later,
longer prompt's blocks. The bodies of different protocols (a chat and an
Anthropic client on one replica set) never match each other.
"""
from __future__ import annotations

import zlib

import orjson

from .table import stable_hash

SESSION_HEADERS = ("x-claude-code-session-id", "x-session-affinity")
MAX_BLOCKS = 4096  # blocks indexed per prompt (8 MB at the default block size); the rest is not


_BODY_HINTS = frozenset(("metadata", "prompt_cache_key", "user", "safety_identifier"))


def session_key(body: dict, headers: dict[str, str]) -> str | None:
    """The client's session hint (see the module docstring), or None."""
    found = headers.get("x-claude-code-session-id")
    if found:
        return "cc:" + found
    if not _BODY_HINTS.isdisjoint(body):  # (most bodies have none of these: one look at the body's names)
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


_HASHED: dict[str, int] = {}  # recent sessions' hashes (a session's every turn hashes the same key)


def session_hash(group: str, key: str, tenant: str = "") -> int:
    """The session's hash: its key's within the replica set and the client key's identity (two tenants sending
    one hint are two sessions)."""
    text = group + "\x00" + tenant + "\x00" + key
    found = _HASHED.get(text)
    if found is None:
        found = stable_hash(text)
        if len(text) <= 256:  # (bounded: at most 4,096 keys of at most 256 characters)
            if len(_HASHED) >= 4096:
                _HASHED.clear()
            _HASHED[text] = found
    return found


# the field a body's conversation is in (chat and Anthropic, Responses, Gemini, completions), as a client names it
HISTORIES = {name: b'"%s"' % name.encode() for name in ("messages", "input", "contents", "prompt")}


_ENDS: dict[tuple[bytes, str], int] = {}  # (a body's last bytes, the field after its history) -> that field's name,
_TAIL = 64                                # counted back from the end; at most _MAX_ENDS of them
_MAX_ENDS = 1024


def history_span(body: dict, raw: bytes) -> tuple[int, int]:
    """Where the history of ``body`` starts and ends in ``raw`` (``body`` as sent), about: what a client sends
    before it (``max_tokens``, ``model``, ...) and after it (the OpenAI SDK its ``tools``, the Anthropic SDK
    its ``system`` and ``tools``, sampling fields) is no part of the conversation's growing prefix, may change
    from turn to turn, and ends the bodies of every conversation of one client alike. The start is where the
    history's name is, the end where the name of the field after it is (found back from how long those
    fields are when serialised again, the only cost that grows with their size: a client ends every
    request alike, so where that name was in a body ending in the same bytes is remembered and, found there
    again, taken)."""
    at = 0
    for name in body:
        needle = HISTORIES.get(name)
        if needle is not None:
            start = raw.find(needle)
            if start < 0:
                start = 0
            if at + 1 == len(body):
                return start, len(raw)
            later = list(body)[at + 1:]
            needle = b'"%s"' % later[0].encode("utf-8", "surrogatepass")
            tail = (raw[-_TAIL:], later[0])
            back = _ENDS.get(tail)
            if back is not None and raw.startswith(needle, len(raw) - back) and len(raw) - back > start:
                return start, len(raw) - back
            # the client's bytes of those fields are at least as many as orjson's (no spaces, UTF-8 as is), so
            # their first name is at most that far from the end: the last time it is named up to there
            try:
                end = len(raw) - len(orjson.dumps({field: body[field] for field in later}))
            except orjson.JSONEncodeError:  # nested past orjson's 254 levels (it reads 1,024): to the end
                return start, len(raw)
            found = raw.rfind(needle, start, end + len(needle) + 1)
            if found <= start:
                return start, max(start, end)
            if len(needle) <= _TAIL:  # (bounded: a name is the client's, up to a whole body long)
                if len(_ENDS) >= _MAX_ENDS:
                    _ENDS.clear()
                _ENDS[tail] = len(raw) - found
            return start, found
        at += 1
    return 0, len(raw)


class Blocks:
    """The full ``size``-byte blocks of a request body as the client sent it, each keyed when first asked for.

    A block's key is the CRC-32 of its bytes with its position above it;
    only the blocks a search probes or a replica is sent are keyed. The body
    is kept as it came (no copy) until the blocks are entered.
    """

    __slots__ = ("data", "start", "size", "seed", "length", "count", "_keys")

    def __init__(self, data: bytes, size: int, start: int = 0, end: int | None = None, seed: int = 0) -> None:
        """The blocks of ``data[start:end]``, keyed from ``seed`` (the replica set's and the tenant's: one's
        prompts never match another's)."""
        self.data, self.start, self.size, self.seed = data, start, size, seed
        self.length = (len(data) if end is None else end) - start
        count = self.length // size
        self.count = count if count < MAX_BLOCKS else MAX_BLOCKS
        self._keys: dict[int, int] = {}

    def key(self, index: int) -> int:
        """Block ``index``'s key (never 0): the CRC-32 of its bytes, and its position above it."""
        found = self._keys.get(index)
        if found is None:
            at = self.start + index * self.size
            found = self._keys[index] = zlib.crc32(self.data[at:at + self.size], self.seed) | (index + 1) << 32
        return found

    def keys_from(self, start: int) -> list[int]:
        """The keys of blocks ``start`` to the last."""
        key = self.key
        return [key(index) for index in range(start, self.count)]
