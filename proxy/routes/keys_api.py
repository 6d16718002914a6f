"""``PATCH /v0/management/api-keys``: change a client key's policy (models, rpm, tpm, max-concurrent) live.

Registered on the management blueprint (secret, loopback rule, lockout).
Body: ``{"name": "team-b", "value": {"rpm": 120, "models": ["qwen*"], "tpm": null}}``;
``null`` removes a limit. The key itself cannot be read or set here (secrets
stay in the file or the environment). The change is validated like the file
(400 naming the key path, e.g. ``api-keys[1].rpm: must be >= 0``; nothing
written) and written to this instance's settings file atomically; every worker
picks it up within a second. With Redis, only provider lists are shared: a
policy change applies to the instance whose file it wrote.
"""
from __future__ import annotations

import orjson
from flask import Response, current_app

from ..config import file as settings_file
from ..config.live import ConfigHolder, layer
from ..config.load import build_settings
from ..config.model import SettingsError
from ..errors import BadRequest, NotFound, ProxyError
from .guard import management_blueprint
from .manage import read_body

bp = management_blueprint("keys_api", __name__)

POLICY_FIELDS = ("models", "rpm", "tpm", "max-concurrent")


@bp.patch("/api-keys")
def patch_client_key() -> Response:
    holder: ConfigHolder = current_app.extensions["streamfold"]
    body = read_body()  # the management API's capped reader (a chunked body cannot exceed max-request-bytes)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("value"), dict):
        raise BadRequest('send {"name": <client key name>, "value": {"rpm": ..., ...}}')
    name, value = body["name"], body["value"]
    other = [field for field in value if field not in POLICY_FIELDS]
    if other:
        raise BadRequest(f"only {', '.join(POLICY_FIELDS)} can be changed here, not {', '.join(map(str, other))}")
    if holder.path is None:
        raise ProxyError("this instance was started without a settings file; nothing to write", status=409,
                         type="invalid_request_error", code="no_settings_file")

    def change(document: dict) -> None:
        entry = _find(document.get("api-keys"), name)
        for field, new in value.items():
            if new is None:
                entry.pop(field, None)
            else:
                entry[field] = new

    try:
        settings, document, fingerprint = settings_file.update(holder.path, holder.environ, change)
        effective = layer(document, holder.runtime_providers)
        if holder.runtime_providers is not None:  # the shared provider list stays in force
            settings = build_settings(effective, holder.environ)
    except SettingsError as exc:
        return Response(orjson.dumps({"error": {
            "message": "the change does not validate: " + "; ".join(exc.problems), "type": "invalid_request_error",
            "param": None, "code": "invalid_settings", "problems": exc.problems}}), 400,
            {"Content-Type": "application/json"})
    holder.file_document = document
    holder.install(settings, effective, fingerprint)
    public = settings_file.public_config(settings)["api-keys"]
    return Response(orjson.dumps({"status": "ok", "api-keys": public}), 200, {"Content-Type": "application/json"})


def _find(keys, name: str) -> dict:
    """The file's entry for the client key called ``name`` (only ``{key, name}`` entries have names)."""
    if isinstance(keys, list):
        for entry in keys:
            if isinstance(entry, dict) and entry.get("name") == name:
                return entry
    raise NotFound(f"no client key named {name!r} (give the key a name in api-keys to manage it here)")
