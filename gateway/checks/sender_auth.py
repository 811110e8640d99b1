"""Policy IV.B.3.c.iii: "Messages must pass authentication (SPF and/or DKIM) or they will be
subject to ... SPAM filtering rules, which may include messages dropping, quarantining or junk
mail routing."

Composes SPF (:mod:`auth_spf`, on MAIL FROM and HELO), DKIM (:mod:`auth_dkim`, every signature)
and alignment (:mod:`auth_alignment`): an identity passes only when its result is ``pass``, its
domain (MAIL FROM's for SPF, ``d=`` for DKIM) is one of the sender's registered ``domains`` and
it is aligned with the From: domain, itself a registered domain. ``require`` says which
identities must pass; ``on_fail`` what happens when they do not: ``reject`` (550 5.7.26 when both
fail, 5.7.23 SPF / 5.7.20 DKIM when the one required fails, RFC 7372), ``quarantine`` (250, kept
in the quarantine, not relayed) or ``tag`` (relayed with a junk header). A DNS failure that
leaves the outcome open defers (451 4.7.24 for SPF, 4.7.5 for DKIM keys). More than one From:
field, or one with several addresses, is rejected. Every relayed message gets an
Authentication-Results field (RFC 8601) for campus mail; incoming ones claiming our
authserv-id are removed. That alignment decision is reported as ``x-ecomm-alignment``.

DMARC (:mod:`auth_dmarc`, RFC 7489) is evaluated for every message, its record looked up
alongside SPF and DKIM, and reported as ``dmarc=<result> (p=<policy>) header.from=<domain>``,
counted (``gateway_auth_results_total{check="dmarc"}``) and, when fail or an error, logged
(``dmarc_result``). It refuses nothing unless ``dmarc = "pass"`` (globally or in the sender's
file): then a message that passed the checks above is still refused when DMARC does not pass
(``550 5.7.26`` fail, ``550 5.7.1`` no record / permerror, ``451 4.7.0`` temperror; ``on_fail``
and ``on_temperror`` apply as above).
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import structlog

from gateway.checks.auth_alignment import Aligner, FromError, author_domain, registered
from gateway.checks.auth_dkim import DkimResult, DkimVerifier
from gateway.checks.auth_dmarc import Discovery, DmarcResult, discover, evaluate
from gateway.checks.auth_results import HEADER, format_value
from gateway.checks.auth_spf import SpfResult, check_spf
from gateway.checks.base import Check, Context, Deps, Stage, Verdict, defer, reject
from gateway.checks.dkim_once import verified
from gateway.infra.config import CheckSettings
from gateway.message.replies import Reply
from gateway.infra.typed import ConfigError

log = structlog.get_logger("gateway.auth")

_HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}\Z")
State = Literal["pass", "temp", "fail"]


@dataclass(frozen=True)
class SenderAuthSettings(CheckSettings):
    require: Literal["spf_or_dkim", "dkim", "spf", "spf_and_dkim"] = "spf_or_dkim"
    on_fail: Literal["reject", "quarantine", "tag"] = "reject"
    on_temperror: Literal["defer", "fail"] = "defer"
    alignment: Literal["relaxed", "strict"] = "relaxed"
    junk_header: str = "X-Ecomm-Junk"
    junk_value: str = "yes"
    min_rsa_bits: int = 1024
    allow_body_length: bool = False
    max_signatures: int = 5
    clock_skew: int = 300
    check_helo: bool = True
    spf_time_limit: float = 20.0
    # DMARC (RFC 7489) is always evaluated and reported; "pass" also refuses mail that does not
    # pass it (550 5.7.26 fail, 550 5.7.1 no or malformed record, 451 4.7.0 look-up failure)
    dmarc: Literal["record", "pass"] = "record"

    def validate(self, file, prefix):
        if not _HEADER_NAME.match(self.junk_header):
            raise ConfigError(file, f"{prefix}.junk_header", "must be a header field name")
        if not self.junk_value or any(c in self.junk_value for c in "\r\n"):
            raise ConfigError(file, f"{prefix}.junk_value", "must be one non-empty line")
        if not 1024 <= self.min_rsa_bits <= 16384:
            raise ConfigError(file, f"{prefix}.min_rsa_bits", "must be 1024 to 16384 (RFC 8301 "
                                                              "forbids accepting smaller keys)")
        if not 1 <= self.max_signatures <= 50:
            raise ConfigError(file, f"{prefix}.max_signatures", "must be 1 to 50")
        if not 0 <= self.clock_skew <= 86400:
            raise ConfigError(file, f"{prefix}.clock_skew", "must be 0 to 86400 seconds")
        if self.spf_time_limit <= 0:
            raise ConfigError(file, f"{prefix}.spf_time_limit", "must be positive")


@dataclass(frozen=True)
class Judgement:
    """One identity's standing: pass (counts), temp (unknown for now) or fail, and why."""

    state: State
    why: str


