"""What the whole instance did lately (all gunicorn workers): access records, key cooldowns, bad secrets.

The operator page needs instance-wide answers (traffic, the last 200
requests, which keys are cooling, the management lockout), but every gunicorn
worker is its own process with its own memory. So each worker appends to its
own files in one directory, and a reader (any worker answering the page)
merges all of them:

* ``<pid>.requests``: one JSON line per client request (the access-log fields:
  no key, no content);
* ``<pid>.events``: worker start, key cooldowns and provider back-offs;
* ``<pid>.auth``: failed management secrets (the lockout counts them across workers).

Why files and not the alternatives: a worker's append is one ``write`` on an
``O_APPEND`` descriptor (no cross-process lock on the request path, a few
microseconds); the prometheus multiprocess files hold only counters and
histograms since start, not "the last 5 minutes" or single records; SQLite
would serialise every worker's request path on one write lock.

A file is capped (``SEGMENT_BYTES``): when full it becomes ``<name>.1`` and a
new one starts, so a worker keeps at most two segments. At high traffic the
last hour may not fit; readers report the period the data covers.

The directory is ``STREAMFOLD_ACTIVITY_DIR``, else ``activity/`` under
``PROMETHEUS_MULTIPROC_DIR`` (which ``gunicorn.conf.py`` always sets, per
instance, and empties at start). Without either (``python app.py``, tests
using the Flask test client) there is one process and the records live in
memory.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

import orjson

if TYPE_CHECKING:
    from .models import Record

log = logging.getLogger(__name__)
SEGMENT_BYTES = 4 * 1024 * 1024
MEMORY_RECORDS = 20000
# Routes that are not client traffic: the page and its API would drown the list they show.
OPERATOR_ROUTES = ("/v0/management", "/manage", "/healthz", "/metrics")


def directory() -> str | None:
    """The activity directory the environment names; read when the recorder is made, never per request."""
    given = os.environ.get("STREAMFOLD_ACTIVITY_DIR")
    if given:
        return given
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return os.path.join(metrics_dir, "activity") if metrics_dir else None


class _Journal:
    """One worker's append-only file of JSON lines (or, without a directory, a ring in memory)."""

    def __init__(self, folder: str | None, pid: int, kind: str) -> None:
        self.kind = kind
        self.path = os.path.join(folder, f"{pid}.{kind}") if folder else None
        self.memory: collections.deque[bytes] = collections.deque(maxlen=MEMORY_RECORDS)
        self.lock = threading.Lock()
        self.fd = -1
        self.size = 0
        self.failing = False
        if self.path:
            self._open()

    def _open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.fstat(self.fd).st_size

    def append(self, record: dict) -> None:
        line = orjson.dumps(record) + b"\n"
        if self.path is None:
            self.memory.append(line)
            return
        with self.lock:
            try:
                if self.size + len(line) > SEGMENT_BYTES:
                    os.close(self.fd)
                    os.replace(self.path, self.path + ".1")
                    self._open()
                os.write(self.fd, line)
                self.size += len(line)
            except OSError as exc:
                # The page loses a record; the request it describes must not fail (disk full, dir removed).
                if not self.failing:
                    log.error("activity file %s cannot be written (%s); the operator page will miss records",
                              self.path, exc.strerror or type(exc).__name__)
                self.failing = True
                return
            self.failing = False


