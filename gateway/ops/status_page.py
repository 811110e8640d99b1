"""The status page on the admin listener (``/status``): one read-only, server-rendered HTML page
for mail administrators, without JavaScript, behind the admin token (HTTP Basic with the token as
the password, so that a browser asks for it; a bearer token works too).

For each sender: its registration and expiry, its rate use against its limit and throttle, its
decisions of the last hour by reason, its active large-audience campaigns against the threshold;
the latest refusals, each linking to its decision; for the gateway: version, configuration
generation, upstream, state store, quarantine. Every string that a client or a configuration
file could have chosen is HTML-escaped (:func:`e`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import hmac
import time
from collections import Counter
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from aiohttp import web

from gateway import __version__

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.ops.recent import Refusal

REALM = 'Basic realm="ecomm-gateway status", charset="UTF-8"'
EXPIRY_SOON_DAYS = 30

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1b1b1b}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.5em}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:.3em .5em;
text-align:left;vertical-align:top;font-size:.9em}th{background:#eef}
.bad{color:#a00;font-weight:bold}.warn{color:#a60}.ok{color:#070}
small{color:#555}
"""


def e(value: object) -> str:
    """HTML-escaped text (quotes too: safe in attributes)."""
    return escape(str(value), quote=True)


def authorized(request: web.Request, token: str) -> bool:
    """HTTP Basic with the admin token as the password (any user name), or the bearer token."""
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    return False


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _page(title: str, body: str) -> web.Response:
    html = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")
    return web.Response(text=html, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store",
                                 "Content-Security-Policy": "default-src 'none'; "
                                 "style-src 'unsafe-inline'",
                                 "X-Content-Type-Options": "nosniff"})


def trace_link(queue_id: str) -> str:
    return f'<a href="/status/trace?queue_id={e(quote(queue_id, safe=""))}">{e(queue_id)}</a>'


