"""``PATCH /v0/management/api-keys``: change a client key's policy (models, rpm, tpm, max-concurrent) live.

Body: ``{"name": "team-b", "value": {"rpm": 120, "models": ["qwen*"], "tpm": null}}``;
``null`` removes a limit. The key itself cannot be read or set here (secrets
stay in the file or the environment). The change is validated like the file
(400 naming the key path, e.g. ``api-keys[1].rpm: must be >= 0``; nothing
written) and written to this instance's settings file by
``proxy/management.py``; every worker picks it up within a second. With
Redis, only provider lists are shared: a policy change applies to the
instance whose file it wrote.
"""
from __future__ import annotations

from flask import Response

from ... import management
from ...config import file as settings_file
from ...errors import BadRequest
from ..common import holder
from .bodies import json_response, read_body
from .guard import management_blueprint

bp = management_blueprint("manage_client_keys", __name__)

POLICY_FIELDS = ("models", "rpm", "tpm", "max-concurrent")


@bp.patch("/api-keys")
def patch_client_key() -> Response:
    body = read_body()
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("value"), dict):
        raise BadRequest('send {"name": <client key name>, "value": {"rpm": ..., ...}}')
    name, value = body["name"], body["value"]
    other = [field for field in value if field not in POLICY_FIELDS]
    if other:
        raise BadRequest(f"only {', '.join(POLICY_FIELDS)} can be changed here, not {', '.join(map(str, other))}")

    def change(document: dict) -> None:
        management.set_fields(management.find_client_key(document, name), value)

    settings = management.change_client_keys(holder(), change)
    return json_response({"status": "ok", "api-keys": settings_file.public_config(settings)["api-keys"]})
