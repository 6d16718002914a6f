"""Validation of a settings document: typed getters that name every problem by its key path.

``Validator`` records a problem (``openai-compatibility[1].base-url: required``)
instead of raising, so one pass reports everything wrong with a file;
``load.build_settings`` raises ``SettingsError`` with the whole list.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping
from urllib.parse import urlsplit

from ..balance.settings import replica_urls
from ..translate.effort import DEFAULT_LEVELS, LEVELS
from .model import (
    BALANCE_POLICIES,
    DEFAULT_NATIVE_APIS,
    NATIVE_APIS,
    TOKENIZERS,
    ClientKey,
    KeyEntry,
    Management,
    Model,
    Provider,
    Timeouts,
    redact,
)

# Numbers are bounded to what every consumer holds: SQLite's INTEGER is 64-bit (2^63 and up was an
# OverflowError on every request of the key) and Redis's Lua numbers are doubles, exact to 2^53.
MAX_INTEGER = 2**53 - 1
# Every float setting is seconds: past ~31 years a value is a mistake, and inf, nan or 1e400 would overflow
# sleeps, socket timeouts and expiry times.
MAX_SECONDS = 10**9
MAX_NAMESPACE = 64  # characters of redis-namespace
_NAME = re.compile(r"[a-z0-9_-]+")  # used with fullmatch: "$" would accept a trailing newline
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")

TOP_KEYS = {"api-keys", "request-retry", "timeouts", "max-request-bytes", "max-aggregate-bytes",
            "nonstream-keepalive-interval", "remote-management", "redis-url", "redis-namespace",
            "openai-compatibility", "state-path", "responses-store-ttl", "demo-upstream", "client-timeout",
            "max-cooldown", "max-inflight-bytes", "responses-store-max-bytes", "responses-store-max-count", "fleet"}
PROVIDER_KEYS = {"name", "base-url", "disabled", "prefix", "request-retry", "api-key-entries",
                 "headers", "ca-bundle", "verify-tls", "force-upstream-stream", "models",
                 "native-apis", "tokenizer", "reasoning-replay", "stream-usage", "base-urls", "balance",
                 "reasoning-efforts"}
CLIENT_KEY_KEYS = {"key", "name", "models", "rpm", "tpm", "max-concurrent"}
MODEL_KEYS = {"name", "alias", "max-output-tokens", "context-length", "vision"}


def join_path(path: str, key: Any) -> str:
    """A key path: ``providers[0]`` + ``name`` is ``providers[0].name``."""
    return f"{path}.{key}" if path else str(key)


class Validator:
    """Typed getters that record a problem (with its key path) instead of raising."""

    def __init__(self, problems: list[str], check_files: bool = True) -> None:
        self.problems = problems
        self.check_files = check_files  # whether a file the settings name must exist (load.build_settings)

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def unknown(self, mapping: dict, path: str, allowed: set[str]) -> None:
        for key in mapping:
            if key not in allowed:
                self.problem(join_path(path, key), "unknown key")

    def mapping(self, node: Any, path: str) -> dict:
        if node is None:
            return {}
        if not isinstance(node, dict):
            self.problem(path, "must be a mapping")
            return {}
        return node

    def sequence(self, node: Any, path: str) -> list:
        if node is None:
            return []
        if not isinstance(node, list):
            self.problem(path, "must be a list")
            return []
        return node

    def string(self, mapping: dict, path: str, key: str, default: str | None) -> str:
        value = mapping.get(key)
        if value is None:
            if default is None:
                self.problem(join_path(path, key), "required")
                return ""
            return default
        if not isinstance(value, str):
            self.problem(join_path(path, key), f"must be a string, not {_kind(value)}")
            return default or ""
        return value

    def redis_namespace(self, mapping: dict, path: str, key: str) -> str:
        """A token every Redis key starts with (``<namespace>:streamfold:``): no ':' (so no namespace's keys are
        another's), no glob characters (the store lists keys by pattern), bounded; "" for none."""
        value = self.string(mapping, path, key, "")
        if value and (len(value) > MAX_NAMESPACE or not _NAME.fullmatch(value)):
            self.problem(join_path(path, key), f"use only a-z, 0-9, '-' and '_', at most {MAX_NAMESPACE} characters")
            return ""
        return value

    def boolean(self, mapping: dict, path: str, key: str, default: bool) -> bool:
        value = mapping.get(key, default)
        if not isinstance(value, bool):
            self.problem(join_path(path, key), f"must be true or false, not {_kind(value)}")
            return default
        return value

    def integer(self, mapping: dict, path: str, key: str, default: int, minimum: int) -> int:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(join_path(path, key), f"must be an integer, not {_kind(value)}")
            return default
        if value < minimum:
            self.problem(join_path(path, key), f"must be >= {minimum}")
            return default
        if value > MAX_INTEGER:
            self.problem(join_path(path, key), f"must be <= {MAX_INTEGER}")
            return default
        return value

    def number(self, mapping: dict, path: str, key: str, default: float, minimum: float,
               exclusive: bool = False) -> float:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(join_path(path, key), f"must be a number, not {_kind(value)}")
            return default
        if value != value or value > MAX_SECONDS:  # nan, inf, or a number float() cannot even hold
            self.problem(join_path(path, key), f"must be a number of seconds <= {MAX_SECONDS}")
            return default
        if value < minimum or (exclusive and value == minimum):
            self.problem(join_path(path, key), f"must be {'>' if exclusive else '>='} {minimum}")
            return default
        return float(value)

    def client_keys(self, node: Any, path: str) -> tuple[ClientKey, ...]:
        keys = []
        names: dict[str, str] = {}    # name -> where it was first given
        secrets: dict[str, str] = {}  # key -> where it was first given
        for i, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{i}]"
            if isinstance(item, str):
                key, name, policy = item, "", {}
            elif isinstance(item, dict):
                self.unknown(item, where, CLIENT_KEY_KEYS)
                key, name = self.string(item, where, "key", None), self.string(item, where, "name", "")
                policy = {"models": self.globs(item.get("models"), f"{where}.models"),
                          "rpm": self.integer(item, where, "rpm", 0, minimum=0),
                          "tpm": self.integer(item, where, "tpm", 0, minimum=0),
                          "max_concurrent": self.integer(item, where, "max-concurrent", 0, minimum=0)}
            else:
                self.problem(where, "must be a key string or {key, name, ...}")
                continue
            if not key:
                self.problem(where, "empty key")
                continue
            # A name is a label, never who a key is; still, two keys shown alike would be told apart by nobody.
            if name and name in names:
                self.problem(f"{where}.name", f"duplicate client key name {name!r} (also {names[name]}.name); "
                                              "give each key its own name")
            if key in secrets:
                self.problem(where, f"the same key is listed again (first at {secrets[key]})")
            names.setdefault(name, where)
            secrets.setdefault(key, where)
            keys.append(ClientKey(key=key, name=name or redact(key, short=True), named=bool(name), **policy))
        return tuple(keys)

    def globs(self, node: Any, path: str) -> tuple[str, ...]:
        """A list of non-empty model-name globs (absent = no restriction)."""
        out = []
        for i, item in enumerate(self.sequence(node, path)):
            if not isinstance(item, str) or not item:
                self.problem(f"{path}[{i}]", "must be a non-empty string (a model name or glob)")
                continue
            out.append(item)
        return tuple(out)

    def timeouts(self, node: Any, path: str) -> Timeouts:
        mapping = self.mapping(node, path)
        self.unknown(mapping, path, {"connect", "read"})
        return Timeouts(connect=self.number(mapping, path, "connect", 5.0, 0, exclusive=True),
                        read=self.number(mapping, path, "read", 600.0, 0, exclusive=True))

    def management(self, node: Any, path: str, environ: Mapping[str, str]) -> Management:
        mapping = self.mapping(node, path)
        self.unknown(mapping, path, {"secret-key", "allow-remote"})
        secret = self.string(mapping, path, "secret-key", "") or environ.get("MANAGEMENT_SECRET", "")
        return Management(secret_key=secret,
                          allow_remote=self.boolean(mapping, path, "allow-remote", False))

    def providers(self, node: Any, path: str) -> tuple[Provider, ...]:
        providers, seen = [], set()
        for i, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{i}]"
            if not isinstance(item, dict):
                self.problem(where, "must be a mapping")
                continue
            provider = self.provider(item, where)
            if provider.name in seen:
                self.problem(f"{where}.name", f"duplicate provider name {provider.name!r}")
            seen.add(provider.name)
            providers.append(provider)
        return tuple(providers)

    def provider(self, item: dict, where: str) -> Provider:
        self.unknown(item, where, PROVIDER_KEYS)
        name = self.string(item, where, "name", None)
        if name and not _NAME.fullmatch(name):
            self.problem(f"{where}.name", "use only a-z, 0-9, '-' and '_'")
        elif not name and isinstance(item.get("name"), str):
            self.problem(f"{where}.name", "must not be empty")
        base_urls, replicas_off = replica_urls(self, item, where)
        # with replicas, base_url is the first one enabled
        base_url = next((url for n, url in enumerate(base_urls, 1) if n not in replicas_off), base_urls[0]) \
            if base_urls else self.string(item, where, "base-url", None).rstrip("/")
        if base_url and not base_urls:
            self.url(base_url, f"{where}.base-url")
        ca_bundle = self.string(item, where, "ca-bundle", "")
        if ca_bundle and self.check_files and not os.path.isfile(ca_bundle):
            self.problem(f"{where}.ca-bundle", f"file not found: {ca_bundle}")
        return Provider(
            name=name, base_url=base_url,
            disabled=self.boolean(item, where, "disabled", False),
            prefix=self.string(item, where, "prefix", "").strip("/"),
            request_retry=self.integer(item, where, "request-retry", -1, minimum=-1),
            api_key_entries=self.key_entries(item.get("api-key-entries"), f"{where}.api-key-entries"),
            headers=self.headers(item.get("headers"), f"{where}.headers"),
            ca_bundle=ca_bundle,
            verify_tls=self.boolean(item, where, "verify-tls", True),
            force_upstream_stream=self.boolean(item, where, "force-upstream-stream", False),
            models=self.models(item.get("models"), f"{where}.models"),
            native_apis=self.native_apis(item.get("native-apis"), f"{where}.native-apis"),
            tokenizer=self.choice(item, where, "tokenizer", "none", TOKENIZERS),
            reasoning_replay=self.boolean(item, where, "reasoning-replay", False),
            stream_usage=self.boolean(item, where, "stream-usage", True),
            base_urls=base_urls if len(base_urls) > 1 else (),
            replicas_off=replicas_off if len(base_urls) > 1 else frozenset(),
            balance=self.choice(item, where, "balance", "", BALANCE_POLICIES) if "balance" in item else "",
            reasoning_efforts=self.efforts(item.get("reasoning-efforts"), f"{where}.reasoning-efforts"),
        )

    def url(self, value: str, path: str) -> None:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problem(path, "must be an http:// or https:// URL")

    def efforts(self, node: Any, path: str) -> tuple[str, ...]:
        """The ``reasoning_effort`` values an upstream accepts: a non-empty list of known levels."""
        if node is None:
            return DEFAULT_LEVELS
        items = self.sequence(node, path)
        levels: list[str] = []
        for i, item in enumerate(items):
            if item not in LEVELS:
                self.problem(f"{path}[{i}]", f"must be one of {', '.join(LEVELS)}")
            elif item not in levels:
                levels.append(item)
        if not items and isinstance(node, list):
            self.problem(path, f"must list at least one of {', '.join(LEVELS)}")
        return tuple(levels) or DEFAULT_LEVELS

    def native_apis(self, node: Any, path: str) -> frozenset[str]:
        if node is None:
            return DEFAULT_NATIVE_APIS
        apis = set()
        for i, item in enumerate(self.sequence(node, path)):
            if item not in NATIVE_APIS:
                self.problem(f"{path}[{i}]", f"must be one of {', '.join(NATIVE_APIS)}")
                continue
            apis.add(item)
        return frozenset(apis)

    def choice(self, mapping: dict, path: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.string(mapping, path, key, default)
        if value not in allowed:
            self.problem(join_path(path, key), f"must be one of {', '.join(allowed)}")
            return default
        return value

    def key_entries(self, node: Any, path: str) -> tuple[KeyEntry, ...]:
        entries = []
        for i, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{i}]"
            if not isinstance(item, dict):
                self.problem(where, "must be a mapping with api-key")
                continue
            self.unknown(item, where, {"api-key", "proxy-url"})
            proxy_url = self.string(item, where, "proxy-url", "")
            if proxy_url and urlsplit(proxy_url).scheme not in _PROXY_SCHEMES:
                self.problem(f"{where}.proxy-url", "must be an http, https or socks5 URL")
            entries.append(KeyEntry(api_key=self.string(item, where, "api-key", None), proxy_url=proxy_url))
        return tuple(entries)

    def headers(self, node: Any, path: str) -> tuple[tuple[str, str], ...]:
        pairs = []
        for key, value in self.mapping(node, path).items():
            if not isinstance(key, str) or not isinstance(value, (str, int)) or isinstance(value, bool):
                self.problem(join_path(path, key), "header names and values must be strings")
                continue
            pairs.append((key, str(value)))
        return tuple(pairs)

    def models(self, node: Any, path: str) -> tuple[Model, ...]:
        models = []
        for i, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{i}]"
            if not isinstance(item, dict):
                self.problem(where, "must be a mapping with name (and optional alias)")
                continue
            self.unknown(item, where, MODEL_KEYS)
            models.append(Model(name=self.string(item, where, "name", None),
                                alias=self.string(item, where, "alias", ""),
                                max_output_tokens=self.integer(item, where, "max-output-tokens", 0, minimum=0),
                                context_length=self.integer(item, where, "context-length", 0, minimum=0),
                                vision=self.boolean(item, where, "vision", True)))
        return tuple(models)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)
