"""The decisions of the last hour in this process, for the status page (gateway.ops.status_page):
counts by sender, decision and reason in 10-second buckets, and the latest refusals.

Bounded: at most ``window / BUCKET`` buckets, each keyed by (sender, decision, reason) — senders
are registered ids or "unknown", reasons a fixed vocabulary — and ``keep`` refusals. Never an
address or a body: a refusal keeps its queue id, sender, reason and the reply the client got.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.engine.transaction import Transaction
    from gateway.message.replies import Reply

BUCKET = 10.0  # seconds


@dataclass(frozen=True)
class Refusal:
    at: float  # Unix time
    queue_id: str
    session: str
    sender: str
    decision: str  # reject | defer | quarantine
    reason: str
    stage: str
    reply: str
    decided_by: str


class Recent:
    def __init__(self, clock: Clock, window: float = 3600.0, keep: int = 50) -> None:
        self.clock = clock
        self.window = window
        self._buckets: deque[tuple[float, Counter]] = deque()
        self._refusals: deque[Refusal] = deque(maxlen=keep)

    def observe(self, txn: Transaction, action: str, reason: str, reply: Reply | None,
                stage: str, decided_by: str | None) -> None:
        """A decision (an observer of :class:`gateway.engine.decisions.Decisions`)."""
        now = self.clock.now().timestamp()
        sender = txn.ctx.sender.id if txn.ctx.sender is not None else "unknown"
        start = now - now % BUCKET
        if not self._buckets or self._buckets[-1][0] != start:
            self._buckets.append((start, Counter()))
            self._prune(now)
        self._buckets[-1][1][(sender, action, reason)] += 1
        if action != "accept":
            # an upstream's reply text may name a recipient: only its codes
            said = ("" if reply is None else f"{reply.code} {reply.enhanced}"
                    if decided_by == "upstream" else str(reply))
            self._refusals.append(Refusal(now, txn.queue_id, txn.session_id, sender, action,
                                          reason, stage, said, decided_by or ""))

    def _prune(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + BUCKET <= now - self.window:
            self._buckets.popleft()

    def counts(self, seconds: float | None = None) -> Counter:
        """(sender, decision, reason) -> decisions within the last ``seconds`` (default: the
        window), to the bucket."""
        now = self.clock.now().timestamp()
        since = now - (self.window if seconds is None else seconds)
        total: Counter = Counter()
        for start, counter in self._buckets:
            if start + BUCKET > since:
                total.update(counter)
        return total

    def refusals(self) -> list[Refusal]:
        """The latest refusals, deferrals and quarantines, newest first."""
        return list(reversed(self._refusals))

    def refusal(self, queue_id: str) -> Refusal | None:
        return next((r for r in self._refusals if r.queue_id == queue_id), None)
