"""The state store's blob API (what the Responses bridge stores answers in), on SQLite and on real Redis.

No HTTP route serves blobs by itself, so these drive the store object the app
factory builds; the routes that use it are tested through HTTP in their own files.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from proxy.state import Store, StoreUnavailable, open_store
from proxy.state.memory import MemoryStore
from proxy.state.redis_store import RedisStore
from proxy.state import sqlite
from proxy.state.sqlite import SQLiteStore
from tests.conftest import make_app, provider, settings_doc, state_path
from tests.redis_util import RedisServer


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def opened(kind: str, request) -> Store:
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(state_path())
    return RedisStore(request.getfixturevalue("redis_server").url)


@pytest.fixture(params=["sqlite", "redis"])
def store(request):
    made = opened(request.param, request)
    yield made
    made.close()


@pytest.fixture(params=["sqlite", "redis", "memory"])
def limit_store(request):
    """The backends of the limit operations: the two stores, and the memory store the limiter counts in while
    the store is down (state/memory.py), so all three answer alike."""
    made = opened(request.param, request)
    yield made
    made.close()


def test_app_factory_keeps_one_store_per_app_at_the_documented_extension():
    app = make_app(settings_doc(provider("http://127.0.0.1:9")))
    store = app.extensions["streamfold.state"]
    assert isinstance(store, SQLiteStore)
    assert store.path == app.extensions["streamfold"].runtime.settings.state_path
    assert not os.path.exists(store.path)  # created on first use, not at import or start


def test_blob_round_trip_and_a_missing_key_is_none(store):
    store.put_blob("responses", "resp_1", b'{"messages": [1, 2]}', ttl=60)
    assert store.get_blob("responses", "resp_1") == b'{"messages": [1, 2]}'
    assert store.get_blob("responses", "resp_2") is None
    assert store.get_blob("other", "resp_1") is None  # namespaces are separate


def test_blob_put_replaces_and_expires_after_its_ttl(store):
    store.put_blob("ns", "k", b"old", ttl=60)
    store.put_blob("ns", "k", b"new", ttl=0.3)
    assert store.get_blob("ns", "k") == b"new"
    time.sleep(0.4)
    assert store.get_blob("ns", "k") is None


def _put_from_child(path: str) -> None:
    open_store_path = SQLiteStore(path)
    open_store_path.put_blob("ns", "from-child", b"\x00binary\xff", ttl=60)


def test_sqlite_blob_written_by_another_process_is_read_back_and_survives_a_new_store():
    path = state_path()
    first = SQLiteStore(path)
    first.put_blob("ns", "mine", b"1", ttl=60)  # the parent opened the file before forking
    child = multiprocessing.get_context("fork").Process(target=_put_from_child, args=(path,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert first.get_blob("ns", "from-child") == b"\x00binary\xff"
    again = SQLiteStore(path)  # a restart opens the same file
    assert again.get_blob("ns", "mine") == b"1"


def test_blob_api_never_raises_while_redis_is_down_and_writes_held_puts_when_it_returns():
    server = RedisServer()
    store = RedisStore(server.url)
    try:
        store.put_blob("ns", "before", b"a", ttl=60)
        server.stop()
        store.put_blob("ns", "during", b"b", ttl=60)   # kept in memory
        assert store.get_blob("ns", "during") == b"b"  # served from memory
        assert store.get_blob("ns", "before") is None  # only in the unreachable Redis
        assert not store.up
        with pytest.raises(StoreUnavailable):
            store.take("rpm:x", 5, 60)  # limit operations report the outage to their owner
        server = RedisServer(port=server.port)
        store.tick()  # what the background thread does once a second
        assert store.up
        import redis

        assert redis.Redis.from_url(server.url).get("streamfold:blob:ns:during") == b"b"
    finally:
        server.stop()
        store.close()


def test_open_store_picks_redis_when_a_redis_url_is_set(redis_server):
    from proxy.config.load import build_settings

    settings = build_settings({"redis-url": redis_server.url, "state-path": state_path()}, {})
    assert isinstance(open_store(settings), RedisStore)


def test_admit_is_all_or_nothing_and_settle_gives_back_on_every_backend(limit_store):
    """The limit operations the limiter builds on: same answers from SQLite, Redis and memory."""
    store = limit_store
    slot = ("conc:t", "token-1", 1)
    assert store.admit([("tpm:t", 10, 0)], slot, [("rpm:t", 2)], 60, 30) is None
    kind, wait = store.admit([], ("conc:t", "token-2", 1), [("rpm:t", 2)], 60, 30)
    assert kind == "slot" and wait >= 1  # the one slot is held
    store.settle(("conc:t", "token-1"), ("tpm:t", 12), 60)  # answer done: slot back, 12 tokens spent
    kind, wait = store.admit([("tpm:t", 10, 0)], ("conc:t", "token-3", 1), [("rpm:t", 2)], 60, 30)
    assert kind == "check" and 59 <= wait <= 60  # tpm spent; nothing was taken
    assert store.admit([], ("conc:t", "token-4", 1), [("rpm:t", 2)], 60, 30) is None  # the slot was free
    kind, _ = store.admit([], None, [("rpm:t", 2)], 60, 30)
    assert kind == "count"  # 2 requests in the window
    kind, _ = store.admit([], ("conc:t", "token-5", 2), [("rpm:t", 2)], 60, 30)
    assert kind == "count"
    assert store.admit([], ("conc:t", "token-6", 2), [], 60, 30) is None  # token-5 was not left behind


def test_a_tpm_reservation_counts_until_settled_and_is_replaced_by_the_real_tokens_on_every_backend(limit_store):
    """Requests in flight at once hold their estimate in the tpm window; the end swaps it for the real count,
    and a request refused by another limit leaves no reservation behind."""
    store = limit_store
    assert store.admit([("tpm:r", 100, 60)], None, [], 60, 30, "n1") is None
    assert store.admit([("tpm:r", 100, 60)], None, [], 60, 30, "n2") is None  # 60 < 100: still under
    kind, _ = store.admit([("tpm:r", 100, 60)], None, [], 60, 30, "n3")
    assert kind == "check"  # 120 reserved by the two in flight
    store.settle(None, ("tpm:r", 5), 60, ("tpm:r", 60, "n1"))
    store.settle(None, ("tpm:r", 5), 60, ("tpm:r", 60, "n2"))  # both used 5: 10 in the window
    assert store.admit([("tpm:r", 100, 60)], ("conc:r", "t1", 1), [], 60, 30, "n4") is None  # 70
    kind, _ = store.admit([("tpm:r", 100, 20)], ("conc:r", "t2", 1), [], 60, 30, "n5")
    assert kind == "slot"  # refused by the slot: its reservation of 20 is given back
    assert store.admit([("tpm:r", 100, 25)], None, [], 60, 30, "n6") is None  # 70 < 100, now 95
    assert store.admit([("tpm:r", 100, 5)], None, [], 60, 30, "n7") is None  # 95 < 100 (n5's 20 was not kept)
    kind, _ = store.admit([("tpm:r", 100, 1)], None, [], 60, 30, "n8")
    assert kind == "check"


def test_a_capped_namespace_keeps_its_newest_blobs_within_count_and_bytes(store):
    store.cap("capped", 3, 10_000)
    for i in range(5):
        store.put_blob("capped", f"k{i}", b"x" * 100, ttl=60 + i)
    assert [store.get_blob("capped", f"k{i}") is not None for i in range(5)] == [False, False, True, True, True]
    store.put_blob("capped", "k4", b"y" * 100, ttl=70)  # a replaced blob counts once
    store.put_blob("capped", "big", b"z" * 9_850, ttl=80)  # over the bytes: the oldest go until it fits
    assert [store.get_blob("capped", k) is not None for k in ("k2", "k3", "k4", "big")] == [False, False, True, True]
    store.put_blob("other", "free", b"w" * 20_000, ttl=60)  # other namespaces are not capped
    assert store.get_blob("other", "free") is not None


def test_a_blob_put_again_while_a_capped_put_chooses_its_victims_is_kept(monkeypatch):
    """A capped put chooses what to drop from a snapshot read without the write lock, then deletes it: a blob put
    again between the two (a stored answer written again after an outage) is a new blob and stays."""
    store = SQLiteStore(state_path())
    try:
        store.cap("capped", 2, 10_000)
        store.put_blob("capped", "k0", b"x" * 100, ttl=60)
        store.put_blob("capped", "k1", b"x" * 100, ttl=61)
        choose = sqlite._victims

        def victims(*args):
            drop = choose(*args)
            with store._tx() as db:  # k0, the victim, put again before the delete (as another worker would)
                db.execute("UPDATE blobs SET value = ?, expires = ? WHERE namespace = 'capped' AND key = 'k0'",
                           (b"new" * 10, time.time() + 600))
            return drop

        monkeypatch.setattr(sqlite, "_victims", victims)
        store.put_blob("capped", "k2", b"x" * 100, ttl=62)
        assert store.get_blob("capped", "k0") == b"new" * 10
    finally:
        store.close()


def test_an_existing_state_file_gets_its_blob_totals_from_the_blobs_already_there():
    import sqlite3

    path = state_path()
    with sqlite3.connect(path) as db:  # a file from before the totals: its blobs table only
        db.execute("CREATE TABLE blobs (namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, "
                   "expires REAL NOT NULL, PRIMARY KEY (namespace, key)) WITHOUT ROWID")
        db.executemany("INSERT INTO blobs VALUES ('capped', ?, ?, ?)",
                       [(f"old{i}", b"x" * 100, time.time() + 60 + i) for i in range(4)])
    store = SQLiteStore(path)
    try:
        store.cap("capped", 4, 10_000)
        store.put_blob("capped", "new", b"n" * 100, ttl=600)
        assert store.get_blob("capped", "old0") is None and store.get_blob("capped", "old1") is not None
        assert store.get_blob("capped", "new") is not None
    finally:
        store.close()


def test_a_write_stalled_between_statements_leaves_the_other_workers_limit_steps_going(monkeypatch):
    """Flake under load (test_rpm_60_across_three_gunicorn_workers): a worker's usage flush held SQLite's write lock
    across its statements, and the sqlite3 module lets the GIL go around each one: with busy request threads the
    flusher waited for it again (~100 ms, past a second at times) holding the lock, another worker's limit step
    ran out of BUSY_TIMEOUT and the store was marked down (limits per worker). So did the renewal of slots and a
    put into a full capped namespace (one step per blob read: 2-10 s at 10,000 blobs). The stall is simulated
    where the thread waits: as a statement begins, before it has taken any lock of its own."""
    monkeypatch.setattr(sqlite, "BUSY_TIMEOUT", 0.2)
    path = state_path()
    writer, other = SQLiteStore(path), SQLiteStore(path)  # two workers' connections to the instance's file
    try:
        assert writer.acquire("slots:team", "token-1", 4, 60) and other.take("rpm:team", 60, 60) == 0.0
        writer.cap("capped", 2, 1 << 20)
        for key in ("alice/1", "bob/1"):
            writer.put_blob("capped", key, b"x" * 10, 60)
        stalled = threading.Event()

        def stall(sql: str) -> None:
            if any(write in sql for write in ("INSERT INTO usage", "UPDATE slots", "INSERT INTO blobs")):
                stalled.set()
                time.sleep(1.0)
        writer._connection().set_trace_callback(stall)
        day = time.strftime("%Y-%m-%d", time.gmtime())
        for write in (lambda: writer.add_usage({(day, "team", "m", "up"): [1, 0, 3, 4, 0, 0],
                                                (day, "ops", "m", "up"): [2, 1, 0, 0, 0, 0]}),
                      lambda: writer.renew([("slots:team", "token-1")], 60),
                      lambda: writer.put_blob("capped", "bob/2", b"y" * 10, 120)):
            stalled.clear()
            thread = threading.Thread(target=write)
            thread.start()
            assert stalled.wait(5)
            assert other.take("rpm:team", 60, 60) == 0.0  # another worker's limit step meanwhile
            thread.join()
        assert writer.up and other.up
        assert writer.usage(day, day) == [(day, "ops", "m", "up", 2, 1, 0, 0, 0, 0),
                                          (day, "team", "m", "up", 1, 0, 3, 4, 0, 0)]
        assert not other.acquire("slots:team", "token-2", 1, 60)  # token-1's slot is still held
        assert [writer.get_blob("capped", key) for key in ("alice/1", "bob/1", "bob/2")] == [b"x" * 10, None, b"y" * 10]
    finally:
        writer.close()
        other.close()


@pytest.fixture(params=["redis"])
def two_instances_store(request):
    """Two stores on the same backend, as two instances hold them: the backends whose ``shares`` is True (a new
    shared backend adds its name here)."""
    made = [opened(request.param, request) for _ in range(2)]
    yield made
    for store in made:
        store.close()


def test_what_one_instance_puts_in_a_shared_store_the_other_reads(two_instances_store):
    a, b = two_instances_store
    assert a.shares and b.shares and not MemoryStore.shares and not SQLiteStore.shares
    tag = os.urandom(4).hex()  # the module's Redis is shared by these tests
    a.mark(f"auth:{tag}", 120)
    b.mark(f"auth:{tag}", 120)
    assert len(a.marks(f"auth:{tag}", 120)) == 2 and all(abs(t - time.time()) < 5 for t in b.marks(f"auth:{tag}", 120))
    a.announce(f"{tag}:a", b"1", 60)
    b.announce(f"{tag}:b", b"2", 0.05)
    assert sorted(b.announced(tag)) == [(f"{tag}:a", b"1"), (f"{tag}:b", b"2")]
    time.sleep(0.1)
    assert a.announced(tag) == [(f"{tag}:a", b"1")]  # expired
    assert a.claim(f"{tag}:s", b"7", 60) == b"7" and b.claim(f"{tag}:s", b"9", 60) == b"7"  # the first one stands
    heard = b.subscribe()
    try:
        a.publish(b"hello " + tag.encode())
        got = [heard.get(0.2) for _ in range(10)]
        assert b"hello " + tag.encode() in got
    finally:
        heard.close()
    assert b.revision(tag) is None and b.versioned(tag) == (0, None)
    assert a.put_versioned(tag, b"v1", b"r1") == 1 and a.put_versioned(tag, b"v2", b"r2") == 2
    assert b.revision(tag) == b"r2" and b.versioned(tag) == (2, b"v2")
    assert not b.reseed(tag, b"old", 1, b"r1")  # there is one: nothing put back


def test_shared_operations_raise_at_once_while_the_store_is_down_and_work_again_after_the_probe():
    server = RedisServer()
    store = RedisStore(server.url)
    try:
        store.announce("instance:x", b"1", 60)
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.marks("auth:x", 120)  # the first failure marks the store down ...
        assert not store.up
        for operation in (lambda: store.mark("auth:x", 120), lambda: store.announced("instance:"),
                          lambda: store.claim("s", b"1", 60), lambda: store.publish(b"m"), store.subscribe,
                          lambda: store.revision("providers")):
            with pytest.raises(StoreUnavailable):  # ... and the others do not ask it until the probe says so
                operation()
        server = RedisServer(port=server.port)
        store.tick()
        assert store.up and store.announced("instance:") == []  # a new, empty Redis
        assert store.reseed("providers", b"[]", 3, b"r") and store.versioned("providers") == (3, b"[]")
    finally:
        server.stop()
        store.close()
