"""Management API under ``/v0/management`` (CLIProxyAPI-style).

Who may call it (on/off, loopback, lockout, secret) is decided in
``guard.py``, which the operator page shares.

Writes go through ``settings_file.update``: validated like the file at startup (400
naming each problem, running config untouched), then written atomically. This
worker installs the new config at once; the others see the file change within
about a second (``config.live.ConfigHolder``).

Input is read to the letter: a body is read at most ``max-request-bytes`` (with
or without Content-Length), an ``index`` is ASCII digits only, a write holds at
most ``config.file.MAX_PROVIDERS`` providers and may not remove every provider
(the other workers' reload guard would refuse that file, so they would diverge;
emptying the list takes a hand edit and a restart). Management writes cannot
change ``api-keys``; a write on top of a hand edit the reload guard refused
(``api-keys`` deleted, say) goes through the same guard, so it cannot open the
proxy either.
"""
from __future__ import annotations

import re

import orjson
from flask import Response, current_app, request

from ..config import file as settings_file
from ..config.live import ConfigHolder, reload_refusal
from ..config.model import SettingsError
from ..errors import BadRequest, NotFound, PayloadTooLarge, ProxyError
from ..shared import SharedUnavailable
from ..state.identity import label
from .common import holder
from .guard import management_blueprint

bp = management_blueprint("management", __name__)
_INDEX = re.compile(r"[0-9]{1,9}")  # str.isdigit() is true for "²", which int() refuses


def json_response(body, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, {"Content-Type": "application/json"})


@bp.get("/config")
def get_config() -> Response:
    config = holder()
    runtime = config.current()
    body = settings_file.public_config(runtime.settings)
    identities = current_app.extensions["streamfold.identity"]
    for shown, key in zip(body["api-keys"], runtime.settings.api_keys, strict=True):
        # how usage, metrics, logs and the page show this key (unnamed keys: by their identity)
        identity = identities.of(key.key)
        shown["shown-as"] = label(key.name, key.named, identity)
    body["provider-sources"] = runtime.sources
    body["shared-state"] = ("off" if config.shared is None else
                            f"redis {'up' if config.shared.up else 'DOWN'}, providers version {config.shared.version}")
    return json_response(body)


@bp.get("/openai-compatibility")
def get_providers() -> Response:
    providers = holder().current().settings.providers
    return json_response({"openai-compatibility": [settings_file.public_provider(p) for p in providers]})


@bp.put("/openai-compatibility")
def put_providers() -> Response:
    body = read_body()
    items = body.get("items", body.get("openai-compatibility")) if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise BadRequest("send a JSON array of providers (or {\"items\": [...]})")
    if len(items) > settings_file.MAX_PROVIDERS:
        raise BadRequest(f"{len(items)} providers in one write; at most {settings_file.MAX_PROVIDERS} are allowed")

    def change(document: dict) -> None:
        document["openai-compatibility"] = items

    return write_change(change)


@bp.patch("/openai-compatibility")
def patch_provider() -> Response:
    body = read_body()
    if not isinstance(body, dict) or not isinstance(body.get("value"), dict):
        raise BadRequest('send {"name": ..., "value": {...}} or {"index": ..., "value": {...}}')
    value = body["value"]

    def change(document: dict) -> None:
        entry = _find(document, body.get("name"), body.get("index"))
        for key, new in value.items():
            if new is None:
                entry.pop(key, None)
            else:
                entry[key] = new

    return write_change(change)


@bp.delete("/openai-compatibility")
def delete_provider() -> Response:
    name = request.args.get("name")
    index = request.args.get("index")
    if name is None and index is None:
        raise BadRequest("give ?name=<provider> or ?index=<n>")
    if index is not None and not _INDEX.fullmatch(index):
        raise BadRequest("index must be a non-negative integer")

    def change(document: dict) -> None:
        entry = _find(document, name, int(index) if index is not None else None)
        document["openai-compatibility"].remove(entry)

    return write_change(change)


def _find(document: dict, name, index) -> dict:
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


def read_body():
    limit = holder().runtime.settings.max_request_bytes
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    # Read through the stream with a cap: a chunked body has no Content-Length to check first.
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON") from None


def write_change(change) -> Response:
    config = holder()
    if config.shared is not None:
        return _write_shared(config, change)
    if config.path is None:
        raise ProxyError("this instance was started without a settings file; nothing to write", status=409,
                         type="invalid_request_error", code="no_settings_file")
    # The file may hold a version the reload guard refused (auth off, say): a write on top of
    # it must not install that through the back door.
    running = config.runtime.settings
    try:
        settings, document, fingerprint = settings_file.update(
            config.path, config.environ, change, guard=lambda new: reload_refusal(running, new))
    except SettingsError as exc:
        return _invalid(exc)
    config.file_document = document
    config.install(settings, document, fingerprint)
    return json_response({"status": "ok",
                  "openai-compatibility": [settings_file.public_provider(p) for p in settings.providers]})


def _write_shared(holder: ConfigHolder, change) -> Response:
    """With Redis: the new provider list becomes the shared runtime version, for every instance."""
    try:
        settings, document = settings_file.apply_change(holder.runtime.document, holder.environ, change)
        refusal = reload_refusal(holder.runtime.settings, settings)
        if refusal is not None:
            raise SettingsError([f"(top level): the result {refusal}"])
    except SettingsError as exc:
        return _invalid(exc)
    providers = document.get("openai-compatibility") or []
    try:
        version = holder.shared.store_providers(providers)
    except SharedUnavailable as exc:
        raise ProxyError(f"shared state is unavailable, nothing was changed: {exc}", status=503,
                         type="server_error", code="shared_state_unavailable") from None
    holder.apply_runtime_providers(version, providers)
    return json_response({"status": "ok", "version": version,
                  "openai-compatibility": [settings_file.public_provider(p) for p in settings.providers]})


def _invalid(exc: SettingsError) -> Response:
    return json_response({"error": {"message": "the change does not validate: " + "; ".join(exc.problems),
                            "type": "invalid_request_error", "param": None, "code": "invalid_settings",
                            "problems": exc.problems}}, 400)


@bp.get("/config.yaml")
def export_yaml() -> Response:
    """The effective settings as YAML: how runtime changes go back into the file.

    ``${VAR}`` references are kept as written; literal secrets are redacted as
    ``/config`` shows them (put them back, or better, into the environment).
    """
    document = settings_file.redacted_document(holder().runtime.document)
    return Response(settings_file.to_yaml(document), 200, {"Content-Type": "application/yaml"})
