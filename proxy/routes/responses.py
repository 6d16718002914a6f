"""``POST /v1/responses``: the generic runner over the Responses bridge (``translate/responses/bridge.py``).

Passed through to providers that serve it, bridged to chat for the others;
errors are OpenAI-shaped.
"""
from __future__ import annotations

from functools import partial

from flask import Blueprint

from ..translate.responses.bridge import RESPONSES
from . import bridged

bp = Blueprint("responses", __name__)
bridged.errors(bp, RESPONSES)
bp.post("/v1/responses", endpoint="create_response")(partial(bridged.serve, RESPONSES))
