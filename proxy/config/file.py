"""Writing the settings file: read-modify-write under a lock, atomically, secrets kept as written.

Management writes work on the *document* (the YAML as written, ``${VAR}``
references unresolved), never on resolved settings, so a secret taken from the
environment never lands on disk and entries a request didn't touch are
written back as they were (comments are not preserved: PyYAML drops them).

Concurrency: an ``flock`` on ``<settings>.lock`` serialises writers across
gunicorn workers and threads; each writer re-reads the file under the lock,
so two concurrent PATCHes both land. The write is a temp file in the same
directory, fsync, rename: a reader sees the old file or the new one, never half.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import os
import tempfile
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

from .load import build_settings, read_document
from .model import Settings, SettingsError, redact

SECRET_HEADER_WORDS = ("key", "token", "auth", "secret", "password")
# Providers in one management write: 10,000 took seconds to validate and route while
# chat requests waited; a file edited by hand (and read at startup) is not capped.
MAX_PROVIDERS = 1000


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update(path: str, environ: Mapping[str, str], change: Callable[[dict], None],
           guard: Callable[[Settings], str | None] | None = None) -> tuple[Settings, dict, tuple]:
    """Apply ``change`` to the file's document, validate, write atomically.

    Returns the new settings, the document written, and the file's
    fingerprint (mtime, size, sha256) as written, taken under the lock.
    Raises ``SettingsError`` (nothing written) when the result does not
    validate, or when ``guard`` names a reason to refuse it.
    """
    with locked(path):
        settings, new = apply_change(read_document(path) or {}, environ, change)
        refusal = guard(settings) if guard is not None else None
        if refusal is not None:
            raise SettingsError([f"(top level): the result {refusal}"])
        data = to_yaml(new)
        write_atomically(path, data)
        stat = os.stat(path)
        return settings, new, (stat.st_mtime_ns, stat.st_size, hashlib.sha256(data).digest())


def apply_change(document: Any, environ: Mapping[str, str],
                 change: Callable[[dict], None]) -> tuple[Settings, dict]:
    """Apply ``change`` to a copy of the document, keep redacted keys, validate; the document is untouched."""
    if not isinstance(document, dict):
        raise SettingsError(["(top level): the settings file is not a mapping; fix it by hand"])
    old_resolved = _resolved_keys(document, environ)
    new = copy.deepcopy(document)
    change(new)
    providers = new.get("openai-compatibility")
    if isinstance(providers, list):
        if len(providers) > MAX_PROVIDERS:
            raise SettingsError([f"openai-compatibility: {len(providers)} providers; "
                                 f"a management write may hold at most {MAX_PROVIDERS}"])
        if not providers and document.get("openai-compatibility"):
            raise SettingsError(["openai-compatibility: a management write may not remove every provider "
                                 "(edit the file and restart to run with none)"])
    _restore_redacted_keys(new, old_resolved)
    return build_settings(new, environ), new


def to_yaml(document: Any) -> bytes:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True).encode()


def write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _resolved_keys(document: dict, environ: Mapping[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Per provider name: (value as written, value as resolved) of what GET redacts: base-url, api-keys,
    proxy-urls, secret headers."""
    try:
        settings = build_settings(document, environ)
    except SettingsError:
        return {}
    out: dict[str, list[tuple[str, str]]] = {}
    raw_providers = {p.get("name"): p for p in document.get("openai-compatibility") or [] if isinstance(p, dict)}
    for provider in settings.providers:
        raw = raw_providers.get(provider.name, {})
        pairs = [(raw.get("base-url", provider.base_url), provider.base_url)]
        written_replicas = [item.get("url") if isinstance(item, dict) else item
                            for item in (raw.get("base-urls") if isinstance(raw.get("base-urls"), list) else [])]
        pairs += [(written_replicas[i] if i < len(written_replicas) else url, url)
                  for i, url in enumerate(provider.base_urls)]
        written = raw.get("api-key-entries") or []
        for i, entry in enumerate(provider.api_key_entries):
            raw_entry = written[i] if i < len(written) and isinstance(written[i], dict) else {}
            pairs.append((raw_entry.get("api-key", entry.api_key), entry.api_key))
            if entry.proxy_url:
                pairs.append((raw_entry.get("proxy-url", entry.proxy_url), entry.proxy_url))
        raw_headers = raw.get("headers") if isinstance(raw.get("headers"), dict) else {}
        pairs += [(raw_headers.get(name, value), value) for name, value in provider.headers if _secret_header(name)]
        out[provider.name] = pairs
    return out


def _restore_redacted_keys(document: dict, old: dict[str, list[tuple[str, str]]]) -> None:
    """A secret sent back as GET shows it (``sk-...abcd``, ``https://user:***@host``) means "keep the stored one"."""
    for provider in document.get("openai-compatibility") or []:
        if not isinstance(provider, dict):
            continue
        known = old.get(provider.get("name"), [])
        for holder, field, _ in _redacted_places(provider):
            given = holder[field]
            if not isinstance(given, str) or ("..." not in given and "***" not in given):
                continue
            for raw, resolved in known:
                if given in (redact(resolved), redact_url(resolved)) and given != resolved:
                    holder[field] = raw
                    break


