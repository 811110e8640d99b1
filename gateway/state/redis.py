"""Redis state, for a cluster of gateways: every admission decision is one Lua script, so any
number of gateways sharing one Redis never let a sender exceed its rate."""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from gateway.infra.clock import Clock
from gateway.state import Admission, Limit, StoreError

# KEYS: the window keys. ARGV: now, token, then count, window and cost for each key.
# Sliding-window log in a sorted set per key (score = event time): prune what left the window,
# find the wait each key imposes, and record the event in every key only when none does.
# Returns the wait, the limit imposing it, the first key's events and then each key's room.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local token = ARGV[2]
local wait, worst, first, rooms = 0, -1, 0, {}
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[3 * i])
  local window = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local n = redis.call('ZCARD', key)
  if i == 1 then first = n end
  rooms[i] = count - n
  local excess = n + cost - count
  if excess > 0 then
    local at = redis.call('ZRANGE', key, excess - 1, excess - 1, 'WITHSCORES')
    local w = tonumber(at[2]) + window - now
    if w > wait then wait, worst = w, i - 1 end
  end
end
if wait > 0 then return {tostring(wait), worst, first, unpack(rooms)} end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  for j = 1, cost do
    redis.call('ZADD', key, now, token .. ':' .. j)
  end
  redis.call('PEXPIRE', key, math.ceil(window * 1000) + 1000)
  rooms[i] = rooms[i] - cost
end
return {'0', -1, first + tonumber(ARGV[5]), unpack(rooms)}
"""

# The same decision, recording nothing and pruning nothing (a look, not a take): the early
# refusal at MAIL. KEYS and ARGV as for _ACQUIRE (the token unused).
_PEEK = """
local now = tonumber(ARGV[1])
local wait, worst, first, rooms = 0, -1, 0, {}
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[3 * i])
  local window = tonumber(ARGV[3 * i + 1])
  local cost = tonumber(ARGV[3 * i + 2])
  local after = string.format('(%.17g', now - window)
  local n = redis.call('ZCOUNT', key, after, '+inf')
  if i == 1 then first = n end
  rooms[i] = count - n
  local excess = n + cost - count
  if excess > 0 then
    local at = redis.call('ZRANGEBYSCORE', key, after, '+inf', 'WITHSCORES', 'LIMIT',
                          excess - 1, 1)
    local w = tonumber(at[2]) + window - now
    if w > wait then wait, worst = w, i - 1 end
  end
