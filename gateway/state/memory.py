"""In-process state, for tests and single-process experiments. Lost at exit."""

from __future__ import annotations

import bisect
from collections import OrderedDict

from gateway.infra.clock import Clock
from gateway.state import Admission, Limit, retry_after


class MemoryStore:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._windows: dict[str, list[float]] = {}
        self._flags: dict[str, set[str]] = {}  # recipient flag sets (gateway.policy.flags)
        self._distinct: dict[str, OrderedDict[str, float]] = {}  # key: member -> expires

    def _now(self) -> float:
        return self.clock.now().timestamp()

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._now():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._data[key] = (value, None if ttl is None else self._now() + ttl)

    async def set_many(self, items: list[tuple[str, bytes, float | None]]) -> None:
        for key, value, ttl in items:
            await self.set(key, value, ttl)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        current = self._live(key)
        if current is None:
            value = amount
            expires = None if ttl is None else self._now() + ttl
        else:
            value = int(current) + amount
            expires = self._data[key][1]
        self._data[key] = (str(value).encode(), expires)
        return value

    async def purge_expired(self) -> int:
        now = self._now()
        expired = [k for k, (_, until) in self._data.items() if until is not None and until <= now]
        for key in expired:
            del self._data[key]
        return len(expired)

    async def scan(self, prefix: str) -> dict[str, bytes]:
        out = {}
        for key in [k for k in self._data if k.startswith(prefix)]:
            value = self._live(key)
            if value is not None:
                out[key] = value
        return out

    async def acquire(self, limits: list[Limit], now: float, token: str) -> Admission:
        wait, worst = 0.0, -1
        for i, (key, count, window, cost) in enumerate(limits):
            times = self._windows.setdefault(key, [])
            del times[:bisect.bisect_right(times, now - window)]
            w = retry_after(times, count, window, now, cost)
            if w > wait:
                wait, worst = w, i
        if wait == 0:
            for key, _, _, cost in limits:
                for _ in range(cost):
                    bisect.insort(self._windows[key], now)
        return Admission(wait, worst, len(self._windows[limits[0].key]),
                         tuple(count - len(self._windows[key]) for key, count, _, _ in limits))

    async def peek(self, limits: list[Limit], now: float) -> Admission:
        wait, worst, first, rooms = 0.0, -1, 0, []
        for i, (key, count, window, cost) in enumerate(limits):
            times = self._windows.get(key, [])
            live = times[bisect.bisect_right(times, now - window):]
            if i == 0:
                first = len(live)
            rooms.append(count - len(live))
            w = retry_after(live, count, window, now, cost)
            if w > wait:
                wait, worst = w, i
        return Admission(wait, worst, first, tuple(rooms))

    # --- recipient flags (gateway.policy.flags): sets of keyed hashes ----------------------------

    async def flag_lookup(self, names: list[str], members: list[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name in names:
            live = self._flags.get(name)
            if live:
                for m in members:
                    if m in live:
                        out.setdefault(m, set()).add(name)
        return out

    async def flag_add(self, name: str, members: list[str]) -> int:
        live = self._flags.setdefault(name, set())
        before = len(live)
        live.update(members)
        return len(live) - before

    async def flag_remove(self, name: str, members: list[str]) -> int:
        live = self._flags.get(name, set())
        before = len(live)
        live.difference_update(members)
        return before - len(live)

    async def flag_replace(self, name: str, members) -> int:
        new = set(members)  # built aside, then swapped in one assignment
        self._flags[name] = new
        return len(new)

    async def flag_counts(self) -> dict[str, int]:
        return {name: len(live) for name, live in sorted(self._flags.items()) if live}

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
        self._windows.clear()
        self._flags.clear()
        self._distinct.clear()

    async def count_distinct(self, key: str, members: list[str], window: float,
                             limit: int | None = None) -> int:
        now = self._now()
        seen = self._distinct.setdefault(key, OrderedDict())
        while seen and next(iter(seen.values())) <= now:  # oldest first: expiries are in order
            seen.popitem(last=False)
        for member in members:
            if member in seen:
                seen[member] = now + window
                seen.move_to_end(member)
            elif limit is None or len(seen) <= limit:
                seen[member] = now + window
        count = len(seen)
        if not seen:
            del self._distinct[key]
        return count

    async def count_distinct_and_get(self, key: str, members: list[str], window: float,
                                     limit: int | None, read: str) -> tuple[int, bytes | None]:
        return await self.count_distinct(key, members, window, limit), self._live(read)
