"""Issue 21, settings integrity: a worker gunicorn (re)boots goes through the hot reload's guards.

One gunicorn with 2 workers for the module. For each way settings.yaml can go
wrong while the proxy runs (not YAML, not valid, valid without ``api-keys``,
being rewritten truncate-then-write) one worker is SIGKILLed, as the OOM
killer would, and then the master gets HUP: gunicorn keeps serving, and every
answer, from the respawned worker and from the workers HUP started, still
requires a valid key.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import AUTH, CHAT, CLIENT_KEY, PROVIDER_KEY
from tests.gunicorn_util import Gunicorn
from tests.upstream import FakeUpstream, Reply, sse, text_chunks


def settings_text(upstream_url: str, state: Path) -> bytes:
    """Providers first and api-keys last, so the file cut short still validates, with auth off."""
    doc = {"openai-compatibility": [{"name": "up", "base-url": upstream_url,
                                     "api-key-entries": [{"api-key": PROVIDER_KEY}],
                                     "models": [{"name": "upstream-model", "alias": "m"}]}],
           "timeouts": {"connect": 2, "read": 10}, "state-path": str(state),
           "api-keys": [CLIENT_KEY]}
    return yaml.safe_dump(doc, sort_keys=False).encode()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    upstream = FakeUpstream()
    upstream.handler = lambda rec: Reply(events=sse(*text_chunks(["fine"])))
    path = Path(tmp_path_factory.mktemp("integrity")) / "settings.yaml"
    path.write_bytes(settings_text(upstream.url, path.with_suffix(".state.db")))
    server = Gunicorn(path, workers=2, threads=4)
    yield server, path
    server.stop()
    upstream.stop()


def without_api_keys(good: bytes) -> bytes:
    return good[:good.index(b"api-keys:")]


BROKEN = {
    "not-yaml": lambda good: good + b"timeouts: {connect: [\n",
    "invalid": lambda good: good.replace(b"read: 10", b"read: soon") + b"bogus-key: 1\n",
    "no-api-keys": without_api_keys,
}


class Rewriter:
    """Rewrites the file in place again and again as cp and > do: truncate, then write, here in two parts
    with the cut (providers, no api-keys) on disk for most of the time."""

    def __init__(self, path: Path, good: bytes) -> None:
        self.path, self.good, self.stop = path, good, threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        cut = len(without_api_keys(self.good))
        while not self.stop.is_set():
            with open(self.path, "wb") as fh:
                fh.write(self.good[:cut])
                fh.flush()
                time.sleep(0.03)
                fh.write(self.good[cut:])
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def assert_closed_and_serving(server: Gunicorn) -> None:
    """Every answer needs the key (a new connection per request, so both workers answer), and the key works."""
    statuses = [requests.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10).status_code
                for _ in range(30)]
    assert statuses.count(200) == 0, f"{statuses.count(200)} requests without a key were served"
    assert set(statuses) == {401}
    models = requests.get(server.url + "/v1/models", timeout=10)
    assert models.status_code == 401
    answer = requests.post(server.url + "/v1/chat/completions", json=CHAT, headers=AUTH, timeout=10)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "fine"


@pytest.mark.parametrize("broken", [*BROKEN, "half-written"])
def test_a_respawned_or_hup_booted_worker_never_serves_a_broken_open_or_half_written_file(deployed, broken):
    server, path = deployed
    good = path.read_bytes()
    booted = server.output().count("streamfold ready")
    rewriter = None
    if broken == "half-written":
        rewriter = Rewriter(path, good)
    else:
        path.write_bytes(BROKEN[broken](good))
    try:
        os.kill(server.worker_pids()[0], signal.SIGKILL)  # what the OOM killer does
        server.wait_ready(booted + 1)
        assert_closed_and_serving(server)
        before = set(server.worker_pids())
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_ready(booted + 3)
        deadline = time.monotonic() + 30
        while set(server.worker_pids()) & before and time.monotonic() < deadline:  # the old workers leave
            time.sleep(0.05)
        assert not set(server.worker_pids()) & before
        assert_closed_and_serving(server)
    finally:
        if rewriter is not None:
            rewriter.finish()
        path.write_bytes(good)
    assert server.proc.poll() is None
    assert "Worker failed to boot" not in server.output()
    if broken != "half-written":
        assert "keeping the running config" in server.output()
