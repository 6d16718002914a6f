"""The embedded state store: one SQLite file (``state-path``) shared by every gunicorn worker of an instance.

WAL mode lets readers and one writer work at once; multi-statement updates
(a limit check and its increment) run in ``BEGIN IMMEDIATE`` transactions, so
workers serialise on SQLite's file lock and a check-then-add cannot race.
Each process opens its own connection, lazily (a connection must never cross
a ``fork``: SQLite's locks are per process), shared by its threads under a
lock: every statement here takes microseconds, and one connection per thread
would mean hundreds under gthread.

A deleted or replaced file is noticed by the tick (inode check, once a
second) and before each blob write: the connection is dropped and the file
is created again, so usage kept meanwhile lands in the new file.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from .store import Store, StoreUnavailable, UsageKey

log = logging.getLogger(__name__)
BUSY_TIMEOUT = 2.0  # seconds a statement waits for another worker's write lock

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (namespace, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, client TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0, reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, client, model, provider)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS windows (name TEXT NOT NULL, at REAL NOT NULL, amount INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS windows_name_at ON windows (name, at);
CREATE TABLE IF NOT EXISTS window_totals (name TEXT PRIMARY KEY, total INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (token TEXT PRIMARY KEY, name TEXT NOT NULL, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS slots_name ON slots (name);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"""
_ADD_USAGE = """
INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, client, model, provider) DO UPDATE SET
    requests = requests + excluded.requests, errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens
"""


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file we opened
        self._pid = os.getpid()
        self._orphans: list[sqlite3.Connection] = []  # inherited over a fork: never used, never closed
        self._db_lock = threading.Lock()
        self._lock_fd: int | None = None  # <state-path>.lock, see _tx

    # -- connection ------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():
            # Forked: the parent's connection (and its lock state) is not ours to use or close.
            if self._db is not None:
                self._orphans.append(self._db)
            self._db, self._pid, self._db_lock, self._lock_fd = None, os.getpid(), threading.Lock(), None
        if self._db is None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
                db.executescript(SCHEMA)
                stat = os.stat(self.path)
            except BaseException:
                db.close()
                raise
            try:
                lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                lock_fd = None  # only an optimisation
            self._db, self._identity, self._lock_fd = db, (stat.st_dev, stat.st_ino), lock_fd
        return self._db

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """The connection under the process lock, in a transaction; any failure is ``StoreUnavailable``.

        A writing transaction first takes an flock on ``<state-path>.lock``:
        SQLite's own busy handler waits by sleeping 1, 2, 5... ms, which under
        several busy workers costs far more than the microseconds a limit check
        takes; the flock hands over as soon as the holder is done. (SQLite's
        locking still guarantees correctness; the flock only shortens waits.)
        """
        with self._db_lock:
            db = None
            locked = False
            try:
                db = self._connection()
                if immediate:
                    locked = self._flock()
                db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                self._drop(db)
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
            finally:
                if locked and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _flock(self) -> bool:
        if self._lock_fd is None:
            return False
        pause, deadline = 0.00005, 0.0
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                if not deadline:
                    deadline = now + BUSY_TIMEOUT
                elif now > deadline:
                    return False  # a stuck holder: fall back to SQLite's own busy wait
                time.sleep(pause)
                pause = min(pause * 2, 0.001)

    def _drop(self, db: sqlite3.Connection | None) -> None:
        if db is not None and db is self._db:
            self._db = None
            try:
                db.close()
            except sqlite3.Error:
                pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _check(self) -> None:
        with self._db_lock:
            if self._db is None or self._pid != os.getpid():
                return
            try:
                stat = os.stat(self.path)
                same = (stat.st_dev, stat.st_ino) == self._identity
            except OSError:
                same = False
            if not same:
                self._drop(self._db)
                raise StoreUnavailable("the state file was deleted or replaced")

    def _probe(self) -> None:
        with self._tx(immediate=True) as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (_now(),))

    def _expire(self, now: float) -> None:
        with self._tx(immediate=True) as db:
            db.execute("DELETE FROM blobs WHERE expires <= ?", (now,))
            # Windows nobody checks any more (a key removed from the settings): drop, and re-add the totals.
            if db.execute("DELETE FROM windows WHERE at <= ?", (now - 3600,)).rowcount:
                db.execute("UPDATE window_totals SET total = (SELECT COALESCE(SUM(amount), 0) FROM windows "
                           "WHERE windows.name = window_totals.name)")
            db.execute("DELETE FROM slots WHERE until <= ?", (now,))

    # -- blobs -------------------------------------------------------------------
    def _put_blob(self, namespace: str, key: str, value: bytes, expires: float) -> None:
        self._check()  # a write into a deleted file would be lost without a trace
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?)", (namespace, key, value, expires))

    def _get_blob(self, namespace: str, key: str, now: float) -> bytes | None:
        with self._tx() as db:
            row = db.execute("SELECT value FROM blobs WHERE namespace = ? AND key = ? AND expires > ?",
                             (namespace, key, now)).fetchone()
        return None if row is None else bytes(row[0])

    # -- usage -------------------------------------------------------------------
    def _add_usage(self, rows: Mapping[UsageKey, Sequence[int]]) -> None:
        with self._tx(immediate=True) as db:
            db.executemany(_ADD_USAGE, [(*key, *counts) for key, counts in rows.items()])

    def _usage(self, first_day: str, last_day: str) -> list[tuple]:
        with self._tx() as db:
            return db.execute("SELECT * FROM usage WHERE day BETWEEN ? AND ? ORDER BY day, client, model, provider",
                              (first_day, last_day)).fetchall()

    # -- limits ------------------------------------------------------------------
    # Each public operation is one transaction; the helpers below run inside it.
    def _take(self, name: str, limit: int, span: float, cost: int) -> float:
        with self._tx(immediate=True) as db:
            return _take_in(db, name, limit, span, cost, _now())

    def _record(self, name: str, amount: int, span: float) -> None:
        with self._tx(immediate=True) as db:
            _add(db, name, _now(), amount)

    def _acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        with self._tx(immediate=True) as db:
            return _acquire_in(db, name, token, limit, lease, _now())

    def _release(self, name: str, token: str) -> None:
        with self._tx(immediate=True) as db:
            db.execute("DELETE FROM slots WHERE token = ?", (token,))

    def _renew(self, held: list[tuple[str, str]], lease: float) -> None:
        if held:
            until = _now() + lease
            with self._tx(immediate=True) as db:
                db.executemany("UPDATE slots SET until = ? WHERE token = ?", [(until, token) for _, token in held])

    def _admit(self, checks, slot, counts, span: float, lease: float) -> tuple[str, float] | None:
        now = _now()
        with self._tx(immediate=True) as db:  # all of it or none: a refusal leaves nothing written
            for name, limit in checks:
                wait = _take_in(db, name, limit, span, 0, now)
                if wait:
                    return "check", wait
            if slot is not None and not _acquire_in(db, slot[0], slot[1], slot[2], lease, now):
                return "slot", 1.0
            for name, limit in counts:
                wait = _take_in(db, name, limit, span, 0, now)
                if wait:
                    if slot is not None:
                        db.execute("DELETE FROM slots WHERE token = ?", (slot[1],))
                    return "count", wait
            for name, _ in counts:
                _add(db, name, now, 1)
        return None

    def _settle(self, release, record, span: float) -> None:
        with self._tx(immediate=True) as db:
            if release is not None:
                db.execute("DELETE FROM slots WHERE token = ?", (release[1],))
            if record is not None:
                _add(db, record[0], _now(), record[1])