end
return {tostring(wait), worst, first, unpack(rooms)}
"""


# KEYS: the HyperLogLog of the current window bucket, then the older buckets still in the window.
# ARGV: the current bucket's time to live (ms), then the members. Adds to the current bucket (in
# slices: Lua's unpack has a stack limit) and counts the union of all buckets.
_COUNT_DISTINCT = """
local n = #ARGV
for i = 2, n, 1000 do
  redis.call('PFADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, n)))
end
if n > 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return redis.call('PFCOUNT', unpack(KEYS))
"""
# A distinct set's window is covered by this many buckets (plus the current one): each member
# is counted for at least the window and at most one bucket (window / BUCKETS) longer.
DISTINCT_BUCKETS = 7


# Recipient flags (gateway.policy.flags): one set per flag under "flag:NAME". A replace fills a build
# key (expiring, so a killed import leaves nothing behind), then this script swaps it in
# atomically; the old set is renamed aside and UNLINKed (freed off Redis's main thread).
# KEYS: the live set, the build, the aside name. Returns the new size.
_FLAG_SWAP = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[3]) end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('RENAME', KEYS[2], KEYS[1])
  redis.call('PERSIST', KEYS[1])
end
return redis.call('SCARD', KEYS[1])
"""
# KEYS: the sets; ARGV: the members. Returns the hits as (member index, set index) pairs, so a
# message's look-up is one command and one short reply whatever the number of sets.
_FLAG_LOOKUP = """
local out = {}
for k = 1, #KEYS do
  local hits = redis.call('SMISMEMBER', KEYS[k], unpack(ARGV))
  for i = 1, #hits do
    if hits[i] == 1 then out[#out + 1] = i; out[#out + 1] = k end
  end
end
return out
"""
_FLAG = "flag:"
_FLAG_LOOKUP_MAX = 1000  # members per script call (Lua's unpack has a stack limit)
_FLAG_CHUNK = 10000
_FLAG_BUILD_TTL_MS = 86400 * 1000


class RedisStore:
    def __init__(self, url: str, clock: Clock, timeout: float = 2.0) -> None:
        self.url = url
        self.clock = clock
        self.client = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                              socket_connect_timeout=timeout)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._peek = self.client.register_script(_PEEK)
        self._flag_swap = self.client.register_script(_FLAG_SWAP)
        self._flag_lookup = self.client.register_script(_FLAG_LOOKUP)
        self._count_distinct = self.client.register_script(_COUNT_DISTINCT)

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

    async def set_many(self, items: list[tuple[str, bytes, float | None]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value, ttl in items:
            pipe.set(key, value, px=None if ttl is None else max(1, int(ttl * 1000)))
        await self._call(pipe.execute())

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
        for _, count, window, cost in limits:
            args += [count, repr(float(window)), cost]
        wait, worst, used, *rooms = await self._call(
            self._acquire(keys=[lim.key for lim in limits], args=args))
        return Admission(float(wait), int(worst), int(used), tuple(map(int, rooms)))

    async def peek(self, limits: list[Limit], now: float) -> Admission:
        args: list = [repr(now), ""]
        for _, count, window, cost in limits:
            args += [count, repr(float(window)), cost]
        wait, worst, used, *rooms = await self._call(
            self._peek(keys=[lim.key for lim in limits], args=args))
        return Admission(float(wait), int(worst), int(used), tuple(map(int, rooms)))

    # --- recipient flags (gateway.policy.flags) ----------------------------------------------------

    async def flag_lookup(self, names: list[str], members: list[str]) -> dict[str, set[str]]:
        if not names or not members:
            return {}

        keys = [_FLAG + name for name in names]
        out: dict[str, set[str]] = {}
        for i in range(0, len(members), _FLAG_LOOKUP_MAX):  # one round trip per 1000
            chunk = members[i:i + _FLAG_LOOKUP_MAX]
            hits = await self._call(self._flag_lookup(keys=keys, args=chunk))
            for j in range(0, len(hits), 2):
                out.setdefault(chunk[int(hits[j]) - 1], set()).add(names[int(hits[j + 1]) - 1])
        return out

    async def flag_add(self, name: str, members: list[str]) -> int:
        added = 0
        for i in range(0, len(members), _FLAG_CHUNK):
            added += await self._call(self.client.sadd(_FLAG + name,
                                                       *members[i:i + _FLAG_CHUNK]))
        return added

    async def flag_remove(self, name: str, members: list[str]) -> int:
        if not members:
            return 0
        return await self._call(self.client.srem(_FLAG + name, *members))

    async def flag_replace(self, name: str, members) -> int:
        import secrets

        build = f"flagbuild:{secrets.token_hex(8)}"
        aside = f"flagold:{secrets.token_hex(8)}"

        async def fill(batch):
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(build, *batch)
            pipe.pexpire(build, _FLAG_BUILD_TTL_MS)
            await pipe.execute()

        try:
            batch: list[str] = []
            for member in members:
                batch.append(member)
                if len(batch) >= _FLAG_CHUNK:
                    await self._call(fill(batch))
                    batch = []
            if batch:
                await self._call(fill(batch))
            count = await self._call(self._flag_swap(keys=[_FLAG + name, build, aside]))
        except BaseException:
            await self._call(self.client.unlink(build))
            raise
        await self._call(self.client.unlink(aside))
        return int(count)

    async def flag_counts(self) -> dict[str, int]:
        async def run():
            keys = sorted([k async for k in self.client.scan_iter(match=_FLAG + "*")])
            if not keys:
                return {}
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.scard(k)
            return {k.decode()[len(_FLAG):]: n for k, n in zip(keys, await pipe.execute()) if n}

        return await self._call(run())

    async def ping(self) -> None:
        await self._call(self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()

    def _distinct_keys(self, key: str, window: float) -> tuple[list[str], int]:
        """The bucket keys of distinct set ``key`` (current first) and the current one's TTL in
        milliseconds: one HyperLogLog per bucket of window / DISTINCT_BUCKETS, named with a
        {hash tag} so that a Redis Cluster keeps a set's buckets in one slot (PFCOUNT needs
        them together)."""
        width = window / DISTINCT_BUCKETS
        current = int(self.clock.now().timestamp() // width)
        keys = [f"{{{key}}}:{current - i}" for i in range(DISTINCT_BUCKETS + 1)]
        return keys, math.ceil((window + 2 * width) * 1000)

    async def count_distinct(self, key: str, members: list[str], window: float,
                             limit: int | None = None) -> int:
        keys, ttl = self._distinct_keys(key, window)
        count = await self._call(self._count_distinct(keys=keys, args=[ttl, *members]))
        return int(count)

    async def count_distinct_and_get(self, key: str, members: list[str], window: float,
                                     limit: int | None, read: str) -> tuple[int, bytes | None]:
        # a pipeline, not the script: ``read`` is in another Cluster slot than the buckets
        keys, ttl = self._distinct_keys(key, window)

        async def run():
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(self._count_distinct.sha, len(keys), *keys, ttl, *members)
            pipe.get(read)
            return await pipe.execute()

        try:
            count, value = await self._call(run())
        except StoreError as exc:
            if not isinstance(exc.__cause__, NoScriptError):
                raise
            # the server lost its scripts (a restart, SCRIPT FLUSH): load it and run once more
            await self._call(self.client.script_load(_COUNT_DISTINCT))
            count, value = await self._call(run())
        return int(count), value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
