"""``GET /metrics``: every worker's Prometheus values (``proxy.metrics`` holds them, without Flask)."""
from __future__ import annotations

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import metrics as counters

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(counters.registry()), 200, {"Content-Type": CONTENT_TYPE_LATEST})
