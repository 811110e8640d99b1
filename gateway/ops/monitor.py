"""What ops watch, refreshed in the background every ``[admin] watch_interval`` seconds:

* each upstream host probed cheaply (TCP connect, the 220 banner, EHLO, QUIT, all within a
  deadline; a Maildir: its directories writable) into ``gateway_upstream_up{host}``, and how long
  campus mail has been unreachable (every host down) for ``/readyz``;
* the state store pinged into ``gateway_state_up``;
* the quarantine's size into ``gateway_quarantine_messages`` (counted off the event loop);
* the audit trail's new events into ``gateway_admin_actions_total{action}``.

Registration expiries and the build are set once at start (:func:`static_metrics`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger("gateway.ops.monitor")

MAX_REPLY_LINES = 100


def version() -> str:
    try:
        return metadata.version("ecomm-gateway")
    except metadata.PackageNotFoundError:
        from gateway import __version__

        return __version__


def host_label(url: str) -> str:
    """The ``host`` label of an upstream URL: ``host:port``, or ``maildir`` for a Maildir."""
    if url.startswith("maildir:"):
        return "maildir"
    parts = urlsplit(url)
    port = parts.port or (465 if parts.scheme == "smtps" else 25)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{port}"


async def _reply_code(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) SMTP reply; return its code."""
    for _ in range(MAX_REPLY_LINES):
        line = await reader.readline()
        if len(line) < 4 or not line[:3].isdigit():
            raise ConnectionError(f"not an SMTP reply: {line[:40]!r}")
        if line[3:4] != b"-":
            return int(line[:3])
    raise ConnectionError("reply of too many lines")


async def probe_smtp(url: str, helo: str, timeout: float,
                     tls: ssl.SSLContext | None = None) -> str | None:
    """None if the host answers 220, EHLO 250 and QUIT within ``timeout``; else why not."""
    parts = urlsplit(url)
    implicit = parts.scheme == "smtps"
    port = parts.port or (465 if implicit else 25)

    async def talk() -> str | None:
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=tls if implicit else None, limit=8192,
            server_hostname=parts.hostname if implicit else None)
        try:
            code = await _reply_code(reader)
            if code != 220:
                return f"banner {code}"
            writer.write(f"EHLO {helo}\r\n".encode())
            code = await _reply_code(reader)
            if code != 250:
                return f"EHLO {code}"
            writer.write(b"QUIT\r\n")
            await _reply_code(reader)
            return None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass

    try:
        return await asyncio.wait_for(talk(), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ssl.SSLError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def probe_maildir(path: Path) -> str | None:
    for d in (path, path / "tmp", path / "new"):
        if not d.is_dir():
            return f"{d} is not a directory"
        if not os.access(d, os.W_OK | os.X_OK):
            return f"{d} is not writable"
    return None


def expiry_timestamp(expires: dt.date) -> float:
    """A registration is valid through its expires date: it ends at the next midnight, UTC."""
    end = dt.datetime.combine(expires + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
    return end.timestamp()


def static_metrics(gateway) -> None:
    """Build info and registration expiries (at start and after each reload); each registered sender's recipient decisions and
    holds start at 0 (so rate() and the dashboard see a sender before its first event)."""
    from gateway.ops.metrics import DECISIONS

    metrics = gateway.metrics
    metrics.build_info.labels(version()).set(1)
    metrics.registration_expiry.clear()  # after a reload: only the senders registered now
    from gateway.ops.audit import ACTIONS

    for action in ACTIONS:
        metrics.admin_actions.labels(action)
    for sender in gateway.registry.senders:
        metrics.registration_expiry.labels(sender.id).set(expiry_timestamp(sender.expires))
        metrics.holds.labels(sender.id)
        for decision in DECISIONS:
            metrics.recipients.labels(sender.id, decision)


class Monitor:
    """The background watch of one Gateway (started and stopped with it)."""

    def __init__(self, gateway) -> None:
        self.gw = gateway
        cfg = gateway.config
        self.interval = cfg.admin.watch_interval
        self.grace = cfg.upstream.unreachable_grace
        self.probe = cfg.upstream.probe and gateway.upstream is not None  # milter-only: none
        self.timeout = min(cfg.upstream.timeout, 10.0)
        self.urls = cfg.upstream.urls
        self.down_since: float | None = None  # clock.monotonic() of the first failed round
        self.last_problem = ""
        self._task: asyncio.Task | None = None
        self._tls: ssl.SSLContext | None = None
        from gateway.ops.audit import AuditCounter

        self.audit = AuditCounter(cfg.path(cfg.logging.audit_file))

    def start(self) -> None:
        static_metrics(self.gw)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the watch must go on
                log.error("monitor_error", error=repr(exc))
            # The cadence is real time: it paces background I/O and decides nothing (how long
            # campus mail has been down is measured on the injectable clock, in tick()); on the
            # test clock it would be one more sleeper for tests that wait for a held message.
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        await asyncio.gather(self._quarantine(), self._state(), self._audit(),
                             *([self._upstreams()] if self.probe else []))

    async def _quarantine(self) -> None:
        count = await asyncio.to_thread(self.gw.quarantine.count)
        self.gw.metrics.quarantine_messages.set(count)

    async def _audit(self) -> None:
        """Count the audit trail's new events, whoever wrote them (CLI or this API)."""
        for action, n in (await asyncio.to_thread(self.audit.read_new)).items():
            self.gw.metrics.admin_actions.labels(action).inc(n)

    async def _state(self) -> None:
        try:
            await asyncio.wait_for(self.gw.store.ping(), self.timeout)
            self.gw.metrics.state_up.set(1)
        except Exception as exc:  # noqa: BLE001 - any failure is "down"
            self.gw.metrics.state_up.set(0)
            log.warning("state_probe_failed", error=str(exc) or type(exc).__name__)

    async def _probe(self, url: str) -> str | None:
        if url.startswith("maildir:"):
            return await asyncio.to_thread(probe_maildir,
                                           self.gw.config.path(url[len("maildir:"):]))
        if url.startswith("smtps:") and self._tls is None:
            from gateway.relay.base import tls_context

            self._tls = tls_context(self.gw.config)
        return await probe_smtp(url, self.gw.config.server.hostname, self.timeout, self._tls)

    async def _upstreams(self) -> None:
        results = await asyncio.gather(*(self._probe(url) for url in self.urls))
        for url, problem in zip(self.urls, results):
            self.gw.metrics.upstream_up.labels(host_label(url)).set(0 if problem else 1)
            if problem:
                log.warning("upstream_probe_failed", host=host_label(url), error=problem)
        now = self.gw.clock.monotonic()
        if any(problem is None for problem in results):
            if self.down_since is not None:
                log.info("upstream_reachable_again")
            self.down_since = None
        else:
            if self.down_since is None:
                self.down_since = now
            self.last_problem = "; ".join(f"{host_label(u)}: {p}"
                                          for u, p in zip(self.urls, results))

    def readiness_problem(self) -> str | None:
        """Why the gateway is not ready, as far as campus mail goes."""
        if self.down_since is None:
            return None
        down = self.gw.clock.monotonic() - self.down_since
        if down <= self.grace:
            return None
        return f"campus mail unreachable for {down:.0f} s ({self.last_problem})"
