"""Campus mail over SMTP: aiosmtplib connections kept in a pool and reused across messages,
STARTTLS as configured, failover across the configured hosts in order."""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import aiosmtplib
from aiosmtplib import (SMTPException, SMTPHeloError, SMTPRecipientRefused, SMTPResponse,
                        SMTPResponseException, SMTPSenderRefused, SMTPServerDisconnected)

from gateway.infra.clock import Clock
from gateway.relay.base import CONNECTION_LOST, POOL_BUSY, UNAVAILABLE, UpstreamError
from gateway.message.replies import Reply, from_upstream

_TRANSPORT_ERRORS = (OSError, asyncio.TimeoutError, SMTPServerDisconnected,
                     aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPConnectError)


OK = Reply(250, "2.0.0", "OK")  # (nothing to reset: restart() before any RCPT was forwarded)

# aiosmtplib sends every bare CR or LF as CRLF and adds a final CRLF: campus mail would receive
# other bytes than the checks judged. Content it would rewrite is never sent.
NOT_WIRE_EXACT = Reply(554, "5.6.0", "Message has line endings other than CRLF; not relayed")


def wire_exact(content: bytes, checked: int = 0) -> bool:
    """``content`` goes out as it is (dot-stuffing aside, which the receiver undoes): every CR
    and LF is part of a CRLF, and it ends with CRLF. Its last ``checked`` bytes are known to
    be (the admitted message: gateway.message.intake refused any other), so only the bytes
    before them are counted (the three counts cost about 19 us for 10 KB)."""
    if not content.endswith(b"\r\n"):
        return False
    head = content[:len(content) - checked] if checked else content
    if not head:
        return True
    pairs = head.count(b"\r\n")
    return head.count(b"\r") == pairs == head.count(b"\n") and head.endswith(b"\r\n")


