"""Time, injectable: production uses the system clock, tests move a fake one by hand."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware (UTC)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards, for durations and rate budgets."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that only moves when told to; for tests that must reach a minute boundary,
    business hours or an expiry date without sleeping."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        self._now = start or dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.timezone.utc)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start")
        self._mono = 1000.0
        self._lock = threading.Lock()
        self._sleepers: list[tuple[float, asyncio.AbstractEventLoop, asyncio.Future]] = []

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        """Move time on, waking the sleepers whose time has come (from any thread)."""
        with self._lock:
            self._now += dt.timedelta(seconds=seconds)
            self._mono += seconds
            due = [s for s in self._sleepers if s[0] <= self._mono]
            self._sleepers = [s for s in self._sleepers if s[0] > self._mono]
        for _, loop, fut in due:
            loop.call_soon_threadsafe(_wake, fut)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            self._sleepers.append((self._mono + seconds, loop, fut))
        try:
            await fut
        finally:
            with self._lock:
                self._sleepers = [s for s in self._sleepers if s[2] is not fut]

    @property
    def sleeping(self) -> int:
        """How many tasks are waiting on this clock (tests wait for holds to begin)."""
        with self._lock:
            return len(self._sleepers)

    def set(self, when: dt.datetime) -> None:
        delta = (when - self._now).total_seconds()
        if delta < 0:
            raise ValueError("FakeClock does not go backwards")
        self.advance(delta)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
