"""The state store (usage, limit windows, stored responses, what instances share): SQLite by default, Redis with
``REDIS_URL``.

``open_store(settings)`` picks the backend; ``web.create_app`` keeps one per
app at ``app.extensions["streamfold.state"]``. See ``store.py`` for the
interface and what happens while the backend is down.
"""
from __future__ import annotations

from ..config.model import Settings
from .store import COUNTERS, Store, StoreUnavailable

__all__ = ["COUNTERS", "Store", "StoreUnavailable", "open_store"]


def open_store(settings: Settings) -> Store:
    """The store for these settings (nothing is opened or created until first use)."""
    if settings.redis_url:
        from .redis_store import RedisStore

        return RedisStore(settings.redis_url, settings.redis_namespace)
    from .sqlite import SQLiteStore

    return SQLiteStore(settings.state_path)
