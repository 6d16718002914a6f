"""Load and validate ``settings.yaml`` into one frozen ``Settings`` object.

The file uses kebab-case keys (like CLIProxyAPI's config). Every string may
hold ``${VAR}`` (or ``${VAR:-default}``) references that are replaced from the
environment. Validation collects *every* problem with its key path, e.g.
``openai-compatibility[1].base-url: required``, so an operator fixes a file in
one go; ``SettingsError`` carries that list. The request path only ever reads
the resulting immutable objects: nothing here runs per request.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

import yaml

DEFAULT_PATH = "settings.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"^[a-z0-9_-]+$")
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")


class SettingsError(Exception):
    """A settings document that does not validate; ``problems`` names each key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ClientKey:
    key: str
    name: str


@dataclass(frozen=True, slots=True)
class KeyEntry:
    api_key: str
    proxy_url: str = ""


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    alias: str = ""


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    disabled: bool = False
    prefix: str = ""
    request_retry: int = -1
    api_key_entries: tuple[KeyEntry, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    ca_bundle: str = ""
    verify_tls: bool = True
    force_upstream_stream: bool = False
    models: tuple[Model, ...] = ()

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 600.0


@dataclass(frozen=True, slots=True)
class Management:
    secret_key: str = ""
    allow_remote: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    api_keys: tuple[ClientKey, ...] = ()
    request_retry: int = 2
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_request_bytes: int = 10 * 1024 * 1024
    max_aggregate_bytes: int = 64 * 1024 * 1024
    nonstream_keepalive_interval: float = 0.0
    management: Management = field(default_factory=Management)
    redis_url: str = ""
    providers: tuple[Provider, ...] = ()


def settings_path(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    return environ.get("PROXY_SETTINGS") or DEFAULT_PATH


def read_document(path: str) -> Any:
    """Parse the YAML file as written (``${VAR}`` references unresolved)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError as exc:
        raise SettingsError([f"{path}: cannot read settings file ({exc.strerror})"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SettingsError([f"{path}: {problem}{where}"]) from None


def load_settings(path: str | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, substitute and validate a settings file; raise ``SettingsError`` listing every problem."""
    environ = os.environ if environ is None else environ
    path = path or settings_path(environ)
    return build_settings(read_document(path), environ)


def build_settings(document: Any, environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a parsed (unresolved) settings document into ``Settings``."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    doc = _substitute(document, "", environ, problems)
    if doc is None:
        doc = {}
    v = _Validator(problems)
    if not isinstance(doc, dict):
        raise SettingsError(["(top level): must be a mapping of settings"])
    v.unknown(doc, "", _TOP_KEYS)
    settings = Settings(
        api_keys=v.client_keys(doc.get("api-keys"), "api-keys"),
        request_retry=v.integer(doc, "", "request-retry", 2, minimum=0),
        timeouts=v.timeouts(doc.get("timeouts"), "timeouts"),
        max_request_bytes=v.integer(doc, "", "max-request-bytes", 10 * 1024 * 1024, minimum=1),
        max_aggregate_bytes=v.integer(doc, "", "max-aggregate-bytes", 64 * 1024 * 1024, minimum=1),
        nonstream_keepalive_interval=v.number(doc, "", "nonstream-keepalive-interval", 0.0, minimum=0),
        management=v.management(doc.get("remote-management"), "remote-management", environ),
        redis_url=v.string(doc, "", "redis-url", "") or environ.get("REDIS_URL", ""),
        providers=v.providers(doc.get("openai-compatibility"), "openai-compatibility"),
    )
    if problems:
        raise SettingsError(problems)
    return settings


_TOP_KEYS = {"api-keys", "request-retry", "timeouts", "max-request-bytes", "max-aggregate-bytes",
             "nonstream-keepalive-interval", "remote-management", "redis-url", "openai-compatibility"}
_PROVIDER_KEYS = {"name", "base-url", "disabled", "prefix", "request-retry", "api-key-entries",
                  "headers", "ca-bundle", "verify-tls", "force-upstream-stream", "models"}


def _substitute(node: Any, path: str, environ: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` in every string of the document; report unset variables by path."""
    if isinstance(node, str):
        if "${" not in node:
            return node

        def repl(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is not None:
                    return default
                problems.append(f"{path or '(top level)'}: environment variable {name} is not set")
                return ""
            return value

        return _VAR.sub(repl, node)
    if isinstance(node, dict):
        return {k: _substitute(v, _join(path, k), environ, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}[{i}]", environ, problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


class _Validator:
    """Typed getters that record a problem (with its key path) instead of raising."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def unknown(self, mapping: dict, path: str, allowed: set[str]) -> None:
        for key in mapping:
            if key not in allowed:
                self.problem(_join(path, key), "unknown key")

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
                self.problem(_join(path, key), "required")
                return ""
            return default
        if not isinstance(value, str):
            self.problem(_join(path, key), f"must be a string, not {_kind(value)}")
            return default or ""
        return value

    def boolean(self, mapping: dict, path: str, key: str, default: bool) -> bool:
        value = mapping.get(key, default)
        if not isinstance(value, bool):
            self.problem(_join(path, key), f"must be true or false, not {_kind(value)}")
            return default
        return value

    def integer(self, mapping: dict, path: str, key: str, default: int, minimum: int) -> int:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(_join(path, key), f"must be an integer, not {_kind(value)}")
            return default
        if value < minimum:
            self.problem(_join(path, key), f"must be >= {minimum}")
            return default
        return value

    def number(self, mapping: dict, path: str, key: str, default: float, minimum: float,
               exclusive: bool = False) -> float:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(_join(path, key), f"must be a number, not {_kind(value)}")
            return default
        if value < minimum or (exclusive and value == minimum):
            self.problem(_join(path, key), f"must be {'>' if exclusive else '>='} {minimum}")
            return default
        return float(value)

    def client_keys(self, node: Any, path: str) -> tuple[ClientKey, ...]:
        keys = []
        for i, item in enumerate(self.sequence(node, path)):
            where = f"{path}[{i}]"
            if isinstance(item, str):
                key, name = item, ""
            elif isinstance(item, dict):
                self.unknown(item, where, {"key", "name"})
                key, name = self.string(item, where, "key", None), self.string(item, where, "name", "")
            else:
                self.problem(where, "must be a key string or {key, name}")
                continue
            if not key:
                self.problem(where, "empty key")
                continue
            keys.append(ClientKey(key=key, name=name or redact(key, short=True)))
        return tuple(keys)

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
        self.unknown(item, where, _PROVIDER_KEYS)
        name = self.string(item, where, "name", None)
        if name and not _NAME.match(name):
            self.problem(f"{where}.name", "use only a-z, 0-9, '-' and '_'")
        base_url = self.string(item, where, "base-url", None).rstrip("/")
        if base_url:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                self.problem(f"{where}.base-url", "must be an http:// or https:// URL")
        ca_bundle = self.string(item, where, "ca-bundle", "")
        if ca_bundle and not os.path.isfile(ca_bundle):
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
        )

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
                self.problem(_join(path, key), "header names and values must be strings")
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
            self.unknown(item, where, {"name", "alias"})
            models.append(Model(name=self.string(item, where, "name", None),
                                alias=self.string(item, where, "alias", "")))
        return tuple(models)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def redact(secret: str, short: bool = False) -> str:
    """Show a secret the way logs and management output may: ``sk-...abcd``."""
    if not secret:
        return ""
    tail = secret[-4:] if len(secret) > 8 else ""
    if short:
        return f"...{tail}"
    head = secret[:3] if len(secret) > 12 else ""
    return f"{head}...{tail}"


def load_or_exit(path: str | None = None) -> Settings:
    """Load the settings or stop the process with one line per problem (exit status 1, no traceback)."""
    try:
        return load_settings(path)
    except SettingsError as exc:
        print("streamfold: invalid settings, not starting:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)
