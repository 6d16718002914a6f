"""The embedded state store: one SQLite file (``state-path``) shared by every gunicorn worker of an instance.

WAL mode lets readers and one writer work at once. A limit check and its add
are one ``INSERT ... SELECT ... WHERE total < limit`` statement, atomic across
workers, with window totals kept by triggers (see ``_one`` for why each step
is a single statement). Each process opens its own connection, lazily (a
connection must never cross a ``fork``: SQLite's locks are per process),
shared by its threads under a lock: every statement here takes microseconds,
and one connection per thread would mean hundreds under gthread.

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
from collections import deque
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import orjson

from .store import Store, StoreUnavailable, UsageKey

log = logging.getLogger(__name__)
BUSY_TIMEOUT = 2.0  # seconds a statement waits for another worker's write lock

# Per namespace, how many blobs and bytes it holds, kept by triggers so a capped put reads two numbers instead
# of scanning the namespace; created, and filled from the blobs already there, in one transaction.
BLOB_TOTALS = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS blob_totals (namespace TEXT PRIMARY KEY, count INTEGER NOT NULL, bytes INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_expires ON blobs (namespace, expires);
CREATE TRIGGER IF NOT EXISTS blob_added AFTER INSERT ON blobs BEGIN
    INSERT INTO blob_totals VALUES (NEW.namespace, 1, length(NEW.value))
    ON CONFLICT (namespace) DO UPDATE SET count = count + 1, bytes = bytes + length(NEW.value);
END;
CREATE TRIGGER IF NOT EXISTS blob_gone AFTER DELETE ON blobs BEGIN
    UPDATE blob_totals SET count = count - 1, bytes = bytes - length(OLD.value) WHERE namespace = OLD.namespace;
END;
CREATE TRIGGER IF NOT EXISTS blob_replaced AFTER UPDATE OF value ON blobs BEGIN
    UPDATE blob_totals SET bytes = bytes - length(OLD.value) + length(NEW.value) WHERE namespace = NEW.namespace;
END;
INSERT OR IGNORE INTO blob_totals SELECT namespace, count(*), total(length(value)) FROM blobs GROUP BY namespace;
COMMIT;
"""
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
CREATE TRIGGER IF NOT EXISTS window_added AFTER INSERT ON windows BEGIN
    INSERT INTO window_totals VALUES (NEW.name, NEW.amount)
    ON CONFLICT (name) DO UPDATE SET total = total + NEW.amount;
END;
CREATE TRIGGER IF NOT EXISTS window_gone AFTER DELETE ON windows BEGIN
    UPDATE window_totals SET total = total - OLD.amount WHERE name = OLD.name;
END;
CREATE TABLE IF NOT EXISTS slots (token TEXT PRIMARY KEY, name TEXT NOT NULL, until REAL NOT NULL);
CREATE INDEX IF NOT EXISTS slots_name ON slots (name);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v) WITHOUT ROWID;
"""
# All of a flush's rows (a JSON array of [day, client, model, provider, *counters]) in one statement: see _one.
_ADD_USAGE = """
INSERT INTO usage SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'),
    json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), json_extract(value, '$[6]'),
    json_extract(value, '$[7]'), json_extract(value, '$[8]'), json_extract(value, '$[9]')
