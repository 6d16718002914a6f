"""What the instance served lately, for the operator page: ``/traffic``, ``/recent``, ``/client-usage``."""
from __future__ import annotations

import re
import time

from flask import Response, request

from ... import report
from ...errors import BadRequest
from .bodies import json_response
from .guard import management_blueprint

bp = management_blueprint("manage_traffic", __name__)

_STATUS_FILTER = re.compile(r"[1-5]xx|[1-5][0-9][0-9]|error")


@bp.get("/traffic")
def traffic() -> Response:
    """Requests, errors, latency percentiles and folds per provider and model, last 5 minutes and hour."""
    return json_response(report.traffic(time.time()))


@bp.get("/recent")
def recent() -> Response:
    """The instance's last 200 client requests (no content), newest first; ?status=&provider=&client=."""
    status = request.args.get("status", "").strip().lower()
    if status and not _STATUS_FILTER.fullmatch(status):
        raise BadRequest("status must be a code (429), a class (4xx) or 'error'", param="status")
    return json_response(report.recent(status, request.args.get("provider", "").strip(),
                                       request.args.get("client", "").strip()))


@bp.get("/client-usage")
def client_usage() -> Response:
    """Per client key: tokens since the workers started (metrics) and requests in the last hour (activity).

    The page uses this until the usage store (``/v0/management/usage``) is there.
    """
    return json_response(report.client_usage())
