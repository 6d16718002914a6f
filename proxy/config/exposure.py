"""Safe defaults: the README's development client key never serves an address other than loopback.

The shipped settings.yaml falls back to ``sk-streamfold-local``, which the
README prints so the first-run commands work: fine on loopback, an open door
anywhere else (``PORT`` set makes ``gunicorn app:app`` bind 0.0.0.0, as on
Heroku). So a start that would serve such an address with that key stops
with one line naming the fix, and the addresses are recorded in the
environment (``EXPOSED_ENV``) so every worker's reload refuses a file that
brings the key in later (``config.live.ConfigHolder``).
"""
from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any

from .model import Settings

DEVELOPMENT_KEY = "sk-streamfold-local"  # the shipped settings' fallback client key, printed in the README
EXPOSED_ENV = "STREAMFOLD_EXPOSED_BINDS"  # the addresses served that are not loopback, set at start


def published_key_refusal(settings: Settings, exposed: str) -> str | None:
    """Why these settings must not be served on the ``exposed`` addresses (not loopback), or None."""
    uses = [i for i, key in enumerate(settings.api_keys) if key.key == DEVELOPMENT_KEY]
    if not exposed or not uses:
        return None
    return (f"api-keys[{uses[0]}] is the published development key {DEVELOPMENT_KEY} and the proxy serves "
            f"{exposed} (not loopback): set STREAMFOLD_CLIENT_KEY to a key of your own (the shipped "
            "settings.yaml reads it), or list your own api-keys in the settings file")


def exposed_binds(binds: list[Any]) -> str:
    """The listening addresses that are not loopback, for ``published_key_refusal`` ("" when none).

    ``binds`` are gunicorn's parsed addresses: (host, port), a unix socket path,
    or an inherited descriptor (an int, counted as not loopback: it may be anything).
    """
    return ", ".join(f"{b[0]}:{b[1]}" if isinstance(b, tuple) else f"fd://{b}"
                     for b in binds if not isinstance(b, str) and not _is_loopback(b))


def _is_loopback(bind: Any) -> bool:
    if not isinstance(bind, tuple):
        return False
    host = bind[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


def refuse_or_exit(settings: Settings, binds: list[Any], environ: Any = os.environ) -> None:
    """At start: stop the process (status 1, one line) if ``published_key_refusal`` names a reason.

    Otherwise the exposed addresses go into the environment (``EXPOSED_ENV``),
    so every worker's reload refuses a file that brings the key in later.
    """
    exposed = exposed_binds(binds)
    refusal = published_key_refusal(settings, exposed)
    if refusal is not None:
        print(f"streamfold: not starting: {refusal}", file=sys.stderr)
        sys.exit(1)
    environ[EXPOSED_ENV] = exposed
