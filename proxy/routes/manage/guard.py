"""Who may use the management API and the operator page: on/off, the loopback rule, the lockout, the secret.

Off (404, as if absent) unless ``remote-management.secret-key`` or env
``MANAGEMENT_SECRET`` is set. Only loopback clients are served unless
``allow-remote: true`` (behind a reverse proxy the proxy's address is what
counts). Five bad secrets from one address within a minute lock that address
out for a minute, and twenty from all addresses together lock every address
out for a minute (rotating source addresses buys no more guesses). Under
gunicorn the failures are counted across all workers of the instance
(``activity``), and with Redis across all instances
(``shared``), so the fifth bad try locks the address out whichever worker of
whichever instance it reached. While Redis does not answer, each instance
counts its own. An accepted management request first looks at
the settings file, so it never answers from a config another worker has
already replaced. The secret comes as ``Authorization: Bearer`` or
``X-Management-Key`` and is compared in constant time.
"""
from __future__ import annotations

import hmac
import ipaddress
import threading
import time

from flask import Blueprint, current_app, g, request

from ... import activity
from ...errors import Forbidden, ManagementUnauthorized, NotFound, RateLimited
from ...shared import Shared

LOCKOUT_FAILURES, LOCKOUT_WINDOW, LOCKOUT_SECONDS = 5, 60.0, 60.0
# Failed secrets from all addresses together within the window: past it every address is locked out
# for LOCKOUT_SECONDS, so rotating source addresses (127.x.y.z, a botnet) gets no more guesses than this.
GLOBAL_FAILURES = 20
EVERYONE = "*"  # the lockout's name for all addresses together (no address is spelt so)


class _Lockout:
    """Failed secrets per address: in Redis for all instances, and in the instance's activity files, or (one
    process) in this app."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, float]] = []
        self.lock = threading.Lock()

    def check(self, address: str, shared: Shared | None) -> None:
        for who, limit, whose in ((address, LOCKOUT_FAILURES, "from this address"),
                                  (EVERYONE, GLOBAL_FAILURES, "from all addresses together")):
            times = None if shared is None else shared.auth_failures(who, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
            if times is None:  # no Redis, or it does not answer: this instance's own count
                times = self._local(who)
            until = activity.locked_until(times, limit, LOCKOUT_WINDOW, LOCKOUT_SECONDS)
            now = time.time()
            if until > now:
                raise RateLimited(f"too many failed management logins {whose}; try again later",
                                  headers={"Retry-After": str(int(until - now) + 1)})

    def _local(self, address: str) -> list[float]:
        if activity.recorder().configured:
            return [r["t"] for r in activity.recorder().read("auth") if address in (EVERYONE, r.get("address"))]
        return [t for a, t in self.failures if address in (EVERYONE, a)]

    def failed(self, address: str, shared: Shared | None) -> None:
        if shared is not None:
            shared.record_auth_failure(address, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
            shared.record_auth_failure(EVERYONE, LOCKOUT_WINDOW + LOCKOUT_SECONDS)
        if activity.recorder().configured:  # counted locally all the same, for when Redis does not answer
            activity.record_auth_failure(address)
            return
        now = time.time()
        with self.lock:
            keep = LOCKOUT_WINDOW + LOCKOUT_SECONDS
            self.failures = [(a, t) for a, t in self.failures if now - t < keep] + [(address, now)]


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
    lockout = current_app.extensions.setdefault("streamfold.lockout", _Lockout())
    lockout.check(address, holder.shared)
    if not require_secret:
        return
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("X-Management-Key", "")
    if not given or not hmac.compare_digest(given.encode(), management.secret_key.encode()):
        lockout.failed(address, holder.shared)
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