FROM json_each(?) WHERE true
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
                db.executescript(BLOB_TOTALS)
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
    def _held(self, flock: bool) -> Iterator[sqlite3.Connection]:
        """The connection under the process lock (and the file's flock for a writer); failures are ``StoreUnavailable``.

        A writer first takes an flock on ``<state-path>.lock``: SQLite's own
        busy handler waits by sleeping 1, 2, 5... ms, which under several busy
        workers costs far more than the microseconds a limit check takes; the
        flock hands over as soon as the holder is done. (SQLite's locking still
        guarantees correctness; the flock only shortens waits.)
        """
        with self._db_lock:
            db = None
            locked = False
            try:
                db = self._connection()
                if flock:
                    locked = self._flock()
                yield db
            except (sqlite3.Error, OSError) as exc:
                self._drop(db)
                raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
            finally:
                if locked and self._lock_fd is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _tx(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """``_held`` in a transaction (``BEGIN IMMEDIATE`` for a writer, which also takes the flock)."""
        with self._held(immediate) as db:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

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
        self._one("INSERT OR REPLACE INTO meta VALUES ('probe', ?)", (_now(),))

    def _expire(self, now: float) -> None:
        self._one("DELETE FROM blobs WHERE expires <= ?", (now,))
        self._one("DELETE FROM windows WHERE at <= ?", (now - 3600,))  # windows nobody checks any more
        self._one("DELETE FROM slots WHERE until <= ?", (now,))

    # -- blobs -------------------------------------------------------------------
    def _put_blob(self, namespace: str, key: str, value: bytes, expires: float) -> None:
        self._check()  # a write into a deleted file would be lost without a trace
        # One statement (see _one); not INSERT OR REPLACE: the row it replaces would not fire blob_gone.
        self._one("INSERT INTO blobs VALUES (?, ?, ?, ?) ON CONFLICT (namespace, key) DO UPDATE SET "
                  "value = excluded.value, expires = excluded.expires", (namespace, key, value, expires))
        cap = self.caps.get(namespace)
        if cap is not None:
            self._drop_oldest(namespace, *cap)

    def _drop_oldest(self, namespace: str, max_count: int, max_bytes: int) -> None:
        """Bring ``namespace`` within its caps: expired blobs first, then the victims ``_victims`` chooses from a
        snapshot read without the write lock, deleted in one statement. (In one transaction, the choice held the
        lock: with 10,000 blobs and busy request threads a put held it 2-10 s.) Puts from several workers at once
        may leave the namespace past its cap by those puts, or one under it, until the next put."""
        totals = "SELECT count, bytes FROM blob_totals WHERE namespace = ?"
        with self._tx() as db:
            count, total = db.execute(totals, (namespace,)).fetchone() or (0, 0)
        if count <= max_count and total <= max_bytes:
            return
        self._one("DELETE FROM blobs WHERE namespace = ? AND expires <= ?", (namespace, _now()))
        with self._tx() as db:  # one consistent snapshot, each row read in the one step of an aggregate
            count, total = db.execute(totals, (namespace,)).fetchone() or (0, 0)
            if count <= max_count and total <= max_bytes:
                return
            (rows,) = db.execute("SELECT json_group_array(json_array(key, size, expires)) FROM (SELECT key, "
                                 "length(value) AS size, expires FROM blobs WHERE namespace = ?)",
                                 (namespace,)).fetchone()
        drop = _victims(orjson.loads(rows), count, total, max_count, max_bytes)
        # each victim as the snapshot saw it, its key and expiry (as SQLite's JSON wrote it: 15 digits): one put
        # again since then expires later and is a new blob, kept
        self._one("DELETE FROM blobs WHERE namespace = ?1 AND key IN (SELECT json_extract(value, '$[0]') FROM "
                  "json_each(?2)) AND EXISTS (SELECT 1 FROM json_each(?2) WHERE json_extract(value, '$[0]') = "
                  "blobs.key AND abs(json_extract(value, '$[1]') - blobs.expires) < 0.001)",
                  (namespace, orjson.dumps(drop).decode()))

    def _get_blob(self, namespace: str, key: str, now: float) -> bytes | None:
        with self._tx() as db:
            row = db.execute("SELECT value FROM blobs WHERE namespace = ? AND key = ? AND expires > ?",
                             (namespace, key, now)).fetchone()
        return None if row is None else bytes(row[0])

    # -- usage -------------------------------------------------------------------
    def _add_usage(self, rows: Mapping[UsageKey, Sequence[int]]) -> None:
        self._one(_ADD_USAGE, (orjson.dumps([(*key, *counts) for key, counts in rows.items()]).decode(),))

    def _usage(self, first_day: str, last_day: str) -> list[tuple]:
        with self._tx() as db:
            return db.execute("SELECT * FROM usage WHERE day BETWEEN ? AND ? ORDER BY day, client, model, provider",
                              (first_day, last_day)).fetchall()

    # -- limits ------------------------------------------------------------------
    # Every step is ONE statement in its own (autocommit) transaction: atomic,
    # and the write lock is never held while this thread waits to get the GIL
    # back between statements (the sqlite3 module lets the GIL go around each
    # step; with busy request threads getting it back takes ~100 ms, past a
    # second at times, and every other worker would queue behind it: their
    # limit steps then ran out of BUSY_TIMEOUT and the store was marked down).
    # The usage flush, the slots' renewal and the expiry are single statements
    # for the same reason. Window totals are kept by triggers, so a check costs
    # the same whatever the limit.
    def _one(self, sql: str, parameters: tuple) -> sqlite3.Cursor:
        with self._held(True) as db:
            return db.execute(sql, parameters)

    def _take(self, name: str, limit: int, span: float, cost: int) -> float:
        now = _now()
        self._one("DELETE FROM windows WHERE name = ? AND at <= ?", (name, now - span))
        if cost:
            if self._one(_TAKE, (name, now, cost, name, limit)).rowcount:
                return 0.0
        elif self._one(_TOTAL, (name,)).fetchone()[0] < limit:
            return 0.0
        (oldest,) = self._one("SELECT MIN(at) FROM windows WHERE name = ?", (name,)).fetchone()
        return max(0.001, oldest + span - now) if oldest is not None else span

    def _unreserve(self, name: str, amount: int, nonce: str) -> None:
        # Entries are not named here: the oldest of that amount goes (as good as the reservation, or older)
        self._one("DELETE FROM windows WHERE rowid = (SELECT rowid FROM windows WHERE name = ? AND amount = ? "
                  "ORDER BY at LIMIT 1)", (name, amount))

    def _record(self, name: str, amount: int, span: float) -> None:
        self._one("INSERT INTO windows VALUES (?, ?, ?)", (name, _now(), amount))

    def _acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        now = _now()
        return bool(self._one(_ACQUIRE, (token, name, now + lease, name, now, limit)).rowcount)

    def _release(self, name: str, token: str) -> None:
        self._one("DELETE FROM slots WHERE token = ?", (token,))

    def _renew(self, held: list[tuple[str, str]], lease: float) -> None:
        if held:
            self._one("UPDATE slots SET until = ? WHERE token IN (SELECT value FROM json_each(?))",
                      (_now() + lease, orjson.dumps([token for _, token in held]).decode()))

    # -- identity secret ---------------------------------------------------------
    def _secret(self, candidate: bytes | None) -> bytes | None:
        with self._tx(immediate=candidate is not None) as db:
            if candidate is not None:  # in the file's first transaction that wants one: every worker reads it
                db.execute("INSERT OR IGNORE INTO meta VALUES ('identity-secret', ?)", (candidate,))
            row = db.execute("SELECT v FROM meta WHERE k = 'identity-secret'").fetchone()
        return None if row is None else bytes(row[0])


# Add an entry only while the window's total is under the limit: the check and the add are one statement.
_TAKE = ("INSERT INTO windows SELECT ?, ?, ? "
         "WHERE COALESCE((SELECT total FROM window_totals WHERE name = ?), 0) < ?")
_TOTAL = "SELECT COALESCE((SELECT total FROM window_totals WHERE name = ?), 0)"
_ACQUIRE = "INSERT INTO slots SELECT ?, ?, ? WHERE (SELECT COUNT(*) FROM slots WHERE name = ? AND until > ?) < ?"


def _now() -> float:
    # Wall clock, not monotonic: every worker process compares the same timestamps.
    return time.time()


def owner_of(key: str) -> str:
    """Whose blob ``key`` is: what comes before its first ``/`` (stored responses are ``<identity>/<id>``);
    keys without one share the owner ``""``."""
    return key.split("/", 1)[0] if "/" in key else ""


def _victims(rows: list, count: int, total: int, max_count: int, max_bytes: int) -> list[tuple[str, float]]:
    """The (key, expiry) of each blob to delete from a namespace holding ``rows`` ([key, size, expires]; ``count`` blobs, ``total``
    bytes) until at most ``max_count`` and ``max_bytes`` remain: one at a time, the oldest (first to expire) of
    the owner holding the most blobs (bytes, for the bytes cap; of those, the one with the oldest blob), so one
    tenant's flood drops its own answers, not another's. ``length`` read a blob's size without its content."""
    held: dict[str, list] = {}  # owner -> [count, bytes, its blobs (key, size, expires) oldest first]
    for key, size, expires in sorted(rows, key=lambda row: row[2]):
        entry = held.setdefault(owner_of(key), [0, 0, deque()])
        entry[0], entry[1] = entry[0] + 1, entry[1] + size
        entry[2].append((key, size, expires))
    drop = []
    while (count > max_count or total > max_bytes) and held:
        field = 0 if count > max_count else 1
        victim = max(held, key=lambda owner: (held[owner][field], -held[owner][2][0][2]))
        entry = held[victim]
        key, size, expires = entry[2].popleft()
        drop.append((key, expires))
        count, total = count - 1, total - size
        entry[0], entry[1] = entry[0] - 1, entry[1] - size
        if not entry[2]:
            del held[victim]
    return drop
