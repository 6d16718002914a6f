"""The request path leaves the environment and the settings file alone (issue 23, acceptance 4).

The environment is read once, when the app is made; a hot reload reads, parses
and validates the file without holding a lock that requests wait on.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

import proxy
from proxy import create_app
from tests.conftest import AUTH, CHAT, make_app, provider, settings_doc
from tests.gunicorn_util import write_settings

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


@pytest.fixture
def held_parse(monkeypatch):
    """``yaml.safe_load`` of a text holding ``# hold-the-parse`` blocks until released (it says when it started)."""
    started, release = threading.Event(), threading.Event()
    safe_load = yaml.safe_load

    def parse(stream):
        text = stream if isinstance(stream, (str, bytes)) else b""
        if (b"# hold-the-parse" if isinstance(text, bytes) else "# hold-the-parse") in text:
            started.set()
            release.wait(60)
        return safe_load(stream)

    monkeypatch.setattr(yaml, "safe_load", parse)
    yield started, release
    release.set()


def test_requests_are_answered_while_a_reload_is_held_mid_parse(tmp_path, upstream, serve, held_parse):
    started, release = held_parse
    path = write_settings(tmp_path / "settings.yaml", settings_doc(provider(upstream)))
    app = create_app({"PROXY_SETTINGS": str(path), "ENVIRON": {}})
    server = serve(app)
    models = f"{server.url}/v1/models"
    assert [m["id"] for m in requests.get(models, headers=AUTH, timeout=10).json()["data"]] == ["m"]

    changed = settings_doc(provider(upstream, models=[{"name": "upstream-model", "alias": "m"},
                                                      {"name": "upstream-model", "alias": "m2"}]))
    changed["state-path"] = yaml.safe_load(path.read_text())["state-path"]
    path.write_text(yaml.safe_dump(changed, sort_keys=False) + "# hold-the-parse\n")
    # Requests go on until the reload reaches the parser (where a request once made the check itself).
    answered: list = []

    def traffic():
        while not started.is_set():
            answered.append(requests.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH,
                                          timeout=90).status_code)
    first = threading.Thread(target=traffic)
    first.start()
    try:
        assert started.wait(30), "the reload never reached the parser"
        # The reload is parsing now: other requests are answered meanwhile, by the running config.
        for _ in range(3):
            assert requests.post(f"{server.url}/v1/chat/completions", json=CHAT, headers=AUTH,
                                 timeout=20).status_code == 200
            assert [m["id"] for m in requests.get(models, headers=AUTH, timeout=20).json()["data"]] == ["m"]
        assert not release.is_set()  # all of that while the parse was still held
    finally:
        release.set()
        first.join(90)
    assert answered and set(answered) == {200}
    # The parse finished: the new file is taken (within about a second; polled, not timed).
    deadline = time.monotonic() + 30
    while [m["id"] for m in requests.get(models, headers=AUTH, timeout=10).json()["data"]] != ["m", "m2"]:
        assert time.monotonic() < deadline, "the new file was never taken"
        time.sleep(0.05)
