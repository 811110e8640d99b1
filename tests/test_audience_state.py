"""Store.count_distinct, the audience counter of policy IV.B.3.c.iv, on every backend: exact and
sliding in memory and SQLite (capped just past the threshold), a HyperLogLog per window bucket
in a real redis-server shared by every gateway."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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



@pytest.fixture(params=["memory", "sqlite", "redis"])
def any_store(request, tmp_path):
    clock = FakeClock()
    url = {"memory": "memory:", "sqlite": "sqlite:state.sqlite3"}.get(request.param) \
        or request.getfixturevalue("redis_server").url
    return open_store(url, clock, tmp_path), clock, request.param


async def test_count_distinct_and_get_is_both_calls_in_one(any_store):
    """The audience check's per-message call: the count as count_distinct gives it, and the
    other key's value as get gives it (absent, set, expired), on every backend."""
    store, clock, backend = any_store
    assert await store.count_distinct_and_get("c", ["a", "b"], WEEK, None, "total") == (2, None)
    await store.incr("total", 40, ttl=DAY)
    assert await store.count_distinct_and_get("c", ["b", "c"], WEEK, 10, "total") == (3, b"40")
    assert await store.count_distinct_and_get("c", [], WEEK, None, "total") == (3, b"40")
    assert await store.count_distinct("c", [], WEEK) == 3
    if backend == "redis":
        # a Redis that lost its scripts (restarted, SCRIPT FLUSH): loaded again, answered
        await store.client.script_flush()
        assert await store.count_distinct_and_get("c", ["d"], WEEK, None, "total") == (4, b"40")
        assert await store.count_distinct("c", [], WEEK) == 4
    else:  # (Redis expires keys on its own clock)
        clock.advance(DAY)
        assert await store.count_distinct_and_get("c", ["d"], WEEK, None, "total") == (4, None)
    await store.close()


# --- SQLite's kept per-set count (distinct_counts) against a brute-force reference -----------

