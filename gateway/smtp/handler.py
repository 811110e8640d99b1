"""The SMTP session hooks: identification at MAIL, relay control at RCPT, checks and the
before-queue relay at DATA. aiosmtpd finds the ``handle_*`` hooks by name.

Lifetimes follow aiosmtpd: per-connection facts live on the Session, per-transaction ones on the
Envelope (``envelope.gateway``, a :class:`Transaction`).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import compat32
from typing import TYPE_CHECKING

import structlog
from aiosmtpd.smtp import LoginPassword

from gateway.checks.auth_results import claims
from gateway.checks.base import Context, Stage, reject, strip_header_fields
from gateway.checks.identity import identify
from gateway.checks.pipeline import Outcome, Pipeline
from gateway.passwords import hash_password, verify_password
from gateway.quarantine import item_for
from gateway.relay.base import Transaction as UpstreamTransaction
from gateway.relay.base import Upstream, UpstreamError
from gateway.smtp.address import AddressError, DomainSet, parse_mailbox
from gateway.smtp.recipients import DUPLICATE, path_key
from gateway.smtp.replies import Reply
from gateway.smtp.server import NULL_PATH

if TYPE_CHECKING:
    from gateway.adaptive import AdaptiveRate
    from gateway.clock import Clock
    from gateway.config import Config
    from gateway.maillog import MailLog
    from gateway.metrics import Metrics
    from gateway.senders import Registry

log = structlog.get_logger("gateway.smtp")
_PARSER = BytesParser(policy=compat32)  # parsed once per message, shared by every check
_PARSE_INLINE_MAX = 256 * 1024  # larger messages are parsed off the event loop
_DUMMY_HASH = hash_password("not-a-password", ln=10)


@dataclass
class Transaction:
    """One mail transaction: from an accepted MAIL FROM to the reply to the final dot."""

    queue_id: str
    ctx: Context
    upstream: UpstreamTransaction
    outcome: Outcome
    started: float
    rcpt_keys: set[str] = field(default_factory=set)  # accepted recipients (recipients.py)


_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def _message_id(ctx: Context) -> str:
    """The Message-ID for the log: from the parsed message, or (when no check needed the
    parse) found in the raw header block."""
    if ctx.message is not None:
        # str(): compat32 gives a Header object for a header with raw 8-bit bytes
        return str(ctx.message.get("Message-ID", "")).strip()[:200]
    head = ctx.raw[:ctx.raw.find(b"\r\n\r\n") + 2] if ctx.raw else b""
    m = _MESSAGE_ID.search(head)
    return m.group(1).decode("utf-8", "replace").strip()[:200] if m else ""


def _sender_label(ctx: Context) -> str:
    return ctx.sender.id if ctx.sender is not None else "unknown"


class Handler:
    def __init__(self, *, config: Config, registry: Registry, pipeline: Pipeline,
                 upstream: Upstream, clock: Clock, maillog: MailLog, metrics: Metrics,
                 adaptive: AdaptiveRate | None = None) -> None:
        self.config = config
        self.registry = registry
        self.pipeline = pipeline
        self.upstream = upstream
        self.clock = clock
        self.maillog = maillog
        self.metrics = metrics
        self.adaptive = adaptive
        self.limits = config.limits
        self._per_ip: Counter[str] = Counter()  # open sessions, this process
        self._per_sender: Counter[str] = Counter()
        self.university = DomainSet(config.university.domains)
        self.hostname = config.server.hostname
        self._tasks: set[asyncio.Task] = set()
        self._auth_cache: OrderedDict[bytes, str] = OrderedDict()
        self._auth_cache_key = secrets.token_bytes(32)

    # --- session lifetime (called by GatewaySMTP) -----------------------------------------

    def session_opened(self, session) -> Reply | None:
        """A new connection; a Reply refuses it (421) over the per-IP session cap."""
        session.gateway_id = secrets.token_hex(4)
        session.gateway_sender = None
        ip = self._ip_text(session)
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        self.maillog.connected(session.gateway_id, ip)
        self._per_ip[ip] += 1
        if self._per_ip[ip] > self.limits.sessions_per_ip:
            self.metrics.sessions_refused.labels("ip").inc()
            return Reply(421, "4.7.0", f"Too many sessions from [{ip}] "
                                       f"(at most {self.limits.sessions_per_ip}); try again later")
        return None

    def session_closed(self, session) -> None:
        self.metrics.sessions.dec()
        ip = self._ip_text(session)
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        sender = getattr(session, "gateway_sender", None)
        if sender is not None:
            self._per_sender[sender] -= 1
            if self._per_sender[sender] <= 0:
                del self._per_sender[sender]

    def _claim_sender_session(self, session, sender_id: str) -> Reply | None:
        """Count the session against its sender at its first identified MAIL."""
        if session.gateway_sender == sender_id:
            return None
        if session.gateway_sender is not None:  # (AUTH cannot change; IP identification can)
            self._per_sender[session.gateway_sender] -= 1
        session.gateway_sender = sender_id
        self._per_sender[sender_id] += 1
        if self._per_sender[sender_id] > self.limits.sessions_per_sender:
            self.metrics.sessions_refused.labels("sender").inc()
            return Reply(421, "4.7.0", f"Too many concurrent sessions for sender {sender_id} "
                                       f"(at most {self.limits.sessions_per_sender}); "
                                       "try again later")
        return None

    def transaction_dropped(self, session, txn: Transaction) -> asyncio.Task:
        """The client left the transaction (RSET, EHLO, QUIT, disconnect, refused DATA)."""
        task = asyncio.get_running_loop().create_task(txn.upstream.abort())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @staticmethod
    def _ip_text(session) -> str:
        return str(session.peer[0]) if session.peer else "?"

    def _client_ip(self, session):
        ip = ipaddress.ip_address(str(session.peer[0]).split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip

    # --- AUTH -----------------------------------------------------------------------------

    async def verify_credentials(self, session, creds: LoginPassword) -> str | None:
        """The sender username when the password is right; verified in a worker thread."""
        try:
            username = creds.login.decode()
        except UnicodeDecodeError:
            username = ""
        sender = self.registry.by_username.get(username)
        encoded = sender.auth.password_hash if sender and sender.auth else _DUMMY_HASH
        token = hmac.new(self._auth_cache_key, creds.login + b"\0" + creds.password + b"\0"
                         + encoded.encode(), hashlib.sha256).digest()
        if sender is not None and self._auth_cache.get(token) == username:
            self._auth_cache.move_to_end(token)
            return username
        ok = await asyncio.to_thread(verify_password, creds.password, encoded)
        if ok and sender is not None:
            self._auth_cache[token] = username
            if len(self._auth_cache) > 1024:
                self._auth_cache.popitem(last=False)
            return username
        self.maillog.auth_failed(session.gateway_id, self._ip_text(session), username)
        return None

    # --- SMTP hooks -----------------------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        last = responses.pop()
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        mail_from = "" if address == NULL_PATH else address
        if mail_from:
            try:
                mail_from = str(parse_mailbox(mail_from))
            except AddressError as exc:
                return f"553 5.1.7 Bad sender address <{address}>: {exc}"
        ctx = Context(client_ip=self._client_ip(session), helo=session.host_name or "",
                      tls=session.ssl is not None,
                      auth_user=session.auth_data if session.authenticated else None,
                      mail_from=mail_from)
        identify(ctx, self.registry)
        outcome = await self.pipeline.run(Stage.MAIL, ctx)
        verdict = outcome.verdict
        if not verdict.accepted:
            self._decide(session, ctx, outcome, verdict.action, verdict.reason, verdict.reply,
                         stage="mail", decided_by=outcome.decided_by)
            return str(verdict.reply)
        if ctx.sender is not None:
            refused = self._claim_sender_session(session, ctx.sender.id)
            if refused is not None:
                self._decide(session, ctx, outcome, "defer", "sender_sessions", refused,
                             stage="mail", decided_by="limits")
                return str(refused)
        eightbit = "BODY=8BITMIME" in mail_options
        size = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=")
                     and o[5:].isdigit()), None)
        try:
            upstream_txn = await self.upstream.begin(mail_from, eightbit, size)
        except UpstreamError as exc:
            self.metrics.upstream_reply("mail", exc.reply.code)
            action = "defer" if exc.reply.transient else "reject"
            self._decide(session, ctx, outcome, action, "upstream", exc.reply, stage="mail",
                         decided_by="upstream")
            return str(exc.reply)
        envelope.gateway = Transaction(queue_id=secrets.token_hex(6).upper(), ctx=ctx,
                                       upstream=upstream_txn, outcome=outcome,
                                       started=time.perf_counter())
        envelope.mail_from = mail_from
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        txn: Transaction | None = getattr(envelope, "gateway", None)
        if txn is None:
            return "503 5.5.1 Need MAIL command"
        ctx = txn.ctx
        key = path_key(address)
        if key is not None and key in txn.rcpt_keys:  # not forwarded or counted again
            return str(DUPLICATE)
        reply, reason = await self._rcpt(txn, address, len(envelope.rcpt_tos))
        if reply.ok:
            envelope.rcpt_tos.append(ctx.recipients[-1])
            txn.rcpt_keys.add(key)
        else:
            self.metrics.recipients.labels(_sender_label(ctx), "refused").inc()
            # the upstream's text may name the recipient: log its codes only
            said = f"{reply.code} {reply.enhanced}" if reason == "upstream" else str(reply)
            self.maillog.rcpt_refused(session.gateway_id, str(ctx.client_ip),
                                      ctx.sender.id if ctx.sender else None, address,
                                      said, reason)
        return str(reply)

    async def _rcpt(self, txn: Transaction, address: str, count: int) -> tuple[Reply, str]:
        if count >= self.config.server.max_recipients:
            return Reply(452, "4.5.3", "Too many recipients"), "too_many_recipients"
        if address == NULL_PATH:
            return Reply(550, "5.7.1", "Relaying denied: empty recipient"), "relay_denied"
        try:
            mailbox = parse_mailbox(address)
        except AddressError as exc:
            return Reply(550, "5.7.1", f"Relaying denied: {exc}"), "relay_denied"
        if mailbox.domain not in self.university:
            return (Reply(550, "5.7.1", f"Relaying denied: {mailbox.domain} is not a university "
                                        "domain"), "relay_denied")
        refused = await self._rcpt_checks(txn, str(mailbox))
        if refused is not None:  # decided here: never forwarded upstream
            return refused
        reply = await txn.upstream.rcpt(str(mailbox))
        self.metrics.upstream_reply("rcpt", reply.code)
        if reply.ok:
            txn.ctx.recipients.append(str(mailbox))
        return reply, "upstream"

    async def _rcpt_checks(self, txn: Transaction, address: str) -> tuple[Reply, str] | None:
        """The RCPT-stage checks for one recipient (``ctx.rcpt``); a refusal and its reason."""
        if not self.pipeline.by_stage[Stage.RCPT]:
            return None
        ctx = txn.ctx
        ctx.rcpt = address
        try:
            outcome = await self.pipeline.run(Stage.RCPT, ctx)
        finally:
            ctx.rcpt = None
        txn.outcome.monitored.extend(outcome.monitored)
        if outcome.verdict.accepted:
            return None
        return outcome.verdict.reply, outcome.verdict.reason

    async def handle_DATA(self, server, session, envelope):
        txn: Transaction | None = getattr(envelope, "gateway", None)
        if txn is None:
            return "503 5.5.1 Need MAIL command"
        ctx, outcome = txn.ctx, txn.outcome
        content: bytes = envelope.original_content
        ctx.size = len(content)
        ctx.raw = content
        try:
            if self.pipeline.needs_message(Stage.DATA, ctx):
                ctx.message = await self._parse(content)
        except RecursionError:  # pathological nesting: the stdlib parser recurses per level
            outcome.verdict = reject(550, "5.6.0", "Message structure is nested too deeply to "
                                     "be parsed; flatten it", "mime_unparsable")
            outcome.decided_by = "parser"
        else:
            outcome = await self.pipeline.run(Stage.DATA, ctx, outcome)
        verdict = outcome.verdict
        # Authentication-Results claiming to be ours are forged (RFC 8601 5), whatever checks ran
        content = strip_header_fields(content, [claims(self.hostname), *ctx.strip_headers])
        if outcome.drop and verdict.action in ("accept", "quarantine"):
            finished = await self._drop_recipients(session, envelope, txn, outcome,
                                                   restart=verdict.accepted)
            if finished is not None:
                return finished
        if verdict.action == "quarantine":  # kept in the quarantine, not relayed; 250 + id
            await txn.upstream.abort()
            envelope.gateway = None
            head = self._received(session, ctx, txn.queue_id) + b"".join(
                f"{n}: {v}\r\n".encode() for n, v in [*outcome.headers, *verdict.headers])
            item = item_for(txn.queue_id, ctx, verdict, outcome.decided_by,
                            envelope.mail_options, self.clock.now().isoformat())
            reply, action = Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"), "quarantine"
            store = self.pipeline.deps.quarantine
            try:
                if store is None:
                    raise OSError("no quarantine configured")
                await store.store(item, head + content)
            except OSError as exc:
                log.error("quarantine_failed", queue_id=txn.queue_id, error=repr(exc))
                reply, action = Reply(451, "4.3.0", "Temporary local problem; try again later"), \
                    "defer"
            self._decide(session, ctx, outcome, action, verdict.reason, reply, stage="data",
                         decided_by=outcome.decided_by, txn=txn)
            return str(reply)
        if not verdict.accepted:
            await txn.upstream.abort()
            envelope.gateway = None
            self._decide(session, ctx, outcome, verdict.action, verdict.reason, verdict.reply,
                         stage="data", decided_by=outcome.decided_by, txn=txn)
            return str(verdict.reply)
        head = self._received(session, ctx, txn.queue_id)
        head += b"".join(f"{name}: {value}\r\n".encode() for name, value in outcome.headers)
        started = time.perf_counter()
        reply = await txn.upstream.data(head + content)
        envelope.gateway = None  # finished; a cancelled hook leaves it for the abort on close
        elapsed = time.perf_counter() - started
        self.metrics.relay_seconds.observe(elapsed)
        if self.adaptive is not None:
            self.adaptive.observe(reply.code, elapsed)
        self.metrics.upstream_reply("data", reply.code)
        if reply.ok:
            self.metrics.bytes.inc(len(content))
            action, reason = "accept", "relayed"
        else:
            action, reason = ("defer" if reply.transient else "reject"), "upstream"
        self._decide(session, ctx, outcome, action, reason, reply, stage="data",
                     decided_by="upstream" if not reply.ok else None, txn=txn)
        if reply.ok and self.config.flags.uniform_replies:
            # campus mail's own text (its queue id) would tell a relayed message from one the
            # gateway answered itself (every recipient dropped): the same form for both
            return str(Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"))
        return str(reply)

    async def _drop_recipients(self, session, envelope, txn: Transaction, outcome: Outcome,
                               restart: bool) -> str | None:
        """Leave out the recipients DATA checks dropped (``outcome.drop``), each logged with its
        hashed address and rule. None left: abort upstream, reply 250 (nothing is relayed).
        Otherwise, with ``restart``, re-open the upstream transaction with only the others; if
        campus mail now refuses one it accepted before, defer rather than lose anyone.
        Returns the reply when the transaction ends here."""
        ctx = txn.ctx
        kept = [r for r in ctx.recipients if r not in outcome.drop]
        sender = ctx.sender.id if ctx.sender else None
        for rcpt in ctx.recipients:
            if rcpt in outcome.drop:
                self.maillog.rcpt_dropped(session.gateway_id, txn.queue_id, sender, rcpt,
                                          outcome.drop[rcpt])
        self.metrics.recipients.labels(_sender_label(ctx), "dropped").inc(
            len(ctx.recipients) - len(kept))
        ctx.recipients[:] = kept
        if kept and not restart:
            return None
        if kept:
            reply = await txn.upstream.restart(kept)
            self.metrics.upstream_reply("restart", reply.code)
            if reply.ok:
                return None
            action, reason, decided_by = "defer", "upstream_restart", "upstream"
            reply = Reply(451, "4.3.0", "Temporary problem relaying to campus mail; "
                                        "try again later")
        else:
            action, reason, decided_by = "accept", "recipients_dropped", None
            reply = Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")
        await txn.upstream.abort()
        envelope.gateway = None
        self._decide(session, ctx, outcome, action, reason, reply, stage="data",
                     decided_by=decided_by, txn=txn)
        return str(reply)

    @staticmethod
    async def _parse(content: bytes):
        """Parse once for every check; a big message is parsed in a worker thread so that the
        event loop is never held for long (about 2 ms of CPU per 100 KB)."""
        if len(content) <= _PARSE_INLINE_MAX:
            return _PARSER.parsebytes(content)
        return await asyncio.to_thread(_PARSER.parsebytes, content)

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal_error", error=repr(error), exc_info=error)
        return "451 4.3.0 Internal error; try again later"

    # --- helpers --------------------------------------------------------------------------

    def _received(self, session, ctx: Context, queue_id: str) -> bytes:
        proto = "ESMTP" + ("S" if ctx.tls else "") + ("A" if ctx.auth_user else "")
        only = f"\r\n\tfor <{ctx.recipients[0]}>" if len(ctx.recipients) == 1 else ""
        date = email.utils.format_datetime(self.clock.now())
        helo = (ctx.helo or "unknown").replace("\r", "").replace("\n", "")[:255]
        return (f"Received: from {helo} ([{ctx.client_ip}])\r\n\tby {self.hostname} "
                f"(ecomm-gateway) with {proto} id {queue_id}{only};\r\n\t{date}\r\n").encode()

    def _decide(self, session, ctx: Context, outcome: Outcome, action: str, reason: str,
                reply: Reply | None, *, stage: str, decided_by: str | None,
                txn: Transaction | None = None) -> None:
        sender = _sender_label(ctx)
        self.metrics.messages.labels(sender, action, reason).inc()
        for name, verdict in outcome.monitored:
            self.metrics.monitored.labels(name, verdict.action).inc()
        if stage == "data":
            self.metrics.recipients.labels(sender, action).inc(len(ctx.recipients))
            if ctx.message_class is not None:
                self.metrics.message_classes.labels(sender, ctx.message_class, action).inc()
        if not self.maillog.enabled:
            return
        self.maillog.decision(
            session=session.gateway_id, queue_id=txn.queue_id if txn else None,
            sender=ctx.sender.id if ctx.sender else None, client_ip=str(ctx.client_ip),
            auth=ctx.auth_user, tls=ctx.tls, mail_from=ctx.mail_from,
            message_id=_message_id(ctx), size=ctx.size, recipients=ctx.recipients,
            recipient_count=len(ctx.recipients), stage=stage, decision=action, reason=reason,
            decided_by=decided_by, message_class=ctx.message_class,
            # an upstream's reply text may name recipients: log only its codes
            reply=(None if reply is None else f"{reply.code} {reply.enhanced}"
                   if decided_by == "upstream" or reason == "relayed" else str(reply)),
            monitored=[{"check": n, "would": v.action, "reason": v.reason}
                       for n, v in outcome.monitored] or None,
            checks_ms=outcome.timings_ms,
            elapsed_ms=round((time.perf_counter() - txn.started) * 1000, 3) if txn else None)
