"""SQLite state's schema on disk: a file made by an earlier version is brought to this one
(once, in one transaction) and answers as it did; the rate windows answer as the memory store
does whatever the sequence of admissions and looks."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.infra.clock import FakeClock
from gateway.state import Limit, StoreError, open_store, retry_after
from gateway.state import sqlite as sqlite_state
from gateway.state.memory import MemoryStore

# The schema as gateway/state/sqlite.py created it before its version was kept (user_version 0,
# commit 1c8828a): the file an upgrade finds.
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
);
CREATE TABLE IF NOT EXISTS window_events (
    key TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS window_events_key_at ON window_events (key, at);
CREATE TABLE IF NOT EXISTS window_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS distinct_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS distinct_members_expires ON distinct_members (expires);
-- each distinct set's row count (expired members not purged yet included), kept beside its
-- members by every write (see _count_distinct); a set with members and no count row (a file
-- made before this table) gets its count computed once, by the next write
CREATE TABLE IF NOT EXISTS distinct_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
-- the members of one set that left its window: what the kept count must discount
CREATE INDEX IF NOT EXISTS distinct_members_key_expires ON distinct_members (key, expires);
-- recipient flags (gateway.policy.flags): each flag's live generation of members is named in
-- flag_sets; flag_gens allocates generations (and dates builds, so an abandoned one is found)
CREATE TABLE IF NOT EXISTS flag_gens (
    gen INTEGER PRIMARY KEY AUTOINCREMENT,
    flag TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flag_sets (
    flag TEXT PRIMARY KEY,
    gen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_sets_gen ON flag_sets (gen);
-- member first: a look-up is one probe per recipient, whatever the number of sets
CREATE TABLE IF NOT EXISTS flag_members (
    member TEXT NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (member, gen)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flag_members_gen ON flag_members (gen);
"""


