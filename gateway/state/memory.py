"""In-process state, for tests and single-process experiments. Lost at exit."""

from __future__ import annotations

from gateway.clock import Clock


class MemoryStore:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._data: dict[str, tuple[bytes, float | None]] = {}

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

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._data.clear()
