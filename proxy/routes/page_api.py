"""Management endpoints the operator page reads: overview, live key state, traffic, recent requests, usage.

They register on ``manage.bp``, so the management guard (on/off, loopback,
lockout, secret) covers them like every other ``/v0/management`` route.
Instance-wide numbers come from ``activity`` (every worker's files), not from
the memory of the worker that happens to answer.
"""
from __future__ import annotations

import re
import time

import orjson
import requests
from flask import Response, request

from .. import activity, instances, metrics
from ..config.file import redact_url
from ..config.model import Provider, redact
from ..errors import BadRequest, NotFound
from ..keys import key_id
from ..version import __version__
from .common import holder
from .guard import management_blueprint
from .manage import json_response, read_body, write_change

bp = management_blueprint("page_api", __name__)

WINDOWS = (300, 3600)  # the traffic panel: last 5 minutes, last hour
RECENT_LIMIT = 200
TEST_TIMEOUT = 10.0
_STATUS_FILTER = re.compile(r"[1-5]xx|[1-5][0-9][0-9]|error")


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
                  {"state": "up" if shared.up else "down", "url": redact_url(shared.url),
                   "providers-version": shared.version}),
        "instances": None if shared is None else instances.listing(shared),
        "workers": workers,
    })


@bp.get("/keys")
def keys() -> Response:
    """Each provider's keys (redacted) with their state across the instance: ok, cooling or refused."""
    config = holder()
    now = time.time()
    ends = cooldown_ends(config, now)
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


def cooldown_ends(holder, now: float) -> dict[tuple[str, str], tuple[float, str]]:
    """(provider or replica, key id or "" for a back-off) -> (end, reason) of what is sitting out now,
    in any worker of the instance or, through Redis, any instance."""
    ends: dict[tuple[str, str], tuple[float, str]] = {}
    for event in activity.recorder().read("events"):
        if event.get("kind") == "cooldown" and event.get("until", 0) > now:
            where = (event.get("provider"), event.get("key"))
            if event["until"] > ends.get(where, (0.0, ""))[0]:
                ends[where] = (event["until"], event.get("reason", "rate_limited"))
    for where, until in holder.keys.cooling().items():  # announced by other instances through Redis
        ends.setdefault(where, (until, "rate_limited"))
    return ends


@bp.get("/traffic")
def traffic() -> Response:
    """Requests, errors, latency percentiles and folds per provider and model, last 5 minutes and hour."""
    found = activity.recorder()
    records = found.read("requests")
    complete_since = found.coverage("requests", records)
    now = time.time()
    windows = []
    for seconds in WINDOWS:
        since = now - seconds
        rows: dict[tuple[str, str], list[dict]] = {}
        for record in records:
            if record.get("t", 0) >= since:
                rows.setdefault((str(record.get("provider")), str(record.get("model"))), []).append(record)
        every = [r for group in rows.values() for r in group]
        windows.append({
            "seconds": seconds, "from": since, "complete": complete_since <= since,
            "workers": sorted({r.get("worker") for r in every}),
            "rows": [dict(provider=p, model=m, **_stats(group)) for (p, m), group in sorted(rows.items())],
            "total": _stats(every)})
    return json_response({"now": now, "complete-since": complete_since or None, "windows": windows})


def _stats(records: list[dict]) -> dict:
    latencies = sorted(r["ms"] for r in records if isinstance(r.get("ms"), (int, float)))
    return {"requests": len(records),
            "errors": sum(1 for r in records if not isinstance(r.get("status"), int) or r["status"] >= 400),
            "p50-ms": _percentile(latencies, 0.50), "p95-ms": _percentile(latencies, 0.95),
            "folds": sum(1 for r in records if r.get("folded"))}


