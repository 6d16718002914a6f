"""streamfold: an OpenAI-compatible proxy that folds upstream event streams into JSON answers.

The package imports nothing heavy, so the pure parts (``proxy.fold``,
``proxy.fold.sse``) can be used without Flask; the app lives in ``proxy.web``.
"""
from __future__ import annotations

from typing import Any, Mapping

from .version import __version__  # noqa: F401 - proxy.__version__


def create_app(test_config: Mapping[str, Any] | None = None):
    """Build the WSGI app (see ``proxy.web.create_app``)."""
    from .web import create_app as build

    return build(test_config)


def run_dev_server() -> None:
    """``python app.py``: werkzeug's development server on the usual settings."""
    from .web import run_dev_server as run

    run()