class SenderAuth(Check):
    name = "sender_auth"
    stage = Stage.DATA
    description = "SPF and/or DKIM pass for a registered domain aligned with From: (IV.B.3.c.iii)"
    Settings = SenderAuthSettings

    def __init__(self, deps: Deps) -> None:
        super().__init__(deps)
        self.aligner: Aligner | None = None  # the Public Suffix List, loaded at first use
        self.dkim = DkimVerifier(deps.dns) if deps.dns is not None else None
        # SPF results that depend only on (client IP, domain): bulk mail repeats them for every
        # message (VERP return-paths differ only in the local part), so they are remembered for
        # a minute: HELO results always (the HELO identity has no other input), MAIL FROM ones
        # when the evaluation used no macro naming the local part, HELO name or time
        self._spf_memo: OrderedDict[tuple[str, str, str], tuple[float, SpfResult]] = \
            OrderedDict()

    def inherit(self, previous: SenderAuth) -> None:
        self.aligner, self._spf_memo = previous.aligner, previous._spf_memo
        if previous.dkim is not None and self.dkim is not None:
            self.dkim = previous.dkim  # its parsed keys

    async def check(self, ctx: Context) -> Verdict:
        s: SenderAuthSettings = self.settings(ctx)  # type: ignore[assignment]
        hostname = self.deps.config.server.hostname
        try:
            author = author_domain(ctx.message)
        except FromError as exc:
            self._count("alignment", "permerror", ctx)
            return reject(550, "5.7.1", f"{exc}; the author must be one registered address",
                          "from_header")
        if self.deps.dns is None or self.dkim is None:
            return defer(451, "4.3.0", "Sender authentication is unavailable (no resolver); "
                         "try again later", "auth_unavailable")
        if self.aligner is None:  # ~50 ms of parsing: off the loop, once
            aligner = await asyncio.to_thread(Aligner)
            self.aligner = self.aligner or aligner
        spf_mf, spf_helo, signatures, found = await self._gather(ctx, s, author)
        domains = ctx.sender.domains if ctx.sender is not None else ()
        author_ok = registered(author, domains)
        spf = self._judge_spf(spf_mf, author, author_ok, domains, s)
        dkim = self._judge_dkim(signatures, author, author_ok, domains, s)
        aligned = ("pass" if "pass" in (spf.state, dkim.state)
                   else "temperror" if "temp" in (spf.state, dkim.state) else "fail")
        self._count("spf", spf_mf.result, ctx)
        self._count("dkim", _dkim_summary(signatures), ctx)
        self._count("alignment", aligned, ctx)
        dmarc = evaluate(found, author, spf_mf, signatures, self.aligner, ctx.raw)
        self._count("dmarc", dmarc.result, ctx)
        if dmarc.result not in ("pass", "none"):  # (none: no record; counted, not logged)
            log.info("dmarc_result", sender=ctx.sender.id if ctx.sender else None,
                     domain=author, result=dmarc.result, policy=dmarc.policy,
                     disposition=dmarc.disposition, reason=dmarc.reason or None)
        note = f"{s.alignment} alignment; From: domain not registered" if not author_ok else \
            f"{s.alignment} alignment, registered domains"
        results = format_value(hostname, [spf_mf] + ([spf_helo] if spf_helo else []),
                               signatures, aligned, author, note, dmarc)
        ar = ((HEADER, results),)
        verdict = self._verdict(s, spf, dkim, ar, ctx)
        if s.dmarc == "pass" and verdict.action == "accept" and not verdict.reason \
                and dmarc.result != "pass":
            return self._dmarc_required(s, dmarc, ar, ctx)
        return verdict

    async def _gather(self, ctx: Context, s: SenderAuthSettings, author: str
                      ) -> tuple[SpfResult, SpfResult | None, list[DkimResult], Discovery]:
        now = self.deps.clock.now().timestamp()
        ip, receiver = str(ctx.client_ip), self.deps.config.server.hostname
        resolver = self.deps.dns
        mail_domain = ctx.mail_from.rpartition("@")[2].lower()
        mailfrom = self._memo("mailfrom", ip, mail_domain)
        helo = self._memo("helo", ip, ctx.helo.lower()) if s.check_helo else None
        jobs = [discover(resolver, author, self.aligner)]
        if mailfrom is None:
            jobs.append(check_spf(resolver, ip, ctx.mail_from, ctx.helo, "mailfrom", receiver,
                                  now, s.spf_time_limit))
        if s.check_helo and helo is None:
            jobs.append(check_spf(resolver, ip, ctx.mail_from, ctx.helo, "helo", receiver, now,
                                  s.spf_time_limit))
        # the look-ups run concurrently with the DKIM verification, which runs in this task: a
        # task less than gathering all (a gather of one job is its task; SPF, once remembered,
        # is seldom a job)
        loop = asyncio.get_running_loop()
        others = (loop.create_task(jobs[0]) if len(jobs) == 1
                  else asyncio.gather(*jobs))
        try:
            signatures = await verified(ctx, self.deps, self.dkim)
        except BaseException:
            others.cancel()
            raise
        done = await others
        found, *spf_done = [done] if len(jobs) == 1 else done
        if mailfrom is None:
            mailfrom = spf_done.pop(0)
            if mailfrom.per_domain:
                self._remember("mailfrom", ip, mail_domain, mailfrom)
        if s.check_helo and helo is None:
            helo = spf_done.pop(0)
            if helo.result != "temperror":
                self._remember("helo", ip, ctx.helo.lower(), helo)
        return mailfrom, helo, signatures, found

    SPF_MEMO_SECONDS = 60.0
    SPF_MEMO_ENTRIES = 4096

    def _memo(self, identity: str, ip: str, domain: str) -> SpfResult | None:
        hit = self._spf_memo.get((identity, ip, domain))
        if hit is None or self.deps.clock.monotonic() - hit[0] > self.SPF_MEMO_SECONDS:
            return None
        return hit[1]

    def _remember(self, identity: str, ip: str, domain: str, result: SpfResult) -> None:
        key = (identity, ip, domain)
        self._spf_memo[key] = (self.deps.clock.monotonic(), result)
        self._spf_memo.move_to_end(key)
        while len(self._spf_memo) > self.SPF_MEMO_ENTRIES:
            self._spf_memo.popitem(last=False)

    def _judge_spf(self, r: SpfResult, author: str, author_ok: bool, domains: tuple[str, ...],
                   s: SenderAuthSettings) -> Judgement:
        where = f"MAIL FROM domain {r.domain or '(none)'}"
        if r.result == "temperror":
            return Judgement("temp", f"SPF temperror for {where}: {r.explanation}")
        if r.result != "pass":
            detail = f": {r.explanation}" if r.explanation else ""
            return Judgement("fail", f"SPF {r.result} for {where}{detail}")
        if not registered(r.domain, domains):
            return Judgement("fail", f"SPF pass for {where}, which is not a registered domain "
                                     "of this sender")
        if not author_ok:
            return Judgement("fail", f"SPF pass for {where}, but From: domain {author} is not a "
                                     "registered domain of this sender")
        if not self.aligner.aligned(r.domain, author, s.alignment):
            return Judgement("fail", f"SPF pass for {where}, not aligned with From: domain "
                                     f"{author}")
        return Judgement("pass", f"SPF pass for {where}")

    def _judge_dkim(self, sigs: list[DkimResult], author: str, author_ok: bool,
                    domains: tuple[str, ...], s: SenderAuthSettings) -> Judgement:
        if not sigs:
            return Judgement("fail", "no DKIM signature")
        problems = []
        for r in sigs:
            label = f"DKIM signature d={r.domain or '?'} s={r.selector or '?'}"
            if r.result == "pass":
                if not registered(r.domain, domains):
                    problems.append(f"{label} passes but d= is not a registered domain of this "
                                    "sender")
                elif not author_ok:
                    problems.append(f"{label} passes but From: domain {author} is not a "
                                    "registered domain of this sender")
                elif not self.aligner.aligned(r.domain, author, s.alignment):
                    problems.append(f"{label} passes but is not aligned with From: domain "
                                    f"{author}")
                else:
                    return Judgement("pass", f"{label} passes")
            else:
                problems.append(f"{label}: {r.result}" + (f" ({r.reason})" if r.reason else ""))
        state: State = "temp" if any(r.result == "temperror" for r in sigs) else "fail"
        return Judgement(state, "; ".join(problems))

    def _verdict(self, s: SenderAuthSettings, spf: Judgement, dkim: Judgement,
                 ar: tuple[tuple[str, str], ...], ctx: Context) -> Verdict:
        needed = {"spf_or_dkim": [spf, dkim], "spf_and_dkim": [spf, dkim],
                  "spf": [spf], "dkim": [dkim]}[s.require]
        temp_fails = s.on_temperror == "fail"
        failed = [j for j in needed if j.state == "fail" or (j.state == "temp" and temp_fails)]
        passed = [j for j in needed if j.state == "pass"]
        if s.require == "spf_or_dkim":
            if passed:
                return Verdict("accept", headers=ar)
            settled = len(failed) == len(needed)  # every identity failed
        else:
            if len(passed) == len(needed):
                return Verdict("accept", headers=ar)
            settled = bool(failed)  # one required identity failed
        if not settled:  # what is missing is a DNS answer: try again later
            temp = [j for j in needed if j.state == "temp"]
            enhanced = "4.7.24" if any(j is spf for j in temp) else "4.7.5"
            why = "; ".join(j.why for j in temp)
            return Verdict("defer", Reply(451, enhanced, "Sender authentication could not be "
                                          f"completed: {why}; try again later"),
                           "auth_temperror", ar)
        if len(failed) == 2:
            enhanced, reason = "5.7.26", "spf_dkim_fail"
            text = f"SPF and DKIM authentication both failed: {spf.why}; {dkim.why}"
        elif failed[0] is spf:
            enhanced, reason = "5.7.23", "spf_fail"
            text = f"SPF authentication failed: {spf.why}"
        else:
            enhanced, reason = "5.7.20", "dkim_fail"
            text = f"No passing DKIM signature: {dkim.why}"
        return self._refuse(s, enhanced, reason, text[:900] + " (policy IV.B.3.c.iii)", ar, ctx)

    def _dmarc_required(self, s: SenderAuthSettings, r: DmarcResult,
                        ar: tuple[tuple[str, str], ...], ctx: Context) -> Verdict:
        """The sender must pass DMARC (``dmarc = "pass"``) and did not."""
        where = f"From: domain {r.domain}"
        if r.result == "temperror" and s.on_temperror == "defer":
            return Verdict("defer", Reply(451, "4.7.0", f"DMARC could not be evaluated for "
                                          f"{where}: {r.reason}"[:900] + "; try again later"),
                           "dmarc_temperror", ar)
        if r.result in ("fail", "temperror"):
            text = f"DMARC failed for {where} (p={r.policy}): {r.reason}"
            return self._refuse(s, "5.7.26", "dmarc_fail", text[:900] + " (RFC 7489)", ar, ctx)
        text = f"DMARC is required for this sender and {where} has none that applies: {r.reason}"
        return self._refuse(s, "5.7.1", f"dmarc_{r.result}", text[:900] + " (RFC 7489)", ar,
                            ctx)

    def _refuse(self, s: SenderAuthSettings, enhanced: str, reason: str, text: str,
                ar: tuple[tuple[str, str], ...], ctx: Context) -> Verdict:
        """``on_fail``: reject, quarantine or tag."""
        if s.on_fail == "quarantine":
            # the handler replies 250 with the queue id and keeps this text with the item
            return Verdict("quarantine", Reply(250, "2.0.0", text), reason, ar)
        if s.on_fail == "tag":
            if s.mode == "monitor":  # would tag: count it, add only the results
                log.info("auth_monitored", check=self.name, would="tag", reason=reason,
                         sender=ctx.sender.id if ctx.sender else None)
                if self.deps.metrics is not None:
                    self.deps.metrics.monitored.labels(self.name, "tag").inc()
                return Verdict("accept", headers=ar)
            return Verdict("accept", reason=f"{reason}_tagged",
                           headers=ar + ((s.junk_header, s.junk_value),))
        return Verdict("reject", Reply(550, enhanced, text), reason, ar)

    def _count(self, check: str, result: str, ctx: Context) -> None:
        if self.deps.metrics is not None:
            sender = ctx.sender.id if ctx.sender is not None else "unknown"
            metrics = self.deps.metrics
            metrics.child(metrics.auth_results, check, result, sender).inc()


def _dkim_summary(sigs: list[DkimResult]) -> str:
    if not sigs:
        return "none"
    results = [r.result for r in sigs]
    for r in ("pass", "temperror", "fail", "policy", "permerror", "neutral"):
        if r in results:
            return r
    return results[0]
