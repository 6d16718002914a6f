"""Management API (placeholder until the management issue lands)."""
from flask import Blueprint

bp = Blueprint("management", __name__, url_prefix="/v0/management")
