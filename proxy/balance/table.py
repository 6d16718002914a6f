"""The balancer's state shared by every gunicorn worker of an instance: one memory-mapped file.

Three things must be the same in every worker, and cost microseconds to read
on each request, so they live in shared memory rather than in the state store
(a SQLite write per request would serialise the workers on its write lock):

* **In-flight counts**: a column of counters per replica, one cell per worker.
  A worker only ever writes its own cells (its threads take a lock), so no
  cross-process lock is needed; a reader sums the column. A worker that dies
  leaves its cells behind until the next sweep (about once a second) sees its
  pid gone and zeroes them.
* **Session affinity**: session hash -> replica hash.
* **The prefix index**: block hash -> bit mask of the replicas that were sent
  a prompt holding that block.

The two maps are set-associative caches of ``WAYS`` entries per bucket with
least-recently-used replacement inside a bucket, so their memory is fixed by
``fleet.max-sessions`` and ``fleet.max-prefix-blocks`` however many sessions
come. Writers of different processes may race on one entry; the worst that
can happen is a lost or stale entry, i.e. one request routed as if nothing
were known, never a wrong answer. Replica names get a slot in a table under
an ``flock`` (once per replica and worker).

Without a directory (``python app.py``, tests with the Flask test client)
the same layout lives in this process's memory.

Layout (native byte order, 8-byte aligned): header (magic, bucket counts,
claimed worker slots), ``WORKERS`` pids, ``REPLICAS`` replica hashes, the
in-flight cells (replica-major), then the session and block buckets.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

from ..activity import alive as _alive

log = logging.getLogger(__name__)
MAGIC = b"SFLEET01"
WORKERS = 64      # worker slots (processes of one instance at once, respawns reuse dead slots)
REPLICAS = 1024   # distinct replica names an instance can count
WAYS = 4
_HEADER = struct.Struct("8sIIII")     # magic, session buckets, block buckets, claimed worker slots, pad
HEADER_BYTES = 64
_CLAIMED = struct.Struct("I")
_BUCKET = struct.Struct(f"{WAYS}Q{WAYS}Q{WAYS}d")  # keys, values, last use
_WORDS = _BUCKET.size // 8
SWEEP_INTERVAL = 1.0
FRESH = 30.0  # seconds a merged entry's last use may lag before it is written again


_TABLES: weakref.WeakSet = weakref.WeakSet()


def _forked() -> None:
    for table in list(_TABLES):
        table._pid = 0  # a forked worker claims its own slot on first use


os.register_at_fork(after_in_child=_forked)  # rather than asking the kernel for the pid on every request


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and instance (never 0)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") or 1


class Table:
    def __init__(self, path: str | None, max_sessions: int, max_blocks: int) -> None:
        self.path = path
        session_buckets = max(1, -(-max_sessions // WAYS))
        block_buckets = max(1, -(-max_blocks // WAYS))
        self._fd = -1
        self._lock = threading.Lock()
        self._slots: dict[str, int] = {}   # replica name -> column, once known here
        self._pid = 0
        self._me = 0
        self._next_sweep = 0.0
        _TABLES.add(self)
        if path:
            try:
                self._open(path, session_buckets, block_buckets)
            except OSError as exc:
                log.error("fleet: shared balancer file %s is not usable (%s); counts and affinity are per worker",
                          path, exc.strerror or type(exc).__name__)
                self.path = None
        if not self.path:
            self._layout(session_buckets, block_buckets)
            self.buffer = bytearray(self.size)
            _HEADER.pack_into(self.buffer, 0, MAGIC, session_buckets, block_buckets, 0, 0)
        self._view()

    # -- setting up ---------------------------------------------------------
    def _layout(self, session_buckets: int, block_buckets: int) -> None:
        self.session_buckets, self.block_buckets = session_buckets, block_buckets
        self.workers_at = HEADER_BYTES
        self.replicas_at = self.workers_at + WORKERS * 8
        self.cells_at = self.replicas_at + REPLICAS * 8
        self.sessions_at = self.cells_at + REPLICAS * WORKERS * 4
        self.blocks_at = self.sessions_at + session_buckets * _BUCKET.size
        self.size = self.blocks_at + block_buckets * _BUCKET.size
        self._block_words = (self.blocks_at - self.sessions_at) // 8

    def _open(self, path: str, session_buckets: int, block_buckets: int) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            header = os.pread(self._fd, _HEADER.size, 0)
            if len(header) == _HEADER.size and header[:8] == MAGIC:
                _, found_sessions, found_blocks, _, _ = _HEADER.unpack(header)
                if (found_sessions, found_blocks) != (session_buckets, block_buckets):
                    log.warning("fleet: %s was sized for other max-sessions / max-prefix-blocks; the new sizes "
                                "take effect when the instance restarts", path)
                self._layout(found_sessions, found_blocks)
            else:
                self._layout(session_buckets, block_buckets)
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, self.size)  # zero-filled
                os.pwrite(self._fd, _HEADER.pack(MAGIC, session_buckets, block_buckets, 0, 0), 0)
            self.buffer = mmap.mmap(self._fd, self.size)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _view(self) -> None:
        view = memoryview(self.buffer)
        self.pids = view[self.workers_at:self.replicas_at].cast("q")
        self.names = view[self.replicas_at:self.cells_at].cast("Q")
        self.cells = view[self.cells_at:self.sessions_at].cast("i")
        # the two maps read and written in place a word at a time (a bucket is 3 * WAYS words: keys, values,
        # last uses), not unpacked and packed whole
        self.words = view[self.sessions_at:].cast("Q")
        self.floats = view[self.sessions_at:].cast("d")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The file's lock across processes (slot and column tables only; never on the request path twice)."""
        if self._fd < 0:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- worker slots ---------------------------------------------------------
    def me(self) -> int:
        """This process's worker slot (claimed on first use, again after a fork)."""
        if not self._pid:
            with self._lock:
                if not self._pid:
                    self._claim(os.getpid())
        return self._me

    def _claim(self, pid: int) -> None:
        with self._locked():
            claimed = _HEADER.unpack_from(self.buffer, 0)[3]
            slot = next((i for i in range(claimed) if self.pids[i] in (0, pid) or not _alive(self.pids[i])), None)
            if slot is None:
                slot = claimed if claimed < WORKERS else 0
                if claimed < WORKERS:
                    struct.pack_into("I", self.buffer, 20, claimed + 1)
            self._zero(slot)
            self.pids[slot] = pid
        self._me, self._pid = slot, pid

    def _zero(self, slot: int) -> None:
        cells = self.cells
        for column in range(REPLICAS):
            if cells[column * WORKERS + slot]:
                cells[column * WORKERS + slot] = 0

    def sweep(self, now: float) -> None:
        """Zero the cells of workers that died (at most once per ``SWEEP_INTERVAL``)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_INTERVAL
        claimed = _HEADER.unpack_from(self.buffer, 0)[3]
        for slot in range(claimed):
            pid = self.pids[slot]
            if pid and pid != self._pid and not _alive(pid):
                with self._locked():
                    if self.pids[slot] == pid:
                        self._zero(slot)
                        self.pids[slot] = 0

    # -- replica columns --------------------------------------------------------
    def column(self, replica: str) -> int:
        """The replica's column (-1 when the table is full: it is then counted by nobody)."""
        found = self._slots.get(replica)
        if found is not None:
            return found
        ident = stable_hash(replica)
        with self._lock, self._locked():
            names = self.names
            column = next((i for i in range(REPLICAS) if names[i] == ident), None)
            if column is None:
                column = next((i for i in range(REPLICAS) if names[i] == 0), -1)
                if column >= 0:
                    names[column] = ident
                else:
                    log.error("fleet: more than %d replica names; %s is balanced without in-flight counts",
                              REPLICAS, replica)
            self._slots[replica] = column
        return column

    # -- in-flight ------------------------------------------------------------
    def begin(self, replica: str) -> int:
        """Count a request in flight to ``replica`` in this worker's cell of its column; the cell (-1: not counted)."""
        column = self._slots.get(replica)
        if column is None:
            column = self.column(replica)
        if column < 0:
            return -1
        cell = column * WORKERS + (self._me if self._pid else self.me())
        lock = self._lock  # (acquire and release: a ``with`` costs a third of this method; nothing between raises)
        lock.acquire()
        self.cells[cell] += 1
        lock.release()
        return cell

    def end(self, cell: int) -> None:
        """The request counted in ``cell`` (``begin``'s) is over."""
        if cell >= 0:
            lock = self._lock
            lock.acquire()
            self.cells[cell] -= 1
            lock.release()

    def busy(self, columns: list[int] | tuple[int, ...]) -> list[int]:
        """Requests in flight to each of these replicas from every worker of the instance."""
        return self.counter(columns)()

    def counter(self, columns: list[int] | tuple[int, ...]) -> Callable[[], list[int]]:
        """What reads the in-flight counts of ``columns`` (each summed over the workers) with one unpack: a
        replica set keeps one (``balancer._Known``)."""
        buffer, cells_at, claimed_at = self.buffer, self.cells_at, _CLAIMED.unpack_from
        known = [(0, None, None)]  # (claimed slots, unpack and order for them): one tuple, read once a call

        def read() -> list[int]:
            claimed = claimed_at(buffer, 20)[0] or 1
            layout = known[0]
            if claimed != layout[0]:
                layout = known[0] = (claimed, *self._reader(columns, claimed))
            _, unpack, order = layout
            cells = unpack(buffer, cells_at)  # the claimed cells of every column, in one call
            if claimed > 1:
                cells = [sum(cells[at:at + claimed]) for at in range(0, len(cells), claimed)]
            found = order(cells) if order is not None else cells
            return [max(0, count) for count in found] if found and min(found) < 0 else list(found)
        return read

    def _reader(self, columns, claimed: int) -> tuple:
        """(unpack: the claimed cells of the distinct columns in ascending order; what puts their sums in
        ``columns``' order, or None when they are in it)."""
        present = sorted({column for column in columns if column >= 0})
        layout, at = [], 0
        for column in present:
            start = column * WORKERS * 4
            layout.append(f"{start - at}x{claimed}i")
            at = start + claimed * 4
        unpack = struct.Struct("=" + "".join(layout)).unpack_from
        where = {column: n for n, column in enumerate(present)}
        picks = [where.get(column, len(present)) for column in columns]
        if picks == list(range(len(columns))) and -1 not in columns:
            return unpack, None

        def order(cells) -> list[int]:
            padded = (*cells, 0)  # a column -1 (not counted) reads the 0 past the end
            return [padded[n] for n in picks]
        return unpack, order

    def mine(self) -> dict[str, int]:
        """This worker's non-zero counts by replica name (what it reports to other instances)."""
        me, cells = self.me(), self.cells
        return {name: cells[column * WORKERS + me] for name, column in list(self._slots.items())
                if column >= 0 and cells[column * WORKERS + me] > 0}

    # -- the two maps -----------------------------------------------------------
    def _bucket(self, sessions: bool, key: int) -> int:
        """The word where ``key``'s bucket starts in ``words`` (its keys, then values, then last uses)."""
        if sessions:
            return key % self.session_buckets * _WORDS
        return self._block_words + key % self.block_buckets * _WORDS

    def get(self, sessions: bool, key: int, ttl: float = 0.0) -> int:
        """The value stored under ``key`` (0: none); a session entry older than ``ttl`` counts as none."""
        words = self.words
        at = self._bucket(sessions, key)
        for way in range(at, at + WAYS):
            if words[way] == key:
                if ttl and self.floats[way + 2 * WAYS] < time.time() - ttl:
                    return 0
                return words[way + WAYS]
        return 0

    def probe(self, key: int) -> tuple[int, bool]:
        """A prefix block's value (0: none), and whether its last use is older than ``FRESH`` (worth a touch)."""
        words = self.words
        at = self._block_words + key % self.block_buckets * _WORDS  # (``_bucket``'s, inlined: once a probe)
        for way in range(at, at + WAYS):
            if words[way] == key:
                return words[way + WAYS], self.floats[way + 2 * WAYS] < time.time() - FRESH
        return 0, False

    def put(self, sessions: bool, key: int, value: int, merge: bool = False, bump: int = 0, first: int = 0) -> bool:
        """Store ``value`` (or OR it into the one there, with ``merge``, and add ``bump``; a new entry gets
        ``first`` added), evicting the bucket's oldest entry; True when ``key`` was not there before."""
        words, floats = self.words, self.floats
        at = self._bucket(sessions, key)
        now = time.time()
        for way in range(at, at + WAYS):
            if words[way] == key:
                if merge:
                    old = words[way + WAYS]
                    if not bump and old & value == value and floats[way + 2 * WAYS] > now - FRESH:
                        return False  # already there and fresh: skip the write
                    value |= old
                    if bump and (old >> 56) < 255:
                        value += bump << 56
                words[way + WAYS] = value
                floats[way + 2 * WAYS] = now
                return False
        times = floats[at + 2 * WAYS:at + 3 * WAYS].tolist()
        way = at + times.index(min(times))
        words[way] = key
        words[way + WAYS] = value + first
        floats[way + 2 * WAYS] = now
        return True

    def drop(self, sessions: bool, key: int) -> None:
        words = self.words
        at = self._bucket(sessions, key)
        for way in range(at, at + WAYS):
            if words[way] == key:
                words[way] = 0

