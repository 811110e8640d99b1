"""Shared state behind one small interface: ``memory:`` (tests), ``sqlite:PATH`` (the embedded
default, survives a restart). Rate budgets, throttles, audience counts and suppression lists
will all live here, so that several gateways sharing a backend agree.

Expiry uses wall-clock seconds from the injected clock, so a restart does not reset it.
"""

from __future__ import annotations

from typing import Protocol

from gateway.clock import Clock


class StoreError(Exception):
    """The backend cannot be reached or answered wrongly."""


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount`` atomically and return the new value; ``ttl`` applies when created."""

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
    raise ValueError(f"unsupported state url {url!r}")
