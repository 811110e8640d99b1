"""DNS for the checks: dnspython's asynchronous stub resolver behind one TTL-respecting cache.

One :class:`Resolver` is built at start-up (``[dns]`` in gateway.toml) and shared by every check
through ``Deps.dns``. Answers, including negative ones (NXDOMAIN, no data; RFC 2308 TTL from the
SOA), are cached until their TTL runs out on the gateway's clock; failures (timeout, SERVFAIL,
REFUSED) are not cached and raise :class:`DnsTempError`. Concurrent look-ups of the same name
and type share one query.

Code that can only resolve synchronously (pyspf) runs in the resolver's bounded thread pool via
:meth:`Resolver.in_thread`, and gets a blocking ``lookup`` function that hands each query back
to the event loop, so it shares the cache and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

if TYPE_CHECKING:
    from gateway.infra.clock import Clock
    from gateway.ops.metrics import Metrics

RDTYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "NS", "SOA", "SPF")
MAX_TTL = 86400
MAX_NEGATIVE_TTL = 3600


class DnsTempError(Exception):
    """The answer is unknown for now: timeout, SERVFAIL, REFUSED, no usable nameserver."""


class DnsNameError(ValueError):
    """The name cannot be put in a query (bad label, too long); treat it as non-existent."""


@dataclass(frozen=True)
class Answer:
    """The records of one name and type, as plain values.

    A/AAAA: address text; MX: (preference, exchange without final dot); TXT/SPF: tuple of the
    character-strings (bytes); PTR/CNAME/NS: target without final dot. ``nxdomain`` is set when
    the name does not exist; ``values`` is empty for both NXDOMAIN and no data.
    """

    values: tuple[Any, ...]
    nxdomain: bool = False
    ttl: int = 0

    @property
    def void(self) -> bool:
        return not self.values

    def txt(self) -> list[bytes]:
        """TXT records with their character-strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return [b"".join(v) for v in self.values]


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"2001:db8::53"`` or ``"[2001:db8::53]:5353"``."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]")
        port = port[1:] if port.startswith(":") else port
        if not sep or (port and not port.isdigit()):
            raise ValueError(f"{text!r}: expected [IPv6]:port")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError(f"{text!r}: bad port")
    else:
        host, port = text, ""
    ipaddress.ip_address(host)
    number = int(port) if port else 53
    if not 0 < number < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return host, number


def _value(rdata) -> Any:
    rdtype = rdata.rdtype
    if rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        return rdata.address
    if rdtype == dns.rdatatype.MX:
        return (rdata.preference, rdata.exchange.to_text(omit_final_dot=True))
    if rdtype in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return tuple(rdata.strings)
    if rdtype in (dns.rdatatype.PTR, dns.rdatatype.CNAME, dns.rdatatype.NS):
        return rdata.target.to_text(omit_final_dot=True)
    return rdata.to_text()


def _negative_ttl(response) -> int:
    try:
        return int(response.resolve_chaining().minimum_ttl)
    except Exception:  # no SOA or an odd response: a short default
        return 60