def _redacted_places(provider: dict) -> list[tuple[Any, Any, Callable[[str], str]]]:
    """(container, key, how GET redacts it) of each value of a provider entry that GET shows redacted."""
    places: list[tuple[Any, Any, Callable[[str], str]]] = [(provider, "base-url", redact_url)] \
        if "base-url" in provider else []
    replicas = provider.get("base-urls")
    for i, item in enumerate(replicas if isinstance(replicas, list) else []):
        if not isinstance(item, dict):
            places.append((replicas, i, redact_url))
        elif "url" in item:  # a disabled replica: {url, disabled}
            places.append((item, "url", redact_url))
    for entry in provider.get("api-key-entries") or []:
        if isinstance(entry, dict):
            places += [(entry, field, how) for field, how in (("api-key", redact), ("proxy-url", redact_url))
                       if field in entry]
    headers = provider.get("headers")
    places += [(headers, name, redact) for name in headers if _secret_header(name)] \
        if isinstance(headers, dict) else []
    return places


def redacted_document(document: Any) -> Any:
    """The document for download: literal secrets redacted, ``${VAR}`` references kept as written.

    A value that names a variable holds no secret itself (the environment
    does); a literal key, secret, credential-looking header or URL
    credentials are shown as ``GET /config`` shows them.
    """
    if not isinstance(document, dict):
        return document
    out = copy.deepcopy(document)
    keys = out.get("api-keys")
    for i, item in enumerate(keys if isinstance(keys, list) else []):
        if isinstance(item, dict) and "key" in item:
            item["key"] = _hide(item["key"], redact)
        elif not isinstance(item, dict):
            keys[i] = _hide(item, redact)
    management = out.get("remote-management")
    if isinstance(management, dict) and "secret-key" in management:
        management["secret-key"] = _hide(management["secret-key"], redact)
    if "redis-url" in out:
        out["redis-url"] = _hide(out["redis-url"], redact_url)
    for provider in out.get("openai-compatibility") or []:
        if isinstance(provider, dict):
            for holder, field, how in _redacted_places(provider):
                holder[field] = _hide(holder[field], how)
    return out


def _hide(value: Any, how: Callable[[str], str]) -> Any:
    if not isinstance(value, str) or "${" in value:
        return value
    return how(value)


def _secret_header(name: Any) -> bool:
    return isinstance(name, str) and any(w in name.lower() for w in SECRET_HEADER_WORDS)


def public_config(settings: Settings) -> dict[str, Any]:
    """The effective config with every key and secret redacted."""
    return {
        "api-keys": [_public_client_key(k) for k in settings.api_keys],
        "request-retry": settings.request_retry,
        "timeouts": {"connect": settings.timeouts.connect, "read": settings.timeouts.read},
        "max-request-bytes": settings.max_request_bytes,
        "max-aggregate-bytes": settings.max_aggregate_bytes,
        "nonstream-keepalive-interval": settings.nonstream_keepalive_interval,
        "remote-management": {"secret-key": redact(settings.management.secret_key),
                              "allow-remote": settings.management.allow_remote},
        "redis-url": redact_url(settings.redis_url),
        "redis-namespace": settings.redis_namespace,
        "openai-compatibility": [public_provider(p) for p in settings.providers],
        "state-path": settings.state_path,
        "responses-store-ttl": settings.responses_store_ttl,
        "demo-upstream": settings.demo_upstream,
        "client-timeout": settings.client_timeout,
        "max-cooldown": settings.max_cooldown,
        "max-inflight-bytes": settings.max_inflight_bytes,
        "responses-store-max-bytes": settings.responses_store_max_bytes,
        "responses-store-max-count": settings.responses_store_max_count,
    }


def _public_client_key(key) -> dict[str, Any]:
    out: dict[str, Any] = {"key": redact(key.key), "name": key.name}
    if key.models:
        out["models"] = list(key.models)
    for attribute, label in (("rpm", "rpm"), ("tpm", "tpm"), ("max_concurrent", "max-concurrent")):
        if getattr(key, attribute):
            out[label] = getattr(key, attribute)
    return out


def public_provider(provider) -> dict[str, Any]:
    return {
        "name": provider.name, "disabled": provider.disabled,
        # one address or replicas, as the file takes them (a GET's answer can be PUT back)
        **({"base-urls": [_public_replica(provider, n, url) for n, url in enumerate(provider.base_urls, 1)]}
           if provider.base_urls else {"base-url": redact_url(provider.base_url)}),
        "prefix": provider.prefix, "request-retry": provider.request_retry,
        "api-key-entries": [{"api-key": redact(e.api_key), "proxy-url": redact_url(e.proxy_url)}
                            for e in provider.api_key_entries],
        "headers": {k: redact(v) if _secret_header(k) else v for k, v in provider.headers},
        "ca-bundle": provider.ca_bundle, "verify-tls": provider.verify_tls,
        "force-upstream-stream": provider.force_upstream_stream,
        "models": [_public_model(m) for m in provider.models],
        "native-apis": sorted(provider.native_apis), "tokenizer": provider.tokenizer,
        "reasoning-replay": provider.reasoning_replay, "stream-usage": provider.stream_usage,
        **({"balance": provider.balance} if provider.balance else {}),
        "reasoning-efforts": list(provider.reasoning_efforts),
    }


def _public_replica(provider, number: int, url: str) -> Any:
    return {"url": redact_url(url), "disabled": True} if number in provider.replicas_off else redact_url(url)


def _public_model(model) -> dict[str, Any]:
    out: dict[str, Any] = {"name": model.name, "alias": model.alias}
    if model.max_output_tokens:
        out["max-output-tokens"] = model.max_output_tokens
    if model.context_length:
        out["context-length"] = model.context_length
    if not model.vision:
        out["vision"] = False
    return out


def redact_url(url: str) -> str:
    """A URL without its credentials: ``https://user:***@host/v1``; a user name alone (often a token) is ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparseable URL)" if "@" in url else url
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, _ = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user + ':***' if has_password else '***'}@{host}"))
