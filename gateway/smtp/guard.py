"""Session admission at connect, before the greeting and so before any TLS or AUTH work
(issue #10 item 11): a gateway-wide cap on open sessions (``[limits] sessions_total``) and a
per-IP rate of new connections (``[limits] connection_rate``), both answered ``421 4.7.0``
and closed. The rate is a leaky bucket per client IP (aiolimiter), per process: it bounds
what one address can make this process do, and needs no round trip to the state store.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import structlog
from aiolimiter import AsyncLimiter

from gateway.policy.rates import Rate
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.infra.config import LimitsConfig
    from gateway.ops.metrics import Metrics

log = structlog.get_logger("gateway.smtp")
MAX_TRACKED_IPS = 10_000  # per-IP buckets kept (least recently seen dropped first)


class ConnectionGuard:
    def __init__(self, limits: LimitsConfig, metrics: Metrics) -> None:
        self.cap = limits.sessions_total
        self.rate = Rate.parse(limits.connection_rate) if limits.connection_rate else None
        self.metrics = metrics
        self.open = 0
        self._buckets: OrderedDict[str, AsyncLimiter] = OrderedDict()

    def opened(self, ip: str) -> Reply | None:
        """Count a new connection (every one, refused or not, until :meth:`closed`)."""
        self.open += 1
        if self.open > self.cap:
            return self._refuse("total", ip, Reply(
                421, "4.7.0", f"Too many sessions (at most {self.cap}); try again later"))
        return None

    def closed(self) -> None:
        self.open -= 1

    async def admit(self, ip: str) -> Reply | None:
        """Take one unit of ``ip``'s connection rate; a refusal when it has none left."""
        if self.rate is None:
            return None
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = AsyncLimiter(self.rate.count, self.rate.period)
            if len(self._buckets) > MAX_TRACKED_IPS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(ip)
        if not bucket.has_capacity():
            return self._refuse("rate", ip, Reply(
                421, "4.7.0", f"Too many connections from [{ip}] (at most {self.rate}); "
                              "try again later"))
        await bucket.acquire()  # has capacity: returns at once
        return None

    def _refuse(self, cap: str, ip: str, reply: Reply) -> Reply:
        self.metrics.sessions_refused.labels(cap).inc()
        log.info("session_refused", cap=cap, client_ip=ip, reply=f"{reply.code} {reply.enhanced}")
        return reply
