"""SQLite state, the embedded default: one file, survives restarts, safe for one host.

SQLite calls can block (on another writer's lock, on a sync to disk), so they run on one
dedicated worker thread that owns its connection, and the event loop only awaits it. The
per-message calls (rate admission and its look at MAIL, flag look-up, the audience count and
a key read, the trace's batched writes) are the exception: they run on the loop's own
connection when they cannot wait on anything (see ``_quick``), since the hop to the thread
costs more than they do.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.infra.clock import Clock
from gateway.state import Admission, Limit, StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
);
-- what purge_expired deletes, found without reading every key (a new key's expiry is the
-- latest, so its entry goes to the end: a page a batch, not one a key)
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
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

# The schema's version, in the file's user_version. 0: the files made before it was kept
# (window events one row each, in a rowid table and an index; distinct members indexed by
# expiry). Each step below brings a file from the version before to its own; a new file gets
# _SCHEMA at once.
SCHEMA_VERSION = 4
COUNT_AT = float("-inf")  # a rate window's row holding its key's event count


def _statements(script: str) -> list[str]:
    """The statements of ``script``, one each (sqlite3's execute takes one at a time, and
    executescript would commit the set-up's transaction)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def _rebuild(db: sqlite3.Connection, table: str, create: str, copy: str) -> None:
    """Re-create ``table`` as ``create`` says, its rows converted by ``copy`` (a SELECT from
    the old one, renamed ``<table>_old``)."""
    db.execute(f"ALTER TABLE {table} RENAME TO {table}_old")
    db.execute(create)
    db.execute(f"INSERT INTO {table} {copy}")
    db.execute(f"DROP TABLE {table}_old")  # with its indexes


def _to_1(db: sqlite3.Connection) -> None:
    """Window events merged into one row an instant in a WITHOUT ROWID table keyed (key, at),
    their counts WITHOUT ROWID too: an admission's events dirty one B-tree, not two (a rowid
    table and its (key, at) index), its counts one, not two (a rowid table and its key index),
    and a cost of n writes one row, not n."""
    if _has_table(db, "window_events"):
        _rebuild(db, "window_events",
                 "CREATE TABLE window_events (key TEXT NOT NULL, at REAL NOT NULL, "
                 "n INTEGER NOT NULL, PRIMARY KEY (key, at)) WITHOUT ROWID",
                 "(key, at, n) SELECT key, at, count(*) FROM window_events_old "
                 "GROUP BY key, at")
    if _has_table(db, "window_counts"):
        _rebuild(db, "window_counts",
                 "CREATE TABLE window_counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL) "
                 "WITHOUT ROWID",
                 "(key, n) SELECT key, n FROM window_counts_old")


def _to_2(db: sqlite3.Connection) -> None:
    """No index of every member by expiry (each write moved its entries: two pages a member
    seen again): the purge finds its sets by distinct_counts.oldest and deletes through the
    per-set (key, expires) index. Counts and earliest expiries computed afresh from the members
    (which also gives a count to every set stored before distinct_counts)."""
    db.execute("DROP INDEX IF EXISTS distinct_members_expires")
    if _has_table(db, "distinct_counts"):
        db.execute("DROP TABLE distinct_counts")
    db.execute("CREATE TABLE distinct_counts (key TEXT PRIMARY KEY, n INTEGER NOT NULL, "
               "oldest REAL NOT NULL) WITHOUT ROWID")
    if _has_table(db, "distinct_members"):
        db.execute("INSERT INTO distinct_counts (key, n, oldest) SELECT key, count(*), "
                   "min(expires) FROM distinct_members GROUP BY key")


def _to_3(db: sqlite3.Connection) -> None:
    """Each key's event count moved into its window, as the row at COUNT_AT: an admission
    writes one page a key (its events and its count), not two."""
    if _has_table(db, "window_counts"):
        db.execute("INSERT INTO window_events (key, at, n) SELECT key, ?, n FROM window_counts",
                   (COUNT_AT,))
        db.execute("DROP TABLE window_counts")


def _to_4(db: sqlite3.Connection) -> None:
    """kv's keys with an expiry indexed by it (created with the schema, below): the hourly
    purge read every key (the trace's records: its CPU, amortized, about as much as a message's
    own SQLite writes), now only the expired ones."""


_MIGRATIONS = {1: _to_1, 2: _to_2, 3: _to_3, 4: _to_4}


def set_up(db: sqlite3.Connection) -> None:
    """Create the schema, or bring a file made by an earlier version to this one: in one
    transaction (a process stopped half-way leaves the file as it was), once (a file at
    SCHEMA_VERSION is left alone), one process at a time (BEGIN IMMEDIATE)."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # (another may have)
        if version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[step](db)
            for sql in _statements(_SCHEMA):
                db.execute(sql)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SQLiteStore:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = Path(path)
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-state")
        self._db: sqlite3.Connection | None = None  # the worker thread's
        self._fast: sqlite3.Connection | None = None  # the event loop's (see _quick)
        self._fast_calls = 0
        self._purged = 0.0  # when expired distinct members were last deleted (wall clock)
        self._background: set[asyncio.Task] = set()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            set_up(db)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    # --- the fast path: the per-message decisions on the event loop's own connection ------
    # A rate decision or a flag look-up is a few indexed statements, cheaper than the hop to
    # the worker thread and back (about 130 us of CPU a call, measured). They run on a
    # connection of the event loop's own only when that cannot make the loop wait: it never
    # waits for a lock (busy_timeout = 0: when another writer, say an import, holds the
    # database, the call goes to the worker thread, which may wait), a commit only appends to
    # the write-ahead log (synchronous = NORMAL: no fsync), and it never checkpoints (the
    # worker does, every CHECKPOINT_EVERY fast calls).
    CHECKPOINT_EVERY = 1000

    def _loop_conn(self) -> sqlite3.Connection:
        if self._fast is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")
            self._fast = db
        return self._fast

    async def _quick(self, fn, *args):
        """``fn(*args, db=...)`` on the event loop's connection when it can run without
        waiting, else in the worker thread."""
        if self._db is None:  # the schema and WAL mode first, set up by the worker
            await self._run(self._conn)
        try:
            result = fn(*args, db=self._loop_conn())
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise StoreError(f"sqlite {self.path}: {exc}") from exc
            return await self._run(fn, *args)  # another writer holds it: wait off the loop
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc
        self._fast_calls += 1
        if self._fast_calls % self.CHECKPOINT_EVERY == 0:
            task = asyncio.get_running_loop().create_task(self._run(self._checkpoint))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return result

    def _checkpoint(self) -> None:
        self._conn().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _get(self, key: str, now: float, db: sqlite3.Connection | None = None) -> bytes | None:
        row = (db or self._conn()).execute(
            "SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, now)).fetchone()
        return None if row is None else bytes(row[0])

    async def get(self, key: str) -> bytes | None:
        return await self._quick(self._get, key, self._now())

    def _set(self, key: str, value: bytes, expires: float | None) -> None:
        self._conn().execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                             (key, value, expires))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self._run(self._set, key, value, None if ttl is None else self._now() + ttl)

    def _set_many(self, rows: list[tuple[str, bytes, float | None]],
                  db: sqlite3.Connection | None = None) -> None:
        db = db or self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                           rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def set_many(self, items: list[tuple[str, bytes, float | None]]) -> None:
        # on the loop's connection like the per-message decisions (see _quick): a batch from
        # the worker thread held the write lock while they ran, and sent them to the thread too
        now = self._now()
        await self._quick(self._set_many, [(k, v, None if ttl is None else now + ttl)
                                           for k, v, ttl in items])

    async def delete(self, key: str) -> None:
        await self._run(lambda: self._conn().execute("DELETE FROM kv WHERE key = ?", (key,)))

    def _incr(self, key: str, amount: int, ttl: float | None, now: float) -> int:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or (row[1] is not None and row[1] <= now):
                value, expires = amount, (None if ttl is None else now + ttl)
            else:
                value, expires = int(row[0]) + amount, row[1]
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, str(value).encode(), expires))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return value

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        return await self._run(self._incr, key, amount, ttl, self._now())

    def _scan(self, prefix: str, now: float) -> dict[str, bytes]:
        # the range lets SQLite walk the primary key's index instead of the whole table
        rows = self._conn().execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? AND substr(key, 1, ?) = ? "
            "AND (expires IS NULL OR expires > ?)",
            (prefix, prefix + "\U0010ffff", len(prefix), prefix, now)).fetchall()
        return {k: bytes(v) for k, v in rows}

    def _purge(self, now: float) -> int:
        return self._conn().execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?",
                                    (now,)).rowcount

    async def purge_expired(self) -> int:
        """Delete expired keys (read as absent already); the trace retention job calls it."""
        return await self._run(self._purge, self._now())

    async def scan(self, prefix: str) -> dict[str, bytes]:
        return await self._run(self._scan, prefix, self._now())

    # A key's window: its kept event count, in the key's row at -inf (beside its events, on
    # their page), less the events at or before the window's start (pruned by the next
    # admission): one range read however full the window
    _KEPT_AND_GONE = ("SELECT sum(CASE WHEN at = ?2 THEN n END), coalesce(sum(CASE WHEN at > ?2 "
                      "THEN n END), 0) FROM window_events WHERE key = ?1 AND at <= ?3")
    # the time of the excess-th oldest event in the window (rows hold n events each)
    _NTH_OLDEST = ("SELECT at FROM (SELECT at, sum(n) OVER (ORDER BY at) AS upto FROM "
                   "window_events WHERE key = ? AND at > ?) WHERE upto >= ? LIMIT 1")

    def _acquire(self, limits: list[Limit], now: float,
                 db: sqlite3.Connection | None = None) -> Admission:
        db = db or self._conn()
        db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
        try:
            wait, worst, counts, changed = 0.0, -1, [], []
            for i, (key, count, window, cost) in enumerate(limits):
                # each key's event count is kept beside its events, so a decision costs the
                # same however full the window is: prune what left it, adjust the count
                since = now - window
                kept, gone = db.execute(self._KEPT_AND_GONE,
                                        (key, COUNT_AT, since)).fetchone()
                if gone:
                    db.execute("DELETE FROM window_events WHERE key = ? AND at > ? AND at <= ?",
                               (key, COUNT_AT, since))
                n = max((kept or 0) - gone, 0)
                counts.append(n)
                changed.append(n != (kept or 0))
                excess = n + cost - count
                if excess > 0:  # the event whose leaving makes room: the excess-th oldest
                    found = db.execute(self._NTH_OLDEST, (key, since, excess)).fetchone()
                    w = max(found[0] + window - now, 0.0) if found else 0.0
                    if w > wait:
                        wait, worst = w, i
            admitted = wait == 0
            if admitted:
                db.executemany("INSERT INTO window_events (key, at, n) VALUES (?, ?, ?) "
                               "ON CONFLICT (key, at) DO UPDATE SET n = n + excluded.n",
                               [(lim.key, now, lim.cost) for lim in limits if lim.cost])
            # (a count that did not move is not written)
            db.executemany("INSERT INTO window_events (key, at, n) VALUES (?, ?, ?) "
                           "ON CONFLICT (key, at) DO UPDATE SET n = excluded.n",
                           [(lim.key, COUNT_AT, n + (lim.cost if admitted else 0))
                            for lim, n, moved in zip(limits, counts, changed)
                            if moved or (admitted and lim.cost)])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Admission(wait, worst, counts[0] + (limits[0].cost if wait == 0 else 0),
                         tuple(lim.count - n - (lim.cost if admitted else 0)
                               for lim, n in zip(limits, counts)))

    async def acquire(self, limits: list[Limit], now: float, token: str) -> Admission:
        return await self._quick(self._acquire, limits, now)

    def _peek(self, limits: list[Limit], now: float,
              db: sqlite3.Connection | None = None) -> Admission:
        db = db or self._conn()
        db.execute("BEGIN")  # read only: one snapshot for every limit, no write lock
        try:
            wait, worst, first, rooms = 0.0, -1, 0, []
            for i, (key, count, window, cost) in enumerate(limits):
                # the kept count, less the events that left the window but are not pruned yet
                # (an acquire prunes them): a few index probes, however full the window
                since = now - window
                kept, gone = db.execute(self._KEPT_AND_GONE,
                                        (key, COUNT_AT, since)).fetchone()
                n = max((kept or 0) - gone, 0)
                if i == 0:
                    first = n
                rooms.append(count - n)
                excess = n + cost - count
                if excess > 0:
                    found = db.execute(self._NTH_OLDEST, (key, since, excess)).fetchone()
                    w = max(found[0] + window - now, 0.0) if found else 0.0
                    if w > wait:
                        wait, worst = w, i
        finally:
            db.execute("COMMIT")
        return Admission(wait, worst, first, tuple(rooms))

    async def peek(self, limits: list[Limit], now: float) -> Admission:
        return await self._quick(self._peek, limits, now)

    # --- recipient flags (gateway.policy.flags) ----------------------------------------------------
    # A flag's members form a generation; flag_sets names each flag's live one. A replace fills
    # a new generation in short transactions (other writers wait milliseconds, not the whole
    # import), swaps flag_sets in one, then deletes the old generation in chunks: a reader sees
    # the old set or the new one, never a mix and never an empty window.

    _FLAG_CHUNK = 10000

    def _flag_lookup(self, names: list[str], members: list[str],
                     db: sqlite3.Connection | None = None) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        if not names or not members:
            return out
        db = db or self._conn()
        marks = ",".join("?" * len(names))
        for i in range(0, len(members), 500):
            chunk = members[i:i + 500]
            # one statement, so one snapshot: the generation read is the one probed; CROSS
            # JOIN keeps the members as the outer loop (one probe each)
            for flag, member in db.execute(
                    f"SELECT s.flag, m.member FROM flag_members AS m CROSS JOIN flag_sets AS s "
                    f"ON s.gen = m.gen WHERE m.member IN ({','.join('?' * len(chunk))}) "
                    f"AND s.flag IN ({marks})", (*chunk, *names)):
                out.setdefault(member, set()).add(flag)
        return out

    async def flag_lookup(self, names: list[str], members: list[str]) -> dict[str, set[str]]:
        return await self._quick(self._flag_lookup, names, members)

    def _write(self, fn):
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return result

    def _flag_add(self, name: str, members: list[str], now: float) -> int:
        def fn(db):
            row = db.execute("SELECT gen FROM flag_sets WHERE flag = ?", (name,)).fetchone()
            if row is None:
                gen = db.execute("INSERT INTO flag_gens (flag, started) VALUES (?, ?)",
                                 (name, now)).lastrowid
                db.execute("INSERT INTO flag_sets (flag, gen) VALUES (?, ?)", (name, gen))
            else:
                gen = row[0]
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO flag_members (member, gen) VALUES (?, ?)",
                           [(m, gen) for m in members])
            return db.total_changes - before

        return self._write(fn)

    async def flag_add(self, name: str, members: list[str]) -> int:
        added = 0
        for i in range(0, len(members), self._FLAG_CHUNK):
            added += await self._run(self._flag_add, name, members[i:i + self._FLAG_CHUNK],
                                     self._now())
        return added

    def _flag_remove(self, name: str, members: list[str]) -> int:
        def fn(db):
            before = db.total_changes
            db.executemany("DELETE FROM flag_members WHERE gen = (SELECT gen FROM flag_sets "
                           "WHERE flag = ?) AND member = ?", [(name, m) for m in members])
            return db.total_changes - before

        return self._write(fn)

    async def flag_remove(self, name: str, members: list[str]) -> int:
        return await self._run(self._flag_remove, name, members)

    def _flag_fill(self, gen: int, members: list[str]) -> None:
        self._write(lambda db: db.executemany(
            "INSERT OR IGNORE INTO flag_members (member, gen) VALUES (?, ?)",
            [(m, gen) for m in members]))

    def _flag_swap(self, name: str, gen: int) -> tuple[int | None, int]:
        def fn(db):
            row = db.execute("SELECT gen FROM flag_sets WHERE flag = ?", (name,)).fetchone()
            db.execute("INSERT OR REPLACE INTO flag_sets (flag, gen) VALUES (?, ?)", (name, gen))
            (count,) = db.execute("SELECT count(*) FROM flag_members WHERE gen = ?",
                                  (gen,)).fetchone()
            return (None if row is None else row[0]), count

        return self._write(fn)

    def _flag_drop_chunk(self, gen: int) -> int:
        """Delete up to a chunk of an unreferenced generation; 0 once it is gone."""
        def fn(db):
            cur = db.execute("DELETE FROM flag_members WHERE gen = ? AND member IN (SELECT "
                             "member FROM flag_members WHERE gen = ? LIMIT ?)",
                             (gen, gen, self._FLAG_CHUNK))
            if cur.rowcount == 0:
                db.execute("DELETE FROM flag_gens WHERE gen = ?", (gen,))
            return cur.rowcount

        return self._write(fn)

    def _flag_abandoned(self, now: float) -> list[int]:
        """Generations of builds that never swapped in (a killed import) and are a day old."""
        return [r[0] for r in self._conn().execute(
            "SELECT gen FROM flag_gens WHERE started < ? AND gen NOT IN "
            "(SELECT gen FROM flag_sets)", (now - 86400,))]

    async def _flag_drop(self, gen: int) -> None:
        while await self._run(self._flag_drop_chunk, gen):
            pass

    async def flag_replace(self, name: str, members) -> int:
        now = self._now()
        for stale in await self._run(self._flag_abandoned, now):
            await self._flag_drop(stale)
        gen = await self._run(lambda: self._write(lambda db: db.execute(
            "INSERT INTO flag_gens (flag, started) VALUES (?, ?)", (name, now)).lastrowid))
        try:
            batch: list[str] = []
            for member in members:
                batch.append(member)
                if len(batch) >= self._FLAG_CHUNK:
                    await self._run(self._flag_fill, gen, batch)
                    batch = []
            if batch:
                await self._run(self._flag_fill, gen, batch)
            old, count = await self._run(self._flag_swap, name, gen)
        except BaseException:
            await self._flag_drop(gen)
            raise
        if old is not None:
            await self._flag_drop(old)
        return count

    def _flag_counts(self) -> dict[str, int]:
        return {flag: n for flag, n in self._conn().execute(
            "SELECT s.flag, count(m.member) FROM flag_sets AS s JOIN flag_members AS m "
            "ON m.gen = s.gen GROUP BY s.flag ORDER BY s.flag")}

    async def flag_counts(self) -> dict[str, int]:
        return await self._run(self._flag_counts)

    async def ping(self) -> None:
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._fast is not None:
            self._fast.close()
            self._fast = None

        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(_close)
        self._executor.shutdown(wait=True)

    # Members that left their window are skipped by every read and deleted in bulk at most
    # every PURGE_EVERY seconds (a delete over every key, on each message, was most of the cost).
    # Each set's row count is kept in distinct_counts, so that a count costs a few index probes
    # plus the set's members that expired since the last purge, whatever the audience: the live
    # count is the kept one less those. Every write keeps it exact in its own transaction (two
    # gateway processes on one file included): a member stored for the first time adds one, a
    # purge subtracts what it deleted from each set; re-seeing a member, expired or not, changes
    # no row count. Beside it, ``oldest``: no later than the set's earliest expiry (a member
    # seen again only moves its own expiry later), so the purge visits the sets it may have
    # work in, through an index, however many sets there are.
    PURGE_EVERY = 10.0

    def _purge_distinct(self, db: sqlite3.Connection, now: float) -> None:
        for (key,) in db.execute("SELECT key FROM distinct_counts WHERE oldest <= ?",
                                 (now,)).fetchall():
            gone = db.execute("DELETE FROM distinct_members WHERE key = ? AND expires <= ?",
                              (key, now)).rowcount
            (oldest,) = db.execute("SELECT min(expires) FROM distinct_members WHERE key = ?",
                                   (key,)).fetchone()
            if oldest is None:  # nothing left: no count row
                db.execute("DELETE FROM distinct_counts WHERE key = ?", (key,))
            else:
                db.execute("UPDATE distinct_counts SET n = n - ?, oldest = ? WHERE key = ?",
                           (gone, oldest, key))

    def _count_distinct(self, key: str, members: list[str], window: float,
                        limit: int | None, now: float,
                        db: sqlite3.Connection | None = None) -> int:
        db = db or self._conn()
        db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
        try:
            if now - self._purged >= self.PURGE_EVERY:
                self._purge_distinct(db, now)
                self._purged = now
            # (no count row: the set has no members, stored or expired)
            row = db.execute(
                "SELECT n, oldest, (SELECT count(*) FROM distinct_members WHERE key = ?1 AND "
                "expires <= ?2) FROM distinct_counts WHERE key = ?1", (key, now)).fetchone()
            rows, oldest, expired = row if row is not None else (0, None, 0)
            count = rows - expired
            wanted = list(dict.fromkeys(members))
            present: dict[str, float] = {}  # this message's members stored already (live or not)
            for i in range(0, len(wanted) if rows else 0, 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" * len(chunk))
                present.update(db.execute(
                    "SELECT member, expires FROM distinct_members WHERE key = ? AND member IN "
                    f"({marks})", (key, *chunk)))
            known = [m for m in wanted if present.get(m, now) > now]
            new = [m for m in wanted if present.get(m, now) <= now]  # absent, or expired
            if limit is not None:
                new = new[:max(0, limit + 1 - count)]
            expires = now + window
            # one statement writes them all: the known ones seen again, the new ones (and any
            # that had left the window but not been purged yet) recorded
            written = known + new
            for i in range(0, len(written), 300):
                chunk = written[i:i + 300]
                db.execute("INSERT INTO distinct_members (key, member, expires) "
                           "VALUES " + ",".join(["(?, ?, ?)"] * len(chunk)) +
                           " ON CONFLICT (key, member) DO UPDATE SET expires = excluded.expires",
                           [v for m in chunk for v in (key, m, expires)])
            added = sum(1 for m in new if m not in present)
            if row is None:
                if written:
                    db.execute("INSERT INTO distinct_counts (key, n, oldest) VALUES (?, ?, ?)",
                               (key, added, expires))
            elif written and expires < oldest:  # (a window shorter than before)
                db.execute("UPDATE distinct_counts SET n = ?, oldest = ? WHERE key = ?",
                           (rows + added, expires, key))
            elif added:  # (oldest left out: its index is not touched)
                db.execute("UPDATE distinct_counts SET n = ? WHERE key = ?", (rows + added, key))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return count + len(new)

    async def count_distinct(self, key: str, members: list[str], window: float,
                             limit: int | None = None) -> int:
        return await self._quick(self._count_distinct, key, members, window, limit,
                                 self._now())

    def _count_distinct_and_get(self, key: str, members: list[str], window: float,
                                limit: int | None, read: str, now: float,
                                db: sqlite3.Connection | None = None) -> tuple[int, bytes | None]:
        return (self._count_distinct(key, members, window, limit, now, db=db),
                self._get(read, now, db=db))

    async def count_distinct_and_get(self, key: str, members: list[str], window: float,
                                     limit: int | None, read: str) -> tuple[int, bytes | None]:
        return await self._quick(self._count_distinct_and_get, key, members, window, limit,
                                 read, self._now())
