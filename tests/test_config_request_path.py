"""The request path leaves the environment and the settings file alone (issue 23, acceptance 4).

The environment is read once, when the app is made; a hot reload reads, parses
and validates the file without holding a lock that requests wait on.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import requests

import proxy
from tests.conftest import AUTH, CHAT, make_app, provider, settings_doc

PROXY_DIR = str(Path(proxy.__file__).parent)
SECRET = "mgmt-request-path-secret-2222"
MGMT = {"Authorization": f"Bearer {SECRET}"}


class _Watched(dict):
    """The process environment, noting every read made from the proxy's own code."""

    def __init__(self, environ) -> None:
        super().__init__(environ)
        self.readers: list[str] = []

    def _note(self) -> None:
        frame = sys._getframe(2)
        for _ in range(3):  # the caller, or os.getenv's caller
            if frame is None:
                return
            if frame.f_code.co_filename.startswith(PROXY_DIR):
                self.readers.append(f"{frame.f_code.co_filename}:{frame.f_lineno}")
                return
            frame = frame.f_back

    def get(self, key, default=None):
        self._note()
        return super().get(key, default)

    def __getitem__(self, key):
        self._note()
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._note()
        return super().__contains__(key)


def test_no_request_reads_the_process_environment(upstream, serve, monkeypatch):
    app = make_app(settings_doc(provider(upstream), **{"remote-management": {"secret-key": SECRET}}))
    watched = _Watched(os.environ)
    monkeypatch.setattr(os, "environ", watched)  # from here on only requests run
    server = serve(app)
    assert requests.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10).status_code == 200
    assert requests.post(f"{server.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH,
                         timeout=10).status_code == 200
    assert requests.get(f"{server.url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "streamfold" in metrics.text
    wrong = requests.get(f"{server.url}/v0/management/config", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401  # a failed login is counted (the lockout)
    for path in ("/v0/management/overview", "/v0/management/client-usage", "/v0/management/recent",
                 "/v0/management/fleet", "/v0/management/config"):
        assert requests.get(f"{server.url}{path}", headers=MGMT, timeout=10).status_code == 200, path
    assert watched.readers == []
