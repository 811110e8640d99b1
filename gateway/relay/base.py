"""The upstream interface: one transaction per relayed message, opened at MAIL FROM.

A transaction is opened when the gateway accepts MAIL FROM (an SMTP upstream with PIPELINING gets
MAIL FROM with the first RCPT TO), forwards each accepted RCPT (so the upstream's per-recipient
refusals reach the client per recipient) and sends the message only after every check has passed;
the upstream's reply to the data is the client's reply.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gateway.message.replies import Reply

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.infra.config import Config

UNAVAILABLE = Reply(451, "4.4.1", "Campus mail is unavailable; try again later")
CONNECTION_LOST = Reply(451, "4.4.2", "Connection to campus mail lost; try again later")
# RFC 3463 X.4.5 "mail system congestion": no pooled connection to campus mail came free in time
POOL_BUSY = Reply(451, "4.4.5", "All connections to campus mail are busy; try again later")


class UpstreamError(Exception):
    """The upstream could not start a transaction; ``reply`` is what the client gets."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class Transaction(Protocol):
    async def rcpt(self, address: str) -> Reply: ...

    async def restart(self, recipients: list[str]) -> Reply:
        """Start the transaction over with only ``recipients`` (RSET, MAIL FROM as before, RCPT
        each): how recipients already forwarded are left out before the data. The first reply
        that is not a success is returned (the caller then aborts); else the last RCPT's."""

    async def data(self, content: bytes, checked: int = 0) -> Reply:
        """Send ``content``; its last ``checked`` bytes are known to end lines with CRLF only
        (the admitted message), so an SMTP upstream checks only the bytes before them."""

    async def abort(self) -> None: ...


class Upstream(Protocol):
    description: str

    async def begin(self, mail_from: str, eightbit: bool, size: int | None,
                    owner: str | None = None) -> Transaction:
        """Open a transaction (MAIL FROM). ``owner`` (the registered sender) bounds how much of
        a connection pool one sender may hold."""

    async def close(self) -> None: ...


def tls_context(config: Config) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(config.path(config.upstream.ca_file))
                                     if config.upstream.ca_file else None)
    if not config.upstream.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def open_upstream(config: Config, clock: Clock) -> Upstream:
    up = config.upstream
    if up.url.startswith("maildir:"):
        from gateway.relay.maildir import MaildirUpstream

        return MaildirUpstream(config.path(Path(up.url[len("maildir:"):])))
    from gateway.relay.smtp import SMTPUpstream

    return SMTPUpstream(urls=up.urls, starttls=up.starttls, tls_context=tls_context(config),
                        pool_size=up.pool_size, timeout=up.timeout,
                        idle_timeout=up.idle_timeout, helo=config.server.hostname, clock=clock,
                        pool_wait=up.pool_wait, sender_share=up.sender_share,
                        chunking=up.chunking)
