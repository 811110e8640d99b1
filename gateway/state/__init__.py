"""Shared state behind one small interface: ``memory:`` (tests), ``sqlite:PATH`` (the embedded
default, survives a restart) and ``redis://host:port/db`` (a cluster of gateways). Rate budgets,
throttles, audience counts and suppression lists live here, so that gateways sharing a backend
agree.

Times are wall-clock seconds from the injected clock, so a restart does not reset a window.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from gateway.clock import Clock


class StoreError(Exception):
    """The backend cannot be reached or answered wrongly."""


class Limit(NamedTuple):
    key: str
    count: int
    window: float  # seconds


class Admission(NamedTuple):
    wait: float  # 0: admitted and recorded; else seconds until it would be
    limit: int  # index of the limit that imposes the wait (-1 when admitted)
    used: int  # events now in the first limit's window (after recording, if admitted)


def retry_after(times: list[float], count: int, window: float, now: float) -> float:
    """Seconds until an event at ``now`` fits a window holding the sorted ``times``."""
    excess = len(times) - count
    if excess < 0:
        return 0.0
    return max(times[excess] + window - now, 0.0)


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` atomically and return the new value; ``ttl`` applies when created."""

    async def scan(self, prefix: str) -> dict[str, bytes]:
        """Every live key starting with ``prefix``, with its value."""

    async def acquire(self, limits: list[Limit], now: float, token: str) -> Admission:
        """Sliding-window admission, all or nothing, atomic across gateways.

        For each (key, count, window): admitted when fewer than ``count`` events lie in the
        window ``(now - window, now]``. When every limit admits, record the event (``token``
        makes it unique) under every key; otherwise record nothing and say how long until all
        would admit, and which limit is the reason.
        """

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def open_store(url: str, clock: Clock, base_dir=None) -> Store:
    from pathlib import Path

    if url == "memory:":
        from gateway.state.memory import MemoryStore

        return MemoryStore(clock)
    if url.startswith("sqlite:"):
        from gateway.state.sqlite import SQLiteStore

        path = Path(url[len("sqlite:"):])
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return SQLiteStore(path, clock)
    if url.startswith("redis://") or url.startswith("rediss://"):
        from gateway.state.redis import RedisStore

        return RedisStore(url, clock)
    raise ValueError(f"unsupported state url {url!r}")
