"""One MTA connection (one Postfix smtpd session): milter events in, engine calls, milter
responses out.

Postfix asks at each stage and waits for the answer: connect (identification needs the client
address), HELO, MAIL (the engine's MAIL checks), each RCPT (relay control and the RCPT checks),
the header fields and body chunks (collected, bounded by ``max_message_size``) and the end of the
message (the engine's content checks; its result becomes header edits, recipient removals,
quarantine or a reply). Nothing is decided or spent before the end of the message, so an abort,
a timeout or a closed connection before it costs nothing; one that comes while the end of the
message is being decided cancels the decision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from typing import TYPE_CHECKING

import structlog
from kilter.protocol import messages as m

from gateway.engine import Client, Transaction
from gateway.milter import wire
from gateway.milter.actions import edits, reply_code
from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.milter.server import MilterServer

log = structlog.get_logger("gateway.milter")

ACTIONS = (m.ActionFlags.ADD_HEADERS | m.ActionFlags.CHANGE_HEADERS
           | m.ActionFlags.DELETE_RECIPIENT | m.ActionFlags.QUARANTINE)
# no DATA and unknown-command events; header values with their leading space (byte-exact)
PROTOCOL = m.ProtocolFlags.NO_UNKNOWN | m.ProtocolFlags.NO_DATA
LEADING_SPACE = m.ProtocolFlags.HEADER_LEADING_SPACE
# No answer to each header field, the end of the headers and each body chunk (when the MTA
# offers it): a message costs one round trip for its content instead of one per field and
# chunk. Their refusals (too big) then wait for the end of the message.
NO_REPLY = (m.ProtocolFlags.NR_HEADER | m.ProtocolFlags.NR_END_OF_HEADERS
            | m.ProtocolFlags.NR_BODY)
_NO_REPLY_EVENTS = {m.ProtocolFlags.NR_HEADER: m.Header,
                    m.ProtocolFlags.NR_END_OF_HEADERS: m.EndOfHeaders,
                    m.ProtocolFlags.NR_BODY: m.Body}

TOO_BIG = Reply(552, "5.3.4", "Error: Too much mail data")
FAMILY_REFUSED = Reply(554, "5.7.1", "Client address family is not IPv4 or IPv6; relaying "
                                     "denied")
NOT_A_SENDER = Reply(550, "5.7.1", "Authenticated user is not a registered sender; relaying "
                                   "denied")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")


class Closed(Exception):
    """The session is over (the MTA closed, stalled or sent a bad packet); logged once."""


class MilterSession:
    def __init__(self, server: MilterServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.engine = server.engine
        self.reader, self.writer = reader, writer
        self.id = secrets.token_hex(4)
        self.timeout = server.config.milter.timeout
        self.max_size = server.config.server.max_message_size
        self.leading_space = False
        self.no_reply: tuple[type, ...] = ()  # events the MTA expects no answer to
        self.macros: dict[str, str] = {}
        self.ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self.refused: Reply | None = None  # the connection's refusal (family, session cap)
        self.sender: str | None = None  # the sender the session is counted against
        self.helo = ""
        self.txn: Transaction | None = None
        self.deciding = False  # the end of a message is being decided
        self.current = None  # the event being handled
        self._reset_message()

    def _reset_message(self) -> None:
        self.rcpt_forms: dict[str, list[bytes]] = {}  # mailbox -> as the MTA gave it
        self.head: list[bytes] = []
        self.body: list[bytes] = []
        self.size = 0
        self.too_big = False

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        stage = "connect"
        try:
            while True:
                try:
                    event = await wire.read_event(self.reader, self.timeout)
                except TimeoutError:
                    raise Closed(f"no packet from the MTA for {self.timeout:g} s") from None
                except asyncio.IncompleteReadError:
                    raise Closed("the MTA closed the connection mid-packet") from None
                if event is None or isinstance(event, m.Close):
                    if self.txn is not None and event is None:
                        raise Closed("the MTA closed the connection mid-transaction")
                    return
                stage = type(event).__name__.lower()
                answer = await self.handle(event)
                if answer:
                    self.writer.write(wire.encode(*answer))
                    await self.writer.drain()
        except Closed as exc:
            self._log_end(str(exc), stage)
        except wire.BadPacket as exc:
            self._log_end(f"bad packet: {exc}", stage)
        except (ConnectionError, OSError) as exc:
            self._log_end(f"connection error: {exc.__class__.__name__}", stage)
        finally:
            self.txn = None  # nothing decided is kept; nothing was spent before the end
            if self.ip is not None:
                self.server.counts.closed(str(self.ip), self.sender)

    def _log_end(self, why: str, stage: str) -> None:
        log.warning("milter_session_ended", session=self.id, reason=why, stage=stage,
                    in_transaction=self.txn is not None,
                    client_ip=str(self.ip) if self.ip else None)

    # --- events -------------------------------------------------------------------------------

    async def handle(self, event) -> list[m.Message]:
        answer = await self._handle(event)
        if isinstance(event, self.no_reply):
            return []  # (a refusal is given at the end of the message)
        return answer

    async def _handle(self, event) -> list[m.Message]:
        self.current = event
        match event:
            case m.Negotiate():
                return [self._negotiate(event)]
            case wire.Macros():
                self.macros.update(event.values)
                return []
            case wire.Connect():
                return [self._connect(event)]
            case wire.Helo():
                self.helo = event.hostname
                return [self._refusal() or m.Continue()]
            case m.EnvelopeFrom():
                return [await self._mail(event)]
            case m.EnvelopeRecipient():
                return [await self._rcpt(event)]
            case m.Header():
                return [self._header(event)]
            case m.EndOfHeaders():
                return [self._continue()]
            case m.Body():
                return [self._body(bytes(event.content))]
            case m.EndOfMessage():
                if self.too_big:  # passed the limit in a chunk that took no answer
                    return [self._too_big()]
                if event.content:
                    answer = self._body(bytes(event.content))
                    if not isinstance(answer, m.Continue):
                        return [answer]
                return await self._guarded_end_of_message()
            case m.Abort():
                if self.txn is not None and (self.head or self.body):
                    log.info("milter_message_aborted", session=self.id,
                             queue_id=self.txn.queue_id, stage="message")
                self.txn = None
                self._reset_message()
                return []
        raise wire.BadPacket(f"unexpected {type(event).__name__} packet")

    def _negotiate(self, offer: m.Negotiate) -> m.Negotiate:
        if offer.version < 6:
            raise wire.BadPacket(f"milter protocol version {offer.version} (6 is needed)")
        missing = ACTIONS & ~offer.action_flags
        if missing:
            raise wire.BadPacket(f"the MTA does not offer the actions {missing!r}")
        self.leading_space = bool(offer.protocol_flags & LEADING_SPACE)
        self.no_reply = tuple(event for flag, event in _NO_REPLY_EVENTS.items()
                              if flag & offer.protocol_flags)
        return m.Negotiate(6, ACTIONS,
                           (PROTOCOL | LEADING_SPACE | NO_REPLY) & offer.protocol_flags)

    def _connect(self, event: wire.Connect) -> m.Message:
        if event.address is None:
            self.refused = FAMILY_REFUSED
            log.info("milter_connect_refused", session=self.id, family=event.family)
            return reply_code(FAMILY_REFUSED)
        ip = event.address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        self.ip = ip
        self.server.maillog.connected(self.id, str(ip))
        self.refused = self.server.counts.opened(str(ip))
        return reply_code(self.refused) if self.refused else m.Continue()

    def _refusal(self) -> m.Message | None:
        if self.refused is not None:
            return reply_code(self.refused)
        if self.ip is None:
            raise wire.BadPacket("event before connect")
        return None

    def _continue(self) -> m.Message:
        if self.txn is None:
            return reply_code(NEED_MAIL)
        return m.Continue()

    async def _mail(self, event: m.EnvelopeFrom) -> m.Message:
        refused = self._refusal()
        if refused is not None:
            return refused
        self.txn = None
        self._reset_message()
        address = bytes(event.sender).decode("utf-8", "replace").strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        mail_from, bad = self.engine.sender_path(address)
        if bad is not None:
            return reply_code(bad)
        auth = self.macros.get("auth_authen") or None
        if auth is not None and auth not in self.engine.registry.by_username:
            log.info("milter_auth_not_a_sender", session=self.id, client_ip=str(self.ip))
            return reply_code(NOT_A_SENDER)
        client = Client(session_id=self.id, ip=self.ip, helo=self.helo,
                        tls=bool(self.macros.get("tls_version")), auth_user=auth)
        options = [bytes(a).decode("utf-8", "replace") for a in event.arguments]
        txn = await self.engine.mail(client, mail_from, options)
        if txn.reply is not None:
            return reply_code(txn.reply)
        if txn.ctx.sender is not None:
            refused = self.server.counts.claim(self.sender, txn.ctx.sender.id)
            self.sender = txn.ctx.sender.id
            if refused is not None:
                return reply_code(self.engine.refuse(txn, "defer", "sender_sessions", refused,
                                                     stage="mail", decided_by="limits"))
        self.txn = txn
        return m.Continue()

    async def _rcpt(self, event: m.EnvelopeRecipient) -> m.Message:
        txn = self.txn
        if txn is None:
            return self._refusal() or reply_code(NEED_MAIL)
        form = bytes(event.recipient)
        address = form.decode("utf-8", "replace").strip()
        if address.startswith("<") and address.endswith(">"):
            address = address[1:-1]
        decision = await self.engine.rcpt(txn, address, len(txn.ctx.recipients))
        if decision.reply is not None:
            self.engine.rcpt_refused(txn, address, decision.reply, decision.reason)
            return reply_code(decision.reply)
        mailbox = decision.mailbox
        if mailbox not in self.rcpt_forms:  # (a repeated recipient is counted once)
            self.engine.rcpt_accepted(txn, mailbox)
        self.rcpt_forms.setdefault(mailbox, []).append(form)
        return m.Continue()

    def _add(self, data: bytes) -> bool:
        """Count ``data`` against max_message_size; False (and nothing kept) past it."""
        self.size += len(data)
        if self.size > self.max_size:
            self.too_big = True
            self.head.clear()
            self.body.clear()
        return not self.too_big

    def _header(self, event: m.Header) -> m.Message:
        if self.txn is None:
            return reply_code(NEED_MAIL)
        value = bytes(event.value).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        sep = b":" if self.leading_space else b": "
        line = event.name.encode("ascii", "replace") + sep + value + b"\r\n"
        if not self._add(line):
            return self._too_big()
        self.head.append(line)
        return m.Continue()

    def _body(self, chunk: bytes) -> m.Message:
        if self.txn is None:
            return reply_code(NEED_MAIL)
        if not self._add(chunk):
            return self._too_big()
        self.body.append(chunk)
        return m.Continue()

    def _too_big(self) -> m.Message:
        if isinstance(self.current, self.no_reply):  # answered at the end of the message
            return m.Continue()
        log.info("milter_message_too_big", session=self.id, queue_id=self.txn.queue_id,
                 limit=self.max_size)
        self.txn = None
        self._reset_message()
        return reply_code(TOO_BIG)

    # --- end of message -----------------------------------------------------------------------

    async def _guarded_end_of_message(self) -> list[m.Message]:
        """Decide; if the MTA goes away meanwhile (it gave up waiting, or closed), cancel the
        decision: a held rate budget is then not taken, and no answer is owed."""
        txn = self.txn
        if txn is None:
            return [reply_code(NEED_MAIL)]
        decide = asyncio.ensure_future(self._end_of_message())
        watch = asyncio.ensure_future(self.reader.read(1))
        self.deciding = True
        try:
            await asyncio.wait([decide, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.deciding = False
            if not decide.done():
                decide.cancel()
                await asyncio.gather(decide, return_exceptions=True)
            if not watch.done():
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        if watch.done() and not watch.cancelled() and watch.exception() is None \
                and watch.result():
            raise wire.BadPacket("a packet while the end of the message was being decided")
        if not decide.done() or decide.cancelled():
            self.txn = txn  # (for the log line: it ends mid-transaction)
            raise Closed("the MTA closed the connection while the message was being decided")
        return decide.result()

    async def _end_of_message(self) -> list[m.Message]:
        txn, self.txn = self.txn, None
        raw = b"".join(self.head) + b"\r\n" + b"".join(self.body)
        forms = self.rcpt_forms
        self._reset_message()
        if self.macros.get("i"):  # Postfix's queue id next to the gateway's, for the logs
            log.info("milter_queue_id", session=self.id, queue_id=txn.queue_id,
                     mta_queue_id=self.macros["i"])
        result = await self.engine.content(txn, raw)
        if result.kind == "relay" and self.server.arc is not None:
            await self.server.arc.seal_result(txn.ctx, result)
        if result.kind == "reply":
            if result.reply.ok:  # every recipient dropped: accepted, delivered to no one
                return [m.Discard()]
            return [reply_code(result.reply)]
        # at the top, under the MTA's own Received field, as the SMTP front adds them under its
        # own: Postfix does not show that field to milters but counts it as header 0
        out = edits(result, forms, self.leading_space, top=1)
        verdict = result.outcome.verdict
        if result.kind == "quarantine":
            why = f"ecomm-gateway: {verdict.reason or 'quarantine'}"
            out.append(m.Quarantine(why))
            self.engine.finish(txn, "quarantine", verdict.reason, Reply(250, "2.0.0", "Ok"),
                               decided_by=result.outcome.decided_by)
        else:
            self.engine.delivered(txn, result, Reply(250, "2.0.0", "Ok"))
        return [*out, m.Continue()]