def _percentile(ordered: list[float], share: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return None
    return ordered[max(0, min(len(ordered) - 1, int(share * len(ordered) + 0.999999) - 1))]


@bp.get("/recent")
def recent() -> Response:
    """The instance's last 200 client requests (no content), newest first; ?status=&provider=&client=."""
    status = request.args.get("status", "").strip().lower()
    if status and not _STATUS_FILTER.fullmatch(status):
        raise BadRequest("status must be a code (429), a class (4xx) or 'error'", param="status")
    provider = request.args.get("provider", "").strip()
    client = request.args.get("client", "").strip()
    records = [r for r in activity.recorder().read("requests")
               if (not status or _status_matches(r.get("status"), status))
               and (not provider or r.get("provider") == provider)
               and (not client or r.get("client") == client)]
    newest = records[-RECENT_LIMIT:][::-1]
    return json_response({"matching": len(records), "records": newest,
                  "workers": sorted({r.get("worker") for r in newest})})


def _status_matches(status, wanted: str) -> bool:
    if not isinstance(status, int):
        return wanted == "error"
    if wanted == "error":
        return status >= 400
    if wanted.endswith("xx"):
        return status // 100 == int(wanted[0])
    return status == int(wanted)


@bp.get("/client-usage")
def client_usage() -> Response:
    """Per client key: tokens since the workers started (metrics) and requests in the last hour (activity).

    The page uses this until the usage store (``/v0/management/usage``) is there.
    """
    tokens: dict[str, dict[str, float]] = {}
    for metric in metrics.registry().collect():
        if metric.name != "streamfold_tokens":
            continue
        for sample in metric.samples:
            if sample.name == "streamfold_tokens_total":
                per = tokens.setdefault(sample.labels.get("client", "-"), {})
                kind = sample.labels.get("kind", "")
                per[kind] = per.get(kind, 0) + sample.value
    since = time.time() - 3600
    requests_by: dict[str, list[int]] = {}
    for record in activity.recorder().read("requests"):
        if record.get("t", 0) >= since:
            counts = requests_by.setdefault(str(record.get("client", "-")), [0, 0])
            counts[0] += 1
            status = record.get("status")
            counts[1] += not isinstance(status, int) or status >= 400
    clients = sorted(set(tokens) | set(requests_by))
    return json_response({"source": "metrics", "clients": [
        {"client": name, "requests-last-hour": requests_by.get(name, [0, 0])[0],
         "errors-last-hour": requests_by.get(name, [0, 0])[1],
         "prompt-tokens": int(tokens.get(name, {}).get("prompt", 0)),
         "completion-tokens": int(tokens.get(name, {}).get("completion", 0))} for name in clients]})


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

    return write_change(change)


@bp.post("/test-connection")
def test_connection() -> Response:
    """Ask the provider's ``/models`` with each of its keys, from the server (no CORS, same network path)."""
    body = read_body()
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise BadRequest('send {"name": "<provider>"}', param="name")
    provider = next((p for p in holder().current().settings.providers if p.name == name), None)
    if provider is None:
        raise NotFound(f"no provider named {name!r}")
    entries = provider.api_key_entries or (None,)
    return json_response({"provider": provider.name, "url": redact_url(provider.base_url) + "/models",
                  "results": [_probe(provider, entry) for entry in entries]})


def _probe(provider: Provider, entry) -> dict:
    session = holder().sessions.get(provider)
    headers = dict(provider.headers)
    headers["Accept"] = "application/json"
    if entry is not None and entry.api_key:
        headers["Authorization"] = f"Bearer {entry.api_key}"
    proxies = {"http": entry.proxy_url, "https": entry.proxy_url} if entry is not None and entry.proxy_url else None
    timeouts = holder().current().settings.timeouts
    result: dict = {"key": redact(entry.api_key) if entry is not None else "(no key)"}
    started = time.perf_counter()
    try:
        response = session.get(provider.base_url + "/models", headers=headers, proxies=proxies,
                               timeout=(timeouts.connect, min(timeouts.read, TEST_TIMEOUT)), allow_redirects=False)
    except requests.RequestException as exc:
        result.update(ok=False, status=None, error=f"could not reach the upstream: {type(exc).__name__}")
        return result
    finally:
        result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    with response:
        raw = response.content[:1024 * 1024]
    result["status"] = response.status_code
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] \
        if isinstance(data, dict) and isinstance(data.get("data"), list) else None
    if response.status_code == 200 and ids is not None:
        result.update(ok=True, models=[str(i) for i in ids[:50]], count=len(ids))
    else:
        text = raw[:200].decode("utf-8", "replace").strip()
        result.update(ok=False, error=f"upstream answered HTTP {response.status_code}"
                      + ("" if response.status_code != 200 else " without an OpenAI model list")
                      + (f": {text}" if text and response.status_code != 200 else ""))
    return result