class Recorder:
    """This worker's journals."""

    def __init__(self, folder: str | None) -> None:
        self.configured = folder  # the directory asked for (files shared by the workers), even if unusable here
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, f"{os.getpid()}.probe"), "wb"):
                    pass
                os.unlink(os.path.join(folder, f"{os.getpid()}.probe"))
            except OSError as exc:
                log.error("activity directory %s is not usable (%s); the operator page shows this worker only",
                          folder, exc.strerror or type(exc).__name__)
                folder = None
        self.folder = folder
        self.pid = os.getpid()
        self.started = time.time()
        self.requests = _Journal(folder, self.pid, "requests")
        self.events = _Journal(folder, self.pid, "events")
        self.auth = _Journal(folder, self.pid, "auth")
        self.events.append({"kind": "start", "t": round(self.started, 3), "worker": self.pid})

    def read(self, kind: str) -> list[dict]:
        """Every record of this kind from every worker's files (or this process's memory), oldest first."""
        journal: _Journal = getattr(self, kind)
        if self.folder is None:
            lines: Iterable[bytes] = list(journal.memory)
            return _parse(lines)
        records = []
        for path in sorted(glob.glob(os.path.join(self.folder, f"*.{kind}.1"))
                           + glob.glob(os.path.join(self.folder, f"*.{kind}"))):
            try:
                with open(path, "rb") as fh:
                    records += _parse(fh.read().splitlines())
            except OSError:
                continue  # rotated away between glob and open: its records are in the .1 file
        records.sort(key=lambda r: r.get("t", 0))
        return records

    def coverage(self, kind: str, records: list[dict]) -> float:
        """Epoch time from which ``records`` are complete (0: everything since each worker started)."""
        if self.folder is None:
            journal: _Journal = getattr(self, kind)
            return records[0]["t"] if len(journal.memory) == journal.memory.maxlen and records else 0.0
        since = 0.0
        for path in glob.glob(os.path.join(self.folder, f"*.{kind}.1")):
            try:
                with open(path, "rb") as fh:
                    first = fh.readline()
                since = max(since, orjson.loads(first).get("t", 0.0))
            except (OSError, orjson.JSONDecodeError):
                continue
        return since


def _parse(lines: Iterable[bytes]) -> list[dict]:
    out = []
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if isinstance(record, dict):
            out.append(record)
    return out


_recorder: Recorder | None = None
_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder: the app factory makes it, reading the environment then; a forked worker
    gets its own on first use, on the directory its parent's was made with."""
    global _recorder
    found = _recorder
    if found is None or found.pid != os.getpid():
        with _lock:
            found = _recorder
            if found is None or found.pid != os.getpid():
                found = _recorder = Recorder(directory() if found is None else found.configured)
    return found


def record_request(record: Record) -> None:
    """Called with every access-log line's record (``Ledger.close``)."""
    route = record.route
    if route.startswith(OPERATOR_ROUTES):
        return
    started = record.started
    # Until the answer was complete: the log is written after a fold, and at the end of a stream.
    ms = round((time.perf_counter() - started) * 1000, 1) if started is not None else record.upstream_ms
    found = recorder()
    found.requests.append({
        # route is the path asked for: bounded, since an unmatched one is anything a client sends
        "t": round(time.time(), 3), "worker": found.pid, "id": record.request_id, "route": route[:200],
        "model": record.model, "provider": record.provider, "status": "-" if record.status is None else record.status,
        "ms": ms, "folded": record.folded, "forced": record.forced, "client": record.who,
        "result": "-" if record.result is None else record.result})


def record_cooldown(provider: str, key_id: str, seconds: float, reason: str) -> None:
    """A key sitting out (``rate_limited``, ``refused``) or a provider backing off (``backoff``)."""
    found = recorder()
    now = time.time()
    found.events.append({"kind": "cooldown", "t": round(now, 3), "worker": found.pid, "provider": provider,
                         "key": key_id, "until": round(now + seconds, 3), "reason": reason})


def record_auth_failure(address: str) -> None:
    found = recorder()
    found.auth.append({"t": round(time.time(), 3), "address": address})


def locked_until(times: list[float], failures: int, window: float, seconds: float) -> float:
    """Epoch time until which an address with these failure ``times`` is locked out (0: not).

    ``failures`` bad secrets within ``window`` seconds lock it for ``seconds``;
    attempts during a lockout are refused before they count, so they are skipped.
    """
    recent: list[float] = []
    until = 0.0
    for t in sorted(times):
        if t < until:
            continue
        recent = [x for x in recent if t - x < window] + [t]
        if len(recent) >= failures:
            until, recent = t + seconds, []
    return until


def workers() -> list[dict[str, Any]]:
    """The instance's workers that recorded a start: pid, start time, alive."""
    starts = {r["worker"]: r["t"] for r in recorder().read("events") if r.get("kind") == "start"}
    return [{"pid": pid, "started": started, "alive": alive(pid), "this": pid == os.getpid()}
            for pid, started in sorted(starts.items(), key=lambda item: item[1])]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
