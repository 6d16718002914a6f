"""``GET /metrics``: every worker's Prometheus values (``proxy.metrics`` holds them, without Flask)."""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST

from .. import metrics as counters

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    config = current_app.extensions["streamfold"]
    replicas = config.balancer.in_flight(config.current().router.targets())
    return Response(counters.exposition(replicas), 200, {"Content-Type": CONTENT_TYPE_LATEST})
