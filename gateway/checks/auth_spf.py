"""Policy IV.B.3.c.iii (SPF half): RFC 7208 ``check_host()`` by pyspf, on the shared resolver.

pyspf resolves synchronously, so an evaluation runs in the resolver's bounded thread pool; every
DNS query it makes goes back to the event loop through :meth:`gateway.infra.dns.Resolver.in_thread`
(shared TTL cache, no blocking of the loop). pyspf keeps the RFC 7208 section 4.6.4 limits: at
most 10 DNS-querying terms (include, a, mx, ptr, exists, redirect), 10 MX/PTR names each, two
void look-ups; exceeding one is ``permerror``. A DNS failure is ``temperror``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

import spf
import structlog

from gateway.infra.dns import Answer, DnsNameError, DnsTempError
from gateway.message.address import valid_domain

if TYPE_CHECKING:
    from gateway.infra.dns import Resolver

log = structlog.get_logger("gateway.auth")

SpfResultName = Literal["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
Identity = Literal["mailfrom", "helo"]
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_MACRO = re.compile(r"%\{([A-Za-z])")


def printable(text: str, limit: int = 200) -> str:
    """Text from DNS or a message, safe for an SMTP reply or a header comment."""
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


@dataclass(frozen=True)
class SpfResult:
    identity: Identity
    domain: str  # the domain checked: MAIL FROM's, or the HELO name
    result: SpfResultName
    explanation: str = ""  # pyspf's reason or the domain's exp= text, printable
    # the evaluation used no macro naming the sender's local part, the HELO name or the time, so
    # the same client IP and domain give the same result (see sender_auth's SPF memo)
    per_domain: bool = field(default=False, compare=False)


class _Query(spf.query):
    """pyspf's query with its DNS replaced: each look-up goes to ``lookup`` (the shared async
    resolver, called from this worker thread), and a deadline bounds the whole evaluation."""

    def __init__(self, lookup: Callable[[str, str], Answer], deadline: float, **kw) -> None:
        super().__init__(**kw)
        self._lookup = lookup
        self._deadline = deadline
        self.per_domain = True  # until a macro says otherwise

    def expand(self, s, stripdot=True):
        # %{d} %{o} (the domain), %{i} %{c} %{v} (the client IP) keep a result a function of
        # (IP, domain); %{s} %{l} %{h} %{p} %{r} %{t} do not
        if any(m.lower() not in "dociv" for m in _MACRO.findall(s)):
            self.per_domain = False
        return super().expand(s, stripdot)

    def dns(self, name, qtype, cnames=None, ignore_void=False):  # noqa: D401 - pyspf's interface
        if not name:
            raise spf.PermError("Invalid query: empty name")
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a valid DNS name: no data (RFC 7208 4.3, 4.8)
        name = name.lower()
        key = (name, qtype)
        result = self.cache.get(key)
        if result is None:
            if time.monotonic() > self._deadline:
                raise spf.TempError("SPF evaluation exceeded its time limit")
            try:
                answer = self._lookup(name, qtype)
            except DnsTempError as exc:
                raise spf.TempError(str(exc)) from None
            except DnsNameError:
                answer = Answer(())
            result = list(answer.values)
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError("Void lookup limit of %d exceeded" % spf.MAX_VOID_LOOKUPS)
        return result


def _domain_of(mail_from: str, helo: str) -> str:
    return mail_from.rpartition("@")[2].lower() if mail_from else helo.lower()


def evaluate(lookup: Callable[[str, str], Answer], ip: str, mail_from: str, helo: str,
             identity: Identity, receiver: str, now: float, time_limit: float) -> SpfResult:
    """check_host() for one identity, synchronously (run it in the resolver's pool).

    ``identity="helo"`` checks the HELO name (RFC 7208 2.3), ``"mailfrom"`` the MAIL FROM (or
    postmaster@HELO for the null reverse-path, 2.4). ``now`` feeds the %{t} macro.
    """
    sender = mail_from if identity == "mailfrom" else ""
    domain = _domain_of(sender, helo)
    if not valid_domain(domain.rstrip(".")):
        # RFC 7208 4.3: malformed, an address literal or not a multi-label domain name:
        # "none", without a DNS query
        return SpfResult(identity, domain, "none", "not a fully qualified domain name")
    q = _Query(lookup, time.monotonic() + time_limit, i=ip, s=sender, h=helo,
               receiver=receiver, strict=True, timeout=time_limit)
    q.t = str(int(now))
    try:
        result, _code, explanation = q.check()
    except Exception as exc:  # pyspf internals (recursion guard, odd input): not retryable
        log.warning("spf_internal_error", domain=domain, error=repr(exc))
        return SpfResult(identity, domain, "permerror", printable(f"SPF evaluation failed: {exc}"))
    if result not in ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"):
        result = "permerror"
    if explanation == spf.EXPLANATIONS.get(result):
        explanation = ""  # pyspf's generic text says nothing the result does not
    return SpfResult(identity, domain, result, printable(explanation or ""),
                     per_domain=q.per_domain and result not in ("temperror",))


async def check_spf(resolver: Resolver, ip: str, mail_from: str, helo: str,
                    identity: Identity, receiver: str, now: float,
                    time_limit: float) -> SpfResult:
    """:func:`evaluate` in the resolver's thread pool."""
    if identity == "helo" and not helo:
        return SpfResult("helo", "", "none", "no HELO name")
    return await resolver.in_thread(evaluate, ip, mail_from, helo, identity, receiver, now,
                                    time_limit)
