"""Concurrent sessions per client IP and per sender, one count for every front of the process
(an SMTP session, or a Postfix smtpd session asking through the milter), with the 421 refusals
of ``[limits] sessions_per_ip`` and ``sessions_per_sender``."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.infra.config import LimitsConfig
    from gateway.ops.metrics import Metrics


class SessionCounts:
    def __init__(self, limits: LimitsConfig, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._per_ip: Counter[str] = Counter()  # open sessions, this process
        self._per_sender: Counter[str] = Counter()

    def opened(self, ip: str, check: bool = True) -> Reply | None:
        """Count a new session from ``ip`` (until :meth:`closed`); with ``check``, a Reply
        refuses it (421) over the per-IP cap."""
        self._per_ip[ip] += 1
        if check and self._per_ip[ip] > self.limits.sessions_per_ip:
            self.metrics.sessions_refused.labels("ip").inc()
            return Reply(421, "4.7.0", f"Too many sessions from [{ip}] "
                                       f"(at most {self.limits.sessions_per_ip}); try again later")
        return None

    def claim(self, current: str | None, sender_id: str) -> Reply | None:
        """Count the session (counted for sender ``current`` so far, or none) against
        ``sender_id`` at its first identified MAIL; a Reply (421) over the per-sender cap."""
        if current == sender_id:
            return None
        if current is not None:  # (AUTH cannot change; IP identification can)
            self._release(current)
        self._per_sender[sender_id] += 1
        if self._per_sender[sender_id] > self.limits.sessions_per_sender:
            self.metrics.sessions_refused.labels("sender").inc()
            return Reply(421, "4.7.0", f"Too many concurrent sessions for sender {sender_id} "
                                       f"(at most {self.limits.sessions_per_sender}); "
                                       "try again later")
        return None

    def closed(self, ip: str, sender: str | None) -> None:
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        if sender is not None:
            self._release(sender)

    def _release(self, sender: str) -> None:
        self._per_sender[sender] -= 1
        if self._per_sender[sender] <= 0:
            del self._per_sender[sender]
