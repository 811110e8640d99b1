"""Store.count_distinct, the audience counter of policy IV.B.3.c.iv, on every backend: exact and
sliding in memory and SQLite (capped just past the threshold), a HyperLogLog per window bucket
in a real redis-server shared by every gateway."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from gateway.infra.clock import FakeClock
from gateway.state import open_store

DAY = 86400.0
WEEK = 7 * DAY


@pytest.fixture(params=["memory", "sqlite"])
def exact(request, tmp_path):
    clock = FakeClock()
    url = "memory:" if request.param == "memory" else "sqlite:state.sqlite3"
    return open_store(url, clock, tmp_path), clock


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


async def test_exact_distinct_count_and_read_only(exact):
    store, _ = exact
    assert await store.count_distinct("c", [], WEEK) == 0
    assert await store.count_distinct("c", ["a", "b", "a"], WEEK) == 2
    assert await store.count_distinct("c", ["b", "c"], WEEK) == 3
    assert await store.count_distinct("c", [], WEEK) == 3  # a read
    assert await store.count_distinct("other", ["a"], WEEK) == 1  # sets are separate
    await store.close()


async def test_members_slide_out_of_the_window_unless_seen_again(exact):
    store, clock = exact
    await store.count_distinct("c", ["a", "b"], WEEK)
    clock.advance(3 * DAY)
    await store.count_distinct("c", ["b", "c"], WEEK)  # b seen again: remembered from now
    clock.advance(4 * DAY)  # a was seen exactly a window ago: out
    assert await store.count_distinct("c", [], WEEK) == 2
    clock.advance(3 * DAY)
    assert await store.count_distinct("c", [], WEEK) == 0
    await store.close()


async def test_exact_backends_stop_storing_just_past_the_limit(exact):
    store, _ = exact
    assert await store.count_distinct("c", [f"m{i}" for i in range(8)], WEEK, limit=10) == 8
    assert await store.count_distinct("c", [f"m{i}" for i in range(100)], WEEK, limit=10) == 11
    assert await store.count_distinct("c", ["new"], WEEK, limit=10) == 11  # crossed: stays over
    assert await store.count_distinct("c", ["m0"], WEEK, limit=10) == 11
    await store.close()


async def test_sqlite_counts_atomically_and_keeps_only_hashes(tmp_path):
    clock = FakeClock()
    store = open_store("sqlite:var/s.sqlite3", clock, tmp_path)
    batches = [[f"{i:020x}" for i in range(b * 50, b * 50 + 100)] for b in range(20)]  # overlap
    counts = await asyncio.gather(*(store.count_distinct("c", b, WEEK) for b in batches))
    assert max(counts) == 1050 and len(set(counts)) == 20
    clock.advance(WEEK)
    assert await store.count_distinct("other", ["x"], WEEK) == 1  # prunes every expired member
    await store.close()
    rows = sqlite3.connect(tmp_path / "var" / "s.sqlite3").execute(
        "SELECT key, member FROM distinct_members").fetchall()
    assert rows == [("other", "x")]


async def test_redis_hyperloglog_is_within_its_error_and_shared(redis_url):
    clock = FakeClock()
    one, two = open_store(redis_url, clock), open_store(redis_url, clock)  # two gateways
    members = [f"{i:020x}" for i in range(20000)]
    for i in range(0, 12000, 1000):
        await one.count_distinct("c", members[i:i + 1000], WEEK, limit=15000)
    for i in range(8000, 20000, 1000):  # 4000 seen by the other gateway already
        count = await two.count_distinct("c", members[i:i + 1000], WEEK, limit=15000)
    assert abs(count - 20000) <= 20000 * 0.02  # standard error 0.81 %: within 2.5 sigma
    assert await one.count_distinct("c", members[:5000], WEEK) == count  # no new members
    assert await one.count_distinct("c", [], WEEK) == count
    # the window is covered by day buckets: members leave between 7 and 8 days after last seen
    clock.advance(WEEK)
    assert await one.count_distinct("c", [], WEEK) == count
    clock.advance(DAY + 1)
    assert await one.count_distinct("c", [], WEEK) == 0
    await one.close()
    await two.close()


async def test_redis_keeps_no_members_in_clear_and_expires_its_buckets(redis_url):
    import redis.asyncio as aioredis

    clock = FakeClock()
    store = open_store(redis_url, clock)
    await store.count_distinct("audience:abc:rcpt", ["alice@example.edu", "bob@example.edu"],
                               WEEK)
    client = aioredis.Redis.from_url(redis_url)
    keys = await client.keys("*")
    assert len(keys) == 1 and keys[0].startswith(b"{audience:abc:rcpt}:")
    assert b"example.edu" not in await client.dump(keys[0])  # registers, not members
    assert 0 < await client.pttl(keys[0]) <= (WEEK + 2 * DAY) * 1000
    await client.aclose()
    await store.close()
