"""The decision log and its metrics: one line and one count per decided transaction, whatever
front it came through."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.checks.base import Context
from gateway.engine.message import message_id
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.engine.transaction import Transaction
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics


def sender_label(ctx: Context) -> str:
    return ctx.sender.id if ctx.sender is not None else "unknown"


class Decisions:
    def __init__(self, maillog: MailLog, metrics: Metrics) -> None:
        self.maillog = maillog
        self.metrics = metrics
        # also told of every decision: (txn, action, reason, reply, stage, decided_by); the
        # status page's recent decisions (gateway.ops.recent)
        self.observers: list = []

    def decided(self, txn: Transaction, action: str, reason: str, reply: Reply | None, *,
                stage: str, decided_by: str | None) -> None:
        """Count and log the transaction's decision. A MAIL-stage decision has no queue id."""
        if txn.dry_run:
            return
        for observe in self.observers:
            observe(txn, action, reason, reply, stage, decided_by)
        ctx, outcome = txn.ctx, txn.outcome
        sender = sender_label(ctx)
        self.metrics.child(self.metrics.messages, sender, action, reason).inc()
        if reason.endswith("state_unavailable"):
            self.metrics.state_errors.inc()
        for name, verdict in outcome.monitored:
            self.metrics.child(self.metrics.monitored, name, verdict.action).inc()
        if stage == "data":
            self.metrics.child(self.metrics.recipients, sender, action).inc(len(ctx.recipients))
            if ctx.message_class is not None:
                self.metrics.child(self.metrics.message_classes, sender, ctx.message_class,
                                   action).inc()
        if not self.maillog.enabled:
            return
        in_txn = stage != "mail"
        self.maillog.decision(
            session=txn.session_id, queue_id=txn.queue_id if in_txn else None,
            sender=ctx.sender.id if ctx.sender else None, client_ip=str(ctx.client_ip),
            auth=ctx.auth_user, tls=ctx.tls, mail_from=ctx.mail_from,
            message_id=message_id(ctx), size=ctx.size, recipients=ctx.recipients,
            recipient_count=len(ctx.recipients), stage=stage, decision=action, reason=reason,
            decided_by=decided_by, message_class=ctx.message_class,
            # an upstream's reply text may name recipients: log only its codes
            reply=(None if reply is None else f"{reply.code} {reply.enhanced}"
                   if decided_by == "upstream" or reason == "relayed" else str(reply)),
            monitored=[{"check": n, "would": v.action, "reason": v.reason}
                       for n, v in outcome.monitored] or None,
            checks_ms=outcome.timings_ms,
            elapsed_ms=round((time.perf_counter() - txn.started) * 1000, 3) if in_txn else None)

    def rcpt_refused(self, txn: Transaction, address: str, reply: Reply, reason: str) -> None:
        if txn.dry_run:
            return
        ctx = txn.ctx
        decision = "defer" if reply.code < 500 else "reject"  # metrics.DECISIONS
        self.metrics.recipients.labels(sender_label(ctx), decision).inc()
        # the upstream's text may name the recipient: log its codes only
        said = f"{reply.code} {reply.enhanced}" if reason == "upstream" else str(reply)
        self.maillog.rcpt_refused(txn.session_id, str(ctx.client_ip),
                                  ctx.sender.id if ctx.sender else None, address, said, reason)

    def dropped(self, txn: Transaction, drop: dict[str, str], kept: int) -> None:
        if txn.dry_run:
            return
        ctx = txn.ctx
        sender = ctx.sender.id if ctx.sender else None
        for rcpt in ctx.recipients:
            if rcpt in drop:
                self.maillog.rcpt_dropped(txn.session_id, txn.queue_id, sender, rcpt, drop[rcpt])
        self.metrics.recipients.labels(sender_label(ctx), "drop").inc(
            len(ctx.recipients) - kept)
