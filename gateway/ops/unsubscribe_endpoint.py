"""Recording one-click unsubscribes (RFC 8058) on their way to the vendor: policy IV.C.4.b and
IV.C.5.b (preferences honoured) and IV.B.3, exception process item 8 (opt-outs go back to the
system of record, with ``gateway flags export-optouts``).

Served by the admin listener at ``/u/{token}`` (gateway.policy.optout_links makes the links; put only
``/u/`` behind the public ``[flags] unsubscribe_base_url``, never ``/api/`` or ``/metrics``):

* ``POST`` with ``List-Unsubscribe=One-Click`` (form-encoded or multipart, RFC 8058 3.2): the
  token is opened (forged or damaged: 404; expired: 410); the opt-out is recorded for the
  recipient, scoped per ``[flags] unsubscribe_scope`` (the sender, its organization, or
  everything); then the same one-click POST goes to the vendor's original https URI (no cookies,
  no redirects followed). The reply is 200 once the opt-out is recorded, whatever the vendor
  answers: a forwarding failure is logged and counted, and the next POST of the token retries it.
  Replays are idempotent: recording again changes nothing, and a token already forwarded
  successfully is not forwarded again (a marker in the state store, until the token expires).
* ``GET``: a page whose button makes that POST. A GET never unsubscribes anyone: link scanners
  and prefetchers fetch every URL in a message.

Log lines name the recipient by its keyed hash (the mail log's) and never name a flag.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from gateway.policy.flags import Scope
from gateway.policy.optout_links import Expired, LinkSealer
from gateway.state import StoreError

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.infra.config import Config
    from gateway.policy.flags import FlagStore
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.policy.senders import Registry

log = structlog.get_logger("gateway.unsubscribe")
_DONE = "unsub-forwarded:"
_FORM = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Unsubscribe</title></head>
<body><form method="post" action="{action}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<p><button type="submit">Unsubscribe</button></p></form></body></html>
"""


class UnsubscribeEndpoint:
    def __init__(self, *, config: Config, flags: FlagStore, registry: Registry, clock: Clock,
                 maillog: MailLog, metrics: Metrics | None = None) -> None:
        cfg = config.flags
        self.flags, self.registry, self.clock = flags, registry, clock
        self.maillog, self.metrics = maillog, metrics
        self.scope = cfg.unsubscribe_scope
        self.links = LinkSealer(flags.keys, cfg.unsubscribe_days)
        self.timeout = cfg.forward_timeout
        self.ca_file = config.path(cfg.forward_ca_file) if cfg.forward_ca_file else None
        self._session: aiohttp.ClientSession | None = None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/u/{token}", self.post)
        app.router.add_get("/u/{token}", self.get)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.unsubscribes.labels(outcome).inc()

    def _open(self, token: str):
        """The token's link, or the error response."""
        try:
            link = self.links.open(token, self.clock.now())
        except Expired:
            self._count("expired")
            return None, web.Response(status=410, text="This unsubscribe link has expired.\n")
        if link is None:
            self._count("invalid")
            return None, web.Response(status=404, text="Unknown unsubscribe link.\n")
        return link, None

    async def get(self, request: web.Request) -> web.Response:
        _, error = self._open(request.match_info["token"])
        if error is not None:
            return error
        return web.Response(text=_FORM.format(action=html.escape(request.path)),
                            content_type="text/html")

    async def post(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        link, error = self._open(token)
        if error is not None:
            return error
        try:
            form = await request.post()
        except ValueError:
            form = {}
        if form.get("List-Unsubscribe") != "One-Click":
            self._count("bad_request")
            return web.Response(status=400, text="Expected List-Unsubscribe=One-Click "
                                                 "(RFC 8058).\n")
        sender = self.registry.by_id.get(link.sender)
        organization = sender.organization if sender is not None else None
        scope = (Scope() if self.scope == "global"
                 else Scope.of(organization=organization)
                 if self.scope == "organization" and organization else Scope("sender", link.sender))
        done_key = _DONE + hashlib.sha256(token.encode()).hexdigest()[:32]
        rcpt = self.maillog.rcpt_id(link.recipient)
        try:
            new = await self.flags.record_optout(link.recipient, scope, sender=link.sender,
                                                 organization=organization,
                                                 at=self.clock.now())
            forwarded = await self.flags.store.get(done_key) is not None
        except StoreError as exc:
            log.error("unsubscribe_unrecorded", sender=link.sender, rcpt=rcpt, error=str(exc))
            self._count("unavailable")
            return web.Response(status=503, text="Temporarily unavailable; try again later.\n")
        self._count("recorded" if new else "replayed")
        log.info("unsubscribe", sender=link.sender, rcpt=rcpt, scope=scope.kind,
                 new=new, forwarded_before=forwarded)
        if not forwarded and await self._forward(link.uri, link.sender, rcpt):
            ttl = link.expires - self.clock.now().timestamp()
            try:
                await self.flags.store.set(done_key, b"1", ttl=max(ttl, 1.0))
            except StoreError:
                pass  # at worst a replay forwards again; vendors' one-click is idempotent
        return web.Response(text="You are unsubscribed.\n")

    async def _forward(self, uri: str, sender: str, rcpt: str) -> bool:
        """The one-click POST to the vendor (RFC 8058 3.2): True on a 2xx or 3xx answer."""
        if urlsplit(uri).scheme.lower() != "https":
            return False
        if self._session is None:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        started = dt.datetime.now(dt.timezone.utc)
        try:
            async with self._session.post(uri, data={"List-Unsubscribe": "One-Click"},
                                          allow_redirects=False) as response:
                ok = 200 <= response.status < 400
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, status = False, repr(exc)[:200]
        if self.metrics is not None:
            self.metrics.unsubscribe_forwards.labels("ok" if ok else "failed").inc()
        elapsed = (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
        (log.info if ok else log.warning)(
            "unsubscribe_forwarded" if ok else "unsubscribe_forward_failed", sender=sender,
            rcpt=rcpt, host=urlsplit(uri).hostname, status=status, seconds=round(elapsed, 3))
        return ok
