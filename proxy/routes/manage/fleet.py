"""``GET /v0/management/fleet``: replicas with their live load, and the balancer's decisions, for the page;
``PATCH /v0/management/fleet/replica``: disable or enable one replica of a provider's ``base-urls``.

Behind the management guard (secret, loopback rule, lockout); changes go through ``proxy/management.py``.
Numbers are the whole instance's: in-flight counts from the balancer's shared
table (every worker), decisions from the metrics of every worker (and, with
Redis, in-flight counts other instances reported); nothing from one worker's
memory alone.
"""
from __future__ import annotations

import time

from flask import Response

from ... import management, metrics, report
from ...config.file import redact_url
from ...errors import BadRequest, NotFound
from ...keys import key_id
from ..common import holder
from .bodies import json_response, providers_answer, read_body
from .guard import management_blueprint

bp = management_blueprint("manage_fleet", __name__)


@bp.get("/fleet")
def fleet() -> Response:
    config = holder()
    runtime = config.current()
    balancer = config.balancer
    now = time.time()
    ends = report.cooldown_ends(config.keys, now)
    remote = balancer.remote.busy if balancer.remote is not None else {}
    replicas = {}
    for provider in runtime.settings.providers:
        named = ([(f"{provider.name}#{n}", url) for n, url in enumerate(provider.base_urls, 1)]
                 or [(provider.name, provider.base_url)])
        counts = balancer.table.busy([balancer.table.column(name) for name, _ in named])
        rows = []
        for number, ((name, url), count) in enumerate(zip(named, counts), 1):
            cooling = sum(1 for e in provider.api_key_entries if (name, key_id(e.api_key)) in ends)
            rows.append({"replica": name, "url": redact_url(url), "in-flight": count,
                         "disabled": number in provider.replicas_off,
                         "other-instances": remote.get(name, 0),
                         "backoff-until": ends.get((name, ""), (None,))[0], "keys-cooling": cooling})
        replicas[provider.name] = {"balance": provider.balance or None, "replicas": rows}
    decisions: dict[str, dict[str, int]] = {}
    for sample in _samples("streamfold_routing_decisions_total"):
        labels = sample.labels
        where = decisions.setdefault(labels.get("set", "-"), {})
        where[labels.get("reason", "-")] = where.get(labels.get("reason", "-"), 0) + int(sample.value)
    sets = [{"name": group.name, "policy": group.policy,
             "replicas": list(dict.fromkeys(t.replica_name for t in group)),
             "decisions": decisions.get(group.name, {})} for group in runtime.router.replica_sets()]
    return json_response({"now": now, "default": runtime.settings.fleet.balance, "providers": replicas, "sets": sets})


@bp.patch("/fleet/replica")
def set_replica() -> Response:
    """``{"replica": "<provider>#<n>", "disabled": true|false}``: written to the settings file (or, with
    Redis, the shared providers) like a provider's ``disabled``; a disabled replica's sessions move to the
    next best replica, and new sessions reach it again once it is enabled."""
    body = read_body()
    replica = body.get("replica") if isinstance(body, dict) else None
    disabled = body.get("disabled") if isinstance(body, dict) else None
    name, _, number = replica.rpartition("#") if isinstance(replica, str) else ("", "", "")
    if not (name and number.isascii() and number.isdigit() and len(number) <= 4 and isinstance(disabled, bool)):
        raise BadRequest('send {"replica": "<provider>#<n>", "disabled": true or false}')
    index = int(number) - 1

    def change(document: dict) -> None:
        providers = document.get("openai-compatibility")
        entry = next((p for p in providers if isinstance(p, dict) and p.get("name") == name), None) \
            if isinstance(providers, list) else None
        urls = entry.get("base-urls") if entry is not None else None
        if not isinstance(urls, list) or not 0 <= index < len(urls):
            raise NotFound(f"no replica {replica!r} (a provider's base-urls are <provider>#1, #2, ...)")
        item = urls[index]
        url = item.get("url") if isinstance(item, dict) else item
        urls[index] = {"url": url, "disabled": True} if disabled else url

    return providers_answer(*management.change_providers(holder(), change))


def _samples(name: str):
    """Samples of one metric summed over every worker (multiprocess mode) or from this process."""
    for metric in metrics.registry().collect():
        for sample in metric.samples:
            if sample.name == name:
                yield sample