# The schema of version 1 (commit 0bbe6bb): rate windows converted, distinct members still
# indexed by expiry.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
);
-- rate windows: the n events recorded under key at time at (one row an instant, whatever the
-- admission's cost), in one B-tree ordered as a window is read and pruned
CREATE TABLE IF NOT EXISTS window_events (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (key, at)
) WITHOUT ROWID;
-- each key's event count (events that left its window and are not pruned yet included)
CREATE TABLE IF NOT EXISTS window_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS distinct_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS distinct_members_expires ON distinct_members (expires);
-- each distinct set's row count (expired members not purged yet included), kept beside its
-- members by every write (see _count_distinct); a set with members and no count row (a file
-- made before this table) gets its count computed once, by the next write
CREATE TABLE IF NOT EXISTS distinct_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
-- the members of one set that left its window: what the kept count must discount
CREATE INDEX IF NOT EXISTS distinct_members_key_expires ON distinct_members (key, expires);
-- recipient flags (gateway.policy.flags): each flag's live generation of members is named in
-- flag_sets; flag_gens allocates generations (and dates builds, so an abandoned one is found)
CREATE TABLE IF NOT EXISTS flag_gens (
    gen INTEGER PRIMARY KEY AUTOINCREMENT,
    flag TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flag_sets (
    flag TEXT PRIMARY KEY,
    gen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_sets_gen ON flag_sets (gen);
-- member first: a look-up is one probe per recipient, whatever the number of sets
CREATE TABLE IF NOT EXISTS flag_members (
    member TEXT NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (member, gen)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flag_members_gen ON flag_members (gen);
"""

# The schema of version 2 (commit 954ce43): distinct sets' earliest expiry kept, no index of
# every member by expiry; rate counts still in their own table.
V2_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
);
-- rate windows: the n events recorded under key at time at (one row an instant, whatever the
-- admission's cost), in one B-tree ordered as a window is read and pruned
CREATE TABLE IF NOT EXISTS window_events (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (key, at)
) WITHOUT ROWID;
-- each key's event count (events that left its window and are not pruned yet included)
CREATE TABLE IF NOT EXISTS window_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS distinct_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
-- each distinct set's row count (expired members not purged yet included) and a time no later
-- than its earliest expiry, kept beside its members by every write (see _count_distinct): a set
-- has a row here exactly when it has members; the purge finds the sets it has work in by oldest
CREATE TABLE IF NOT EXISTS distinct_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    oldest REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS distinct_counts_oldest ON distinct_counts (oldest);
-- the members of one set that left its window: what the kept count must discount, and what the
-- purge deletes
CREATE INDEX IF NOT EXISTS distinct_members_key_expires ON distinct_members (key, expires);
-- recipient flags (gateway.policy.flags): each flag's live generation of members is named in
-- flag_sets; flag_gens allocates generations (and dates builds, so an abandoned one is found)
CREATE TABLE IF NOT EXISTS flag_gens (
    gen INTEGER PRIMARY KEY AUTOINCREMENT,
    flag TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flag_sets (
    flag TEXT PRIMARY KEY,
    gen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_sets_gen ON flag_sets (gen);
-- member first: a look-up is one probe per recipient, whatever the number of sets
CREATE TABLE IF NOT EXISTS flag_members (
    member TEXT NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (member, gen)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flag_members_gen ON flag_members (gen);
"""

# The schema of version 3 (commit de7ef99): rate counts in their windows; kv not indexed by
# expiry.
V3_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
);
-- rate windows: the n events recorded under key at time at (one row an instant, whatever the
-- admission's cost), in one B-tree ordered as a window is read and pruned; the key's row at
-- -inf (COUNT_AT) holds its event count (events that left its window and are not pruned yet
-- included), on the page of its first events
CREATE TABLE IF NOT EXISTS window_events (
    key TEXT NOT NULL,
    at REAL NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (key, at)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS distinct_members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
-- each distinct set's row count (expired members not purged yet included) and a time no later
-- than its earliest expiry, kept beside its members by every write (see _count_distinct): a set
-- has a row here exactly when it has members; the purge finds the sets it has work in by oldest
CREATE TABLE IF NOT EXISTS distinct_counts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    oldest REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS distinct_counts_oldest ON distinct_counts (oldest);
-- the members of one set that left its window: what the kept count must discount, and what the
-- purge deletes
CREATE INDEX IF NOT EXISTS distinct_members_key_expires ON distinct_members (key, expires);
-- recipient flags (gateway.policy.flags): each flag's live generation of members is named in
-- flag_sets; flag_gens allocates generations (and dates builds, so an abandoned one is found)
CREATE TABLE IF NOT EXISTS flag_gens (
    gen INTEGER PRIMARY KEY AUTOINCREMENT,
    flag TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flag_sets (
    flag TEXT PRIMARY KEY,
    gen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS flag_sets_gen ON flag_sets (gen);
-- member first: a look-up is one probe per recipient, whatever the number of sets
CREATE TABLE IF NOT EXISTS flag_members (
    member TEXT NOT NULL,
    gen INTEGER NOT NULL,
    PRIMARY KEY (member, gen)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flag_members_gen ON flag_members (gen);
"""

def schema_of(path: Path) -> tuple[int, list[tuple]]:
    """The file's user_version and the shape of its tables and indexes (columns, types, keys,
    WITHOUT ROWID, indexed columns): what a migrated file must have exactly as a new one has."""
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        shape = []
        for kind, name, table, sql in db.execute(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name").fetchall():
            if kind == "table":
                columns = db.execute(f"PRAGMA table_info({name})").fetchall()
                shape.append((kind, name, tuple(columns), "WITHOUT ROWID" in sql.upper()))
            else:
                columns = db.execute(f"PRAGMA index_xinfo({name})").fetchall()
                shape.append((kind, name, table, tuple(columns)))
    finally:
        db.close()
    return version, shape


def old_file(path: Path, now: float, version: int = 0) -> None:
    """A file of ``version`` as its code left it: rate events (two at one instant, and one
    that has left a 60 s window), kept counts, keys (one without an expiry, one expired), and
    audience sets: "c" with its count
    (three members, one expired), "pre" stored before distinct_counts (no count row; two
    members, one expired; from version 2 on every set has its count)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript({0: V0_SCHEMA, 1: V1_SCHEMA, 2: V2_SCHEMA, 3: V3_SCHEMA}[version])
    db.execute(f"PRAGMA user_version = {version}")
    events = [("rate:acme:60", now - 70), ("rate:acme:60", now - 30), ("rate:acme:60", now - 30),
              ("rate:acme:60", now - 10), ("rate:beta:60", now - 5)]
    if version == 0:
        db.executemany("INSERT INTO window_events (key, at) VALUES (?, ?)", events)
    else:
        db.executemany("INSERT INTO window_events (key, at, n) VALUES (?, ?, 1) "
                       "ON CONFLICT (key, at) DO UPDATE SET n = n + 1", events)
    counts = [("rate:acme:60", 4), ("rate:beta:60", 1)]
    if version < 3:
        db.executemany("INSERT INTO window_counts (key, n) VALUES (?, ?)", counts)
    else:  # (each key's count in its window, at -inf)
        db.executemany("INSERT INTO window_events (key, at, n) VALUES (?, ?, ?)",
                       [(key, float("-inf"), n) for key, n in counts])
    db.executemany("INSERT INTO kv (key, value, expires) VALUES (?, ?, ?)",
                   [("throttle:acme", b"5/minute", None), ("trace:q:1", b"{}", now + 30),
                    ("trace:q:2", b"{}", now - 1)])
    db.executemany("INSERT INTO distinct_members (key, member, expires) VALUES (?, ?, ?)",
                   [("c", "m1", now + 50), ("c", "m2", now - 5), ("c", "m3", now + 20),
                    ("pre", "p1", now - 1), ("pre", "p2", now + 300)])
    if version < 2:
        db.execute("INSERT INTO distinct_counts (key, n) VALUES ('c', 3)")
    else:  # (every set counted, with its earliest expiry)
        db.executemany("INSERT INTO distinct_counts (key, n, oldest) VALUES (?, ?, ?)",
                       [("c", 3, now - 5), ("pre", 2, now - 1)])
    db.close()


@pytest.mark.parametrize("version", [0, 1, 2, 3])
async def test_an_old_file_is_migrated_once_and_answers_as_before(tmp_path, version):
    clock = FakeClock()
    now = clock.now().timestamp()
    old_file(tmp_path / "old.sqlite3", now, version)
    fresh = open_store("sqlite:new.sqlite3", clock, tmp_path)
    await fresh.ping()
    await fresh.close()

    store = open_store("sqlite:old.sqlite3", clock, tmp_path)
    store.PURGE_EVERY = float("inf")  # first the counts as the file has them, unpurged
    acme = [Limit("rate:acme:60", 4, 60.0)]
    # three live events (two at now - 30), one gone: room for one, then the oldest live leaves
    assert await store.peek(acme, now) == (0.0, -1, 3, (1,))
    assert await store.acquire(acme, now, "a") == (0.0, -1, 4, (0,))
    full = await store.acquire(acme, now + 1, "b")
    assert full == (pytest.approx(29.0), 0, 4, (0,))
    two = await store.acquire([acme[0]._replace(cost=2)], now + 1, "c")
    assert two == (pytest.approx(29.0), 0, 4, (0,))  # both events at now - 30 must leave
    three = await store.peek([acme[0]._replace(cost=3)], now + 1)
    assert three.wait == pytest.approx(49.0)  # and the one at now - 10
    assert await store.peek([Limit("rate:beta:60", 1, 60.0)], now) == (pytest.approx(55.0), 0, 1,
                                                                       (0,))
    assert await store.get("throttle:acme") == b"5/minute"
    assert await store.scan("trace:") == {"trace:q:1": b"{}"}
    assert await store.count_distinct("c", [], 100.0) == 2
    assert await store.count_distinct("pre", ["p1"], 100.0) == 2  # p1 had expired: new again
    assert await store.count_distinct("c", ["m2", "m4"], 100.0) == 4
    await store.close()
    assert schema_of(tmp_path / "old.sqlite3") == schema_of(tmp_path / "new.sqlite3")
    assert schema_of(tmp_path / "old.sqlite3")[0] == sqlite_state.SCHEMA_VERSION
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    assert db.execute("SELECT key, n, oldest - ? FROM distinct_counts ORDER BY key",
                      (now,)).fetchall() == [("c", 4, -5.0), ("pre", 2, -1.0)]  # (no later
    # than the earliest expiry: a member seen again leaves it as it was)
    db.close()

    again = open_store("sqlite:old.sqlite3", clock, tmp_path)  # a file of this version: as is
    assert (await again.peek(acme, now + 1)).used == 4
    clock.advance(60)  # m1, m3 leave "c"; the purge deletes them (none from "pre")
    assert await again.count_distinct("c", [], 100.0) == 2
    assert await again.purge_expired() == 2  # the trace's two keys; the throttle stays
    assert await again.get("throttle:acme") == b"5/minute"
    await again.close()
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    assert db.execute("SELECT at - ?, n FROM window_events WHERE key = 'rate:acme:60' "
                      "ORDER BY at", (now,)).fetchall() == [(float("-inf"), 4), (-30.0, 2),
                                                           (-10.0, 1), (0.0, 1)]  # (the count)
    assert db.execute("SELECT key, member FROM distinct_members ORDER BY key, member"
                      ).fetchall() == [("c", "m2"), ("c", "m4"), ("pre", "p1"), ("pre", "p2")]
    assert db.execute("SELECT key, n, oldest - ? FROM distinct_counts ORDER BY key",
                      (now,)).fetchall() == [("c", 2, 100.0), ("pre", 2, 100.0)]
    db.close()


async def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """One transaction: a process stopped half-way (here, the last step raises after its work,
    every earlier one done) leaves the version-0 file whole, and the next start migrates it."""
    clock = FakeClock()
    now = clock.now().timestamp()
    path = tmp_path / "old.sqlite3"
    old_file(path, now)
    before = schema_of(path)
    real = dict(sqlite_state._MIGRATIONS)
    last = sqlite_state.SCHEMA_VERSION

    def broken(db):
        real[last](db)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(sqlite_state._MIGRATIONS, last, broken)
    store = open_store("sqlite:old.sqlite3", clock, tmp_path)
    with pytest.raises(StoreError, match="disk I/O error"):
        await store.ping()
    await store.close()
    assert schema_of(path) == before
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM window_events").fetchone() == (5,)
    db.close()

    monkeypatch.setitem(sqlite_state._MIGRATIONS, last, real[last])
    store = open_store("sqlite:old.sqlite3", clock, tmp_path)
    assert await store.peek([Limit("rate:acme:60", 4, 60.0)], now) == (0.0, -1, 3, (1,))
    await store.close()
    assert schema_of(path)[0] == sqlite_state.SCHEMA_VERSION


async def test_two_processes_starting_on_an_old_file_migrate_it_once(tmp_path):
    """Two stores (two processes' worth: each its own connections and thread) opening one
    version-0 file at once: one migrates, the other finds it done; no event is lost or
    doubled."""
    clock = FakeClock()
    now = clock.now().timestamp()
    old_file(tmp_path / "old.sqlite3", now)
    stores = [open_store("sqlite:old.sqlite3", clock, tmp_path) for _ in range(2)]
    looks = await asyncio.gather(*(s.peek([Limit("rate:acme:60", 4, 60.0)], now)
                                   for s in stores))
    assert looks == [(0.0, -1, 3, (1,)), (0.0, -1, 3, (1,))]
    for store in stores:
        await store.close()
    db = sqlite3.connect(tmp_path / "old.sqlite3")
    assert db.execute("SELECT sum(n) FROM window_events WHERE at > ?",
                      (sqlite_state.COUNT_AT,)).fetchone() == (5,)
    assert db.execute("SELECT key, n FROM window_events WHERE at = ? ORDER BY key",
                      (sqlite_state.COUNT_AT,)).fetchall() == [("rate:acme:60", 4),
                                                              ("rate:beta:60", 1)]
    db.close()


_RATE_STEPS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 7.0, 10.0, 30.0])),
    st.tuples(st.sampled_from(["acquire", "peek"]),
              st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 4),
                                 st.sampled_from([10.0, 30.0]), st.integers(1, 3)),
                       min_size=1, max_size=3, unique_by=lambda t: t[0]))), max_size=40)


