"""The settings and the provider list: ``/config``, ``/config.yaml``, ``/openai-compatibility``.

Input is read to the letter: a body is read at most ``max-request-bytes``, an
``index`` is ASCII digits only, a write holds at most
``config.file.MAX_PROVIDERS`` providers and may not remove every provider
(the other workers' reload guard would refuse that file, so they would
diverge; emptying the list takes a hand edit and a restart). Management
writes cannot change ``api-keys``. Every change is applied by
``proxy/management.py``.
"""
from __future__ import annotations

import re

from flask import Response, current_app, request

from ... import management
from ...config import file as settings_file
from ...errors import BadRequest
from ...state.identity import label
from ..common import holder
from .bodies import json_response, providers_answer, read_body
from .guard import management_blueprint

bp = management_blueprint("manage_providers", __name__)
_INDEX = re.compile(r"[0-9]{1,9}")  # str.isdigit() is true for "²", which int() refuses


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


@bp.get("/config.yaml")
def export_yaml() -> Response:
    """The effective settings as YAML: how runtime changes go back into the file.

    ``${VAR}`` references are kept as written; literal secrets are redacted as
    ``/config`` shows them (put them back, or better, into the environment).
    """
    document = settings_file.redacted_document(holder().runtime.document)
    return Response(settings_file.to_yaml(document), 200, {"Content-Type": "application/yaml"})


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

    return providers_answer(*management.change_providers(holder(), change))


@bp.post("/openai-compatibility")
def add_provider() -> Response:
    """Append one provider (``{"value": {...}}`` or the provider itself), validated like the file."""
    body = read_body()
    value = body.get("value", body) if isinstance(body, dict) else None
    if not isinstance(value, dict):
        raise BadRequest('send the new provider as a JSON object (or {"value": {...}})')

    def change(document: dict) -> None:
        providers = document.get("openai-compatibility")
        document["openai-compatibility"] = [*(providers if isinstance(providers, list) else []), value]

    return providers_answer(*management.change_providers(holder(), change))


@bp.patch("/openai-compatibility")
def patch_provider() -> Response:
    body = read_body()
    if not isinstance(body, dict) or not isinstance(body.get("value"), dict):
        raise BadRequest('send {"name": ..., "value": {...}} or {"index": ..., "value": {...}}')

    def change(document: dict) -> None:
        management.set_fields(management.find_provider(document, body.get("name"), body.get("index")),
                              body["value"])

    return providers_answer(*management.change_providers(holder(), change))


@bp.delete("/openai-compatibility")
def delete_provider() -> Response:
    name = request.args.get("name")
    index = request.args.get("index")
    if name is None and index is None:
        raise BadRequest("give ?name=<provider> or ?index=<n>")
    if index is not None and not _INDEX.fullmatch(index):
        raise BadRequest("index must be a non-negative integer")

    def change(document: dict) -> None:
        entry = management.find_provider(document, name, int(index) if index is not None else None)
        document["openai-compatibility"].remove(entry)

    return providers_answer(*management.change_providers(holder(), change))
