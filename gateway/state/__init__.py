"""Shared state behind one small interface: ``memory:`` (tests), ``sqlite:PATH`` (the embedded
default, survives a restart) and ``redis://host:port/db`` (a cluster of gateways). Rate budgets,
throttles, audience counts and suppression lists live here, so that gateways sharing a backend
agree.

Times are wall-clock seconds from the injected clock, so a restart does not reset a window.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple, Protocol

from gateway.infra.clock import Clock


class StoreError(Exception):
    """The backend cannot be reached or answered wrongly."""


class Limit(NamedTuple):
    key: str
    count: int
    window: float  # seconds
    cost: int = 1  # events this admission records (e.g. a message's recipients); <= count


class Admission(NamedTuple):
    wait: float  # 0: admitted and recorded; else seconds until it would be
    limit: int  # index of the limit that imposes the wait (-1 when admitted)
    used: int  # events now in the first limit's window (after recording, if admitted)
    # each limit's room, in order: its count less the events now in its window (after
    # recording, if admitted; below 0 when a lowered count leaves more in it). What the rate
    # check's MAIL half remembers to skip a look while there is ample room (gateway.state.rooms)
    rooms: tuple[int, ...] = ()


def retry_after(times: list[float], count: int, window: float, now: float,
                cost: int = 1) -> float:
    """Seconds until ``cost`` events at ``now`` fit a window holding the sorted ``times``."""
    excess = len(times) + cost - count  # how many of the oldest must leave first
    if excess <= 0:
        return 0.0
    return max(times[excess - 1] + window - now, 0.0)


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    async def set_many(self, items: list[tuple[str, bytes, float | None]]) -> None:
        """``set`` for each (key, value, ttl), in one round trip (one SQLite transaction, one
        Redis pipeline): how the trace writes its records in batches."""

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

    async def peek(self, limits: list[Limit], now: float) -> Admission:
        """What :meth:`acquire` would answer now, recording nothing (a look, not a take): the
        early refusal at MAIL (checks.rate_limit) asks it, so that only relayed messages
        spend budget. ``used`` counts the first limit's window, and ``rooms`` each limit's
        room, as they are."""

    async def count_distinct(self, key: str, members: list[str], window: float,
                             limit: int | None = None) -> int:
        """Add ``members`` to the distinct set ``key`` (each seen now, remembered ``window``
        seconds) and return how many distinct members the set holds within the window.

        Members are opaque strings: callers pass keyed hashes, never addresses (policy
        IV.B.3.c.iv audience counts). ``memory:`` and ``sqlite:`` count exactly, each member
        sliding out ``window`` after it was last seen; once the set holds more than ``limit``
        members they store no new ones (the answer is then ``limit + 1``: the caller only needs to
        know it was crossed). ``redis://`` keeps a HyperLogLog per window bucket (PFADD/PFCOUNT,
        standard error 0.81 %), so gateways sharing the Redis count one set together; it ignores
        ``limit``. ``members`` may be empty: the count is then only read.
        """

    async def count_distinct_and_get(self, key: str, members: list[str], window: float,
                                     limit: int | None, read: str) -> tuple[int, bytes | None]:
        """:meth:`count_distinct`, then :meth:`get` of ``read``, in one round trip (one SQLite
        call, one Redis pipeline): the audience check's per-message call, which reads its
        campaign's distribution-list total with the count of its individual recipients."""

    # Recipient flags (gateway.policy.flags): named sets of members (keyed hashes, never addresses).

    async def flag_lookup(self, names: list[str], members: list[str]) -> dict[str, set[str]]:
        """For each member in any of the sets ``names``, the names of those sets: one round
        trip for a whole message's recipients. A set being replaced answers as the old set or
        the new one, never a mix."""

    async def flag_add(self, name: str, members: list[str]) -> int:
        """Add members to set ``name`` (created if absent); how many were not there before."""

    async def flag_remove(self, name: str, members: list[str]) -> int:
        """Remove members from set ``name``; how many were there."""

    async def flag_replace(self, name: str, members: Iterable[str]) -> int:
        """Make ``members`` the whole of set ``name`` atomically: built aside, then swapped in
        in one step, so there is no moment at which readers see a partial or empty set.
        Returns the new size."""

    async def flag_counts(self) -> dict[str, int]:
        """Every non-empty set, with its size (for administrators; may take a while)."""

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
