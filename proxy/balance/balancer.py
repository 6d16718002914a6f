"""Choose the replica for one request: round-robin, least-busy or cache-aware (README "Serving a fleet").

``route`` orders a replica set for one request (the executor then walks it
for failover); ``begin`` / ``end`` count the request in flight at the replica
it went to; ``served`` remembers where a session and a prompt went once a
replica accepted it.

cache-aware, per request:

1. A session hint (``hints.session_key``) whose session went to a replica
   that is usable now: that replica (reason ``affinity``).
   A hinted session not seen before goes to the least busy replica: spreading
   sessions is worth more than the one copy of a shared system prompt each
   replica must prefill once.
2. Without a hint, the approximate prefix index: the replicas holding the
   longest run of this prompt's leading blocks; if that run covers at least
   ``cache-threshold`` of the prompt, and does not end where prompts have
   branched off before (then it is a prefix shared by many conversations,
   such as an agent's system prompt and tools, not this conversation), the
   least busy of them (``prefix``).
3. Else the least busy replica (``least-busy``).
4. Whichever was chosen in 1 or 2: when it has more than
   ``balance-abs-threshold`` requests in flight over the idlest replica *and*
   more than ``balance-rel-threshold`` times as many, the least busy replica
   instead (``imbalance``), as the SGLang gateway does (it compares the
   busiest with the idlest; comparing the chosen one does not move a request
   off an idle replica because some other one is busy). Only the request
   moves: a hinted session stays on the replica holding its history, where
   its next turn goes unless that one is still overloaded.

A replica backing off after a connect failure or with every key cooling down
is tried last (its sessions move to the next best and stay there); a
disabled provider is not in the set at all. Ties go round-robin.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
import time
import weakref
import zlib
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Iterable

import orjson

from .. import metrics
from ..routing import Replicas
from . import hints
from .table import Table, stable_hash

if TYPE_CHECKING:
    from ..config.model import Fleet
    from ..keys import KeyPool
    from ..routing import Target

BRANCHES = 0xFF << 56  # a prefix entry's top byte: how many different blocks came after it (saturating)
BRANCH = 1 << 56
_BALANCERS: weakref.WeakSet = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [balancer._forked() for balancer in list(_BALANCERS)])
REASONS = ("round-robin", "least-busy", "affinity", "prefix", "imbalance", "failover")


@dataclass(slots=True)
class Choice:
    """One request's routing: the order to try, and what to remember once a replica accepts it."""

    targets: tuple
    policy: str
    reason: str
    session: int = 0                       # session hash (0: no hint)
    session_replica: int = 0               # the replica hash the session was on before this request
    claimed: int = 0                       # the replica hash Redis holds for the session after this request
    blocks: hints.Blocks | None = None     # the prompt's blocks, keyed as they are looked at (cache-aware)
    matched: int = 0                       # leading blocks the index held, and for which replicas
    mask: int = 0
    stale: list[int] | None = None         # keys of held blocks the search saw not used for a while
    bits: dict[str, int] | None = None     # each replica's bit in the prefix index (the set's)


class _Known:
    """What the balancer looks up once per replica set (a router's replica set keeps it, as ``columns``)."""

    __slots__ = ("table", "names", "columns", "busy", "bits", "bit_of", "wanted", "hashes", "rotations",
                 "counters", "name", "seeds")

    def __init__(self, table: Table, targets: tuple) -> None:
        self.table = table
        self.name = getattr(targets, "name", "") or (targets[0].model if targets else "")
        self.names = [target.replica_name for target in targets]
        self.columns = tuple(table.column(name) for name in self.names)  # in the table's in-flight cells
        self.busy = table.counter(self.columns)                          # () -> their counts
        # each replica's bit in a prefix entry: its place in the set (the blocks are keyed from the set's name,
        # so no other set's entries are read); a set of more than 56 replicas shares some
        self.bit_of: dict[str, int] = {}
        for name in self.names:
            self.bit_of.setdefault(name, len(self.bit_of) % 56)
        self.bits = [self.bit_of[name] for name in self.names]
        self.wanted = sum({1 << bit for bit in self.bits})
        self.hashes = [stable_hash(name) for name in self.names]         # what affinity stores
        count = len(targets)
        self.rotations = [(*range(turn, count), *range(turn)) for turn in range(count)]
        self.counters: dict[str, Any] = {}  # reason -> its routing-decisions counter for this set and policy
        self.seeds: dict[str, int] = {}     # tenant -> where its blocks' keys start (the set's and its own)

    def seed(self, tenant: str) -> int:
        found = self.seeds.get(tenant)
        if found is None:
            if len(self.seeds) >= 4096:  # (tenants are configured keys; bounded all the same)
                self.seeds.clear()
            found = self.seeds[tenant] = zlib.crc32(
                (self.name + "\x00" + tenant).encode("utf-8", "surrogatepass"))
        return found


