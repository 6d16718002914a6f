"""The shared state store: Redis (``REDIS_URL``), so usage and limits are the same for every instance.

Keys (all under ``streamfold:``, or ``<redis-namespace>:streamfold:`` when the setting is given, the channel
too, so deployments sharing one Redis with different namespaces never see each other's; the names below are
without it): ``blob:<namespace>:<key>`` (expiring
strings; a capped namespace also keeps ``blobindex:<namespace>``, its blobs
by expiry, ``blobsizes:<namespace>``, their sizes, and ``blobbytes:<namespace>``,
their total), ``usage:<day>`` (a hash per UTC day; field = JSON
``[client, model, provider, counter]``), ``win:<name>`` + ``wintotal:<name>``
(a sliding window: a sorted set of entries scored by time, and its running
total), ``slots:<name>`` (a sorted set of held slot tokens scored by lease
expiry), ``identity-secret`` (the deployment's, ``identity.py``); shared by
instances: ``auth:<address>`` (``mark``: a sorted set of times, the management
lockout's failures), expiring strings (``announce``, ``claim``): ``instance:<host>:<pid>``,
``cool:<kind>:<provider>:<key id>``, ``fleet:session:<hash>``, ``fleet:busy:<instance>:<pid>``, the pub/sub channel ``events`` (``publish``,
``subscribe``) and versioned documents (a hash of ``version``, ``revision`` and
the value under the document's name): ``providers``. Window and slot updates are Lua scripts using Redis's own clock, so
the check and the add are one atomic step and instances' clocks need not
agree.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Mapping, Sequence

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config.file import redact_url
from .store import COUNTERS, Store, StoreUnavailable, UsageKey

PREFIX = "streamfold:"  # of every key without a namespace; ``<namespace>:streamfold:`` with one
NOT_A_DOCUMENT = b"(not a hash)"  # the revision of a versioned document's key that holds another type
USAGE_TTL = 400 * 86400  # usage days kept in Redis (a year and a bit)

# KEYS: window, total. ARGV: limit (-1 = record without a check), span s, cost, nonce.
# Returns "0" when admitted, else seconds until the oldest entry leaves the window.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local limit, span, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - span)
if #old > 0 then
  local gone = 0
  for _, member in ipairs(old) do gone = gone + tonumber(string.match(member, ':(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span)
  redis.call('DECRBY', KEYS[2], gone)
end
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if total < 0 then total = 0; redis.call('SET', KEYS[2], 0) end
if limit < 0 or total < limit then
  if cost > 0 then
    redis.call('ZADD', KEYS[1], now, ARGV[4] .. ':' .. cost)
    redis.call('INCRBY', KEYS[2], cost)
  end
  local ttl = math.ceil(span * 1000) + 1000
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  return '0'
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if oldest[2] then return tostring(math.max(0.001, tonumber(oldest[2]) + span - now)) end
return tostring(span)
"""
# One request's limits in one step, all or nothing (see Store.admit). KEYS: (window, total) per
# check, the slots key when a slot is wanted, (window, total) per count. ARGV: span, lease, nonce,
# slot token ("" = none), slot limit, number of checks, number of counts, then each limit in order,
# then each check's reservation (added as entry <nonce>r<i>:<amount> once everything passed).
# Returns nil when admitted, else {kind, seconds to wait}.
_ADMIT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local span, lease, nonce, token = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local slot_limit, nchecks, ncounts = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl = math.ceil(span * 1000) + 1000
local function total_of(win, tot)
  local old = redis.call('ZRANGEBYSCORE', win, '-inf', now - span)
  if #old > 0 then
    local gone = 0
    for _, member in ipairs(old) do gone = gone + tonumber(string.match(member, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', win, '-inf', now - span)
    redis.call('DECRBY', tot, gone)
  end
  return math.max(0, tonumber(redis.call('GET', tot) or '0'))
end
local function wait_of(win)
  local oldest = redis.call('ZRANGE', win, 0, 0, 'WITHSCORES')
  if oldest[2] then return tostring(math.max(0.001, tonumber(oldest[2]) + span - now)) end
  return tostring(span)
end
local k = 1
for i = 1, nchecks do
  if total_of(KEYS[k], KEYS[k + 1]) >= tonumber(ARGV[7 + i]) then return {'check', wait_of(KEYS[k])} end
  k = k + 2
end
local slots = false
if token ~= '' then
  slots = KEYS[k]
  k = k + 1
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZCARD', slots) >= slot_limit then return {'slot', '1'} end
end
local first = k
for i = 1, ncounts do
  if total_of(KEYS[k], KEYS[k + 1]) >= tonumber(ARGV[7 + nchecks + i]) then return {'count', wait_of(KEYS[k])} end
  k = k + 2
end
if slots then
  redis.call('ZADD', slots, now + lease, token)
  redis.call('PEXPIRE', slots, math.ceil(lease * 1000) + 1000)
end
k = first
for i = 1, ncounts do
  redis.call('ZADD', KEYS[k], now, nonce .. i .. ':1')
  redis.call('INCRBY', KEYS[k + 1], 1)
  redis.call('PEXPIRE', KEYS[k], ttl)
  redis.call('PEXPIRE', KEYS[k + 1], ttl)
  k = k + 2
end
k = 1
for i = 1, nchecks do
  local cost = tonumber(ARGV[7 + nchecks + ncounts + i])
  if cost > 0 then
    redis.call('ZADD', KEYS[k], now, nonce .. 'r' .. i .. ':' .. cost)
    redis.call('INCRBY', KEYS[k + 1], cost)
    redis.call('PEXPIRE', KEYS[k], ttl)
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
  end
  k = k + 2
end
return false
"""
# KEYS: window, total. ARGV: a reservation's entry. Takes it out unless it has left the window already.
_UNRESERVE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(string.match(ARGV[1], ':(%d+)$')))
end
return 0
"""
# KEYS: slots. ARGV: limit, lease s, token. Returns 1 when a slot was taken.
_ACQUIRE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return 1
"""
# KEYS: slots keys; ARGV: lease, then one token per key. Extends leases still held.
_RENEW = """
local now_parts = redis.call('TIME')
local until_ = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000 + tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', until_, ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
end
return 1
"""


# A capped namespace's put. KEYS: the blob, the namespace's index (sorted set: blob key by expiry, ms), its
# sizes (hash: blob key -> bytes) and their running total. ARGV: value, ttl ms, max blobs, max bytes. The
# oldest blobs (first to expire) of the owner holding the most (sqlite.owner_of; ARGV[5]: the length of the
# blob keys' prefix before it) are dropped until both caps hold; entries of blobs Redis expired go first.
_PUT_CAPPED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local total = tonumber(redis.call('GET', KEYS[4]) or '-1')
if total < 0 then
  total = 0
  for _, size in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(size) end
end
local function forget(key)
  total = total - tonumber(redis.call('HGET', KEYS[3], key) or 0)
  redis.call('HDEL', KEYS[3], key)
end
for _, key in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do forget(key) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
forget(KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], string.len(ARGV[1]))
total = total + string.len(ARGV[1])
local count = redis.call('ZCARD', KEYS[2])
local max_count, max_bytes, skip = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if count > max_count or total > max_bytes then
  local function owner(key)
    local slash = string.find(key, '/', skip + 1, true)
    return slash and string.sub(key, skip + 1, slash - 1) or ''
  end
  local sizes, held = {}, {}  -- held: owner -> {count, bytes, its blobs oldest first, their expiries, next}
  local all = redis.call('HGETALL', KEYS[3])
  for i = 1, #all, 2 do sizes[all[i]] = tonumber(all[i + 1]) end
  local index = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #index, 2 do
    local key = index[i]
    local o = owner(key)
    local e = held[o]
    if not e then e = {0, 0, {}, {}, 1}; held[o] = e end
    e[1], e[2] = e[1] + 1, e[2] + (sizes[key] or 0)
    e[3][#e[3] + 1], e[4][#e[4] + 1] = key, tonumber(index[i + 1])
  end
  while count > max_count or total > max_bytes do
    local field = count > max_count and 1 or 2
    local victim, best, first = nil, -1, 0
    for o, e in pairs(held) do
      if e[1] > 0 and (e[field] > best or (e[field] == best and e[4][e[5]] < first)) then
        victim, best, first = o, e[field], e[4][e[5]]
      end
    end
    if victim == nil then break end
    local e = held[victim]
    local key = e[3][e[5]]
    e[5], e[1], e[2] = e[5] + 1, e[1] - 1, e[2] - (sizes[key] or 0)
    forget(key)
    redis.call('ZREM', KEYS[2], key)
    redis.call('DEL', key)
    count = count - 1
  end
end
for i = 2, 3 do redis.call('PEXPIRE', KEYS[i], ttl + 1000) end
redis.call('SET', KEYS[4], total, 'PX', ttl + 1000)
return count
"""

# KEYS: a versioned document. ARGV: its value's field (the document's name), value, revision. Counts the version and
# writes value and revision in one step; or writes nothing and returns Redis's error when the key is no hash or its
# version no integer (MULTI/EXEC would have written them beside the failed count).
_PUT_VERSIONED = """
local version = redis.pcall('HINCRBY', KEYS[1], 'version', 1)
if type(version) == 'table' then return {version['err']} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'revision', ARGV[3])
return version
"""


class RedisStore(Store):
    kind = "redis"
    shares = True

    def __init__(self, url: str, redis_namespace: str = "") -> None:
        super().__init__(redact_url(url))
        # Every key and the channel start with this: deployments sharing one Redis with different namespaces
        # never see each other's (``redis-namespace``; validated: no ':' nor glob characters in it).
        self.redis_namespace = redis_namespace
        self.prefix = f"{redis_namespace}:{PREFIX}" if redis_namespace else PREFIX
        self.channel = self.prefix + "events"  # what ``publish`` sends and ``subscribe`` hears
        # Short timeouts and no retries: a request thread must not wait on a lost Redis.
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                           retry_on_timeout=False, retry=Retry(NoBackoff(), 0))
        self._take_script = self.client.register_script(_TAKE)
        self._acquire_script = self.client.register_script(_ACQUIRE)
        self._renew_script = self.client.register_script(_RENEW)
        self._admit_script = self.client.register_script(_ADMIT)
        self._unreserve_script = self.client.register_script(_UNRESERVE)
        self._put_capped_script = self.client.register_script(_PUT_CAPPED)
        self._put_versioned_script = self.client.register_script(_PUT_VERSIONED)

    def _run(self, operation, *args):
        try:
            return operation(*args)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def _window(self, name: str) -> list[str]:
        """A sliding window's keys: its entries and their running total."""
        return [f"{self.prefix}win:{name}", f"{self.prefix}wintotal:{name}"]

    def _probe(self) -> None:
        self._run(self.client.ping)

    # -- blobs -------------------------------------------------------------------
    def _put_blob(self, namespace: str, key: str, value: bytes, expires: float) -> None:
        ttl_ms = max(1, int((expires - time.time()) * 1000))
        cap = self.caps.get(namespace)
        if cap is None:
            self._run(lambda: self.client.set(f"{self.prefix}blob:{namespace}:{key}", value, px=ttl_ms))
            return
        keys = [f"{self.prefix}blob:{namespace}:{key}", f"{self.prefix}blobindex:{namespace}",
                f"{self.prefix}blobsizes:{namespace}", f"{self.prefix}blobbytes:{namespace}"]
        skip = len(f"{self.prefix}blob:{namespace}:".encode())
        self._run(lambda: self._put_capped_script(keys=keys, args=[value, ttl_ms, cap[0], cap[1], skip]))

    def _get_blob(self, namespace: str, key: str, now: float) -> bytes | None:
        return self._run(self.client.get, f"{self.prefix}blob:{namespace}:{key}")

    # -- usage -------------------------------------------------------------------
    def _add_usage(self, rows: Mapping[UsageKey, Sequence[int]]) -> None:
        def write() -> None:
            pipe = self.client.pipeline(transaction=True)  # all of a flush or none of it
            days = set()
            for (day, client, model, provider), counts in rows.items():
                for counter, amount in zip(COUNTERS, counts, strict=True):
                    if amount:
                        pipe.hincrby(f"{self.prefix}usage:{day}", orjson.dumps([client, model, provider, counter]),
                                     amount)
                days.add(day)
            for day in days:
                pipe.expire(f"{self.prefix}usage:{day}", USAGE_TTL)
            pipe.execute()
        self._run(write)

    def _usage(self, first_day: str, last_day: str) -> list[tuple]:
        days = list(_days(first_day, last_day))

        def read() -> list[dict]:
            pipe = self.client.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(f"{self.prefix}usage:{day}")
            return pipe.execute()

        rows: dict[tuple, list[int]] = {}
        for day, fields in zip(days, self._run(read), strict=True):
            for field, value in fields.items():
                try:  # a field this proxy did not write (another deployment, a hand edit) is left out
                    client, model, provider, counter = found = orjson.loads(field)
                    amount = int(value)
                except (ValueError, TypeError):  # not JSON, not four values, not a count
                    continue
                if not all(type(part) is str for part in found):
                    continue
                counts = rows.setdefault((day, client, model, provider), [0] * len(COUNTERS))
                if counter in COUNTERS:
                    counts[COUNTERS.index(counter)] += amount
        return [(*key, *counts) for key, counts in sorted(rows.items())]

    # -- limits ------------------------------------------------------------------
    def _take(self, name: str, limit: int, span: float, cost: int) -> float:
        answer = self._run(self._take_script, self._window(name),
                           [limit, span, cost, os.urandom(6).hex()])
        return float(answer)

    def _record(self, name: str, amount: int, span: float) -> None:
        self._take(name, -1, span, amount)

    def _acquire(self, name: str, token: str, limit: int, lease: float) -> bool:
        return bool(self._run(self._acquire_script, [f"{self.prefix}slots:{name}"], [limit, lease, token]))

    def _release(self, name: str, token: str) -> None:
        self._run(self.client.zrem, f"{self.prefix}slots:{name}", token)

    def _admit(self, checks, slot, counts, span: float, lease: float, nonce: str = "") -> tuple[str, float] | None:
        keys, limits = [], []
        for name, limit, _ in checks:
            keys += self._window(name)
            limits.append(limit)
        if slot is not None:
            keys.append(f"{self.prefix}slots:{slot[0]}")
        for name, limit in counts:
            keys += self._window(name)
            limits.append(limit)
        token, slot_limit = (slot[1], slot[2]) if slot is not None else ("", 0)
        answer = self._run(self._admit_script, keys, [span, lease, nonce or os.urandom(6).hex(), token, slot_limit,
                                                      len(checks), len(counts), *limits,
                                                      *(cost for _, _, cost in checks)])
        if answer is None:
            return None
        kind, wait = answer
        return (kind.decode() if isinstance(kind, bytes) else kind), float(wait)

    def _unreserve(self, name: str, amount: int, nonce: str) -> None:
        # the only check is tpm's, so its reservation is entry 1 (see _ADMIT)
        self._run(self._unreserve_script, self._window(name), [f"{nonce}r1:{amount}"])

    def _settle(self, release, record, span: float, unreserve=None) -> None:
        def both() -> None:
            pipe = self.client.pipeline(transaction=False)  # one round trip
            if release is not None:
                pipe.zrem(f"{self.prefix}slots:{release[0]}", release[1])
            if unreserve is not None:
                name, amount, nonce = unreserve
                self._unreserve_script(keys=self._window(name),
                                       args=[f"{nonce}r1:{amount}"], client=pipe)
            if record is not None:
                self._take_script(keys=self._window(record[0]),
                                  args=[-1, span, record[1], os.urandom(6).hex()], client=pipe)
            pipe.execute()
        self._run(both)

    def _renew(self, held: list[tuple[str, str]], lease: float) -> None:
        if held:
            self._run(self._renew_script, [f"{self.prefix}slots:{name}" for name, _ in held],
                      [lease, *(token for _, token in held)])

    def _secret(self, candidate: bytes | None) -> bytes | None:
        key = f"{self.prefix}identity-secret"

        def read() -> bytes | None:
            if candidate is None:
                return self.client.get(key)
            pipe = self.client.pipeline(transaction=True)  # SET NX then GET, as one step
            pipe.set(key, candidate, nx=True)
            pipe.get(key)
            return pipe.execute()[1]
        return self._run(read)

    # -- shared by instances -------------------------------------------------------
    def _mark(self, name: str, keep: float) -> None:
        now, key = time.time(), self.prefix + name

        def write() -> None:
            pipe = self.client.pipeline()  # a sorted set of times, each member tagged so equal times both count
            pipe.zadd(key, {f"{now:.6f}:{os.urandom(4).hex()}": now})
            pipe.zremrangebyscore(key, "-inf", now - keep)
            pipe.expire(key, int(keep) + 1)
            pipe.execute()
        self._run(write)

    def _marks(self, name: str, keep: float) -> list[float]:
        found = self._run(lambda: self.client.zrangebyscore(self.prefix + name, time.time() - keep, "+inf",
                                                            withscores=True))
        return [score for _, score in found]

    def _announce(self, name: str, value: bytes, ttl: float) -> None:
        self._run(lambda: self.client.set(self.prefix + name, value, px=max(1, int(ttl * 1000))))

    def _announced(self, prefix: str) -> list[tuple[str, bytes]]:
        def read() -> list[tuple[str, bytes]]:
            keys = list(self.client.scan_iter(match=self.prefix + prefix + "*", count=1000))
            values = self.client.mget(keys) if keys else []
            return [(key.decode("utf-8", "replace")[len(self.prefix):], value)
                    for key, value in zip(keys, values, strict=True) if value is not None]
        return self._run(read)

    def _claim(self, name: str, value: bytes, ttl: float) -> bytes | None:
        def write() -> bytes | None:
            pipe = self.client.pipeline()  # MULTI/EXEC: set-if-absent and read back, atomically
            pipe.set(self.prefix + name, value, px=max(1, int(ttl * 1000)), nx=True)
            pipe.get(self.prefix + name)
            return pipe.execute()[1]
        return self._run(write)

    def _publish(self, message: bytes) -> None:
        self._run(self.client.publish, self.channel, message)

    def _subscribe(self) -> _Subscription:
        return self._run(_Subscription, self.client, self.channel)

    def _put_versioned(self, name: str, value: bytes, revision: bytes) -> int:
        key = self.prefix + name
        # one script: readers never see a half-written version, and nothing is written over what it cannot count on
        answer = self._run(self._put_versioned_script, [key], [name, value, revision])
        if isinstance(answer, list):  # Redis answered: the key is there but no store wrote it so
            error = answer[0].decode("utf-8", "replace") if isinstance(answer[0], bytes) else str(answer[0])
            what = "holds another type than a hash" if error.startswith("WRONGTYPE") else \
                "has a version that is no integer"
            raise ValueError(f"{key} {what} (not written by streamfold: a hand edit, another program on this Redis); "
                             f"look at it, then delete it (redis-cli DEL {key}) and write again")
        return int(answer)

    def _revision(self, name: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                return self.client.hget(self.prefix + name, "revision")
            except redis.ResponseError:  # the key holds another type: Redis is up, the document unreadable
                return NOT_A_DOCUMENT
        return self._run(read)

    def _versioned(self, name: str) -> tuple[int, bytes | None]:
        def read() -> list:
            try:
                return self.client.hmget(self.prefix + name, ["version", name])
            except redis.ResponseError:
                raise ValueError(f"{self.prefix}{name} is not a hash") from None  # what a reader refuses
        version, value = self._run(read)
        return (int(version) if version else 0), value

    def _reseed(self, name: str, value: bytes, version: int, revision: bytes) -> bool:
        def write() -> bool:
            if not self.client.hsetnx(self.prefix + name, "revision", revision):
                return False
            self.client.hset(self.prefix + name, mapping={name: value, "version": version})
            return True
        return self._run(write)


class _Subscription:
    """The events channel, on a connection of its own from the store client's pool."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            self.pubsub.subscribe(channel)
        except BaseException:
            self.close()
            raise

    def get(self, timeout: float) -> bytes | None:
        try:
            message = self.pubsub.get_message(timeout=timeout)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return message["data"] if message is not None and message.get("type") == "message" else None

    def close(self) -> None:
        try:
            self.pubsub.close()
        except (redis.RedisError, OSError):
            pass


def _days(first_day: str, last_day: str):
    day = datetime.date.fromisoformat(first_day)
    last = datetime.date.fromisoformat(last_day)
    while day <= last:
        yield day.isoformat()
        day += datetime.timedelta(days=1)
