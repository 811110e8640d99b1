"""SMTP AUTH brute-force resistance (issue #10 item 10).

- Failures are counted per client IP and per username in the state store (``incr`` with the
  window as its time to live), so every gateway sharing a Redis sees the same counts; while the
  store is unreachable the counts are kept in this process instead (still throttled).
- The reply to a failure is held back: from the second failure in the window on,
  ``auth_delay`` seconds doubling with each further failure of that IP or that username
  (whichever has more), at most ``auth_max_delay``.
- A connection gets ``auth_failures_per_session`` tries: the last failure is answered
  ``421 4.7.0`` and the connection closed.
- An IP with ``auth_lockout`` failures in the window gets ``454 4.7.0`` to every AUTH (its
  credentials are not even verified, so a right guess tells nothing) until the window ends.
  Usernames are never locked out: anyone could lock a vendor out by guessing at its name; a
  username under attack from many IPs gets the growing delay instead.
- At most ``auth_concurrency`` scrypt verifications run at once in the process (each is
  deliberately slow and large); the others wait their turn.

Every failure is a JSON log event (``auth_failed``, with the counts and the delay) and counted in
``gateway_auth_failures_total``; lockouts and disconnects in ``gateway_auth_throttled_total``.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.message.replies import Reply
from gateway.state import StoreError
from gateway.state.memory import MemoryStore

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.infra.config import LimitsConfig
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.state import Store

INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reply: Reply | None = None  # the failure's reply (None on success)


class AuthThrottle:
    def __init__(self, *, limits: LimitsConfig, store: Store, clock: Clock, metrics: Metrics,
                 maillog: MailLog) -> None:
        self.limits = limits
        self.maillog = maillog
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.local = MemoryStore(clock)  # counts while the state store is unreachable
        self._verifying = asyncio.Semaphore(limits.auth_concurrency)

    @staticmethod
    def _ip_key(ip: str) -> str:
        return f"authfail:ip:{ip}"

    @staticmethod
    def _user_key(username: bytes) -> str:
        # client bytes never become a store key as such
        return "authfail:user:" + hashlib.sha256(username).hexdigest()[:32]

    async def _get(self, key: str) -> int:
        try:
            value = await self.store.get(key)
        except StoreError:
            value = await self.local.get(key)
        return int(value or 0)

    async def _incr(self, key: str) -> int:
        ttl = self.limits.auth_window
        try:
            return await self.store.incr(key, 1, ttl=ttl)
        except StoreError:
            return await self.local.incr(key, 1, ttl=ttl)

    def delay(self, failures: int) -> float:
        """Seconds to hold the reply to the ``failures``-th failure in the window."""
        if failures < 2 or self.limits.auth_delay == 0:
            return 0.0
        return min(self.limits.auth_delay * 2 ** (failures - 2), self.limits.auth_max_delay)

    async def attempt(self, session, ip: str, username: bytes, verify) -> Verdict:
        """One AUTH attempt: ``verify()`` (a coroutine function returning True or False) runs
        only when the IP is not locked out, at most ``auth_concurrency`` at a time."""
        limits = self.limits
        session.gateway_auth_failures = getattr(session, "gateway_auth_failures", 0)
        ip_failures = await self._get(self._ip_key(ip))
        if ip_failures >= limits.auth_lockout:
            reason = "locked_out"
        else:
            async with self._verifying:
                if await verify():
                    return Verdict(True)
            reason = "invalid"
        session.gateway_auth_failures += 1
        this_session = session.gateway_auth_failures
        ip_failures = await self._incr(self._ip_key(ip))
        user_failures = await self._incr(self._user_key(username))
        self.metrics.auth_failures.labels(reason).inc()
        if reason == "locked_out":
            reply = Reply(454, "4.7.0", f"Too many authentication failures from [{ip}]; "
                                        "try again later")
            delay = 0.0  # no verification was done: nothing to slow down
        else:
            reply = INVALID
            delay = self.delay(max(ip_failures, user_failures))
            if ip_failures == limits.auth_lockout:
                self.metrics.auth_throttled.labels("lockout").inc()
                self.maillog.auth_lockout(ip, ip_failures, limits.auth_window)
        if this_session >= limits.auth_failures_per_session:
            reply = Reply(421, "4.7.0", f"Too many authentication failures "
                                        f"({this_session}); closing connection")
            self.metrics.auth_throttled.labels("disconnect").inc()
        if delay:
            self.metrics.auth_throttled.labels("delay").inc()
        self.maillog.auth_failed(
            getattr(session, "gateway_id", None), ip,
            username.decode("utf-8", "backslashreplace")[:256], reason=reason,
            session_failures=this_session, ip_failures=ip_failures,
            username_failures=user_failures, delay=delay, reply=f"{reply.code} {reply.enhanced}")
        if delay:
            await self.clock.sleep(delay)
        return Verdict(False, reply)
