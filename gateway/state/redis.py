"""Redis state, for a cluster of gateways: every admission decision is one Lua script, so any
number of gateways sharing one Redis never let a sender exceed its rate."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.clock import Clock
from gateway.state import Admission, Limit, StoreError

# KEYS: the window keys. ARGV: now, token, then count and window for each key.
# Sliding-window log in a sorted set per key (score = event time): prune what left the window,
# find the wait each key imposes, and record the event in every key only when none does.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local token = ARGV[2]
local wait, worst, first = 0, -1, 0
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local n = redis.call('ZCARD', key)
  if i == 1 then first = n end
  if n >= count then
    local at = redis.call('ZRANGE', key, n - count, n - count, 'WITHSCORES')
    local w = tonumber(at[2]) + window - now
    if w > wait then wait, worst = w, i - 1 end
  end
end
if wait > 0 then return {tostring(wait), worst, first} end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZADD', key, now, token)
  redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
end
return {'0', -1, first + 1}
"""


class RedisStore:
    def __init__(self, url: str, clock: Clock, timeout: float = 2.0) -> None:
        self.url = url
        self.clock = clock
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                              socket_connect_timeout=timeout)
        self._acquire = self.client.register_script(_ACQUIRE)

    async def _call(self, coro):
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {self.url}: {exc}") from exc

    async def get(self, key: str) -> bytes | None:
        return await self._call(self.client.get(key))

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        px = None if ttl is None else max(1, int(ttl * 1000))
        await self._call(self.client.set(key, value, px=px))

    async def delete(self, key: str) -> None:
        await self._call(self.client.delete(key))

    async def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        async def run():
            value = await self.client.incrby(key, amount)
            if ttl is not None and value == amount:
                await self.client.pexpire(key, max(1, int(ttl * 1000)), nx=True)
            return value

        return await self._call(run())

    async def scan(self, prefix: str) -> dict[str, bytes]:
        async def run():
            keys = [k async for k in self.client.scan_iter(match=_glob_escape(prefix) + "*")]
            if not keys:
                return {}
            values = await self.client.mget(keys)
            return {k.decode(): v for k, v in zip(keys, values) if v is not None}

        return await self._call(run())

    async def acquire(self, limits: list[Limit], now: float, token: str) -> Admission:
        args: list = [repr(now), token]
        for _, count, window in limits:
            args += [count, repr(float(window))]
        wait, worst, used = await self._call(
            self._acquire(keys=[lim.key for lim in limits], args=args))
        return Admission(float(wait), int(worst), int(used))

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
