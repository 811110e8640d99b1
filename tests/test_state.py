"""The state backends behind one interface: same behaviour, and SQLite survives a restart."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway.infra.clock import FakeClock
from gateway.state import open_store


@pytest.fixture(params=["memory", "sqlite"])
def backend(request, tmp_path):
    clock = FakeClock()
    url = "memory:" if request.param == "memory" else "sqlite:state.sqlite3"
    return url, clock, tmp_path


async def test_get_set_delete_and_expiry(backend):
    url, clock, base = backend
    store = open_store(url, clock, base)
    assert await store.get("k") is None
    await store.set("k", b"v")
    await store.set("t", b"short", ttl=10)
    assert await store.get("k") == b"v" and await store.get("t") == b"short"
    clock.advance(10)
    assert await store.get("t") is None
    await store.delete("k")
    assert await store.get("k") is None
    await store.close()


async def test_incr_is_atomic_and_ttl_starts_at_creation(backend):
    url, clock, base = backend
    store = open_store(url, clock, base)
    results = await asyncio.gather(*(store.incr("n", ttl=60) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    clock.advance(30)
    assert await store.incr("n", 5, ttl=60) == 55  # the window is not extended
    clock.advance(30)
    assert await store.incr("n", ttl=60) == 1
    await store.close()


async def test_sqlite_survives_restart(tmp_path):
    clock = FakeClock()
    store = open_store("sqlite:var/s.sqlite3", clock, tmp_path)
    await store.set("throttle:acme", b"10/minute", ttl=3600)
    await store.incr("budget:acme", 7, ttl=60)
    await store.close()
    again = open_store("sqlite:var/s.sqlite3", clock, tmp_path)
    assert await again.get("throttle:acme") == b"10/minute"
    assert await again.incr("budget:acme") == 8
    await again.close()
    rows = sqlite3.connect(tmp_path / "var" / "s.sqlite3").execute("SELECT key FROM kv").fetchall()
    assert sorted(r[0] for r in rows) == ["budget:acme", "throttle:acme"]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def window_store(request, tmp_path):
    """A store for the window admission tests, on each backend (Redis: a real redis-server)."""
    clock = FakeClock()
    url = {"memory": "memory:", "sqlite": "sqlite:state.sqlite3"}.get(request.param) \
        or request.getfixturevalue("redis_server").url
    return open_store(url, clock, tmp_path), clock


async def test_acquire_sliding_window_all_or_nothing(window_store):
    from gateway.state import Limit

    store, clock = window_store
    now = clock.now().timestamp()
    sender = Limit("rate:acme:60", 3, 60.0)
    gateway = Limit("rate:global:60", 4, 60.0)
    results = [await store.acquire([sender, gateway], now + i, f"t{i}") for i in range(3)]
    assert [r.wait for r in results] == [0, 0, 0]
    assert [r.used for r in results] == [1, 2, 3]
    # each limit's room after the admission: its count less the events now in its window
    assert [r.rooms for r in results] == [(2, 3), (1, 2), (0, 1)]
    refused = await store.acquire([sender, gateway], now + 10, "t3")
    assert (refused.wait, refused.limit) == (50.0, 0)  # the oldest leaves at now + 60
    assert refused.rooms == (0, 1)  # (nothing recorded)
    # the refused attempt recorded nothing: another sender still fits the global limit once
    other = Limit("rate:beta:60", 3, 60.0)
    assert (await store.acquire([other, gateway], now + 10, "b1")).wait == 0
    full = await store.acquire([other, gateway], now + 11, "b2")
    assert (full.wait, full.limit) == (49.0, 1)  # now the gateway-wide limit binds
    assert full.rooms == (2, 0)
    # a count lowered below what the window holds: a room below zero
    assert (await store.peek([sender._replace(count=2)], now + 12)).rooms == (-1,)
    # exactly 60 s after the first event, it has left the window (half-open window)
    assert (await store.acquire([sender], now + 60, "t4")).wait == 0
    await store.close()


async def test_acquire_with_a_cost_counts_each_unit(window_store):
    from gateway.state import Limit

    store, clock = window_store
    now = clock.now().timestamp()
    rcpts = Limit("rcpt:acme:60", 100, 60.0)
    assert (await store.acquire([rcpts._replace(cost=60)], now, "m1")).used == 60
    assert (await store.acquire([rcpts._replace(cost=30)], now + 5, "m2")).rooms == (10,)
    # 20 more do not fit until the first 60 leave, at now + 60
    refused = await store.acquire([rcpts._replace(cost=20)], now + 10, "m3")
    assert (refused.wait, refused.limit, refused.rooms) == (50.0, 0, (10,))
    assert (await store.acquire([rcpts._replace(cost=10)], now + 10, "m4")).used == 100
    assert (await store.acquire([rcpts._replace(cost=20)], now + 60, "m5")).used == 60
    await store.close()


async def test_sqlite_decision_waits_off_the_loop_while_another_writer_holds_the_file(tmp_path):
    """The fast path never waits for a lock: with another process's writer (here a second
    connection) holding the database, the decision goes to the worker thread, which waits."""
    import threading
    import time

    from gateway.state import Limit

    clock = FakeClock()
    store = open_store("sqlite:s.sqlite3", clock, tmp_path)
    limit = [Limit("rate:acme:60", 5, 60.0)]
    assert (await store.acquire(limit, clock.now().timestamp(), "a")).used == 1
    other = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    ticks = 0

    async def ticker():  # the event loop keeps running while the decision waits
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    admission = await store.acquire(limit, clock.now().timestamp(), "b")
    waited = time.monotonic() - started
    task.cancel()
    assert admission.used == 2
    assert waited >= 0.25 and ticks >= 3  # it waited for the lock, and not on the loop
    other.close()
    await store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_backend(request, tmp_path):
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        return server.url, FakeClock(), tmp_path
    return ("memory:" if request.param == "memory" else "sqlite:state.sqlite3"), FakeClock(), \
        tmp_path


async def test_peek_answers_as_acquire_would_and_purge_drops_expired_keys(any_backend):
    """peek (gateway explain, the early refusal) gives the admission a real call would,
    spending nothing; purge_expired (the trace retention job) drops only expired keys."""
    from gateway.state import Limit

    url, clock, base = any_backend
    store = open_store(url, clock, base)
    now = clock.now().timestamp()
    limits = [Limit("rate:acme:60", 2, 60)]
    for i in range(3):  # looking three times leaves the window empty
        seen = await store.peek(limits, now + i)
        assert seen.wait == 0.0
    assert (await store.acquire(limits, now + 3, "a")).used == 1
    assert (await store.acquire(limits, now + 4, "b")).used == 2
    full = await store.peek(limits, now + 5)
    real = await store.acquire(limits, now + 5, "c")
    assert (full.wait, full.limit, full.rooms) == (real.wait, real.limit, real.rooms) == (
        pytest.approx(58.0), 0, (0,))
    assert full.wait == pytest.approx(58.0) and full.limit == 0
    later = await store.peek(limits, now + 63.5)  # "a" has left the window
    assert (later.wait, later.rooms) == (0.0, (1,))
    assert (await store.acquire(limits, now + 63.5, "d")).used == 2  # nothing was spent
    if not url.startswith("redis"):  # (Redis expires keys itself, on its own clock)
        await store.set("trace:q:1", b"x", ttl=10)
        await store.set("kept", b"y")
        clock.advance(11)
        assert await store.purge_expired() == 1
        assert await store.get("kept") == b"y" and await store.scan("trace:") == {}
    await store.close()


async def test_set_many_writes_every_key_with_its_ttl(any_backend):
    """set_many (the trace's batched writes) is set for each item, in one round trip."""
    url, clock, base = any_backend
    store = open_store(url, clock, base)
    await store.set_many([("a", b"1", None), ("b", b"2", 10.0), ("a", b"3", None)])
    assert await store.get("a") == b"3" and await store.get("b") == b"2"
    if not url.startswith("redis"):  # (Redis expires keys on its own clock)
        clock.advance(11)
        assert await store.get("b") is None and await store.get("a") == b"3"
    await store.set_many([])
    await store.close()
