"""Who may use the management API and the operator page: on/off, the loopback rule, the lockout, the secret.

Off (404, as if absent) unless ``remote-management.secret-key`` or env
``MANAGEMENT_SECRET`` is set. Only loopback clients are served unless
``allow-remote: true`` (behind a reverse proxy the proxy's address is what
counts). Five bad secrets from one address within a minute lock that address
out for a minute, and twenty from all addresses together lock every address
out for a minute (rotating source addresses buys no more guesses). Under
gunicorn the failures are counted across all workers of the instance
(``activity``), and with Redis across all instances
(the state store), so the fifth bad try locks the address out whichever worker of
whichever instance it reached. While Redis does not answer, each instance
counts its own (``proxy/lockout.py``). An accepted management request first looks at
the settings file, so it never answers from a config another worker has
already replaced. The secret comes as ``Authorization: Bearer`` or
``X-Management-Key`` and is compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, current_app, g, request

from ...errors import Forbidden, ManagementUnauthorized, NotFound


def guard(require_secret: bool = True) -> None:
    """Raise unless this request may use management: 404 off, 403 remote, 429 locked out, 401 bad secret.

    The operator page itself carries no secret (``require_secret=False``); its
    API calls do.
    """
    holder = current_app.extensions["streamfold"]
    management = holder.current().settings.management
    if not management.secret_key:
        raise NotFound(f"Unknown request URL: {request.method} {request.path}.")
    address = request.remote_addr or ""
    if not management.allow_remote and not is_loopback(address):
        raise Forbidden("remote management is disabled; connect from loopback or set allow-remote")
    lockout = current_app.extensions["streamfold.lockout"]
    lockout.check(address)
    if not require_secret:
        return
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("X-Management-Key", "")
    if not given or not hmac.compare_digest(given.encode(), management.secret_key.encode()):
        lockout.failed(address)
        raise ManagementUnauthorized("missing or wrong management key")
    g.record.who = "management"
    if holder.path is not None:
        # Another worker may have written the file a moment ago; a management read must not show the
        # old config (the background check may lag up to a second; management answers never do).
        holder.check_file()


def management_blueprint(name: str, import_name: str) -> Blueprint:
    """A Blueprint under ``/v0/management`` whose every view is behind ``guard`` (the secret required).

    Each management module (``providers.py``, ``status.py``, ...) makes its own;
    ``web.create_app`` registers each one."""
    bp = Blueprint(name, import_name, url_prefix="/v0/management")
    bp.before_request(_require_secret)
    return bp


def _require_secret() -> None:
    guard(require_secret=True)  # the operator page's shell asks without one (routes/page.py)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
