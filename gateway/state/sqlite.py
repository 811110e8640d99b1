"""SQLite state, the embedded default: one file, survives restarts, safe for one host.

SQLite calls block, so every call runs on one dedicated worker thread that owns the connection;
the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.clock import Clock
from gateway.state import Admission, Limit, StoreError, retry_after

_SCHEMA = """
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
"""


class SQLiteStore:
    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = Path(path)
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-state")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _get(self, key: str, now: float) -> bytes | None:
        row = self._conn().execute(
            "SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
            (key, now)).fetchone()
        return None if row is None else bytes(row[0])

    async def get(self, key: str) -> bytes | None:
        return await self._run(self._get, key, self._now())

    def _set(self, key: str, value: bytes, expires: float | None) -> None:
        self._conn().execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                             (key, value, expires))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        await self._run(self._set, key, value, None if ttl is None else self._now() + ttl)

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
        rows = self._conn().execute(
            "SELECT key, value FROM kv WHERE substr(key, 1, ?) = ? "
            "AND (expires IS NULL OR expires > ?)", (len(prefix), prefix, now)).fetchall()
        return {k: bytes(v) for k, v in rows}

    async def scan(self, prefix: str) -> dict[str, bytes]:
        return await self._run(self._scan, prefix, self._now())

    def _acquire(self, limits: list[Limit], now: float) -> Admission:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes too
        try:
            wait, worst, counts = 0.0, -1, []
            for i, (key, count, window) in enumerate(limits):
                db.execute("DELETE FROM window_events WHERE key = ? AND at <= ?",
                           (key, now - window))
                times = [r[0] for r in db.execute(
                    "SELECT at FROM window_events WHERE key = ? ORDER BY at", (key,))]
                counts.append(len(times))
                w = retry_after(times, count, window, now)
                if w > wait:
                    wait, worst = w, i
            if wait == 0:
                db.executemany("INSERT INTO window_events (key, at) VALUES (?, ?)",
                               [(key, now) for key, _, _ in limits])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return Admission(wait, worst, counts[0] + (1 if wait == 0 else 0))

    async def acquire(self, limits: list[Limit], now: float, token: str) -> Admission:
        return await self._run(self._acquire, limits, now)

    async def ping(self) -> None:
        await self._run(lambda: self._conn().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def _close():
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(_close)
        self._executor.shutdown(wait=True)
