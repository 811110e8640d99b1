"""The SMTP front's session hooks: session caps and AUTH, and the before-queue relay around the
engine's decisions (:mod:`gateway.engine`): MAIL opens the upstream transaction, each recipient
the engine lets through is forwarded, and at DATA the engine's result is relayed, quarantined or
answered. aiosmtpd finds the ``handle_*`` hooks by name.

Lifetimes follow aiosmtpd: per-connection facts live on the Session, per-transaction ones on the
Envelope (``envelope.gateway``, a :class:`Relayed`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from aiosmtpd.smtp import LoginPassword

from gateway.engine import Client, Engine, Transaction
from gateway.engine.sessions import SessionCounts
from gateway.policy.passwords import hash_password, verify_password
from gateway.relay.base import Transaction as UpstreamTransaction
from gateway.relay.base import Upstream, UpstreamError
from gateway.smtp.auth_throttle import AuthThrottle
from gateway.smtp.guard import ConnectionGuard
from gateway.smtp.recipients import DUPLICATE, path_key
from gateway.message.replies import Reply
from gateway.smtp.server import NULL_PATH
from gateway.state.memory import MemoryStore

if TYPE_CHECKING:
    from gateway.policy.adaptive import AdaptiveRate
    from gateway.message.arc import ArcSealer
    from gateway.infra.config import Config
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.policy.senders import Registry
    from gateway.state import Store

log = structlog.get_logger("gateway.smtp")
_DUMMY_HASH = hash_password("not-a-password", ln=10)


@dataclass
class Relayed:
    """The engine's transaction and the upstream transaction that relays it."""

    txn: Transaction
    upstream: UpstreamTransaction
    rcpt_keys: set[str] = field(default_factory=set)  # accepted recipients (recipients.py)


