"""The ``fleet:`` settings block and a provider's ``base-urls`` (validated like the rest of the file)."""
from __future__ import annotations

from typing import Any

from ..config.model import BALANCE_POLICIES, Fleet

FLEET_KEYS = {"balance", "aliases", "cache-threshold", "balance-abs-threshold", "balance-rel-threshold",
              "block-chars", "max-sessions", "max-prefix-blocks", "session-ttl"}
MAX_REPLICAS = 64  # base-urls of one provider (a replica set is at most this wide: see table.py)


def fleet_settings(v, node: Any, path: str) -> Fleet:
    """``fleet:`` -> ``Fleet``; ``v`` is the file's ``Validator`` (problems are recorded, not raised)."""
    mapping = v.mapping(node, path)
    v.unknown(mapping, path, FLEET_KEYS)
    aliases = []
    for name, policy in v.mapping(mapping.get("aliases"), f"{path}.aliases").items():
        if not isinstance(name, str) or not name:
            v.problem(f"{path}.aliases", "names must be non-empty strings")
        elif policy not in BALANCE_POLICIES:
            v.problem(f"{path}.aliases.{name}", f"must be one of {', '.join(BALANCE_POLICIES)}")
        else:
            aliases.append((name, policy))
    return Fleet(
        balance=v.choice(mapping, path, "balance", "cache-aware", BALANCE_POLICIES),
        aliases=tuple(aliases),
        cache_threshold=_share(v, mapping, path, "cache-threshold", 0.3),
        balance_abs_threshold=v.integer(mapping, path, "balance-abs-threshold", 64, minimum=0),
        balance_rel_threshold=v.number(mapping, path, "balance-rel-threshold", 1.5, minimum=1.0),
        block_chars=v.integer(mapping, path, "block-chars", 2048, minimum=16),
        max_sessions=v.integer(mapping, path, "max-sessions", 65536, minimum=64),
        max_prefix_blocks=v.integer(mapping, path, "max-prefix-blocks", 262144, minimum=64),
        session_ttl=v.number(mapping, path, "session-ttl", 3600.0, 0, exclusive=True),
    )


def _share(v, mapping: dict, path: str, key: str, default: float) -> float:
    value = v.number(mapping, path, key, default, minimum=0.0)
    if value > 1:
        v.problem(f"{path}.{key}", "must be between 0 and 1")
        return default
    return value


def replica_urls(v, item: dict, where: str) -> tuple[tuple[str, ...], frozenset[int]]:
    """A provider's ``base-urls`` (each checked like ``base-url``) and the numbers (1 = the first) of those
    disabled; ((), {}) when absent. An entry is a URL, or ``{url: ..., disabled: true}`` for a replica taken
    out of the set (it keeps its place, so the others keep their names)."""
    if "base-urls" not in item:
        return (), frozenset()
    if "base-url" in item:
        v.problem(f"{where}.base-urls", "use base-url (one address) or base-urls (replicas), not both")
    urls: list[str] = []
    off = set()
    for i, entry in enumerate(v.sequence(item.get("base-urls"), f"{where}.base-urls")):
        url = entry
        if isinstance(entry, dict):
            v.unknown(entry, f"{where}.base-urls[{i}]", {"url", "disabled"})
            url = entry.get("url")
            if v.boolean(entry, f"{where}.base-urls[{i}]", "disabled", False):
                off.add(i + 1)
        if not isinstance(url, str) or not url:
            v.problem(f"{where}.base-urls[{i}]", "must be an http:// or https:// URL (or {url: ..., disabled: true})")
            continue
        url = url.rstrip("/")
        v.url(url, f"{where}.base-urls[{i}]")
        if url in urls:
            v.problem(f"{where}.base-urls[{i}]", "listed twice")
        urls.append(url)
    if not urls:
        v.problem(f"{where}.base-urls", "must list at least one URL")
    elif len(urls) > MAX_REPLICAS:
        v.problem(f"{where}.base-urls", f"at most {MAX_REPLICAS} replicas")
    elif len(off) >= len(urls):
        v.problem(f"{where}.base-urls", "every replica is disabled; disable the provider instead")
    return tuple(urls), frozenset(off)
