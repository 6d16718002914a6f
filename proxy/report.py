"""What the operator page reads, computed from the instance's activity, the metrics and the key pool.

No Flask: the views in ``routes/manage/`` parse the query and answer what
these functions return. Instance-wide numbers come from ``activity`` (every
worker's files), not from the memory of the worker that happens to answer.
``probe`` asks a provider's ``/models`` through ``upstream.py``, the one place
transport errors are translated.
"""
from __future__ import annotations

import time
from dataclasses import replace

import orjson

from . import activity, metrics, upstream
from .config.model import KeyEntry, Provider, redact
from .errors import ProxyError
from .upstream import Sessions

WINDOWS = (300, 3600)  # the traffic panel: last 5 minutes, last hour
RECENT_LIMIT = 200
TEST_TIMEOUT = 10.0
TEST_BYTES = 1024 * 1024  # of a /models answer, read at most


def cooldown_ends(keys, now: float) -> dict[tuple[str, str], tuple[float, str]]:
    """(provider or replica, key id or "" for a back-off) -> (end, reason) of what is sitting out now,
    in any worker of the instance or, through Redis, any instance (``keys``: the worker's KeyPool)."""
    ends: dict[tuple[str, str], tuple[float, str]] = {}
    for event in activity.recorder().read("events"):
        if event.get("kind") == "cooldown" and event.get("until", 0) > now:
            where = (event.get("provider"), event.get("key"))
            if event["until"] > ends.get(where, (0.0, ""))[0]:
                ends[where] = (event["until"], event.get("reason", "rate_limited"))
    for where, until in keys.cooling().items():  # announced by other instances through Redis
        ends.setdefault(where, (until, "rate_limited"))
    return ends


def traffic(now: float) -> dict:
    """Requests, errors, latency percentiles and folds per provider and model, last 5 minutes and hour."""
    found = activity.recorder()
    records = found.read("requests")
    complete_since = found.coverage("requests", records)
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
    return {"now": now, "complete-since": complete_since or None, "windows": windows}


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


def recent(status: str, provider: str, client: str) -> dict:
    """The instance's last ``RECENT_LIMIT`` client requests (no content), newest first, filtered."""
    records = [r for r in activity.recorder().read("requests")
               if (not status or _status_matches(r.get("status"), status))
               and (not provider or r.get("provider") == provider)
               and (not client or r.get("client") == client)]
    newest = records[-RECENT_LIMIT:][::-1]
    return {"matching": len(records), "records": newest, "workers": sorted({r.get("worker") for r in newest})}


def _status_matches(status, wanted: str) -> bool:
    if not isinstance(status, int):
        return wanted == "error"
    if wanted == "error":
        return status >= 400
    if wanted.endswith("xx"):
        return status // 100 == int(wanted[0])
    return status == int(wanted)


def client_usage() -> dict:
    """Per client key: tokens since the workers started (metrics) and requests in the last hour (activity)."""
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
    return {"source": "metrics", "clients": [
        {"client": name, "requests-last-hour": requests_by.get(name, [0, 0])[0],
         "errors-last-hour": requests_by.get(name, [0, 0])[1],
         "prompt-tokens": int(tokens.get(name, {}).get("prompt", 0)),
         "completion-tokens": int(tokens.get(name, {}).get("completion", 0))} for name in clients]}


def probe(sessions: Sessions, provider: Provider, entry: KeyEntry | None, timeouts) -> dict:
    """Ask the provider's ``/models`` with one of its keys (or none): ok and the model ids, or what went wrong."""
    headers = dict(provider.headers)
    headers["Accept"] = "application/json"
    if entry is not None and entry.api_key:
        headers["Authorization"] = f"Bearer {entry.api_key}"
    result: dict = {"key": redact(entry.api_key) if entry is not None else "(no key)"}
    started = time.perf_counter()
    try:
        status, raw = upstream.get(sessions, provider, provider.base_url + "/models", headers,
                                   entry or KeyEntry(""), replace(timeouts, read=min(timeouts.read, TEST_TIMEOUT)),
                                   TEST_BYTES)
    except ProxyError as exc:
        result.update(ok=False, status=None, error=exc.detail or exc.message)  # which host, what the socket said
        return result
    finally:
        result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    result["status"] = status
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] \
        if isinstance(data, dict) and isinstance(data.get("data"), list) else None
    if status == 200 and ids is not None:
        result.update(ok=True, models=[str(i) for i in ids[:50]], count=len(ids))
    else:
        text = raw[:200].decode("utf-8", "replace").strip()
        result.update(ok=False, error=f"upstream answered HTTP {status}"
                      + ("" if status != 200 else " without an OpenAI model list")
                      + (f": {text}" if text and status != 200 else ""))
    return result
