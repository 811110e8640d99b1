"""The shared resolver (gateway/infra/dns.py) against a real Knot DNS server: TTL-respecting cache on
the gateway's clock, negative caching, failures not cached, concurrent look-ups coalesced, the
thread bridge for pyspf, metrics, and the [dns] configuration."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from prometheus_client import CollectorRegistry

from gateway.infra.clock import FakeClock
from gateway.infra.config import load_config
from gateway.infra.dns import DnsTempError, Resolver, parse_nameserver
from gateway.ops.metrics import Metrics
from gateway.infra.typed import ConfigError
from tests.dns_server import KNOTD, SKIP_REASON, KnotServer, SilentNameserver, txt, zone_text

needs_knot = pytest.mark.skipif(KNOTD is None, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def knot(tmp_path_factory):
    if KNOTD is None:
        pytest.skip(SKIP_REASON)
    server = KnotServer(tmp_path_factory.mktemp("knot"), {"dns.test": zone_text("dns.test", [
        ("short 30", "TXT", txt("thirty seconds")),
        ("long", "TXT", txt("five minutes")),
        ("multi", "TXT", '"part one " "part two"'),
        ("mail", "MX", "10 mx.dns.test."),
        ("mx", "A", "192.0.2.25"),
        ("mx", "AAAA", "2001:db8::25"),
        ("alias", "CNAME", "long.dns.test."),
    ], ttl=300, negative_ttl=60)})
    yield server
    server.stop()


class Setup:
    def __init__(self, knot=None, nameservers=None, **kw):
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.resolver = Resolver(clock=self.clock, metrics=self.metrics,
                                 nameservers=nameservers or (knot.address,), **kw)

    def cache(self, outcome: str) -> float:
        return self.registry.get_sample_value("gateway_dns_cache_lookups_total",
                                              {"outcome": outcome}) or 0.0


@pytest.fixture
async def setup(knot):
    s = Setup(knot, timeout=2.0)
    yield s
    await s.resolver.close()


@needs_knot
async def test_answers_are_cached_for_their_ttl(setup):
    res = setup.resolver
    assert (await res.txt("long.dns.test")) == [b"five minutes"]
    assert (await res.txt("LONG.dns.test.")) == [b"five minutes"]
    assert (setup.cache("miss"), setup.cache("hit")) == (1, 1)
    setup.clock.advance(299)
    await res.txt("long.dns.test")
    assert setup.cache("miss") == 1
    setup.clock.advance(2)
    await res.txt("long.dns.test")
    assert setup.cache("miss") == 2


@needs_knot
async def test_each_record_keeps_its_own_ttl(setup):
    res = setup.resolver
    answer = await res.query("short.dns.test", "TXT")
    assert answer.ttl == 30
    setup.clock.advance(31)
    await res.query("short.dns.test", "TXT")
    assert setup.cache("miss") == 2


@needs_knot
async def test_negative_answers_are_cached_for_the_soa_minimum(setup):
    res = setup.resolver
    nx = await res.query("nothing.dns.test", "TXT")
    assert (nx.values, nx.nxdomain, nx.ttl) == ((), True, 60)
    nodata = await res.query("long.dns.test", "MX")
    assert (nodata.values, nodata.nxdomain) == ((), False)
    setup.clock.advance(59)
    await res.query("nothing.dns.test", "TXT")
    assert setup.cache("miss") == 2
    setup.clock.advance(2)
    await res.query("nothing.dns.test", "TXT")
    assert setup.cache("miss") == 3


@needs_knot
async def test_values_by_type(setup):
    res = setup.resolver
    assert (await res.query("mail.dns.test", "MX")).values == ((10, "mx.dns.test"),)
    assert (await res.query("mx.dns.test", "A")).values == ("192.0.2.25",)
    assert (await res.query("mx.dns.test", "AAAA")).values == ("2001:db8::25",)
    assert await res.txt("multi.dns.test") == [b"part one part two"]
    assert await res.txt("alias.dns.test") == [b"five minutes"]  # CNAME followed


@needs_knot
async def test_refused_is_a_temporary_error_and_not_cached(setup):
    res = setup.resolver
    for _ in range(2):
        with pytest.raises(DnsTempError, match="REFUSED"):
            await res.txt("elsewhere.test")
    assert setup.cache("miss") == 2 and res.cache_len() == 0


async def test_silent_server_times_out_as_temporary_error():
    silent = SilentNameserver()
    s = Setup(nameservers=(silent.address,), timeout=0.3)
    try:
        with pytest.raises(DnsTempError, match="timeout"):
            await s.resolver.txt("anything.test")
    finally:
        await s.resolver.close()
        silent.close()
    assert s.registry.get_sample_value("gateway_dns_query_seconds_count",
                                       {"qtype": "TXT", "outcome": "timeout"}) == 1


@needs_knot
async def test_concurrent_lookups_share_one_query(setup):
    answers = await asyncio.gather(*(setup.resolver.txt("long.dns.test") for _ in range(5)))
    assert answers == [[b"five minutes"]] * 5
    assert (setup.cache("miss"), setup.cache("coalesced")) == (1, 4)


@needs_knot
async def test_a_cancelled_requester_does_not_cancel_the_shared_query(setup):
    first = asyncio.ensure_future(setup.resolver.txt("long.dns.test"))
    second = asyncio.ensure_future(setup.resolver.txt("long.dns.test"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == [b"five minutes"]


@needs_knot
async def test_cache_is_bounded(knot):
    s = Setup(knot, cache_size=2)
    try:
        for name in ("long", "short", "multi"):
            await s.resolver.txt(f"{name}.dns.test")
        assert s.resolver.cache_len() == 2
        await s.resolver.txt("long.dns.test")  # the oldest was dropped
        assert s.cache("miss") == 4
    finally:
        await s.resolver.close()


@needs_knot
async def test_blocking_consumers_resolve_through_the_loop(setup):
    def work(lookup, name):
        return lookup(name, "TXT").txt()

    assert await setup.resolver.in_thread(work, "long.dns.test") == [b"five minutes"]
    assert await setup.resolver.txt("long.dns.test") == [b"five minutes"]
    assert setup.cache("hit") == 1  # the thread's look-up filled the shared cache


def test_parse_nameserver():
    assert parse_nameserver("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_nameserver("192.0.2.53:5353") == ("192.0.2.53", 5353)
    assert parse_nameserver("2001:db8::53") == ("2001:db8::53", 53)
    assert parse_nameserver("[2001:db8::53]:5353") == ("2001:db8::53", 5353)
    for bad in ("resolver.example", "192.0.2.53:x", "192.0.2.53:70000", "[2001:db8::53"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_dns_config_section(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(textwrap.dedent("""\
        [dns]
        nameservers = ["192.0.2.53", "[2001:db8::53]:5353"]
        timeout = 2.5
        """))
    config = load_config(path)
    assert config.dns.nameservers == ("192.0.2.53", "[2001:db8::53]:5353")
    assert (config.dns.timeout, config.dns.cache_size, config.dns.threads) == (2.5, 10000, 4)
    path.write_text('[dns]\nnameservers = ["ns.example"]\n')
    with pytest.raises(ConfigError, match=r"dns\.nameservers\[0\]"):
        load_config(path)
    path.write_text("[dns]\ntimeout = 0\n")
    with pytest.raises(ConfigError, match=r"dns\.timeout: must be positive"):
        load_config(path)