class Client(aiosmtplib.SMTP):
    """aiosmtplib's client (connection, EHLO, STARTTLS, RSET, QUIT), with the transaction
    commands (MAIL, RCPT, DATA and the final dot, or BDAT) written by :meth:`send` and their
    replies read by :meth:`reply` under one deadline per connection, not aiosmtplib's per-read
    timeout: asyncio.wait_for costs about 2.5 us a reply (a future, a timer and callbacks),
    four times a message. One timer per connection watches instead; a reply later than
    ``timeout`` closes the connection, so the read ends in SMTPServerDisconnected, a transport
    failure like the timeout it replaces (the transaction answers 451 4.4.2 and the connection
    is not reused)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._due: float | None = None  # the awaited reply's deadline (loop time), or None
        self._watch: asyncio.TimerHandle | None = None
        self.timed_out = False  # closed because a reply came too late
        self.reused = False  # taken from the pool (it may have been closed by campus mail)

    def expect_reply(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + (self.timeout or 60.0)
        if self._watch is None:  # else the armed timer fires first and moves on (_watched)
            self._watch = loop.call_at(self._due, self._watched)

    def replied(self) -> None:
        self._due = None

    def _watched(self) -> None:
        self._watch = None
        due = self._due
        if due is None:  # nothing awaited: the next expect_reply arms a timer again
            return
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._watch = loop.call_at(due, self._watched)
            return
        self._due = None
        self.timed_out = True
        self.close()  # the read in flight ends in SMTPServerDisconnected

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().close()

    def send(self, lines: bytes) -> None:
        """Write transaction commands (``lines``: one or more, each ending in CRLF, built by
        this module from validated paths) at once. Not ``execute_command``: it searches every
        argument for line breaks again, and takes a lock and a ``wait_for`` per command, for
        what a transaction of this client, which owns the connection, does not need."""
        protocol = self.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost")
        protocol.write(lines)

    async def reply(self) -> SMTPResponse:
        """The next reply, under the deadline. A reply that arrived with the one before it
        (pipelined commands, RFC 2920) is in the protocol's buffer already: aiosmtplib parses
        one reply per read, so the buffer is read first."""
        protocol = self.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost")
        buffered = protocol._read_response_from_buffer()
        if buffered is not None:
            return buffered
        self.expect_reply()
        try:
            return await protocol.read_response(timeout=None)
        except (SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            self.close()
            raise
        finally:
            self.replied()


def _path_line(verb: bytes, path: str, options: list[str] = ()) -> bytes:
    line = b"%s:<%s>" % (verb, path.encode("ascii"))
    for option in options:
        line += b" " + option.encode("ascii")
    if b"\r" in line or b"\n" in line:  # (normalized paths never have them)
        raise ValueError("line break in an SMTP command")
    return line + b"\r\n"


# MAIL and RCPT carry the paths exactly as the engine normalized them (gateway.message.address:
# ASCII, validated, at most a quoted local part): client.mail() and client.rcpt() would parse each
# again with email.utils (about 2 % of a relayed message's CPU) and could rewrite it.
def mail_line(path: str, options: list[str]) -> bytes:
    return _path_line(b"MAIL FROM", path, options)


def rcpt_line(path: str) -> bytes:
    return _path_line(b"RCPT TO", path)


def _mail_checked(response, path: str):
    if response.code != 250:
        raise SMTPSenderRefused(response.code, response.message, path)
    return response


def _rcpt_checked(response, path: str):
    if response.code not in (250, 251):
        raise SMTPRecipientRefused(response.code, response.message, path)
    return response


async def send_mail(client: Client, path: str, options: list[str]):
    client.send(mail_line(path, options))
    return _mail_checked(await client.reply(), path)


async def send_rcpt(client: Client, path: str):
    client.send(rcpt_line(path))
    return _rcpt_checked(await client.reply(), path)


def bdat_line(content: bytes) -> bytes:
    """``content`` as one last chunk (RFC 3030 2): ``BDAT <octets> LAST`` and the octets as
    they are, no dot-stuffing and no end marker."""
    return b"BDAT %d LAST\r\n" % len(content) + content


async def send_bdat(client: Client, content: bytes):
    """``content`` (wire-exact) on ``client`` as one BDAT LAST chunk (campus mail offers
    CHUNKING, RFC 3030): one write and one reply, where DATA takes two of each and a wait for
    354. The reply to the chunk, or SMTPResponseException for one that is not 250."""
    client.send(bdat_line(content))
    response = await client.reply()
    if response.code != 250:
        raise SMTPResponseException(response.code, response.message)
    return response


async def send_data(client: Client, content: bytes):
    """DATA and ``content`` (wire-exact, see :func:`wire_exact`) on ``client``: the reply to
    the final dot, or SMTPResponseException for one that is not 250. ``client.data`` would
    search the message for bare line endings twice more (regular expressions over the whole
    body) to fix what :func:`wire_exact` has already ruled out; here the body is only
    dot-stuffed (RFC 5321 4.5.2), with ``bytes.replace``, and written at once."""
    client.send(b"DATA\r\n")
    start = await client.reply()
    if start.code != 354:
        raise SMTPResponseException(start.code, start.message)
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    client.send(b"." + stuffed + b".\r\n" if stuffed.startswith(b".") else stuffed + b".\r\n")
    response = await client.reply()
    if response.code != 250:
        raise SMTPResponseException(response.code, response.message)
    return response


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO from a server that refuses it (what client.mail() would do first)."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()


class SMTPUpstream:
    def __init__(self, *, urls: tuple[str, ...], starttls: str, tls_context: ssl.SSLContext,
                 pool_size: int, timeout: float, idle_timeout: float, helo: str,
                 clock: Clock, pool_wait: float | None = None, sender_share: float = 1.0,
                 chunking: bool = True) -> None:
        self.urls = urls
        self.chunking = chunking  # BDAT to a host that offers CHUNKING (RFC 3030)
        self.description = ", ".join(urls)
        self.starttls = starttls
        self.tls_context = tls_context
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.helo = helo
        self.clock = clock
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        # fairness (issue #10 item 9): a slot is waited for at most pool_wait seconds, and one
        # owner (a registered sender) holds at most per_owner slots at once
        self.pool_wait = timeout if pool_wait is None else min(pool_wait, timeout)
        self.per_owner = max(1, int(pool_size * sender_share))
        self._owners: dict[str, asyncio.Semaphore] = {}

    async def _connect(self, url: str) -> aiosmtplib.SMTP:
        parts = urlsplit(url)
        implicit = parts.scheme == "smtps"
        client = Client(
            hostname=parts.hostname, port=parts.port or (465 if implicit else 25),
            local_hostname=self.helo, timeout=self.timeout, use_tls=implicit,
            start_tls=False, tls_context=self.tls_context)
        await client.connect()
        await _greet(client)  # before MAIL, whose parameters depend on the extensions
        if not implicit and self.starttls != "off":
            if client.supports_extension("starttls"):
                await client.starttls()
                await _greet(client)  # again over TLS (RFC 3207 4.2)
            elif self.starttls == "required":
                client.close()
                raise ConnectionError(f"{url} does not offer STARTTLS and starttls = required")
        return client

    @staticmethod
    def _options(client: aiosmtplib.SMTP, eightbit: bool, size: int | None) -> list[str]:
        options = []
        if eightbit and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if size and client.supports_extension("size"):
            options.append(f"SIZE={size}")
        return options

    async def _mail(self, client, mail_from, eightbit, size) -> None:
        await send_mail(client, mail_from, self._options(client, eightbit, size))

    async def begin(self, mail_from: str, eightbit: bool, size: int | None,
                    owner: str | None = None) -> SMTPTransaction:
        """A transaction on a pooled connection: first a slot of ``owner``'s share, then one of
        the pool, both within ``pool_wait`` seconds (else 451 4.4.5, the client retries).
        Campus mail that offers PIPELINING (RFC 2920) gets MAIL FROM with the first RCPT TO,
        in one write (see :meth:`SMTPTransaction.rcpt`); else MAIL FROM is sent now."""
        held = await self._slots_for(owner)
        try:
            client = await self._checkout(mail_from, eightbit, size, pipelined=True)
        except BaseException:
            for slots in held:
                slots.release()
            raise
        return SMTPTransaction(self, client, (mail_from, eightbit, size), held,
                               mail_sent=not client.supports_extension("pipelining"))

    async def _slots_for(self, owner: str | None) -> list[asyncio.Semaphore]:
        wanted = [self._slots]
        if owner is not None:
            wanted.insert(0, self._owners.setdefault(owner, asyncio.Semaphore(self.per_owner)))
        held: list[asyncio.Semaphore] = []
        deadline = self.clock.monotonic() + self.pool_wait
        try:
            for slots in wanted:
                if not await _acquire(slots, self.clock, deadline - self.clock.monotonic()):
                    raise UpstreamError(POOL_BUSY)
                held.append(slots)
        except BaseException:
            for slots in held:
                slots.release()
            raise
        return held

    async def _checkout(self, mail_from: str, eightbit: bool, size: int | None,
                        pipelined: bool = False) -> Client:
        """A connection with MAIL FROM accepted on it; with ``pipelined``, one that offers
        PIPELINING comes with MAIL FROM not sent yet (the transaction sends it with the first
        RCPT TO). A pooled connection that turns out stale is closed and the next one tried,
        then a fresh one to each host in order."""
        now = self.clock.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if now - since > self.idle_timeout or not client.is_connected:
                client.close()
                continue
            client.reused = True
            if pipelined and client.supports_extension("pipelining"):
                return client
            try:
                await self._mail(client, mail_from, eightbit, size)
                return client
            except SMTPSenderRefused as exc:
                self._release(client, reusable=True)
                raise UpstreamError(from_upstream(exc.code, exc.message)) from exc
            except (*_TRANSPORT_ERRORS, SMTPException):
                client.close()  # a stale pooled connection: try another, then a fresh one
        for url in self.urls:
            try:
                client = await self._connect(url)
            except (*_TRANSPORT_ERRORS, SMTPException, ConnectionError):
                continue  # next host
            if pipelined and client.supports_extension("pipelining"):
                return client
            try:
                await self._mail(client, mail_from, eightbit, size)
                return client
            except SMTPSenderRefused as exc:
                self._release(client, reusable=True)
                raise UpstreamError(from_upstream(exc.code, exc.message)) from exc
            except (*_TRANSPORT_ERRORS, SMTPException):
                client.close()
        raise UpstreamError(UNAVAILABLE)

    def _release(self, client: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and client.is_connected:
            self._idle.append((client, self.clock.monotonic()))
        else:
            client.close()

    async def close(self) -> None:
        while self._idle:
            client, _ = self._idle.pop()
            try:
                await asyncio.wait_for(client.quit(), 2)
            except (*_TRANSPORT_ERRORS, SMTPException):
                client.close()


async def _acquire(slots: asyncio.Semaphore, clock: Clock, seconds: float) -> bool:
    """Acquire ``slots`` within ``seconds`` of ``clock``; False (not acquired) when time ran out."""
    if not slots.locked():
        await slots.acquire()  # free: at once
        return True
    if seconds <= 0:
        return False
    acquiring = asyncio.ensure_future(slots.acquire())
    timer = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({acquiring, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not acquiring.done():
            acquiring.cancel()
            try:
                await acquiring
            except asyncio.CancelledError:
                pass
    return acquiring.done() and not acquiring.cancelled()


class SMTPTransaction:
    """One upstream transaction on a pooled connection. The connection goes back to the pool
    after a completed or reset transaction, and is closed after any transport failure, a 421,
    or a client that vanished while a command was in flight.

    With ``mail_sent`` False (campus mail offers PIPELINING), MAIL FROM has not been sent: the
    first :meth:`rcpt` sends it and RCPT TO in one write and reads both replies, which saves a
    write, a read and a wait for campus mail per message. Campus mail's refusal of MAIL FROM is
    then the reply to that recipient (and to each later one, each trying MAIL FROM again), as
    a refused MAIL would be a refused transaction; a transaction that ends before any
    recipient was forwarded sent nothing, so it needs no RSET."""

    def __init__(self, upstream: SMTPUpstream, client: Client,
                 mail: tuple[str, bool, int | None] = ("", False, None),
                 slots: list[asyncio.Semaphore] | None = None, mail_sent: bool = True) -> None:
        self.upstream, self.client = upstream, client
        self._mail_args = mail  # MAIL FROM, 8BITMIME, SIZE: for restart()
        self._held = [upstream._slots] if slots is None else slots
        self._mail_sent = mail_sent
        self._done = False
        self._busy = False

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self.upstream._release(self.client, reusable)
            for slots in self._held:
                slots.release()

    async def _command(self, call):
        """Run one upstream command; returns its reply, or None on a transport failure."""
        self._busy = True
        try:
            response = await call()
        except SMTPResponseException as exc:
            return from_upstream(exc.code, exc.message)
        except (*_TRANSPORT_ERRORS, SMTPException):
            self._finish(reusable=False)
            return None
        except BaseException:  # cancelled: the client went away mid-command
            self._finish(reusable=False)
            raise
        finally:
            self._busy = False
        return from_upstream(response.code, response.message)

    async def rcpt(self, address: str) -> Reply:
        if self._done:
            return CONNECTION_LOST
        if self._mail_sent:
            reply = await self._command(lambda: send_rcpt(self.client, address))
        else:
            reply = await self._command(lambda: self._mail_and_rcpt(address))
        if reply is not None and reply.code == 421:
            self._finish(reusable=False)
        return reply or CONNECTION_LOST

    async def _mail_and_rcpt(self, address: str, retry: bool = True):
        """MAIL FROM and RCPT TO in one write (RFC 2920 3.1: both may be pipelined); the RCPT
        reply, or SMTPSenderRefused with MAIL's refusal. A connection from the pool that fails
        before MAIL's reply (campus mail closed it meanwhile) is closed and the pair sent once
        more on the connection :meth:`SMTPUpstream._checkout` finds next, as a stale
        connection found at MAIL is (once; not after a timeout, which is no stale
        connection)."""
        mail_from, eightbit, size = self._mail_args
        client = self.client
        try:
            client.send(mail_line(mail_from, self.upstream._options(client, eightbit, size))
                        + rcpt_line(address))
            mail = await client.reply()
        except _TRANSPORT_ERRORS:
            if not (retry and client.reused) or client.timed_out:  # not stale: lost
                raise
            client.close()
            try:
                self.client = await self.upstream._checkout(mail_from, eightbit, size,
                                                            pipelined=True)
            except UpstreamError as exc:  # unreachable now, or it refused MAIL (no PIPELINING)
                if exc.reply is UNAVAILABLE:
                    raise SMTPServerDisconnected("Connection lost") from exc
                raise SMTPSenderRefused(exc.reply.code, f"{exc.reply.enhanced} "
                                        f"{exc.reply.text}", mail_from) from exc
            if not self.client.supports_extension("pipelining"):  # MAIL accepted there
                self._mail_sent = True
                return await send_rcpt(self.client, address)
            return await self._mail_and_rcpt(address, retry=False)
        rcpt = await client.reply()  # (read after a refused MAIL too: it answers RCPT)
        _mail_checked(mail, mail_from)  # a refusal: the next recipient tries MAIL again
        self._mail_sent = True
        return _rcpt_checked(rcpt, address)

    async def restart(self, recipients: list[str]) -> Reply:
        if self._done:
            return CONNECTION_LOST
        reply = await self._command(self.client.rset) if self._mail_sent else OK
        if reply is not None and reply.ok:
            mail_from, eightbit, size = self._mail_args
            options = self.upstream._options(self.client, eightbit, size)
            reply = await self._command(lambda: send_mail(self.client, mail_from, options))
            self._mail_sent = reply is not None
        for address in recipients:
            if reply is None or not reply.ok:
                break
            reply = await self._command(lambda a=address: send_rcpt(self.client, a))
        if reply is not None and reply.code == 421:
            self._finish(reusable=False)
        return reply or CONNECTION_LOST

    async def data(self, content: bytes, checked: int = 0) -> Reply:
        if self._done:
            return CONNECTION_LOST
        if not wire_exact(content, checked):  # the DATA path refuses such messages before this
            await self.abort()
            return NOT_WIRE_EXACT
        chunked = self.upstream.chunking and self.client.supports_extension("chunking")
        send = send_bdat if chunked else send_data
        reply = await self._command(lambda: send(self.client, content))
        if reply is None:
            return CONNECTION_LOST
        # a refused chunk ends the connection too: a receiver that did not take the chunk's
        # octets (RFC 3030 2 says it must) would read the message as commands
        self._finish(reusable=reply.code != 421 and (reply.code == 250 or not chunked))
        return reply

    async def abort(self) -> None:
        if self._done:
            return
        if self._busy:
            self._finish(reusable=False)
            return
        if not self._mail_sent:  # nothing was sent: nothing to reset
            self._finish(reusable=True)
            return
        reply = await self._command(self.client.rset)
        self._finish(reusable=reply is not None and reply.ok)