def _take_in(db: sqlite3.Connection, name: str, limit: int, span: float, cost: int, now: float) -> float:
    # A running total per window, so a check costs the same whatever the
    # limit: entries are summed once when added and once when they expire.
    (gone,) = db.execute("SELECT COALESCE(SUM(amount), 0) FROM windows WHERE name = ? AND at <= ?",
                         (name, now - span)).fetchone()
    if gone:
        db.execute("DELETE FROM windows WHERE name = ? AND at <= ?", (name, now - span))
        db.execute("UPDATE window_totals SET total = MAX(0, total - ?) WHERE name = ?", (gone, name))
    row = db.execute("SELECT total FROM window_totals WHERE name = ?", (name,)).fetchone()
    if row is None or row[0] < limit:
        if cost:
            _add(db, name, now, cost)
        return 0.0
    (oldest,) = db.execute("SELECT MIN(at) FROM windows WHERE name = ?", (name,)).fetchone()
    return max(0.001, oldest + span - now) if oldest is not None else span


def _add(db: sqlite3.Connection, name: str, now: float, amount: int) -> None:
    db.execute("INSERT INTO windows VALUES (?, ?, ?)", (name, now, amount))
    db.execute("INSERT INTO window_totals VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET total = total + ?",
               (name, amount, amount))


def _acquire_in(db: sqlite3.Connection, name: str, token: str, limit: int, lease: float, now: float) -> bool:
    db.execute("DELETE FROM slots WHERE name = ? AND until <= ?", (name, now))
    (held,) = db.execute("SELECT COUNT(*) FROM slots WHERE name = ?", (name,)).fetchone()
    if held >= limit:
        return False
    db.execute("INSERT INTO slots VALUES (?, ?, ?)", (token, name, now + lease))
    return True


def _now() -> float:
    # Wall clock, not monotonic: every worker process compares the same timestamps.
    return time.time()