class Handler:
    def __init__(self, *, engine: Engine, upstream: Upstream, maillog: MailLog, metrics: Metrics,
                 adaptive: AdaptiveRate | None = None, store: Store | None = None,
                 arc: ArcSealer | None = None, counts: SessionCounts | None = None) -> None:
        self.engine = engine  # config and registry: the engine's current generation (reload)
        self.arc = arc  # [arc]: seal what is relayed (gateway.message.arc)
        self.upstream = upstream
        self.maillog = maillog
        self.metrics = metrics
        self.adaptive = adaptive
        # per IP and per sender, shared with the other fronts of the process
        self.counts = counts or SessionCounts(engine.config.limits, metrics)
        self._tasks: set[asyncio.Task] = set()
        self._auth_cache: OrderedDict[bytes, str] = OrderedDict()
        self._auth_cache_key = secrets.token_bytes(32)
        self.guard = ConnectionGuard(engine.config.limits, metrics)
        # (not "auth_...": aiosmtpd takes handler attributes named auth_* as AUTH mechanisms)
        self.login_throttle = AuthThrottle(limits=engine.config.limits,
                                           store=store or MemoryStore(engine.clock),
                                           clock=engine.clock, metrics=metrics, maillog=maillog)

    @property
    def config(self) -> Config:
        return self.engine.config

    @property
    def registry(self) -> Registry:
        return self.engine.registry

    @property
    def limits(self):
        return self.engine.config.limits

    # --- session lifetime (called by GatewaySMTP) -----------------------------------------

    def session_opened(self, session) -> Reply | None:
        """A new connection; a Reply refuses it (421) over the per-IP session cap."""
        session.gateway_id = secrets.token_hex(4)
        session.gateway_sender = None
        ip = self._ip_text(session)
        self.metrics.sessions.inc()
        self.metrics.connections.inc()
        self.maillog.connected(session.gateway_id, ip)
        refused = self.guard.opened(ip)  # the gateway-wide cap, before anything else
        over = self.counts.opened(ip, check=refused is None)
        return refused or over

    def session_closed(self, session) -> None:
        self.metrics.sessions.dec()
        self.guard.closed()
        self.counts.closed(self._ip_text(session), getattr(session, "gateway_sender", None))

    def _claim_sender_session(self, session, sender_id: str) -> Reply | None:
        """Count the session against its sender at its first identified MAIL."""
        refused = self.counts.claim(session.gateway_sender, sender_id)
        session.gateway_sender = sender_id
        return refused

    def transaction_dropped(self, session, relayed: Relayed) -> asyncio.Task:
        """The client left the transaction (RSET, EHLO, QUIT, disconnect, refused DATA)."""
        task = asyncio.get_running_loop().create_task(relayed.upstream.abort())
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

    async def verify_credentials(self, session, creds: LoginPassword) -> str | Reply:
        """The sender username when the password is right, else the reply to the failure;
        throttled by gateway.smtp.auth_throttle, verified in a worker thread."""
        try:
            username = creds.login.decode()
        except UnicodeDecodeError:
            username = ""
        sender = self.registry.by_username.get(username)
        encoded = sender.auth.password_hash if sender and sender.auth else _DUMMY_HASH
        token = hmac.new(self._auth_cache_key, creds.login + b"\0" + creds.password + b"\0"
                         + encoded.encode(), hashlib.sha256).digest()

        async def verify() -> bool:
            if sender is not None and self._auth_cache.get(token) == username:
                self._auth_cache.move_to_end(token)
                return True
            ok = await asyncio.to_thread(verify_password, creds.password, encoded)
            if ok and sender is not None:
                self._auth_cache[token] = username
                if len(self._auth_cache) > 1024:
                    self._auth_cache.popitem(last=False)
                return True
            return False

        verdict = await self.login_throttle.attempt(session, self._ip_text(session), creds.login,
                                                    verify)
        return username if verdict.ok else verdict.reply

    def transaction_idle(self, session) -> None:
        """The client fell silent inside a transaction ([upstream] transaction_idle): it was
        told 421 4.4.2 and is being closed; the close aborts the upstream transaction."""
        self.metrics.sessions_refused.labels("idle").inc()
        log.info("transaction_idle", session=session.gateway_id, client_ip=self._ip_text(session),
                 sender=session.gateway_sender, reply="421 4.4.2")

    async def session_admitted(self, session) -> Reply | None:
        """Before the greeting: the per-IP connection rate (gateway.smtp.guard)."""
        return await self.guard.admit(self._ip_text(session))

    # --- SMTP hooks -----------------------------------------------------------------------

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        last = responses.pop()
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        mail_from, bad = self.engine.sender_path("" if address == NULL_PATH else address)
        if bad is not None:
            return str(bad)
        client = Client(session_id=session.gateway_id, ip=self._client_ip(session),
                        helo=session.host_name or "", tls=session.ssl is not None,
                        auth_user=session.auth_data if session.authenticated else None)
        txn = await self.engine.mail(client, mail_from, mail_options)
        if txn.reply is not None:
            return str(txn.reply)
        ctx = txn.ctx
        if ctx.sender is not None:
            refused = self._claim_sender_session(session, ctx.sender.id)
            if refused is not None:
                return str(self.engine.refuse(txn, "defer", "sender_sessions", refused,
                                              stage="mail", decided_by="limits"))
        eightbit = "BODY=8BITMIME" in mail_options
        size = next((int(o[5:]) for o in mail_options if o.startswith("SIZE=")
                     and o[5:].isdigit()), None)
        try:
            upstream_txn = await self.upstream.begin(mail_from, eightbit, size,
                                                     owner=ctx.sender.id if ctx.sender else None)
        except UpstreamError as exc:
            self.metrics.upstream_reply("mail", exc.reply.code)
            action = "defer" if exc.reply.transient else "reject"
            return str(self.engine.refuse(txn, action, "upstream", exc.reply, stage="mail",
                                          decided_by="upstream"))
        envelope.gateway = Relayed(txn, upstream_txn)
        envelope.mail_from = mail_from
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        relayed: Relayed | None = getattr(envelope, "gateway", None)
        if relayed is None:
            return "503 5.5.1 Need MAIL command"
        txn = relayed.txn
        key = path_key(address)
        if key is not None and key in relayed.rcpt_keys:  # not forwarded or counted again
            return str(DUPLICATE)
        decision = await self.engine.rcpt(txn, address, len(envelope.rcpt_tos))
        reply, reason = decision.reply, decision.reason
        if reply is None:  # policy lets it through: campus mail decides
            reply = await relayed.upstream.rcpt(decision.mailbox)
            self.metrics.upstream_reply("rcpt", reply.code)
            reason = "upstream"
            if reply.ok:
                self.engine.rcpt_accepted(txn, decision.mailbox)
                envelope.rcpt_tos.append(decision.mailbox)
                relayed.rcpt_keys.add(key)
        if not reply.ok:
            self.engine.rcpt_refused(txn, address, reply, reason)
        return str(reply)

    async def handle_DATA(self, server, session, envelope):
        relayed: Relayed | None = getattr(envelope, "gateway", None)
        if relayed is None:
            return "503 5.5.1 Need MAIL command"
        txn, upstream = relayed.txn, relayed.upstream
        result = await self.engine.content(txn, envelope.original_content)
        if result.kind == "reply":
            await upstream.abort()
            envelope.gateway = None
            return str(result.reply)
        if result.kind == "quarantine":  # kept in the quarantine, not relayed; 250 + id
            await upstream.abort()
            envelope.gateway = None
            return str(await self.engine.store_quarantined(result, self.engine.received(txn)))
        if result.dropped:  # re-open the upstream transaction with only the kept recipients
            reply = await upstream.restart(txn.ctx.recipients)
            self.metrics.upstream_reply("restart", reply.code)
            if not reply.ok:  # campus mail now refuses one it accepted: defer, lose no one
                await upstream.abort()
                envelope.gateway = None
                reply = Reply(451, "4.3.0", "Temporary problem relaying to campus mail; "
                                            "try again later")
                self.engine.finish(txn, "defer", "upstream_restart", reply,
                                   decided_by="upstream")
                return str(reply)
        head = self.engine.received(txn)
        head += b"".join(f"{name}: {value}\r\n".encode() for name, value in result.headers)
        data = head + result.content
        if self.arc is not None and self.arc.wanted(result.received, result.content):
            sender = txn.ctx.sender.id if txn.ctx.sender is not None else "unknown"
            data = await self.arc.seal(result.received, data, sender)
        started = time.perf_counter()
        reply = await upstream.data(data, checked=len(result.content))  # (admitted)
        envelope.gateway = None  # finished; a cancelled hook leaves it for the abort on close
        elapsed = time.perf_counter() - started
        self.metrics.relay_seconds.observe(elapsed)
        if self.adaptive is not None:
            self.adaptive.observe(reply.code, elapsed)
        self.metrics.upstream_reply("data", reply.code)
        self.engine.delivered(txn, result, reply)
        if reply.ok and self.config.flags.uniform_replies:
            # campus mail's own text (its queue id) would tell a relayed message from one the
            # gateway answered itself (every recipient dropped): the same form for both
            return str(Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"))
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal_error", error=repr(error), exc_info=error)
        return "451 4.3.0 Internal error; try again later"