def assert_rate_counts_exact(path: Path) -> None:
    """Each key's count row (at COUNT_AT) is the number of its stored events (those not pruned
    yet included); a key without events has none, or 0."""
    db = sqlite3.connect(path)
    at = sqlite_state.COUNT_AT
    events = dict(db.execute("SELECT key, sum(n) FROM window_events WHERE at > ? GROUP BY key",
                             (at,)))
    kept = dict(db.execute("SELECT key, n FROM window_events WHERE at = ?", (at,)))
    db.close()
    assert {k: n for k, n in kept.items() if n} == events


@settings(max_examples=80, deadline=None)
@given(steps=_RATE_STEPS)
def test_sqlite_rate_windows_answer_as_the_memory_store_does(steps):
    """Random admissions and looks (several at one instant, costs above one, up to three
    limits, windows of 10 and 30 s): SQLite's answers (wait, limit, used, rooms) are the memory
    store's, whose windows are plain sorted lists of event times, and its kept counts stay
    exact."""

    async def run(base: Path) -> None:
        clock = FakeClock()
        sqlite_store, memory = open_store("sqlite:s.sqlite3", clock, base), MemoryStore(clock)
        try:
            for step in steps:
                if step[0] == "advance":
                    clock.advance(step[1])
                    continue
                call, specs = step
                limits = [Limit(f"rate:{k}:{int(w)}", count, w, min(cost, count))
                          for k, count, w, cost in specs]
                now = clock.now().timestamp()
                if call == "acquire":
                    want = await memory.acquire(limits, now, "t")
                    got = await sqlite_store.acquire(limits, now, "t")
                else:
                    want = await memory.peek(limits, now)
                    got = await sqlite_store.peek(limits, now)
                assert (got.limit, got.used, got.rooms) == (want.limit, want.used,
                                                            want.rooms), step
                assert got.wait == pytest.approx(want.wait), step
                assert_rate_counts_exact(base / "s.sqlite3")
        finally:
            await sqlite_store.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


