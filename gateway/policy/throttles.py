"""Run-time throttles: administrators lower a sender's rate (or the gateway-wide one) without a
restart. Throttles live in the state backend, so every gateway sharing it applies them, and they
survive restarts; each gateway re-reads them at most ``[limits] throttle_refresh`` seconds later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gateway.infra.clock import Clock
from gateway.policy.rates import Rate
from gateway.state import Store

PREFIX = "throttle:"
GLOBAL = "global"


@dataclass(frozen=True)
class Throttle:
    target: str  # a sender id, or "global"
    rate: Rate
    until: float | None  # wall-clock epoch seconds, None = until cleared
    set_at: float

    def to_json(self) -> dict:
        return {"target": self.target, "rate": str(self.rate), "until": self.until,
                "set_at": self.set_at}


class Throttles:
    def __init__(self, store: Store, clock: Clock, refresh: float = 1.0) -> None:
        self.store, self.clock, self.refresh = store, clock, refresh
        self._cache: dict[str, Throttle] = {}
        self._loaded_at: float | None = None

    async def set(self, target: str, rate: Rate, duration: float | None = None) -> Throttle:
        now = self.clock.now().timestamp()
        throttle = Throttle(target, rate, None if duration is None else now + duration, now)
        await self.store.set(PREFIX + target, json.dumps(
            {"rate": str(rate), "until": throttle.until, "set_at": now}).encode(), ttl=duration)
        self._loaded_at = None
        return throttle

    async def clear(self, target: str) -> bool:
        existed = await self.store.get(PREFIX + target) is not None
        await self.store.delete(PREFIX + target)
        self._loaded_at = None
        return existed

    async def list(self) -> list[Throttle]:
        out = []
        for key, value in (await self.store.scan(PREFIX)).items():
            data = json.loads(value)
            out.append(Throttle(key[len(PREFIX):], Rate.parse(data["rate"]), data["until"],
                                data["set_at"]))
        return sorted(out, key=lambda t: t.target)

    async def current(self, target: str) -> Rate | None:
        """The throttle in force for ``target``, re-read from the store at most every
        ``refresh`` seconds (so a change reaches every gateway within that time)."""
        mono = self.clock.monotonic()
        if self._loaded_at is None or mono - self._loaded_at >= self.refresh:
            self._cache = {t.target: t for t in await self.list()}
            self._loaded_at = mono
        return self.cached(target)

    def cached(self, target: str) -> Rate | None:
        """The throttle as last read, without asking the store (used while it is down)."""
        throttle = self._cache.get(target)
        if throttle is None:
            return None
        if throttle.until is not None and throttle.until <= self.clock.now().timestamp():
            return None
        return throttle.rate