class Balancer:
    def __init__(self, path: str | None, fleet: Fleet) -> None:
        self.table = Table(path, fleet.max_sessions, fleet.max_prefix_blocks)
        self.remote: Any = None   # remote.RemoteLink with Redis: other instances' counts and affinity
        # ties go in turn, each worker from its own start (its slot in the table): workers deciding at the
        # same moment seldom pick alike, and one process always starts at the first replica
        self._turn = itertools.count(self.table.me() * 7919)
        self._hashes: dict[str, int] = {}
        self._forked()
        _BALANCERS.add(self)

    def _forked(self) -> None:
        """The index thread's state, new (a forked gunicorn worker has none of its parent's threads)."""
        # prompts whose blocks wait for this process's index thread (``served``), and their bytes
        self._waiting: deque[tuple] = deque()
        self._waiting_bytes = 0
        self._waiting_lock = threading.Lock()
        self._entering = threading.Lock()
        # the index thread sleeps on this lock; ``served`` releases it when the thread is not already awake (a
        # lock, not an Event: releasing one is a C call, setting an Event takes a Python-level Condition)
        self._signal = threading.Lock()
        self._signal.acquire()
        self._awake = False     # the thread has been (or will be) woken and has not found the queue empty since
        self._indexing = False  # the thread runs in this process

    # -- in flight --------------------------------------------------------------
    def _known(self, targets: tuple) -> _Known:
        """The replica set's names, columns, bits, hashes and turns (``_Known``), looked up once per replica set."""
        known = getattr(targets, "columns", None)
        if known is None or known.table is not self.table:
            known = _Known(self.table, targets)
            if isinstance(targets, Replicas):
                targets.columns = known
        return known

    def loads(self, targets: tuple, known: _Known | None = None) -> list[int]:
        """Requests in flight to each target's replica: this instance's workers, plus other instances'."""
        if known is None:
            known = self._known(targets)
        found = known.busy()
        remote = self.remote
        if remote is not None and remote.busy:
            found = [count + remote.busy.get(name, 0) for count, name in zip(found, known.names)]
        return found

    def begin(self, target: Target) -> int:
        """Count the request in flight at ``target``'s replica; what ``end`` takes when it is over."""
        return self.table.begin(target.replica_name)

    def end(self, target: Target, cell: int) -> None:
        self.table.end(cell)

    def in_flight(self, targets: Iterable[Target]) -> list[tuple[str, str, int]]:
        """(provider, replica, requests in flight from this instance's workers) for each replica of ``targets``:
        the ``streamfold_replica_in_flight`` gauge, read from the table when ``/metrics`` is scraped rather
        than written twice per request."""
        providers: dict[str, str] = {}
        for target in targets:
            providers.setdefault(target.replica_name, target.provider.name)
        names = list(providers)
        counts = self.table.busy([self.table.column(name) for name in names])
        return [(providers[name], name, count) for name, count in zip(names, counts)]

    # -- choosing -----------------------------------------------------------------
    def route(self, targets: tuple, body: dict, headers: dict[str, str], keys: KeyPool, fleet: Fleet,
              raw: bytes | None = None, tenant: str = "") -> Choice:
        """The order to try ``targets`` in for this request, and why the first one (``raw``: the body as the
        client sent it, which the prefix index keys; serialised from ``body`` when not given; ``tenant``: the
        client key's identity, whose sessions and prompts are its own)."""
        policy = getattr(targets, "policy", "round-robin")
        if len(targets) < 2 or policy == "round-robin":
            choice = Choice(tuple(targets), policy, "round-robin")
            if len(targets) > 1:
                self._count(targets, choice)
            elif policy == "cache-aware" and targets:
                # the only replica left (the others disabled) takes over its sessions for when they return
                key = hints.session_key(body, headers)
                if key is not None:
                    choice.session = hints.session_hash(getattr(targets, "name", "") or targets[0].model, key,
                                                        tenant)
            return choice
        self.table.sweep(time.monotonic())
        known = self._known(targets)
        loads = self.loads(targets, known)
        count = len(targets)
        # least busy first, usable before resting, ties in turn: a stable sort of the indices from this turn on
        rotated = known.rotations[next(self._turn) % count]
        if keys.sitting_out():
            resting = [keys.resting(t) for t in targets]
            order = sorted(rotated, key=lambda i: (resting[i], loads[i]))
        else:
            resting = None
            # (all as busy, as when the fleet is idle: the turn's order as it is)
            order = list(rotated) if loads.count(loads[0]) == count else sorted(rotated, key=loads.__getitem__)
        if policy == "least-busy":
            choice = Choice(itemgetter(*order)(targets), policy, "least-busy")
            self._count(targets, choice, known)
            return choice
        choice = Choice((), policy, "least-busy")
        chosen = -1
        key = hints.session_key(body, headers)
        if key is not None:
            # A hinted session goes where it went before; a new one (or one whose replica cannot take it
            # now) to the least busy replica: with a hint, a prefix match could only be a prefix shared
            # with other sessions, and spreading sessions is worth more than one more copy of it.
            choice.session = hints.session_hash(known.name, key, tenant)
            replica = self.table.get(True, choice.session, fleet.session_ttl)
            if not replica and self.remote is not None:
                # new here: put it on the least busy replica unless another instance already placed it
                # (one atomic step in Redis, so two instances seeing its first turns agree)
                ours = known.hashes[order[0]]
                replica = choice.claimed = self.remote.claim(choice.session, ours, fleet.session_ttl)
                if replica == ours:
                    replica = 0  # ours: placed below like any new session
            choice.session_replica = replica
            if replica:
                hashes = known.hashes
                for i in range(count):
                    if hashes[i] == replica and not (resting and resting[i]):
                        chosen, choice.reason = i, "affinity"
                        break
                else:
                    choice.reason = "failover"  # its replica is resting or gone: the next best takes it
        else:
            if self._waiting or self._entering.locked():
                self.settle()  # what earlier requests sent, first (the index thread has not got to it yet)
            if raw is None:  # a caller without the body as sent (the routes pass it)
                try:
                    raw = orjson.dumps(body)
                except orjson.JSONEncodeError:  # nested past orjson's 254 levels: nothing to key
                    raw = b""
            start, end = hints.history_span(body, raw)
            choice.blocks = blocks = hints.Blocks(raw, fleet.block_chars, start, end, known.seed(tenant))
            choice.bits = known.bit_of
            if blocks.count:
                least = math.ceil(fleet.cache_threshold * blocks.length / fleet.block_chars)
                matched, mask, choice.stale = self._longest(blocks, known.wanted, least)
                choice.matched, choice.mask = matched, mask
                # a match that ends where many prompts branched off is a shared prefix (a system prompt
                # and tools), not this conversation: it does not pin the request to the replicas holding it
                if (matched and mask >> 56 < 2
                        and matched * fleet.block_chars >= fleet.cache_threshold * blocks.length):
                    bits = known.bits
                    for i in order:
                        if mask >> bits[i] & 1 and not (resting and resting[i]):
                            chosen, choice.reason = i, "prefix"
                            break
        first = order[0]
        if chosen >= 0:
            idlest = loads[first]
            if (loads[chosen] - idlest > fleet.balance_abs_threshold
                    and loads[chosen] > fleet.balance_rel_threshold * idlest):
                chosen, choice.reason = first, "imbalance"
            elif chosen != first:
                order.remove(chosen)
                order.insert(0, chosen)
        choice.targets = itemgetter(*order)(targets)
        self._count(targets, choice, known)
        return choice

    def _longest(self, blocks: hints.Blocks, wanted: int, least: int = 1) -> tuple[int, int, list[int] | None]:
        """(a number of leading blocks some replicas of the set (``wanted``: their bits) hold, bit mask of those
        replicas, the held blocks it found not used for a while or None): the longest such run, or a run found
        long enough to route by (``least`` blocks) that one replica alone holds and that is no branching point
        (a longer one could only be that replica's too: the choice would be the same), or, once the run is
        known to be shorter than ``least``, whatever was found (the request's blocks are entered from there:
        those held already are only touched).

        A replica sent block i of a prompt was sent every block before it, so
        the end of the run is searched for, keying only the blocks probed:
        first two blocks short of the end (a conversation's next turn is its
        last turn plus a tail of new messages: when that tail is under two
        blocks this one probe decides), then at ``least`` (a longer tail's
        conversation is found there, and one the index has not seen is known
        to be too short to route by after two probes), and once a block is
        found by bisection towards the last block not found, unless the run
        found is already enough to decide.
        Held blocks found not used for a while are touched once a replica
        takes the request.
        """
        probe, key = self.table.probe, blocks.key
        least = least if least > 1 else 1
        low, high, mask, stale = 0, blocks.count, 0, None  # the run is at least low and at most high blocks long
        length = high - 2 if high > 3 else 1
        while True:
            block = key(length - 1)
            found, old = probe(block)
            held = found & wanted
            if held:
                low, mask = length, found
                if old:
                    if stale is None:
                        stale = []
                    stale.append(block)
                if length >= least and not held & (held - 1) and found >> 56 < 2:
                    break  # one replica, not a branching point, long enough: probing further changes nothing
            else:
                high = length - 1
            if low >= high or high < least:
                break
            # none found yet: straight to the shortest run worth routing by; else bisect
            length = (low + high + 1) // 2 if mask else least
        return low, mask & (wanted | BRANCHES), stale

    def served(self, choice: Choice, target: Target, fleet: Fleet, waiting: int = 0) -> None:
        """A replica accepted the request: its session and its prompt's blocks are on that replica now.

        The session is written at once; the blocks are entered by this
        process's index thread, off the request's path, while the bodies
        waiting for it come to at most ``waiting`` bytes (``max-request-bytes``
        from the executor; past that, and with 0, here). A request routed
        by the index first enters whatever is still waiting (``settle``), so
        the next turn finds this one's blocks however soon it comes.
        """
        if choice.policy != "cache-aware":
            return
        if choice.session:
            replica = self._hash(target)
            if choice.reason == "imbalance" and choice.session_replica and target is choice.targets[0]:
                replica = choice.session_replica  # only this turn went elsewhere: its history stays home
            self.table.put(True, choice.session, replica)
            if self.remote is not None and replica not in (choice.session_replica, choice.claimed):
                self.remote.move(choice.session, replica, fleet.session_ttl)  # it moved (or Redis said nothing)
        blocks = choice.blocks
        if blocks is None or not blocks.count:
            return
        choice.blocks = None
        job = (blocks, choice.matched, choice.mask, choice.stale, 1 << choice.bits.get(target.replica_name, 0))
        held = len(blocks.data)  # a waiting prompt holds the whole body, not only its history's bytes
        with self._waiting_lock:
            queued = self._waiting_bytes + held <= waiting
            if queued:
                self._waiting_bytes += held
                self._waiting.append((held, job))
                wake, self._awake = not self._awake, True
        if not queued:
            self._enter(*job)
        elif wake:
            if not self._indexing:  # first use in this process (a gunicorn worker forks)
                self._indexing = True
                threading.Thread(target=self._index_thread, name="fleet-index", daemon=True).start()
            self._signal.release()

    def settle(self) -> None:
        """Enter every prompt still waiting for the index thread (and wait for the one it is entering)."""
        with self._entering:
            waiting = self._waiting
            while waiting:
                held, job = waiting.popleft()
                with self._waiting_lock:
                    self._waiting_bytes -= held
                self._enter(*job)

    def _index_thread(self) -> None:
        while True:
            self._signal.acquire()
            while True:
                self.settle()
                # asleep only once the queue is seen empty under the lock ``served`` appends under: a prompt
                # appended after that wakes the thread again, none is left waiting for a request to settle it
                with self._waiting_lock:
                    if not self._waiting:
                        self._awake = False
                        break

    def _enter(self, blocks: hints.Blocks, matched: int, mask: int, stale: list[int], bit: int) -> None:
        """Enter a prompt's blocks as sent to the replica of ``bit``."""
        put, key = self.table.put, blocks.key
        # The blocks this replica already held are only touched (those the search found stale, for the
        # LRU); the rest are entered. An entry counts the different blocks seen after it (its top byte): a
        # new block counts one more after the block before it, which a block entered here starts with.
        start = matched if mask & bit else 0
        for block in stale if start and stale else ():
            put(False, block, bit, merge=True)
        previous, entered, last = key(start - 1) if start else 0, False, blocks.count - 1
        for index, block in enumerate(blocks.keys_from(start), start):
            new = put(False, block, bit, merge=True, first=BRANCH if index < last else 0)
            if new and previous and not entered:
                put(False, previous, bit, merge=True, bump=1)
            previous, entered = block, new

    def forget_session(self, choice: Choice) -> None:
        if choice.session:
            self.table.drop(True, choice.session)

    def _hash(self, target: Target) -> int:
        name = target.replica_name
        found = self._hashes.get(name)
        if found is None:
            found = self._hashes[name] = stable_hash(name)
        return found

    def _count(self, targets: tuple, choice: Choice, known: _Known | None = None) -> None:
        if known is not None:  # the set's own counters, by reason
            found = known.counters.get(choice.reason)
            if found is None:
                found = known.counters[choice.reason] = metrics.child(
                    metrics.ROUTING, getattr(targets, "name", "") or "-", choice.policy, choice.reason)
        else:
            found = metrics.child(metrics.ROUTING, getattr(targets, "name", "") or "-", choice.policy, choice.reason)
        found.inc()
