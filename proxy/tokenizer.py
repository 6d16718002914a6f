"""Ask an upstream's own tokenizer how long a prompt is (``count_tokens`` with ``tokenizer: vllm | llama.cpp``).

vLLM: ``POST <server>/tokenize`` with ``{model, messages, tools?}`` answers
``{"count": N, ...}``. llama.cpp: ``POST <server>/apply-template`` with the
messages answers ``{"prompt": ...}``, then ``POST <server>/tokenize`` with
``{"content": prompt}`` answers ``{"tokens": [...]}``. ``<server>`` is the
base-url without its ``/v1``.

A count is a nicety, never a reason to fail: a short timeout, any failure
gives ``None`` (the caller estimates), and a tokenizer that failed is left
alone for ``BACKOFF`` seconds so a burst of calls (the VS Code extension
sends 40-50 at startup) does not wait on a dead endpoint each time. Key
cooldowns and model state are never touched. Answers are cached per
(provider, model, body hash) in a small per-worker LRU.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict

import orjson

from . import upstream
from .config.model import KeyEntry, Timeouts
from .errors import ProxyError
from .routing import Target

log = logging.getLogger(__name__)
TIMEOUTS = Timeouts(connect=2.0, read=2.0)
CACHE_SIZE = 512
BACKOFF = 30.0
ANSWER_LIMIT = 16 * 1024 * 1024  # llama.cpp lists every token id

_cache: OrderedDict[tuple, int] = OrderedDict()
_failed: dict[str, float] = {}  # provider -> when its tokenizer may be asked again
_lock = threading.Lock()


def count(sessions: upstream.Sessions, target: Target, chat: dict) -> int | None:
    """Prompt tokens of a chat body (``messages``, ``tools``) by the target's tokenizer, or ``None``."""
    provider = target.provider
    if _failed.get(provider.name, 0.0) > time.monotonic():
        return None
    request = {"model": target.model, "messages": chat["messages"]}
    if chat.get("tools"):
        request["tools"] = chat["tools"]
    body = orjson.dumps(request)
    key = (provider.name, target.model, provider.tokenizer, hashlib.sha256(body).digest())
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    server = provider.base_url[:-3] if provider.base_url.endswith("/v1") else provider.base_url
    entry = provider.api_key_entries[0] if provider.api_key_entries else KeyEntry("")
    try:
        if provider.tokenizer == "vllm":
            answer = _post(sessions, target, server + "/tokenize", body, entry)
            tokens = answer.get("count")
        else:
            prompt = _post(sessions, target, server + "/apply-template", body, entry).get("prompt")
            if not isinstance(prompt, str):
                raise ValueError("apply-template answered without a prompt")
            answer = _post(sessions, target, server + "/tokenize", orjson.dumps({"content": prompt}), entry)
            tokens = answer.get("tokens")
            tokens = len(tokens) if isinstance(tokens, list) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError("tokenizer answered without a count")
    except (ProxyError, ValueError, orjson.JSONDecodeError) as exc:
        log.warning("provider %s: tokenizer (%s) failed, estimating instead: %s",
                    provider.name, provider.tokenizer, type(exc).__name__)
        _failed[provider.name] = time.monotonic() + BACKOFF
        return None
    with _lock:
        _cache[key] = tokens
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return tokens


def _post(sessions: upstream.Sessions, target: Target, url: str, body: bytes, entry: KeyEntry) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
    headers.update(target.provider.headers)
    if entry.api_key:
        headers["Authorization"] = f"Bearer {entry.api_key}"
    response = upstream.post(sessions, target.provider, url, body, headers, entry, TIMEOUTS)
    try:
        status = response.status
        data = upstream.read_body(response, b"", ANSWER_LIMIT)
    finally:
        response.close()
    if status != 200:
        raise ValueError(f"tokenizer answered HTTP {status}")
    answer = orjson.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("tokenizer answer is not an object")
    return answer