def test_retry_after_is_the_reference_for_costs_at_one_instant():
    """(The reference the property test rests on: two events at one instant leave together.)"""
    assert retry_after([5.0, 5.0, 9.0], 3, 10.0, 10.0, cost=2) == 5.0
    assert retry_after([5.0, 5.0, 9.0], 3, 10.0, 10.0, cost=3) == 9.0


async def test_purge_expired_reads_only_what_expired(tmp_path):
    """The hourly purge (the trace's retention) finds expired keys through their expiry: its
    work, in SQLite virtual machine steps, is about the same beside 5,000 live keys as beside
    50, and it deletes exactly the expired keys (never one without an expiry)."""
    clock = FakeClock()

    async def purge_steps(live: int) -> int:
        store = open_store(f"sqlite:s{live}.sqlite3", clock, tmp_path)
        await store.set_many([(f"old:{i}", b"x", 10.0) for i in range(20)]
                             + [(f"live:{i}", b"y" * 500, 3600.0) for i in range(live)]
                             + [("forever", b"z", None)])
        clock.advance(10)  # the 20 old keys have just expired
        db = store._conn()  # the worker's connection, which purges
        n = 0

        def tick():
            nonlocal n
            n += 1
            return 0

        await store._run(db.set_progress_handler, tick, 1)
        try:
            assert await store.purge_expired() == 20
        finally:
            await store._run(db.set_progress_handler, None, 1)
        assert len(await store.scan("live:")) == live and await store.get("forever") == b"z"
        assert await store.scan("old:") == {}
        await store.close()
        return n

    few, many = await purge_steps(50), await purge_steps(5000)
    assert many <= few * 1.3, (few, many)
