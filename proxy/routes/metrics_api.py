"""``GET /metrics``: every worker's Prometheus values (``proxy.metrics`` holds them, without Flask).

Anyone may scrape it (Prometheus on the internal network, like ``/healthz``),
but the series labelled by client key (``metrics.TENANT_FAMILIES``: which
tenants exist, their tokens and refusals) are summed over clients unless the
scrape brings the management secret, under the management API's rules (its
loopback rule, lockout and constant-time check: ``manage/guard.py``); a scrape
without credentials, or any scrape while management is off, gets the sums.
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, request
from prometheus_client import CONTENT_TYPE_LATEST

from .. import metrics as counters
from .manage.guard import guard

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    config = current_app.extensions["streamfold"]
    replicas = config.balancer.in_flight(config.current().router.targets())
    return Response(counters.exposition(replicas, _may_see_tenants(config)), 200,
                    {"Content-Type": CONTENT_TYPE_LATEST})


def _may_see_tenants(config) -> bool:
    """True for a scrape with the right management secret; raises as management does (403 remote, 429 locked
    out, 401 wrong secret) for one that brings credentials and fails them."""
    if not (request.headers.get("Authorization") or request.headers.get("X-Management-Key")):
        return False
    if not config.current().settings.management.secret_key:
        return False  # management is off: nobody sees them, nobody is told so
    guard(require_secret=True)
    return True
