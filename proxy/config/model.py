"""The settings as one frozen ``Settings`` object, and its parts (providers, models, client keys).

Pure data: this module imports nothing of the package, so every other module
(the validator that builds these, the request path that reads them) can import
it. ``load.py`` reads and validates a file into these objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..translate.effort import DEFAULT_LEVELS

DEFAULT_STATE_PATH = "streamfold-state.db"


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


NATIVE_APIS = ("chat", "completions", "embeddings", "responses", "messages", "gemini")
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
    replicas_off: frozenset[int] = frozenset()  # numbers (1 = first) of base_urls disabled: out of the set
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


# The settings of the state store (Settings field, settings key): chosen when the instance starts. A reload that
# changes them keeps the running ones, and so does every worker gunicorn boots later (last_good.py).
STORE_FIELDS = (("state_path", "state-path"), ("redis_url", "redis-url"), ("redis_namespace", "redis-namespace"))


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
    redis_namespace: str = ""               # prefix of every Redis key: deployments sharing one Redis apart
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
