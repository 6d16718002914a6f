"""Prometheus metrics, correct under several gunicorn workers.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``gunicorn.conf.py`` creates and
cleans one), each worker writes its values to files there and ``/metrics``
sums them with ``MultiProcessCollector``; without it (tests, ``python app.py``)
the process's own registry is served. Labels never carry a key or any of its
characters (``/metrics`` needs no secret for the rest): clients are labelled by their
configured name or ``key-`` and 8 digits of their identity (a keyed hash of
the key, ``state/identity.py``), and the model label is the
configured alias of the model served (a glob alias stays the glob; an unknown
model is ``-``), so clients cannot grow the series. No Flask here (``state/`` and ``balance/`` count
into it); the ``/metrics`` view is ``routes/metrics_api.py``.
Reasons that come from an upstream (an in-stream error ``code``) are mapped to
a fixed set by ``reason`` (``other`` beyond it), and token counts from upstream
usage are taken only when they are plausible numbers (at most 15 digits).
"""
from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

# Read once, when the process imports this (as prometheus_client decides then whether values go to files),
# never per scrape.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("streamfold_requests_total", "Client requests by route, model, provider and status",
                   ["route", "model", "provider", "status"])
UPSTREAM_SECONDS = Histogram("streamfold_upstream_seconds", "Upstream time until its answer was complete",
                             ["provider"], buckets=_LATENCY_BUCKETS)
UPSTREAM_TTFB = Histogram("streamfold_upstream_ttfb_seconds", "Upstream time until its response headers",
                          ["provider"], buckets=_LATENCY_BUCKETS)
FOLDS = Counter("streamfold_folded_streams_total", "Upstream event streams folded into one JSON answer",
                ["provider", "result"])
RETRIES = Counter("streamfold_retries_total", "Attempts that failed over to another key or provider",
                  ["provider", "reason"])
COOLDOWNS = Counter("streamfold_cooldowns_total", "Keys put on cooldown (429 or a refused key)",
                    ["provider", "reason"])
ACTIVE_STREAMS = Gauge("streamfold_active_streams", "Streams being relayed right now", multiprocess_mode="livesum")
TOKENS = Counter("streamfold_tokens_total", "Tokens reported by upstream usage, by client key label",
                 ["client", "kind"])
ROUTING = Counter("streamfold_routing_decisions_total",
                  "Replica choices by replica set, policy and reason (affinity, prefix, least-busy, imbalance, "
                  "failover, round-robin)", ["set", "policy", "reason"])
CLIENT_LIMITED = Counter("streamfold_client_limited_total",
                         "Requests refused by a client key's policy (reason: rpm, tpm, concurrency, model)",
                         ["client", "reason"])

# Label values for why an attempt failed or a fold ended: the proxy's own error
# codes and HTTP statuses; anything else an upstream sent is "other".
REASONS = frozenset((
    "upstream_unavailable", "upstream_timeout", "upstream_stream_ended_early", "upstream_stream_error",
    "upstream_stream_empty", "upstream_bad_chunk", "aggregate_too_large", "rate_limit_exceeded",
    "upstream_auth_failed", "server_error", "ok",
))
_STATUSES = frozenset(str(status) for status in range(100, 600))


def reason(code: object) -> str:
    """A bounded label value for an error code or status that may come from an upstream."""
    text = code if type(code) is str else str(code) if type(code) is int else ""
    return text if text in REASONS or text in _STATUSES else "other"


_children: dict[tuple, object] = {}


def child(metric, *labels: str):
    """``metric.labels(*labels)``, looked up once per label set: ``labels()`` takes a lock and checks its
    arguments on every call. As many entries as the metric has series (bounded by the labels' design)."""
    key = (metric, *labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


def count_tokens(client: str, usage: tuple[int, int] | None) -> None:
    if usage is not None:
        child(TOKENS, client, "prompt").inc(usage[0])
        child(TOKENS, client, "completion").inc(usage[1])


def registry() -> CollectorRegistry:
    """Every worker's values (multiprocess mode), or this process's."""
    if MULTIPROCESS:
        found = CollectorRegistry()
        MultiProcessCollector(found)
        return found
    return REGISTRY


# The families labelled by client key (tenant names, and how much each used or was refused): per client only
# for a scrape that proved it may see them (routes/metrics_api.py), summed over clients for anyone else.
TENANT_FAMILIES = frozenset(("streamfold_tokens", "streamfold_client_limited"))


def exposition(replicas: list[tuple[str, str, int]], tenants: bool = False) -> bytes:
    """What ``/metrics`` answers: ``registry()``'s values, and ``streamfold_replica_in_flight`` from
    ``replicas`` (provider, replica, in flight), which the balancer's table already counts for every worker.
    Without ``tenants`` the ``TENANT_FAMILIES`` are summed over clients (no ``client`` label)."""
    extra = CollectorRegistry(auto_describe=False)
    extra.register(_InFlight(replicas))
    values = registry() if tenants else _Tenantless(registry())
    return generate_latest(values) + generate_latest(extra)


class _Tenantless:
    """A registry's families with those of ``TENANT_FAMILIES`` summed over the ``client`` label (per scrape,
    never on the request path)."""

    def __init__(self, source) -> None:
        self.source = source

    def collect(self):
        for family in self.source.collect():
            if family.name not in TENANT_FAMILIES:
                yield family
                continue
            sums: dict[tuple, float] = {}
            for sample in family.samples:
                if sample.name.endswith("_total"):  # a counter's _created has no meaning summed
                    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "client"))
                    sums[labels] = sums.get(labels, 0.0) + sample.value
            summed = Metric(family.name, family.documentation + " (summed over clients)", family.type)
            for labels, value in sorted(sums.items()):
                summed.add_sample(family.name + "_total", dict(labels), value)
            yield summed


class _InFlight:
    def __init__(self, replicas: list[tuple[str, str, int]]) -> None:
        self.replicas = replicas

    def collect(self):
        family = GaugeMetricFamily("streamfold_replica_in_flight", "Requests in flight to each replica",
                                   labels=["provider", "replica"])
        for provider, replica, count in self.replicas:
            family.add_metric([provider, replica], count)
        yield family