# distinct_members as main created it before distinct_counts (the file an upgrade finds)
_OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL);
CREATE TABLE IF NOT EXISTS distinct_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS distinct_members_expires ON distinct_members (expires);
"""


class Reference:
    """count_distinct by brute force: every member of every set with its expiry, all kept."""

    def __init__(self) -> None:
        self.sets: dict[str, dict[str, float]] = {}

    def update(self, key: str, members: list[str], window: float, limit: int | None,
               now: float) -> int:
        seen = self.sets.setdefault(key, {})
        live = {m for m, until in seen.items() if until > now}
        new = [m for m in dict.fromkeys(members) if m not in live]
        if limit is not None:
            new = new[:max(0, limit + 1 - len(live))]
        for m in [m for m in dict.fromkeys(members) if m in live] + new:
            seen[m] = now + window
        return len(live) + len(new)


def assert_kept_counts_exact(path) -> None:
    """The invariants the fast count and the purge rest on: each set's kept count is its number
    of rows (expired members not purged yet included); a set without rows has no count row;
    its ``oldest`` is no later than its earliest expiry (the purge visits it in time)."""
    db = sqlite3.connect(path)
    rows = dict(db.execute("SELECT key, count(*) FROM distinct_members GROUP BY key"))
    kept = dict(db.execute("SELECT key, n FROM distinct_counts"))
    late = db.execute("SELECT c.key FROM distinct_counts AS c WHERE c.oldest > (SELECT "
                      "min(m.expires) FROM distinct_members AS m WHERE m.key = c.key)").fetchall()
    db.close()
    assert kept == rows
    assert late == []


async def test_sqlite_kept_count_is_exact_through_expiry_reseen_purge_and_limit(tmp_path):
    clock = FakeClock()
    store = open_store("sqlite:s.sqlite3", clock, tmp_path)
    path = tmp_path / "s.sqlite3"
    ref = Reference()

    async def update(key, members, limit=None, window=100.0):
        got = await store.count_distinct(key, members, window, limit)
        want = ref.update(key, members, window, limit, clock.now().timestamp())
        assert got == want
        assert_kept_counts_exact(path)
        return got

    assert await update("c", ["a", "b", "c"]) == 3
    store.PURGE_EVERY = float("inf")  # expired members stay stored: the count discounts them
    clock.advance(60)
    assert await update("c", ["c", "d"]) == 4  # c seen again, d new
    clock.advance(40)  # a and b have left the window (exactly), stored still
    assert await update("c", []) == 2
    assert await update("c", ["a", "e"]) == 4  # a, expired but stored, counts again
    assert await update("c", ["f", "g", "h", "b"], limit=5) == 6  # f and g only: over 5
    assert await update("c", ["b"], limit=5) == 6  # over the limit: b stays out
    assert await update("c", ["a"], limit=5) == 6  # a known member is still refreshed
    assert await update("other", ["a"]) == 1  # sets are separate
    store.PURGE_EVERY = 10.0
    clock.advance(70)  # c and d (seen at +60) leave; the purge deletes them and b
    assert await update("c", []) == 4
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM distinct_members WHERE key = 'c'").fetchone() == (4,)
    db.close()
    clock.advance(100)
    assert await update("other", []) == 0
    assert await update("c", []) == 0  # everything purged, count rows included
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM distinct_counts").fetchone() == (0,)
    db.close()
    await store.close()


async def test_two_sqlite_stores_on_one_file_keep_the_count_exact(tmp_path):
    """Two gateway processes sharing the file: each writes the count in its own transaction,
    interleaved for real (two threads, each its own event loop, store and connections; a
    store that finds the file locked waits in its worker thread)."""
    import threading

    clock = FakeClock()
    window = 100.0
    ref = Reference()
    path = tmp_path / "s.sqlite3"
    stores = [open_store("sqlite:s.sqlite3", clock, tmp_path) for _ in range(2)]
    for store in stores:
        store.PURGE_EVERY = 30.0
    # the schema first (two fresh files' CREATE ... IF NOT EXISTS may race on a lock)
    await stores[0].count_distinct("c", [], window)

    def batches(phase: int, who: int) -> list[list[str]]:
        # 40 messages of 5 recipients each; the two stores' recipients overlap by half
        return [[f"p{phase}-{who * 100 + i * 5 + j}" for j in range(5)] for i in range(40)] + \
               [[f"p{phase}-{100 + i}" for i in range(0, 100, 7)]]

    def run_phase(phase: int) -> None:
        errors = []

        def worker(store, who):
            async def go():
                for members in batches(phase, who):
                    await store.count_distinct("c", members, window)

            try:
                asyncio.run(go())
            except BaseException as exc:  # noqa: BLE001 (reported by the test below)
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(s, i)) for i, s in enumerate(stores)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        now = clock.now().timestamp()
        for who in (0, 1):
            for members in batches(phase, who):
                ref.update("c", members, window, None, now)

    async def both_read() -> list[int]:
        return [await s.count_distinct("c", [], window) for s in stores]

    run_phase(0)
    want = ref.update("c", [], window, None, clock.now().timestamp())
    assert want == 300 and await both_read() == [want, want]
    clock.advance(60)
    run_phase(1)
    assert await both_read() == [600, 600]
    clock.advance(40)  # phase 0 leaves the window, not purged yet by either
    assert await both_read() == [300, 300]
    assert_kept_counts_exact(path)
    clock.advance(35)  # both purge (their last purge was 35 s ago) on their next update
    run_phase(2)
    want = ref.update("c", [], window, None, clock.now().timestamp())
    assert want == 600 and await both_read() == [want, want]
    assert_kept_counts_exact(path)
    for store in stores:
        await store.close()


async def test_an_old_schema_file_keeps_its_counts(tmp_path):
    """A file made before distinct_counts: its sets get their count computed once, on the
    next update of each, and are exact from then on; sets never touched again are purged."""
    clock = FakeClock()
    now = clock.now().timestamp()
    path = tmp_path / "s.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    ref = Reference()
    rows = [("c", f"m{i}", now + (50 if i % 3 else -5)) for i in range(500)]  # 166 expired
    rows += [("gone", f"m{i}", now - 1) for i in range(20)]
    rows += [("later", f"m{i}", now + 200) for i in range(7)]
    db.executemany("INSERT INTO distinct_members VALUES (?, ?, ?)", rows)
    db.commit()
    db.close()
    for key, member, until in rows:
        ref.sets.setdefault(key, {})[member] = until

    store = open_store("sqlite:s.sqlite3", clock, tmp_path)
    store.PURGE_EVERY = float("inf")  # first without a purge: the count discounts the expired
    assert await store.count_distinct("c", [], 100.0) == 333
    assert await store.count_distinct("c", ["m0", "m1", "x"], 100.0) == 335  # m0 had expired
    ref.update("c", ["m0", "m1", "x"], 100.0, None, now)
    assert await store.count_distinct("later", [], 100.0) == 7
    store.PURGE_EVERY = 10.0
    clock.advance(60)  # c's members from the file leave; the purge deletes them and "gone"
    now = clock.now().timestamp()
    assert await store.count_distinct("c", ["y"], 100.0) == ref.update("c", ["y"], 100.0,
                                                                         None, now) == 4
    assert await store.count_distinct("later", ["z"], 100.0) == 8
    await store.close()
    assert_kept_counts_exact(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM distinct_members WHERE key = 'gone'").fetchone() \
        == (0,)
    db.close()


async def vm_steps(store, call):
    """(``await call()``, the SQLite virtual machine steps it took on the connection the
    per-message calls run on): work counted deterministically, unlike time."""
    db = store._loop_conn()
    n = 0

    def tick():
        nonlocal n
        n += 1
        return 0

    db.set_progress_handler(tick, 1)
    try:
        result = await call()
    finally:
        db.set_progress_handler(None, 1)
    return result, n


async def test_sqlite_update_cost_does_not_grow_with_the_audience(tmp_path):
    """One update's work, counted in SQLite virtual machine steps (deterministic, unlike time),
    is about the same with 100 and with 15,000 members in the set: nothing walks the set."""
    clock = FakeClock()
    store = open_store("sqlite:s.sqlite3", clock, tmp_path)
    await store.count_distinct("small", [f"s{i:05d}" for i in range(100)], WEEK)
    for i in range(0, 15000, 1000):
        await store.count_distinct("large", [f"l{j:05d}" for j in range(i, i + 1000)], WEEK)
    clock.advance(1)

    async def steps(key: str, members: list[str]) -> int:
        count, n = await vm_steps(store, lambda: store.count_distinct(key, members, WEEK))
        assert count == (100 if key == "small" else 15000) + 1
        return n

    small = await steps("small", [f"s{i:05d}" for i in range(9)] + ["new"])
    large = await steps("large", [f"l{i:05d}" for i in range(9)] + ["new"])
    assert large <= small * 1.2, (small, large)
    await store.close()


_STEPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 9.5, 10.0, 25.0, 60.0, 100.0])),
    st.tuples(st.just("count"), st.sampled_from(["a", "b"]),
              st.lists(st.sampled_from([f"m{i}" for i in range(12)]), max_size=6),
              st.one_of(st.none(), st.integers(0, 8)))), max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps=_STEPS, purge_every=st.sampled_from([0.0, 10.0, float("inf")]))
def test_sqlite_counts_as_the_memory_store_does(steps, purge_every):
    """Random sequences of clock moves and updates (sets of 60 s and 40 s windows, with and
    without a limit, purging on every update, every 10 s or never): SQLite answers every update
    as the memory store does, and its kept counts stay exact."""
    import tempfile
    from pathlib import Path

    from gateway.state.memory import MemoryStore

    windows = {"a": 60.0, "b": 40.0}

    async def run(base: Path) -> None:
        clock = FakeClock()
        sqlite_store, memory = open_store("sqlite:s.sqlite3", clock, base), MemoryStore(clock)
        sqlite_store.PURGE_EVERY = purge_every
        try:
            for step in steps:
                if step[0] == "advance":
                    clock.advance(step[1])
                    continue
                _, key, members, limit = step
                want = await memory.count_distinct(key, members, windows[key], limit)
                got = await sqlite_store.count_distinct(key, members, windows[key], limit)
                assert got == want, step
            for key, window in windows.items():
                assert await sqlite_store.count_distinct(key, [], window) == \
                    await memory.count_distinct(key, [], window)
        finally:
            await sqlite_store.close()
        assert_kept_counts_exact(base / "s.sqlite3")

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


_WINDOW_STEPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 9.5, 10.0, 25.0, 60.0])),
    st.tuples(st.just("count"), st.sampled_from(["a", "b", "c"]),
              st.lists(st.sampled_from([f"m{i}" for i in range(10)]), max_size=5),
              st.sampled_from([20.0, 40.0, 90.0]),
              st.one_of(st.none(), st.integers(0, 6)))), max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps=_WINDOW_STEPS, purge_every=st.sampled_from([0.0, 10.0, float("inf")]))
def test_sqlite_counts_and_purges_exactly_when_a_window_changes(steps, purge_every):
    """A set's window may change between updates (a reload of [business_hours] window), so a
    member stored now may leave before members stored earlier: every answer is the brute-force
    reference's, the purge deletes every member that left (whichever set, whenever stored), and
    the kept counts and earliest expiries stay exact."""
    import tempfile
    from pathlib import Path

    async def run(base: Path) -> None:
        clock = FakeClock()
        store = open_store("sqlite:s.sqlite3", clock, base)
        store.PURGE_EVERY = purge_every
        ref = Reference()
        try:
            for step in steps:
                if step[0] == "advance":
                    clock.advance(step[1])
                    continue
                _, key, members, window, limit = step
                now = clock.now().timestamp()
                got = await store.count_distinct(key, members, window, limit)
                assert got == ref.update(key, members, window, limit, now), step
                assert_kept_counts_exact(base / "s.sqlite3")
            clock.advance(90.0)  # everything has left; one purge deletes it all
            store.PURGE_EVERY = 0.0
            assert await store.count_distinct("a", [], 20.0) == 0
        finally:
            await store.close()
        db = sqlite3.connect(base / "s.sqlite3")
        assert db.execute("SELECT count(*) FROM distinct_members").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM distinct_counts").fetchone() == (0,)
        db.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


async def test_sqlite_purge_visits_only_the_sets_with_members_to_delete(tmp_path):
    """The purge finds its sets by their earliest expiry (an index), not by walking every set:
    its work, counted in SQLite virtual machine steps, is about the same with 2,000 live sets
    beside the one it purges as with 10, and it deletes exactly what left the window."""
    clock = FakeClock()

    async def purge_steps(sets: int) -> int:
        store = open_store(f"sqlite:s{sets}.sqlite3", clock, tmp_path)
        store.PURGE_EVERY = float("inf")
        await store.count_distinct("short", [f"x{i}" for i in range(5)], 10.0)
        for s in range(sets):
            await store.count_distinct(f"set{s:05d}", [f"m{s}-{i}" for i in range(3)], WEEK)
        clock.advance(20)  # "short" has left its window; nothing else has
        store.PURGE_EVERY = 0.0
        count, n = await vm_steps(store, lambda: store.count_distinct("set00000", [], WEEK))
        assert count == 3  # purges, then counts
        await store.close()
        db = sqlite3.connect(tmp_path / f"s{sets}.sqlite3")
        assert db.execute("SELECT count(*) FROM distinct_members WHERE key = 'short'"
                          ).fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM distinct_members").fetchone() == (3 * sets,)
        db.close()
        assert_kept_counts_exact(tmp_path / f"s{sets}.sqlite3")
        return n

    few, many = await purge_steps(10), await purge_steps(2000)
    assert many <= few * 1.3, (few, many)
