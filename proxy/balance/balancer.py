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
from collections import deque
from dataclasses import dataclass, field
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
    stale: list[int] = field(default_factory=list)  # keys of held blocks the search saw not used for a while


class Balancer:
    def __init__(self, path: str | None, fleet: Fleet) -> None:
        self.table = Table(path, fleet.max_sessions, fleet.max_prefix_blocks)
        self.remote: Any = None   # remote.RemoteLink with Redis: other instances' counts and affinity
        # ties go in turn, each worker from its own start (its slot in the table): workers deciding at the
        # same moment seldom pick alike, and one process always starts at the first replica
        self._turn = itertools.count(self.table.me() * 7919)
        self._hashes: dict[str, int] = {}
        self._counters: dict[tuple[str, str, str], Any] = {}
        # prompts whose blocks wait for this process's index thread (``served``), and their bytes
        self._waiting: deque[tuple] = deque()
        self._waiting_bytes = 0
        self._waiting_lock = threading.Lock()
        self._entering = threading.Lock()
        self._wake = threading.Event()
        self._thread_pid = 0

    # -- in flight --------------------------------------------------------------
    def _known(self, targets: tuple) -> tuple:
        """(table, replica names, their columns, their bits in a prefix entry, those bits together), looked
        up once per replica set (a router's replica set keeps them)."""
        known = getattr(targets, "columns", None)
        if known is None or known[0] is not self.table:
            names = [t.replica_name for t in targets]
            columns = [self.table.column(name) for name in names]
            bits = [column % 56 for column in columns]
            known = (self.table, names, columns, bits, sum({1 << bit for bit in bits}))
            if isinstance(targets, Replicas):
                targets.columns = known
        return known

    def loads(self, targets: tuple) -> list[int]:
        """Requests in flight to each target's replica: this instance's workers, plus other instances'."""
        _, names, columns, _, _ = self._known(targets)
        found = self.table.busy(columns)
        remote = self.remote
        if remote is not None and remote.busy:
            found = [count + remote.busy.get(name, 0) for count, name in zip(found, names)]
        return found

    def begin(self, target: Target) -> int:
        column = self.table.column(target.replica_name)
        self.table.add(column, 1)
        return column

    def end(self, target: Target, column: int) -> None:
        self.table.add(column, -1)

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
              raw: bytes | None = None) -> Choice:
        """The order to try ``targets`` in for this request, and why the first one (``raw``: the body as the
        client sent it, which the prefix index keys; serialised from ``body`` when not given)."""
        policy = getattr(targets, "policy", "round-robin")
        if len(targets) < 2 or policy == "round-robin":
            choice = Choice(tuple(targets), policy, "round-robin")
            if len(targets) > 1:
                self._count(targets, choice)
            elif policy == "cache-aware" and targets:
                # the only replica left (the others disabled) takes over its sessions for when they return
                key = hints.session_key(body, headers)
                if key is not None:
                    choice.session = hints.session_hash(getattr(targets, "name", "") or targets[0].model, key)
            return choice
        self.table.sweep(time.monotonic())
        loads = self.loads(targets)
        count = len(targets)
        turn = next(self._turn) % count
        # least busy first, usable before resting, ties in turn: a stable sort of the indices from this turn on
        rotated = [*range(turn, count), *range(turn)]
        if keys.sitting_out():
            resting = [keys.resting(t) for t in targets]
            order = sorted(rotated, key=lambda i: (resting[i], loads[i]))
        else:
            resting = [False] * count
            order = sorted(rotated, key=loads.__getitem__)
        if policy == "least-busy":
            choice = Choice(itemgetter(*order)(targets), policy, "least-busy")
            self._count(targets, choice)
            return choice
        choice = Choice((), policy, "least-busy")
        chosen = -1
        group = getattr(targets, "name", "") or targets[0].model
        key = hints.session_key(body, headers)
        if key is not None:
            # A hinted session goes where it went before; a new one (or one whose replica cannot take it
            # now) to the least busy replica: with a hint, a prefix match could only be a prefix shared
            # with other sessions, and spreading sessions is worth more than one more copy of it.
            choice.session = hints.session_hash(group, key)
            replica = self.table.get(True, choice.session, fleet.session_ttl)
            if not replica and self.remote is not None:
                # new here: put it on the least busy replica unless another instance already placed it
                # (one atomic step in Redis, so two instances seeing its first turns agree)
                ours = self._hash(targets[order[0]])
                replica = choice.claimed = self.remote.claim(choice.session, ours, fleet.session_ttl)
                if replica == ours:
                    replica = 0  # ours: placed below like any new session
            choice.session_replica = replica
            if replica:
                for i in range(count):
                    if not resting[i] and self._hash(targets[i]) == replica:
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
            choice.blocks = blocks = hints.Blocks(raw, fleet.block_chars, *hints.history_span(body, raw))
            if blocks.count:
                _, _, _, bits, wanted = self._known(targets)
                least = math.ceil(fleet.cache_threshold * blocks.length / fleet.block_chars)
                choice.matched, choice.mask = matched, mask = self._longest(blocks, wanted, choice.stale, least)
                # a match that ends where many prompts branched off is a shared prefix (a system prompt
                # and tools), not this conversation: it does not pin the request to the replicas holding it
                if (matched and mask >> 56 < 2
                        and matched * fleet.block_chars >= fleet.cache_threshold * blocks.length):
                    holders = [i for i in order if not resting[i] and mask >> bits[i] & 1]
                    if holders:
                        chosen, choice.reason = holders[0], "prefix"
        if chosen >= 0 and choice.reason in ("affinity", "prefix"):
            idlest = loads[order[0]]
            if (loads[chosen] - idlest > fleet.balance_abs_threshold
                    and loads[chosen] > fleet.balance_rel_threshold * idlest):
                chosen, choice.reason = -1, "imbalance"
        if chosen < 0:
            chosen = order[0]
        ordered = itemgetter(*order)(targets)
        if chosen != order[0]:
            ordered = (targets[chosen], *(target for target in ordered if target is not targets[chosen]))
        choice.targets = ordered
        self._count(targets, choice)
        return choice

    def _longest(self, blocks: hints.Blocks, wanted: int, stale: list[int], least: int = 0) -> tuple[int, int]:
        """(number of leading blocks some replica of the set (``wanted``: their bits) holds, bit mask of those
        replicas), or, once the run is known to be shorter than ``least`` blocks (too short to route by), a run
        at least that long is held (the request's blocks are then entered from there: those held already are
        only touched).

        A replica sent block i of a prompt was sent every block before it, so
        the end of the run is searched for, keying only the blocks probed:
        first two blocks short of the end (a conversation's next turn is its
        last turn plus a tail of one to four blocks: two or three probes find
        where it stops), then back in steps growing fourfold, then by
        bisection, unless the run is already known to be too short to route
        by (a conversation the index has not seen, whose shared system prompt
        is a small part of it: about four probes).
        Held blocks found not used for a while go into ``stale``, to be touched
        once a replica takes the request.
        """
        probe = self.table.probe
        key = blocks.key
        low, high, mask, step = 0, blocks.count, 0, 3  # the run is at least low and at most high blocks long
        while low < high and high >= least:
            length = max(1, high + 1 - step) if step else (low + high + 1) // 2
            block = key(length - 1)
            found, old = probe(block)
            if found & wanted:
                low, mask, step = length, found, 0  # found from the end: bisect from here on
                if old:
                    stale.append(block)
            else:
                high, step = length - 1, 2 if step == 3 else step * 4
        return low, mask & (wanted | BRANCHES)

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
        job = (blocks, choice.matched, choice.mask, choice.stale, 1 << self._bit(target))
        held = len(blocks.data.obj)  # a waiting prompt holds the whole body, not only its history's bytes
        with self._waiting_lock:
            if self._waiting_bytes + held <= waiting:
                self._waiting_bytes += held
                idle = not self._waiting  # else the thread is woken already and takes this one too
                self._waiting.append((held, job))
                if self._thread_pid != os.getpid():  # first use in this process (a gunicorn worker forks)
                    self._thread_pid = os.getpid()
                    threading.Thread(target=self._index_thread, name="fleet-index", daemon=True).start()
                if idle:
                    self._wake.set()
                return
        self._enter(*job)

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
            self._wake.wait()
            self._wake.clear()
            self.settle()

    def _enter(self, blocks: hints.Blocks, matched: int, mask: int, stale: list[int], bit: int) -> None:
        """Enter a prompt's blocks as sent to the replica of ``bit``."""
        put, key = self.table.put, blocks.key
        # The blocks this replica already held are only touched (those the search found stale, for the
        # LRU); the rest are entered. An entry counts the different blocks seen after it (its top byte): a
        # new block counts one more after the block before it, which a block entered here starts with.
        start = matched if mask & bit else 0
        for block in stale if start else ():
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

    def _bit(self, target: Target) -> int:
        return self.table.column(target.replica_name) % 56

    def _count(self, targets: tuple, choice: Choice) -> None:
        key = (getattr(targets, "name", "") or "-", choice.policy, choice.reason)
        found = self._counters.get(key)
        if found is None:
            found = self._counters[key] = metrics.ROUTING.labels(*key)
        found.inc()
