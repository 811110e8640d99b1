"""aiosmtpd's SMTP protocol, adapted for a relay that must be strict, fast, and say why.

- every reply carries an enhanced status code (we advertise ENHANCEDSTATUSCODES; aiosmtpd's
  built-in replies have none, so :func:`add_enhanced` supplies the standard one);
- envelope paths are handed to the handler raw, so routing tricks are seen and refused rather
  than silently cleaned, and ``<>`` reaches the handler instead of a 501;
- SMTP AUTH passwords are verified off the event loop (scrypt is deliberately slow);
- DATA is read in large slices rather than line by line;
- an upstream transaction left open by RSET, EHLO, a refused DATA or a dropped connection is
  aborted, so the pooled upstream connection is returned.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

from gateway.message.address import split_path
from gateway.message.replies import Reply, add_enhanced, escape_reply

NULL_PATH = "<>"
DATA_WINDOW = 256 * 1024  # bytes scanned (and buffered) per read while receiving DATA


IDLE_IN_TRANSACTION = b"421 4.4.2 Idle too long in a mail transaction; closing connection\r\n"


TERMINATOR = b"\r\n.\r\n"


def _still_needed(tail: bytes) -> int:
    """How many more bytes could at the soonest finish a <CRLF>.<CRLF> that ``tail`` ends with
    the start of (0: none begun). Reading that many never reads past the message's end: a
    terminator that starts later needs more."""
    for k in (4, 3, 2, 1):
        if tail.endswith(TERMINATOR[:k]):
            return len(TERMINATOR) - k
    return 0


class GatewaySMTP(SMTP):
    def __init__(self, handler, *, transaction_idle: float | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counted = False
        # a client silent this long between commands of a transaction (which holds a pooled
        # upstream connection) is told 421 4.4.2 and closed, and the slot goes back to the pool
        self.transaction_idle = transaction_idle
        self._idle_armed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and not self._counted
        before = self.session
        super().connection_made(transport)  # after STARTTLS this makes a new Session (RFC 3207)
        if first:
            self._counted = True
            self._refusal = self.event_handler.session_opened(self.session)
        elif before is not None:  # the same connection: keep its identity and counts
            self.session.gateway_id = before.gateway_id
            self.session.gateway_sender = before.gateway_sender

    def connection_lost(self, error: Exception | None) -> None:
        self._close_transaction()
        if self._counted:
            self._counted = False
            self.event_handler.session_closed(self.session)
        super().connection_lost(error)

    def _set_post_data_state(self) -> None:
        self._close_transaction()
        super()._set_post_data_state()

    def _close_transaction(self) -> None:
        envelope = self.envelope
        if envelope is not None and getattr(envelope, "gateway", None) is not None:
            txn, envelope.gateway = envelope.gateway, None
            self._pending_abort = self.event_handler.transaction_dropped(self.session, txn)

    _pending_abort: asyncio.Task | None = None

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and getattr(self.envelope, "gateway", None) is not None

    async def smtp_MAIL(self, arg: str | None) -> None:
        # let an abandoned transaction's upstream RSET finish first, so that its pooled
        # connection is free for this one
        if self._pending_abort is not None:
            task, self._pending_abort = self._pending_abort, None
            await asyncio.wait([task])
        await super().smtp_MAIL(arg)

    _refusal = None

    async def _handle_client(self) -> None:
        if self._refusal is None:  # the per-IP connection rate: still before any TLS or AUTH
            self._refusal = await self.event_handler.session_admitted(self.session)
        if self._refusal is not None:  # over a session cap: say so instead of the greeting
            await self.push(str(self._refusal))
            return
        await super()._handle_client()

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            # every reply, aiosmtpd's own that echo the command included: no control
            # character from the client ever reaches it (see replies.escape_reply)
            if not self._greeting_reply:
                status = add_enhanced(status)
            status = escape_reply(status)
        await super().push(status)
        if isinstance(status, str) and status.startswith("421") and self.transport is not None:
            self.transport.close()  # 421: the server closes the transmission channel
            return
        self._arm_idle(status)

    def _arm_idle(self, status: str | bytes) -> None:
        """After a reply inside a transaction, the client has ``transaction_idle`` seconds
        for its next command; DATA's content (after 354) keeps the session timeout."""
        if self.transaction_idle is None or self.transport is None:
            return
        if self.in_transaction and not (isinstance(status, str) and status.startswith("354")):
            if self.transaction_idle < self._timeout_duration:
                self._reset_timeout(self.transaction_idle)
                self._idle_armed = True
        elif self._idle_armed:
            self._idle_armed = False
            self._reset_timeout()

    # aiosmtpd re-arms the session timeout at every command (cancel one timer, start another),
    # and _arm_idle at every reply in a transaction: about 1.4 us each, seven times a message.
    # Here a new deadline that is later than the armed timer's only moves the deadline; the
    # timer, when it fires, arms itself again for what is left. The connection times out when
    # it did before.
    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        due = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = due
        handle = self._timeout_handle
        if handle is not None and not handle.cancelled() and handle.when() <= due:
            return  # it fires first, then arms itself for the rest (_timeout_due)
        if handle is not None:
            handle.cancel()
        self._timeout_handle = self.loop.call_at(due, self._timeout_due)

    def _timeout_due(self) -> None:
        if self.loop.time() < self._deadline:  # the deadline moved on since this was armed
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_due)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self._idle_armed and self.in_transaction and self.transport is not None:
            self._writer.write(IDLE_IN_TRANSACTION)  # sent before the close below
            self.event_handler.transaction_idle(self.session)
        super()._timeout_cb()

    # RFC 2034 section 3: no enhanced codes in the replies to HELO and EHLO.
    _greeting_reply = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._greeting_reply = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._greeting_reply = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._greeting_reply = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._greeting_reply = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        path, rest = split_path(arg)
        if path is None:
            return None, None
        return (path or NULL_PATH), rest

    # DATA: aiosmtpd reads the message line by line through a 1001-byte window, which costs a
    # fifth of the gateway's CPU per message. This reads it in one search for the terminating
    # <CRLF>.<CRLF> (exactly that: a bare-LF "dot" never ends the message, so SMTP smuggling
    # cannot split one message into two) per window, then un-stuffs it in one pass. Only where
    # a read ends inside a possible terminator (at the start, after a full window) are the few
    # bytes that could finish it read on their own.
    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytes | None:
        """The message up to its terminating line, un-stuffed; None when it is over the size
        limit (then it is read to its end and discarded, never buffered beyond the limit)."""
        reader = self._reader
        limit = self.data_size_limit or (1 << 62)
        parts: list[bytes] = []
        size, too_big = 0, False
        # the bytes before the unread stream, for finding a terminator that spans reads: the
        # CRLF that ended the DATA line comes first, so that a lone "." line at once ends an
        # empty message
        tail = b"\r\n"
        saved, reader._limit = reader._limit, DATA_WINDOW  # see the comment above
        try:
            while True:
                needed = _still_needed(tail)
                if needed:  # the terminator may have begun: only the bytes that could end it
                    piece = await reader.readexactly(needed)
                else:  # it lies wholly ahead: one search for it
                    try:
                        piece = await reader.readuntil(TERMINATOR)
                    except asyncio.LimitOverrunError as exc:  # not in the window yet
                        piece = await reader.readexactly(exc.consumed)
                size += len(piece)
                if not too_big:
                    if size > limit + 3:  # (+3: the terminating ".\r\n")
                        too_big = True
                        parts.clear()
                    else:
                        parts.append(piece)
                tail = (tail + piece)[-5:]
                if tail.endswith(TERMINATOR):
                    break
        finally:
            reader._limit = saved
        if too_big:
            return None
        data = b"".join(parts)[:-3]  # drop ".\r\n"; what is left ends with CRLF (or is empty)
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n")

    # AUTH: aiosmtpd parses PLAIN and LOGIN and then calls _authenticate synchronously; we let
    # it parse, then verify the credentials in a worker thread.
    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def _verified(self, result: AuthResult) -> AuthResult:
        creds = result.auth_data
        if result.success or not isinstance(creds, LoginPassword):
            return result
        outcome = await self.event_handler.verify_credentials(self.session, creds)
        if isinstance(outcome, Reply):  # 535, 454 when locked out, 421 (and close) at the last
            return AuthResult(success=False, handled=False, message=str(outcome))
        return AuthResult(success=True, auth_data=outcome)

    async def auth_PLAIN(self, _, args) -> AuthResult:
        return await self._verified(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _, args) -> AuthResult:
        return await self._verified(await super().auth_LOGIN(_, args))
