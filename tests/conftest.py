"""Fixtures: the app from the factory, a real loopback upstream, a real proxy server."""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from typing import Any

import pytest
from werkzeug.serving import make_server

from proxy import create_app
from proxy.config.load import build_settings
from proxy.state import ticker
from proxy.upstream import Sessions
from proxy.web import DevRequestHandler
from tests.upstream import CHAT_REQUESTS, FakeUpstream, role_problem

pytest.register_assert_rewrite("tests.agent_cli")  # the agent tests' helpers assert what the user saw

# Every upstream pool a test app opens, so each test closes its own: the apps
# are dropped without ceremony, and a pooled socket left for the garbage
# collector would surface as a ResourceWarning in some later test.
_POOLS: weakref.WeakSet = weakref.WeakSet()
_sessions_init = Sessions.__init__


def _tracked_init(self) -> None:
    _sessions_init(self)
    _POOLS.add(self)


Sessions.__init__ = _tracked_init

CLIENT_KEY = "sk-client-test-0001"
PROVIDER_KEY = "sk-provider-secret-aaaa"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# Every settings document gets its own state file here, so no test writes into
# the checkout and no two apps share usage or limits unless a test says so.
STATE_DIR = tempfile.mkdtemp(prefix="streamfold-test-state-")


@atexit.register
def _remove_state_dir() -> None:
    ticker.forget_all()  # else the background tick notices the files going and says so
    shutil.rmtree(STATE_DIR, ignore_errors=True)


_state_files = itertools.count()


def state_path() -> str:
    """A fresh, unused state-path."""
    return f"{STATE_DIR}/state-{next(_state_files)}.db"


def provider(upstream: FakeUpstream | str, name: str = "up", **extra: Any) -> dict:
    entry = {"name": name, "base-url": upstream if isinstance(upstream, str) else upstream.url,
             "api-key-entries": [{"api-key": PROVIDER_KEY}],
             "models": [{"name": "upstream-model", "alias": "m"}]}
    entry.update(extra)
    return entry


def settings_doc(*providers: dict, **top: Any) -> dict:
    doc = {"api-keys": [CLIENT_KEY], "request-retry": 2, "timeouts": {"connect": 2, "read": 10},
           "openai-compatibility": list(providers), "state-path": state_path()}
    doc.update(top)
    return doc


def make_app(doc: dict):
    doc.setdefault("state-path", state_path())
    return create_app({"SETTINGS": build_settings(doc, {}), "TESTING": True})


@pytest.fixture
def upstream():
    fake = FakeUpstream()
    yield fake
    fake.stop()


@pytest.fixture
def app(upstream):
    return make_app(settings_doc(provider(upstream)))


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """The proxy served by werkzeug's threaded server on a loopback port, as ``python app.py`` serves it."""

    def __init__(self, app) -> None:
        self.server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=DevRequestHandler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    """``serve(app)`` starts a real server for the app and returns it (stopped at teardown)."""
    servers = []

    def start(app) -> LiveServer:
        server = LiveServer(app)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live(app, serve):
    return serve(app)


@pytest.fixture(autouse=True)
def _no_secrets_in_logs(caplog):
    """Every test: no provider or client key may appear in any log record."""
    caplog.set_level(logging.INFO)
    yield
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert PROVIDER_KEY not in text
    assert CLIENT_KEY not in text


@pytest.fixture(autouse=True)
def _roles_alternate(request):
    """Every test: each chat request a scripted upstream received alternates roles after at most one leading
    system message (SPEC Part 3; strict chat templates refuse anything else). The bridges build them; a test of
    the chat route that relays a client's own odd messages says so with ``@pytest.mark.any_roles``."""
    CHAT_REQUESTS.clear()
    yield
    if request.node.get_closest_marker("any_roles") is None:
        problems = [(rec.path, role_problem(rec.body.get("messages"))) for rec in list(CHAT_REQUESTS)]
        problems = [p for p in problems if p[1] is not None]
        assert not problems, f"chat requests whose roles do not alternate: {problems[:3]}"
    CHAT_REQUESTS.clear()


@pytest.fixture(autouse=True)
def _close_upstream_pools():
    yield
    for pools in list(_POOLS):
        pools.close()


@pytest.fixture(autouse=True, scope="session")
def _collect_leftover_sockets():
    """At the very end, collect what tests left to the garbage collector (SDK clients' pooled sockets in
    reference cycles) before pytest's own final collection turns each into an error for the whole run.
    Leaks inside a test still fail that test; this only covers objects nobody references any more."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
        gc.collect()


def pytest_terminal_summary(terminalreporter) -> None:
    """The agent tests say how long they took: each real CLI's runs, and the agent test files in all
    (setup and teardown included), so a run shows what they cost of CI's budget."""
    agent_cli = sys.modules.get("tests.agent_cli")
    if agent_cli is None or not agent_cli.RUNS:
        return
    reports = [r for group in terminalreporter.stats.values() for r in group
               if "test_agents_" in getattr(r, "nodeid", "") and hasattr(r, "duration")]
    terminalreporter.section("real agent CLIs")
    for cli in sorted({run[0] for run in agent_cli.RUNS}):
        runs = [run for run in agent_cli.RUNS if run[0] == cli]
        slowest = max(runs, key=lambda run: run[2])
        terminalreporter.write_line(
            f"{cli} {agent_cli.VERSIONS[cli]}: {len(runs)} runs in {sum(r[2] for r in runs):.1f} s, "
            f"slowest {slowest[2]:.1f} s ({slowest[1]}), {sum(1 for r in runs if r[3] != 0)} exited non-zero")
    terminalreporter.write_line(f"agent tests: {len({r.nodeid for r in reports})} in "
                                f"{sum(r.duration for r in reports):.1f} s")