class StatusPage:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/status", self.status)
        app.router.add_get("/status/trace", self.trace)

    @web.middleware
    async def auth(self, request: web.Request, handler):
        if request.path == "/status" or request.path.startswith("/status/"):
            if not authorized(request, self.gw.admin_token):
                return web.Response(status=401, text="the admin token is required\n",
                                    headers={"WWW-Authenticate": REALM})
        return await handler(request)

    # --- the page ------------------------------------------------------------------------

    async def status(self, request: web.Request) -> web.Response:
        gw = self.gw
        now = gw.clock.now().timestamp()
        gateway_rows = await self._gateway_rows()
        senders = await self._senders(now)
        refusals = self._refusals(gw.recent.refusals())
        body = (f"<h1>ecomm-gateway status</h1>\n<p><small>{e(_when(now))}; counts are this "
                "gateway's, over the last hour</small></p>\n"
                f'<h2 id="gateway">Gateway</h2>\n<table>{gateway_rows}</table>\n'
                f'<h2 id="senders">Senders</h2>\n{senders}\n'
                f'<h2 id="refusals">Recent refusals</h2>\n{refusals}')
        return _page("ecomm-gateway status", body)

    async def _gateway_rows(self) -> str:
        gw = self.gw
        counts = gw.recent.counts()
        relayed = sum(n for (_, d, r), n in counts.items() if r == "relayed")
        by_upstream = sum(n for (_, d, r), n in counts.items() if r.startswith("upstream"))
        started = time.perf_counter()
        try:
            await asyncio.wait_for(gw.store.ping(), 2)
            store = (f'<span class="ok">reachable</span> ({(time.perf_counter() - started) * 1000:.1f}'
                     " ms)")
        except Exception as exc:  # any failure is what the page must show
            store = f'<span class="bad">unavailable: {e(exc)}</span>'
        try:
            held = len(await asyncio.to_thread(gw.quarantine.list))
            quarantine = f"{held} message(s) held" + (" (<code>gateway quarantine list</code>)"
                                                       if held else "")
        except OSError as exc:
            quarantine = f'<span class="bad">unreadable: {e(exc.strerror or exc)}</span>'
        upstream_state = (f'<span class="warn">{by_upstream} refused or deferred by campus mail'
                          "</span>" if by_upstream else '<span class="ok">no refusal</span>')
        rows = [
            ("Version", e(__version__)),
            ("Configuration", f"{e(gw.config.file)}, generation {gw.engine.generation.number}"),
            ("Upstream", (f"{e(gw.upstream.description)}: {relayed} relayed, {upstream_state} "
                          "in the last hour") if gw.upstream is not None
             else "none (milter only: the MTA in front delivers)"),
            ("State store", f"{e(gw.config.state.url)}: {store}"),
            ("Quarantine", quarantine),
            ("Registered senders", str(len(gw.registry))),
        ]
        return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)

    async def _senders(self, now: float) -> str:
        gw = self.gw
        config = gw.config
        today = dt.datetime.fromtimestamp(now, dt.timezone.utc).date()
        try:
            throttles = {t.target: t for t in await gw.throttles.list()}
        except Exception:  # the store is down: the gateway row says so
            throttles = {}
        counts = gw.recent.counts()
        by_sender: dict[str, Counter] = {}
        for (sender, decision, reason), n in counts.items():
            by_sender.setdefault(sender, Counter())[(decision, reason)] += n
        large = self._large_audience()
        threshold = config.business_hours.large_audience
        rows = []
        for s in gw.registry.senders:
            left = (s.expires - today).days
            if left < 0:
                expiry = f'<span class="bad">expired {e(s.expires)}</span>'
            elif left < EXPIRY_SOON_DAYS:
                expiry = f'<span class="warn">{e(s.expires)} (in {left} days)</span>'
            else:
                expiry = f"{e(s.expires)} <small>(in {left} days)</small>"
            rates = [(config.limits.ceiling, "policy")]
            if s.own_rate is not None:
                rates.append((s.own_rate, "own"))
            throttle = throttles.get(s.id)
            if throttle is not None:
                rates.append((throttle.rate, "throttle"))
            limit, why = min(rates, key=lambda r: r[0].per_second)
            used = gw.recent.counts(limit.period) if limit.period <= gw.recent.window else None
            sent = (sum(n for (sid, d, r), n in used.items() if sid == s.id and r == "relayed")
                    if used is not None else None)
            rate = (f"{sent} of {e(limit)} ({why})" if sent is not None
                    else f"limit {e(limit)} ({why})")
            if throttle is not None:
                until = _when(throttle.until) if throttle.until else "until cleared"
                rate += f'<br><span class="warn">throttled to {e(throttle.rate)}, {e(until)}</span>'
            rows.append(
                f'<tr id="sender-{e(s.id)}"><td><b>{e(s.id)}</b><br><small>{e(s.organization)}'
                f"</small></td><td>{e(', '.join(s.networks))}<br><small>"
                f"{e(', '.join(s.domains))}</small></td><td>{expiry}</td><td>{rate}</td>"
                f"<td>{self._decisions(by_sender.get(s.id, Counter()))}</td>"
                f"<td>{self._campaigns(large.get(s.id, []), threshold)}</td></tr>")
        unknown = by_sender.get("unknown")
        if unknown:
            rows.append(f'<tr id="sender-unknown"><td><i>unidentified clients</i></td><td></td>'
                        f"<td></td><td></td><td>{self._decisions(unknown)}</td><td></td></tr>")
        head = ("<tr><th>Sender</th><th>Networks / domains</th><th>Expires</th><th>Rate "
                "(relayed in its period / limit)</th><th>Last hour by decision and reason</th>"
                f"<th>Large-audience campaigns (threshold {threshold})</th></tr>")
        return f"<table>{head}{''.join(rows)}</table>"

    @staticmethod
    def _decisions(counts: Counter) -> str:
        if not counts:
            return "<small>none</small>"
        names = {"accept": "relayed", "reject": "refused", "defer": "deferred",
                 "quarantine": "quarantined"}
        parts = []
        for decision in ("accept", "reject", "defer", "quarantine"):
            reasons = sorted(((r, n) for (d, r), n in counts.items() if d == decision),
                             key=lambda item: -item[1])
            if reasons:
                total = sum(n for _, n in reasons)
                detail = ", ".join(f"{e(r)} {n}" for r, n in reasons)
                parts.append(f"{names[decision]} {total} <small>({detail})</small>")
        return "<br>".join(parts)

    @staticmethod
    def _campaigns(campaigns: list[tuple[str, int]], threshold: int) -> str:
        if not campaigns:
            return "<small>none</small>"
        return "<br>".join(
            (f'<span class="bad">{e(label)}: {size} &gt; {threshold}</span>' if size > threshold
             else f"{e(label)}: {size} of {threshold}") for label, size in campaigns[:5])

    def _large_audience(self) -> dict[str, list[tuple[str, int]]]:
        checks = [c for stage in self.gw.pipeline.by_stage.values() for c in stage]
        check = next((c for c in checks if c.name == "large_audience"), None)
        if check is None:
            return {}
        return {s.id: check.largest.active(s.id) for s in self.gw.registry.senders}

    @staticmethod
    def _refusals(refusals: list[Refusal]) -> str:
        if not refusals:
            return "<p>No refusal since the gateway started.</p>"
        rows = "".join(
            f"<tr><td>{e(_when(r.at))}</td><td>{trace_link(r.queue_id)}</td><td>{e(r.sender)}"
            f"</td><td>{e(r.decision)}</td><td>{e(r.reason)}</td><td>{e(r.stage)}</td>"
            f"<td><code>{e(r.reply)}</code></td></tr>" for r in refusals)
        return ("<table><tr><th>When</th><th>Queue id</th><th>Sender</th><th>Decision</th>"
                f"<th>Reason</th><th>Stage</th><th>Reply</th></tr>{rows}</table>")

    # --- one decision ---------------------------------------------------------------------

    async def trace(self, request: web.Request) -> web.Response:
        """One decision: from the trace in the state store (gateway.ops.trace), else from the
        recent refusals this process remembers."""
        queue_id = request.query.get("queue_id", "")
        try:
            records = await self.gw.trace.query(queue_id=queue_id) if queue_id else []
        except Exception:  # the store is down: what this process remembers
            records = []
        found = records[-1] if records else None
        if found is None:
            recent = self.gw.recent.refusal(queue_id)
            found = dataclasses.asdict(recent) if recent is not None else None
        if found is None:
            return _page("decision not found", f"<h1>No recent decision {e(queue_id)}</h1>"
                         '<p><a href="/status">Back to the status page</a></p>')
        names = [("queue_id", "Queue id"), ("session", "Session"), ("sender", "Sender"),
                 ("client_ip", "Client IP"), ("mail_from", "Return-path"),
                 ("message_id", "Message-ID"), ("size", "Size (bytes)"),
                 ("message_class", "Message class"), ("stage", "Stage"),
                 ("decision", "Decision"), ("reason", "Reason"), ("decided_by", "Decided by")]
        rows = [("When", e(_when(found["at"])))]
        rows += [(label, e(found[k])) for k, label in names if found.get(k) not in (None, "")]
        if "recipients" in found:
            rows.append(("Recipients (keyed hashes)", e(", ".join(found["recipients"]))))
        rows.append(("Reply", f"<code>{e(found.get('reply') or '-')}</code>"))
        if found.get("checks_ms"):
            rows.append(("Checks", "<br>".join(f"{e(k)}: {e(v)} ms"
                                               for k, v in found["checks_ms"].items())))
        table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        return _page(f"decision {queue_id}",
                     f"<h1>Decision {e(queue_id)}</h1><table>{table}</table>"
                     '<p><a href="/status">Back to the status page</a></p>')
