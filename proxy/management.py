"""Management changes to the running config (providers, client-key policies): validated and applied here.

The management API and the operator page (``routes/manage/``) only parse a
request into a change, a function that edits the settings document, and hand
it to ``change_providers`` or ``change_client_keys``. The result is validated
like the file at startup (``InvalidSettings``, 400, naming each problem; the
running config untouched) and must pass the reload guard against the running
config, so a write on top of a hand edit the guard refused (``api-keys``
deleted, say) cannot open or empty the proxy through the back door. Then:

- without Redis, or for client-key policies: written to this instance's
  settings file atomically (``config.file.update``, under its ``flock``) and
  installed in this worker at once; the other workers take the file within
  about a second (``config.live``);
- a provider change with Redis: stored as the shared runtime provider list,
  which every worker of every instance applies.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .config import file as settings_file
from .config.live import ConfigHolder, layer, reload_refusal
from .config.load import build_settings
from .config.model import Settings, SettingsError
from .errors import InvalidSettings, NotFound, ProxyError
from .shared import SharedRefused, SharedUnavailable

Change = Callable[[dict], None]  # edits the settings document in place; raises a ProxyError for a bad target


def change_providers(holder: ConfigHolder, change: Change) -> tuple[Settings, int | None]:
    """Apply a change to the provider list: the new settings, and the shared version (None without Redis)."""
    if holder.shared is not None:
        return _share(holder, change)
    return _write_file(holder, change), None


def change_client_keys(holder: ConfigHolder, change: Change) -> Settings:
    """Apply a change to ``api-keys`` (policies): always this instance's file (Redis shares providers only)."""
    return _write_file(holder, change)


def _write_file(holder: ConfigHolder, change: Change) -> Settings:
    if holder.path is None:
        raise ProxyError("this instance was started without a settings file; nothing to write", status=409,
                         type="invalid_request_error", code="no_settings_file")
    running, providers = holder.runtime.settings, holder.runtime_providers

    def guard(new: Settings) -> str | None:
        # With a shared provider list in force, the file's providers are not what runs: judge the rest.
        return reload_refusal(running, new if providers is None else replace(new, providers=running.providers))

    try:
        settings, document, fingerprint = settings_file.update(holder.path, holder.environ, change, guard=guard)
        effective = layer(document, providers)
        if providers is not None:  # the shared provider list stays in force
            settings = build_settings(effective, holder.environ)
    except SettingsError as exc:
        raise InvalidSettings(exc.problems) from None
    holder.file_document = document
    holder.install(settings, effective, fingerprint)
    return settings


def _share(holder: ConfigHolder, change: Change) -> tuple[Settings, int]:
    """With Redis: the new provider list becomes the shared runtime version, for every instance."""
    try:
        settings, document = settings_file.apply_change(holder.runtime.document, holder.environ, change)
        refusal = reload_refusal(holder.runtime.settings, settings)
        if refusal is not None:
            raise SettingsError([f"(top level): the result {refusal}"])
    except SettingsError as exc:
        raise InvalidSettings(exc.problems) from None
    providers = document.get("openai-compatibility") or []
    try:
        version = holder.shared.store_providers(providers)
    except SharedUnavailable as exc:
        raise ProxyError(f"shared state is unavailable, nothing was changed: {exc}", status=503,
                         type="server_error", code="shared_state_unavailable") from None
    except SharedRefused as exc:  # what is there stays for the operator to look at: it may be another program's
        raise ProxyError(f"the shared provider list cannot be written, nothing was changed: {exc}", status=409,
                         type="invalid_request_error", code="shared_state_conflict") from None
    holder.apply_runtime_providers(version, providers)
    return settings, version


def find_provider(document: dict, name, index) -> dict:
    """The document's provider entry named ``name``, else the one at ``index``."""
    providers = document.get("openai-compatibility")
    if not isinstance(providers, list):
        raise NotFound("no providers are configured")
    if name is not None:
        for entry in providers:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry
        raise NotFound(f"no provider named {name!r}")
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(providers) \
            and isinstance(providers[index], dict):
        return providers[index]
    raise NotFound(f"no provider at index {index!r}")


def find_client_key(document: dict, name: str) -> dict:
    """The document's ``api-keys`` entry called ``name`` (only ``{key, name}`` entries have names)."""
    keys = document.get("api-keys")
    if isinstance(keys, list):
        for entry in keys:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry
    raise NotFound(f"no client key named {name!r} (give the key a name in api-keys to manage it here)")


def set_fields(entry: dict, value: dict) -> None:
    """Each field of ``value`` set on ``entry``; ``None`` removes the field."""
    for key, new in value.items():
        if new is None:
            entry.pop(key, None)
        else:
            entry[key] = new