class Resolver:
    """The shared asynchronous resolver and cache. Build once; ``await close()`` at shutdown."""

    def __init__(self, *, clock: Clock, nameservers: tuple[str, ...] = (), timeout: float = 5.0,
                 cache_size: int = 10000, threads: int = 4, metrics: Metrics | None = None
                 ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.cache_size = cache_size
        self.metrics = metrics
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                           thread_name_prefix="dns-sync")
        self._config_error: str | None = None
        try:
            if nameservers:
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(n))
                                   for n in nameservers]
            else:
                res = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration as exc:
            res = dns.asyncresolver.Resolver(configure=False)
            self._config_error = f"no system resolver configuration ({exc})"
        res.cache = None  # this object caches, on the gateway's clock
        res.timeout = timeout
        res.lifetime = timeout
        res.retry_servfail = False
        res.use_edns(0, 0, 1232)
        self._res = res
        self.description = ("system resolver" if not nameservers
                            else ", ".join(nameservers))

    # --- asynchronous interface ----------------------------------------------------------

    async def query(self, name: str, rdtype: str) -> Answer:
        """The answer for ``name``/``rdtype``, from the cache when fresh."""
        key = (name.lower().rstrip("."), rdtype.upper())
        now = self.clock.monotonic()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                self._count("hit")
                return hit[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            self._count("miss")
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key))
            self._inflight[key] = task
            task.add_done_callback(lambda t, k=key: self._done(k, t))
        else:
            self._count("coalesced")
        # A requester that is cancelled (its client left) does not cancel the shared query.
        return await asyncio.shield(task)

    def _done(self, key: tuple[str, str], task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every requester has gone

    async def _fetch_and_store(self, key: tuple[str, str]) -> Answer:
        answer = await self._fetch(*key)
        self._store(key, answer)
        return answer

    async def txt(self, name: str) -> list[bytes]:
        return (await self.query(name, "TXT")).txt()

    async def _fetch(self, name: str, rdtype: str) -> Answer:
        if not name:
            raise DnsNameError("empty name")
        if self._config_error:
            raise DnsTempError(self._config_error)
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as exc:
            raise DnsNameError(f"{name!r}: {exc}") from None
        started = time.perf_counter()
        outcome = "ok"
        try:
            ans = await self._res.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            outcome = "nxdomain"
            try:
                response = exc.response(exc.qnames()[0])
            except Exception:
                response = None
            ttl = _negative_ttl(response) if response is not None else 60
            return Answer((), nxdomain=True, ttl=ttl)
        except dns.resolver.LifetimeTimeout:
            outcome = "timeout"
            raise DnsTempError(f"DNS timeout looking up {name} {rdtype}") from None
        except dns.resolver.NoNameservers as exc:
            outcome = "servfail"
            rcode = next((c for c in ("REFUSED", "SERVFAIL", "NOTIMP", "FORMERR")
                          if c in str(exc)), "an error")
            raise DnsTempError(f"DNS look-up of {name} {rdtype} failed: {rcode} from every "
                               "nameserver") from None
        except dns.exception.DNSException as exc:
            outcome = "error"
            raise DnsTempError(f"DNS error looking up {name} {rdtype}: {exc}") from None
        finally:
            if self.metrics is not None:
                self.metrics.dns_seconds.labels(rdtype, outcome).observe(
                    time.perf_counter() - started)
                if outcome in ("timeout", "servfail", "error"):
                    self.metrics.dns_failures.labels(outcome).inc()
        if ans.rrset is None:
            return Answer((), ttl=int(ans.chaining_result.minimum_ttl))
        values = tuple(_value(r) for r in ans.rrset)
        return Answer(values, ttl=int(ans.chaining_result.minimum_ttl))

    def _store(self, key: tuple[str, str], answer: Answer) -> None:
        limit = MAX_NEGATIVE_TTL if answer.void else MAX_TTL
        ttl = max(0, min(answer.ttl, limit))
        if ttl == 0 or self.cache_size <= 0:
            return
        self._cache[key] = (self.clock.monotonic() + ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.child(self.metrics.dns_cache, outcome).inc()

    # --- synchronous consumers -----------------------------------------------------------

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(lookup, *args)`` in the bounded pool; ``lookup(name, rdtype) -> Answer``
        blocks that worker thread (not the loop) while the loop resolves through the cache."""
        loop = asyncio.get_running_loop()
        wait = self.timeout + 5

        def lookup(name: str, rdtype: str) -> Answer:
            try:
                future = asyncio.run_coroutine_threadsafe(self.query(name, rdtype), loop)
            except RuntimeError as exc:  # the loop is closing
                raise DnsTempError(str(exc)) from None
            try:
                return future.result(wait)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise DnsTempError(f"DNS timeout looking up {name} {rdtype}") from None
            except concurrent.futures.CancelledError:
                raise DnsTempError(f"look-up of {name} {rdtype} cancelled") from None

        return await loop.run_in_executor(self._pool, fn, lookup, *args)

    # --- lifetime ------------------------------------------------------------------------

    def cache_len(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        self._cache.clear()

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
