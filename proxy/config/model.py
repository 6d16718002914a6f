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

import yaml

from ..translate.effort import DEFAULT_LEVELS

DEFAULT_PATH = "settings.yaml"
DEFAULT_STATE_PATH = "streamfold-state.db"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class SettingsError(Exception):
    """A settings document that does not validate; ``problems`` names each key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A client key and its policy; 0 / () mean "no limit"."""

    key: str
    name: str                      # for display only (never an identity: state/identity.py)
    models: tuple[str, ...] = ()   # allowed models (globs, matched on the served target); () = all
    rpm: int = 0                   # requests per minute
    tpm: int = 0                   # tokens per minute (prompt + completion, from usage)
    max_concurrent: int = 0        # requests in flight
    named: bool = False            # name was given in the file (else it is the key redacted, "...abcd")

    @property
    def limited(self) -> bool:
        return bool(self.models or self.rpm or self.tpm or self.max_concurrent)


@dataclass(frozen=True, slots=True)
class KeyEntry:
    api_key: str
    proxy_url: str = ""


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    alias: str = ""               # may be a glob (* ? [..]): exact names win, then globs in file order
    max_output_tokens: int = 0    # >0: max_tokens is clamped to this
    context_length: int = 0       # >0: max_tokens is clamped to this minus the estimated prompt
    vision: bool = True           # false: images in translated (bridged) requests become "[image omitted]"

    @property
    def alias_is_glob(self) -> bool:
        return any(c in self.alias for c in "*?[")


NATIVE_APIS = ("chat", "completions", "embeddings", "responses", "messages")
DEFAULT_NATIVE_APIS = frozenset(("chat", "completions", "embeddings", "responses"))
TOKENIZERS = ("none", "vllm", "llama.cpp")


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
    # The client APIs the upstream serves itself; /v1/messages without
    # "messages" and /v1/responses without "responses" are translated to chat.
    native_apis: frozenset[str] = DEFAULT_NATIVE_APIS
    tokenizer: str = "none"           # none | vllm | llama.cpp (count_tokens asks the upstream)
    reasoning_replay: bool = False    # reasoning from history goes back as reasoning_content
    stream_usage: bool = True         # streamed chat asks for stream_options.include_usage
    # Replicas (``base-urls``): the same keys and models at several addresses; () = base_url alone.
    # base_url is the first of them (what tokenizer and "test connection" ask).
    base_urls: tuple[str, ...] = ()
    balance: str = ""                 # this provider's replica set's policy; "" = fleet.balance
    reasoning_efforts: tuple[str, ...] = DEFAULT_LEVELS  # the reasoning_effort values the upstream accepts

    @property
    def chat_url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def replicas(self) -> tuple[str, ...]:
        return self.base_urls or (self.base_url,)


BALANCE_POLICIES = ("cache-aware", "least-busy", "round-robin")


@dataclass(frozen=True, slots=True)
class Fleet:
    """How a replica set (a provider's base-urls, providers sharing a name) is balanced (``fleet:``)."""

    balance: str = "cache-aware"            # the default policy (see README "Serving a fleet")
    aliases: tuple[tuple[str, str], ...] = ()  # (a name clients ask for, or a glob alias as written; policy)
    cache_threshold: float = 0.3            # shortest prefix match (share of the prompt) that routes by prefix
    balance_abs_threshold: int = 64         # imbalance: busiest - idlest above this ...
    balance_rel_threshold: float = 1.5      # ... and busiest above this times the idlest
    block_chars: int = 2048                 # characters per block of the approximate prefix index
    max_sessions: int = 65536               # session -> replica entries kept (LRU); fixes memory
    max_prefix_blocks: int = 262144         # prefix block entries kept (LRU); fixes memory
    session_ttl: float = 3600.0             # seconds a session's replica is remembered without use


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
    state_path: str = DEFAULT_STATE_PATH    # embedded SQLite store (usage, stored responses)
    responses_store_ttl: int = 3600         # seconds a stored response can be continued
    demo_upstream: bool = False             # mount the built-in demo upstream (/demo/v1)
    client_timeout: float = 30.0            # a client must deliver its whole request within this
    max_cooldown: float = 3600.0            # upper bound on any key cooldown (Retry-After)
    max_inflight_bytes: int = 128 * 1024 * 1024   # per worker: requests still being received hold at most this
    responses_store_max_bytes: int = 256 * 1024 * 1024  # stored responses, all together; oldest dropped past it
    responses_store_max_count: int = 10_000       # stored responses at most; oldest dropped past it
    fleet: Fleet = field(default_factory=Fleet)  # balancing replica sets


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
    return parse_document(text, path)


def parse_document(text: bytes, path: str) -> Any:
    """The file's bytes as a document (``${VAR}`` unresolved); YAML errors name the line, not the text."""
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
    from ..balance.settings import fleet_settings
    from .validate import TOP_KEYS, Validator  # validate.py builds the dataclasses defined here

    environ = os.environ if environ is None else environ
    problems: list[str] = []
    doc = _substitute(document, "", environ, problems)
    if doc is None:
        doc = {}
    v = Validator(problems)
    if not isinstance(doc, dict):
        raise SettingsError(["(top level): must be a mapping of settings"])
    v.unknown(doc, "", TOP_KEYS)
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
        state_path=v.string(doc, "", "state-path", DEFAULT_STATE_PATH) or DEFAULT_STATE_PATH,
        responses_store_ttl=v.integer(doc, "", "responses-store-ttl", 3600, minimum=1),
        demo_upstream=v.boolean(doc, "", "demo-upstream", False),
        client_timeout=v.number(doc, "", "client-timeout", 30.0, 0, exclusive=True),
        max_cooldown=v.number(doc, "", "max-cooldown", 3600.0, 0, exclusive=True),
        max_inflight_bytes=v.integer(doc, "", "max-inflight-bytes", 128 * 1024 * 1024, minimum=65536),
        responses_store_max_bytes=v.integer(doc, "", "responses-store-max-bytes", 256 * 1024 * 1024,
                                            minimum=65536),
        responses_store_max_count=v.integer(doc, "", "responses-store-max-count", 10_000, minimum=1),
        fleet=fleet_settings(v, doc.get("fleet"), "fleet"),
    )
    if problems:
        raise SettingsError(problems)
    return settings


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


def redact(secret: str, short: bool = False) -> str:
    """Show a secret the way logs and management output may: ``sk-...abcd``.

    Never more than its last 4 characters (none for 8 or fewer); the head is
    shown only when it is the well-known ``sk-`` prefix, which tells nothing.
    """
    if not secret:
        return ""
    tail = secret[-4:] if len(secret) > 8 else ""
    if short:
        return f"...{tail}"
    head = "sk-" if secret.startswith("sk-") and len(secret) > 12 else ""
    return f"{head}...{tail}"


def load_or_exit(path: str | None = None) -> Settings:
    """Load the settings or stop the process with one line per problem (exit status 1, no traceback)."""
    try:
        return load_settings(path)
    except SettingsError as exc:
        print_problems(exc.problems)
        sys.exit(1)


def print_problems(problems: list[str]) -> None:
    print("streamfold: invalid settings, not starting:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
