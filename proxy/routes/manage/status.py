"""What the operator page shows of the instance: ``/overview``, live key state (``/keys``), ``/test-connection``."""
from __future__ import annotations

import time

from flask import Response

from ... import activity, instances, report
from ...config.file import redact_url
from ...config.model import redact
from ...errors import BadRequest, NotFound
from ...keys import key_id
from ...version import __version__
from ..common import holder
from .bodies import json_response, read_body
from .guard import management_blueprint

bp = management_blueprint("manage_status", __name__)


@bp.get("/overview")
def overview() -> Response:
    config = holder()
    runtime = config.current()
    now = time.time()
    workers = activity.workers()
    started = min((w["started"] for w in workers), default=activity.recorder().started)
    shared = config.shared
    error = config.reload_error
    return json_response({
        "version": __version__, "now": now, "started": started, "uptime": round(now - started, 1),
        "settings": config.path or "(in memory, no settings file)",
        "providers": len(runtime.settings.providers), "provider-sources": runtime.sources,
        "last-reload": config.reloaded_at,
        "reload-error": {"at": error[0], "message": error[1]} if error else None,
        "redis": ({"state": "off"} if shared is None else
                  {"state": "up" if shared.up else "down", "url": shared.safe_url,
                   "namespace": shared.store.redis_namespace, "providers-version": shared.version}),
        "instances": None if shared is None else instances.listing(shared),
        "workers": workers,
    })


@bp.get("/keys")
def keys() -> Response:
    """Each provider's keys (redacted) with their state across the instance: ok, cooling or refused."""
    config = holder()
    now = time.time()
    ends = report.cooldown_ends(config.keys, now)
    out = {}
    for provider in config.current().settings.providers:
        entries = []
        for entry in provider.api_key_entries:
            until, reason = ends.get((provider.name, key_id(entry.api_key)), (0.0, ""))
            state = "ok" if not until else ("refused" if reason == "refused" else "cooling")
            entries.append({"key": redact(entry.api_key), "state": state, "until": until or None})
        backoff = ends.get((provider.name, ""), (0.0, ""))[0]
        out[provider.name] = {"keys": entries, "backoff-until": backoff or None}
    return json_response({"now": now, "providers": out})


@bp.post("/test-connection")
def test_connection() -> Response:
    """Ask the provider's ``/models`` with each of its keys, from the server (no CORS, same network path)."""
    body = read_body()
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest('send {"name": "<provider>"}', param="name")
    config = holder()
    runtime = config.current()
    provider = next((p for p in runtime.settings.providers if p.name == name), None)
    if provider is None:
        raise NotFound(f"no provider named {name!r}")
    results = [report.probe(config.sessions, provider, entry, runtime.settings.timeouts)
               for entry in provider.api_key_entries or (None,)]
    return json_response({"provider": provider.name, "url": redact_url(provider.base_url) + "/models",
                          "results": results})
