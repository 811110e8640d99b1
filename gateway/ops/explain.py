"""``gateway explain MESSAGE.eml``: run the real pipeline on one message, as the gateway would
decide it for the given client and envelope, without relaying it, spending rate budget, counting
audiences, writing state or logging a decision (``Engine.explain``, ``Context.dry_run``).

The checks are the gateway's own, built from its configuration and sender registry, on its state
store (throttles, rate windows, audiences and recipient flags are read, never written) and its
resolver settings. ``--at`` puts the clock at another time (business hours, expiry, DKIM times).
Campus mail is not asked: what it would answer to each recipient and to the message is its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from gateway.infra.config import Config
    from gateway.policy.senders import Registry


class BadInput(ValueError):
    """What the administrator gave cannot be explained (exit 2)."""


@dataclass
class Explanation:
    checks: list[dict] = field(default_factory=list)
    recipients: list[dict] = field(default_factory=list)
    decision: str = ""  # relay | reject | defer | quarantine | no_recipients
    reply: str = ""
    queue_id: str = ""

    @property
    def relayed(self) -> bool:
        return self.decision == "relay"

    def to_json(self) -> dict:
        return {"decision": self.decision, "reply": self.reply, "checks": self.checks,
                "recipients": self.recipients}

    def lines(self) -> list[str]:
        out = [f"{'STAGE':<5} {'CHECK':<17} {'MODE':<8} {'VERDICT':<10} {'MS':>8}  REASON"]
        for c in self.checks:
            ms = "" if c["ms"] is None else f"{c['ms']:.3f}"
            out.append(f"{c['stage']:<5} {c['check']:<17} {c['mode']:<8} {c['verdict']:<10} "
                       f"{ms:>8}  {c['reason']}" + (f": {c['reply']}" if c["reply"] else ""))
        for r in self.recipients:
            out.append(f"recipient {r['address']}: "
                       + ("passes policy (campus mail decides)" if r["accepted"]
                          else f"refused ({r['reason']}): {r['reply']}"))
        out.append(f"decision: {self.decision}")
        out.append(f"reply: {self.reply}")
        return out


def read_message(path: Path) -> bytes:
    """The message as an SMTP client would send it: a file with bare LF line ends (as saved by
    most tools) gets CRLF; one that already has CRLF is taken byte for byte."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"{path}: {exc.strerror}") from None
    if b"\r\n" not in raw:
        raw = raw.replace(b"\n", b"\r\n")
    return raw


def parse_at(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        at = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"--at {text!r} is not an ISO 8601 time, e.g. 2026-11-02T09:30:00-07:00"
                       ) from None
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.timezone.utc)


def _secret(path: Path) -> bytes:
    """A key file's bytes, or (missing) random ones: explain creates no file."""
    try:
        return path.read_bytes()
    except OSError:
        return secrets.token_bytes(32)


def _verdict_row(run) -> dict:
    v = run.verdict
    if v is None:
        verdict, reason, reply = ("skipped" if run.mode == "off" else "inactive"), "", ""
    else:
        verdict, reason, reply = v.action, v.reason, "" if v.reply is None else str(v.reply)
        if run.mode == "monitor" and not v.accepted:
            verdict = f"would {v.action}"
    return {"stage": run.stage.value, "check": run.name, "mode": run.mode, "verdict": verdict,
            "reason": reason, "reply": reply, "ms": run.ms}


async def explain(config: Config, registry: Registry, *, message: bytes, client_ip: str,
                  mail_from: str, recipients: list[str], auth: str | None = None,
                  helo: str = "", tls: bool = False, at: dt.datetime | None = None
                  ) -> Explanation:
    from gateway.checks import CHECKS
    from gateway.checks.base import Deps
    from gateway.checks.pipeline import Pipeline
    from gateway.infra.clock import FakeClock, SystemClock
    from gateway.infra.dns import Resolver
    from gateway.engine import Client, Engine
    from gateway.policy.flags import FlagKeys, FlagStore
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.state import open_store
    from gateway.policy.throttles import Throttles

    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        raise BadInput(f"--client-ip {client_ip!r} is not an IP address") from None
    if not recipients:
        raise BadInput("at least one --rcpt is needed")
    clock = FakeClock(at) if at is not None else SystemClock()
    metrics = Metrics(CollectorRegistry())  # counted nowhere
    store = open_store(config.state.url, clock, config.base_dir)
    dns = Resolver(clock=clock, nameservers=config.dns.nameservers, timeout=config.dns.timeout,
                   cache_size=config.dns.cache_size, threads=config.dns.threads)
    hash_key = _secret(config.path(config.logging.hash_key_file))
    flags = FlagStore(store, FlagKeys(_secret(config.path(config.flags.key_file)),
                                      config.flags.subaddress_separator))
    deps = Deps(config=config, registry=registry, clock=clock, state=store, metrics=metrics,
                throttles=Throttles(store, clock, config.limits.throttle_refresh), dns=dns,
                recipient_key=hash_key, flags=flags)
    pipeline = Pipeline([c(deps) for c in CHECKS], deps)
    engine = Engine(config=config, registry=registry, pipeline=pipeline, clock=clock,
                    maillog=MailLog(hash_key), metrics=metrics)
    client = Client(session_id="explain", ip=ip, helo=helo, tls=tls, auth_user=auth)
    try:
        txn, decisions, result = await engine.explain(client, mail_from, recipients, message)
    finally:
        await dns.close()
        await store.close()
    out = Explanation(queue_id=txn.queue_id)
    out.checks = [_verdict_row(run) for run in txn.outcome.trace or []]
    for address in recipients:
        d = decisions.get(address)
        if d is not None:
            out.recipients.append({"address": address, "accepted": d.reply is None,
                                   "reason": d.reason, "reply": "" if d.reply is None
                                   else str(d.reply)})
    if txn.reply is not None:  # refused at MAIL
        out.decision = "defer" if txn.reply.code < 500 else "reject"
        out.reply = str(txn.reply)
    elif result is None:
        out.decision, out.reply = "no_recipients", "503 5.5.1 Error: need RCPT command"
    elif result.kind == "relay":
        kept = len(txn.ctx.recipients)
        dropped = f"; {len(result.dropped)} recipient(s) left out" if result.dropped else ""
        out.decision = "relay"
        out.reply = (f"campus mail's reply to the message, relayed to {kept} recipient(s)"
                     f"{dropped}")
    elif result.kind == "quarantine":
        out.decision = "quarantine"
        out.reply = f"250 2.0.0 Ok: queued as {txn.queue_id} (kept in the quarantine)"
    else:
        reply = result.reply
        out.decision = ("accept" if reply.ok else "defer" if reply.code < 500 else "reject")
        if reply.ok:  # every recipient left out: answered by the gateway, nothing relayed
            out.decision = "recipients_dropped"
        out.reply = str(reply)
    return out
