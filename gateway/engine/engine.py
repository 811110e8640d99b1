"""The engine: identification and checks at MAIL, relay control and checks per recipient,
content checks, header edits, recipient drops and quarantine at the end of the message, and the
decision log and metrics for all of it. Fronts call it; it never talks to a client or an MTA."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import TYPE_CHECKING

import structlog

from gateway.checks.auth_results import claims
from gateway.checks.base import Context, Stage, Verdict, reject, strip_header_fields
from gateway.checks.identity import identify
from gateway.checks.pipeline import Outcome
from gateway.engine import message
from gateway.engine.decisions import Decisions
from gateway.engine.generation import Generation
from gateway.engine.queue_ids import queue_id
from gateway.engine.transaction import Client, RcptDecision, Result, Transaction
from gateway.message.intake import admit
from gateway.policy.quarantine import item_for
from gateway.message.address import AddressError, parse_mailbox
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.checks.pipeline import Pipeline
    from gateway.infra.clock import Clock
    from gateway.infra.config import Config
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.policy.senders import Registry

log = structlog.get_logger("gateway.engine")


class Engine:
    def __init__(self, *, config: Config, registry: Registry, pipeline: Pipeline, clock: Clock,
                 maillog: MailLog, metrics: Metrics) -> None:
        self.generation = Generation(config, registry, pipeline)
        self.clock = clock
        self.maillog = maillog
        self.metrics = metrics
        self.decisions = Decisions(maillog, metrics)
        self._date: tuple[object, str] = (None, "")  # the Received field's date, this second

    # What new transactions are decided under; a transaction keeps its own (``txn.gen``).
    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def registry(self) -> Registry:
        return self.generation.registry

    @property
    def pipeline(self) -> Pipeline:
        return self.generation.pipeline

    def switch(self, generation: Generation) -> None:
        """Decide transactions that begin from now on under ``generation`` (gateway.ops.reload)."""
        self.generation = generation

    # --- MAIL -----------------------------------------------------------------------------

    @staticmethod
    def sender_path(address: str) -> tuple[str, Reply | None]:
        """The normalized return-path ("" for the null path), or the refusal of a bad one."""
        if not address:
            return "", None
        try:
            return str(parse_mailbox(address)), None
        except AddressError as exc:
            return "", Reply(553, "5.1.7", f"Bad sender address <{address}>: {exc}")

    async def mail(self, client: Client, mail_from: str, mail_options: list[str] = (),
                   *, dry_run: bool = False) -> Transaction:
        """Identify the sender and run the MAIL checks for a normalized ``mail_from``. A
        refusal is logged and left in ``txn.reply``."""
        gen = self.generation  # the transaction is decided under this one to its end
        ctx = Context(client_ip=client.ip, helo=client.helo, tls=client.tls,
                      auth_user=client.auth_user, mail_from=mail_from, dry_run=dry_run)
        identify(ctx, gen.registry)
        outcome = await gen.pipeline.run(Stage.MAIL, ctx, Outcome(trace=[] if dry_run else None))
        txn = Transaction(session_id=client.session_id,
                          queue_id=queue_id(int(self.clock.now().timestamp() * 1000)),
                          ctx=ctx, outcome=outcome, started=time.perf_counter(),
                          mail_options=list(mail_options), dry_run=dry_run, gen=gen)
        verdict = outcome.verdict
        if not verdict.accepted:
            self.refuse(txn, verdict.action, verdict.reason, verdict.reply, stage="mail",
                        decided_by=outcome.decided_by)
        return txn

    def refuse(self, txn: Transaction, action: str, reason: str, reply: Reply, *, stage: str,
               decided_by: str | None) -> Reply:
        """End the transaction with ``reply`` (a front's own refusal, e.g. a session cap, or
        the upstream's), logged and counted; returns the reply."""
        txn.reply = reply
        self.decisions.decided(txn, action, reason, reply, stage=stage, decided_by=decided_by)
        return reply

    # --- RCPT -----------------------------------------------------------------------------

    async def rcpt(self, txn: Transaction, address: str, count: int) -> RcptDecision:
        """Relay control and the RCPT checks for one recipient, ``count`` accepted before it.
        ``address`` is the path as given ("" or "<>": the null path)."""
        gen = txn.gen or self.generation
        if count >= gen.config.server.max_recipients:
            return RcptDecision(Reply(452, "4.5.3", "Too many recipients"), "too_many_recipients")
        if address in ("", "<>"):
            return RcptDecision(Reply(550, "5.7.1", "Relaying denied: empty recipient"),
                                "relay_denied")
        try:
            mailbox = parse_mailbox(address)
        except AddressError as exc:
            return RcptDecision(Reply(550, "5.7.1", f"Relaying denied: {exc}"), "relay_denied")
        if mailbox.domain not in gen.university:
            return RcptDecision(Reply(550, "5.7.1", f"Relaying denied: {mailbox.domain} is not "
                                                    "a university domain"), "relay_denied")
        refused = await self._rcpt_checks(txn, str(mailbox))
        if refused is not None:  # decided here: never forwarded upstream
            return refused
        return RcptDecision(None, mailbox=str(mailbox))

    async def _rcpt_checks(self, txn: Transaction, address: str) -> RcptDecision | None:
        """The RCPT-stage checks for one recipient (``ctx.rcpt``); a refusal and its reason."""
        pipeline = (txn.gen or self.generation).pipeline
        if not pipeline.by_stage[Stage.RCPT]:
            return None
        ctx = txn.ctx
        ctx.rcpt = address
        try:
            outcome = await pipeline.run(
                Stage.RCPT, ctx, Outcome(trace=None if txn.outcome.trace is None else []))
        finally:
            ctx.rcpt = None
        txn.outcome.monitored.extend(outcome.monitored)
        if outcome.trace:
            txn.outcome.trace.extend(outcome.trace)
        if outcome.verdict.accepted:
            return None
        return RcptDecision(outcome.verdict.reply, outcome.verdict.reason)

    @staticmethod
    def rcpt_accepted(txn: Transaction, mailbox: str) -> None:
        txn.ctx.recipients.append(mailbox)

    def rcpt_refused(self, txn: Transaction, address: str, reply: Reply, reason: str) -> None:
        """Count and log a refused recipient (by the engine, or by the front's upstream with
        reason ``"upstream"``: then only its codes are logged)."""
        self.decisions.rcpt_refused(txn, address, reply, reason)

    # --- end of message -------------------------------------------------------------------

    async def parse(self, content: bytes, fields: tuple = ()):
        return await message.parse(content, fields)

    async def admit(self, content: bytes, gen: Generation | None = None):
        """The canonical message or its refusal (gateway.message.intake), under ``gen`` (the
        transaction's); a big message is checked in a worker thread (about 9 ms of CPU per MB),
        like its parse."""
        gen = gen or self.generation
        args = {"hostname": gen.hostname, "max_received": gen.config.server.max_received}
        if len(content) <= message.PARSE_INLINE_MAX:
            return admit(content, **args)
        return await asyncio.to_thread(admit, content, **args)

    async def content(self, txn: Transaction, content: bytes) -> Result:
        """Run the DATA checks on the message as received and decide (see :class:`Result`)."""
        ctx, outcome = txn.ctx, txn.outcome
        gen = txn.gen or self.generation
        ctx.size = len(content)
        ctx.raw = received = content
        # one canonical header block, refused when readers could disagree, before any check;
        # Authentication-Results claiming to be ours (forged, RFC 8601 5) already left out
        admitted = await self.admit(content, gen)
        if isinstance(admitted, Verdict):  # never parsed, never judged, never relayed
            outcome.verdict, outcome.decided_by = admitted, "headers"
        else:
            content = ctx.raw = admitted.content
            ctx.header_fields = admitted.fields
            try:
                if gen.pipeline.needs_message(Stage.DATA, ctx):
                    ctx.message = await self.parse(content, admitted.fields)
            except RecursionError:  # pathological nesting: the stdlib parser recurses per level
                outcome.verdict = reject(550, "5.6.0", "Message structure is nested too deeply "
                                         "to be parsed; flatten it", "mime_unparsable")
                outcome.decided_by = "parser"
            else:
                outcome = txn.outcome = await gen.pipeline.run(Stage.DATA, ctx, outcome)
        verdict = outcome.verdict
        # (a front that edits fields in place, the milter, removes the forged ones too)
        strip = [claims(gen.hostname), *ctx.strip_headers]
        content = strip_header_fields(content, ctx.strip_headers)
        result = Result("relay", txn, headers=list(outcome.headers), content=content, strip=strip,
                        received=received)
        if outcome.drop and verdict.action in ("accept", "quarantine"):
            kept = [r for r in ctx.recipients if r not in outcome.drop]
            self.decisions.dropped(txn, outcome.drop, len(kept))
            result.dropped = {r: outcome.drop[r] for r in ctx.recipients if r in outcome.drop}
            ctx.recipients[:] = kept
            if not kept:  # nothing to deliver: the transaction is over, nothing relayed
                result.kind = "reply"
                result.reply = Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")
                self.finish(txn, "accept", "recipients_dropped", result.reply, decided_by=None)
                return result
        if verdict.action == "quarantine":
            result.kind = "quarantine"
            result.headers += verdict.headers
            return result
        if not verdict.accepted:
            result.kind, result.reply = "reply", verdict.reply
            self.finish(txn, verdict.action, verdict.reason, verdict.reply,
                        decided_by=outcome.decided_by)
        return result

    def received(self, txn: Transaction) -> bytes:
        """The gateway's Received field for a front that is a hop of its own."""
        hostname = (txn.gen or self.generation).hostname
        now = self.clock.now().replace(microsecond=0)
        if self._date[0] != now:  # formatted once a second, not once a message
            self._date = (now, email.utils.format_datetime(now))
        return message.received(txn.ctx, hostname, txn.queue_id, self._date[1])

    def finish(self, txn: Transaction, action: str, reason: str, reply: Reply | None, *,
               decided_by: str | None) -> None:
        """Log and count the end-of-message decision."""
        self.decisions.decided(txn, action, reason, reply, stage="data", decided_by=decided_by)

    def delivered(self, txn: Transaction, result: Result, reply: Reply) -> None:
        """The message was handed on (relayed, or accepted by the MTA in front): ``reply`` is
        what the next hop said (only its codes are logged)."""
        if reply.ok and not txn.dry_run:
            self.metrics.bytes.inc(len(result.content))
        if reply.ok:
            self.finish(txn, "accept", "relayed", reply, decided_by=None)
        else:
            self.finish(txn, "defer" if reply.transient else "reject", "upstream", reply,
                        decided_by="upstream")

    async def store_quarantined(self, result: Result, head: bytes = b"") -> Reply:
        """Keep a ``"quarantine"`` result in the gateway's quarantine (``head``, e.g. the
        Received field, before the added headers); 250 with its id, or 451 when it cannot be
        stored. Logged and counted."""
        txn = result.txn
        ctx, outcome = txn.ctx, txn.outcome
        verdict = outcome.verdict
        head += b"".join(f"{n}: {v}\r\n".encode() for n, v in result.headers)
        item = item_for(txn.queue_id, ctx, verdict, outcome.decided_by, txn.mail_options,
                        self.clock.now().isoformat())
        reply, action = Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"), "quarantine"
        if txn.dry_run:
            return reply
        store = self.pipeline.deps.quarantine
        try:
            if store is None:
                raise OSError("no quarantine configured")
            await store.store(item, head + result.content)
        except OSError as exc:
            log.error("quarantine_failed", queue_id=txn.queue_id, error=repr(exc))
            reply, action = Reply(451, "4.3.0", "Temporary local problem; try again later"), \
                "defer"
        self.finish(txn, action, verdict.reason, reply, decided_by=outcome.decided_by)
        return reply

    # --- explain --------------------------------------------------------------------------

    async def explain(self, client: Client, mail_from: str, recipients: list[str],
                      content: bytes) -> tuple[Transaction, dict[str, RcptDecision],
                                               Result | None]:
        """Run the real pipeline on one message as a dry run: nothing relayed, logged, counted
        or stored (see ``Context.dry_run``). Returns the transaction (``txn.outcome.trace``:
        every check's mode, verdict and time; ``txn.reply`` when MAIL refused it), each
        recipient's decision, and the end-of-message result (None when MAIL or every
        recipient was refused). The reply a client would get is ``result.reply`` for a
        ``"reply"`` result, else 250."""
        mail_from, bad = self.sender_path(mail_from)
        txn = await self.mail(client, mail_from, dry_run=True)
        if bad is not None:
            txn.reply = bad
        if txn.reply is not None:
            return txn, {}, None
        decisions = {}
        for address in recipients:
            decision = await self.rcpt(txn, address, len(txn.ctx.recipients))
            decisions[address] = decision
            if decision.reply is None:
                self.rcpt_accepted(txn, decision.mailbox)
        if not txn.ctx.recipients:
            return txn, decisions, None
        return txn, decisions, await self.content(txn, content)
