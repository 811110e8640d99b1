#!/usr/bin/env python3
"""Sender-authentication cost per message (policy IV.B.3.c.iii), against a baseline measured in
the same run.

    python bench/auth_bench.py                   # 10 KB message, 2000 iterations, 5 rounds
    python bench/auth_bench.py -n 5000 --size 20000 --rounds 3

What is timed, per message, with the DNS answers already in the gateway's cache (the steady
state: a sender's SPF record and DKIM key are looked up once per TTL, not per message):

* baseline   the compat32 parse of the message that handle_DATA does for every message anyway;
* dkim-rsa   DkimVerifier.verify of one rsa-sha256 signature, 2048-bit key (dkimpy);
* dkim-ed    the same with an ed25519-sha256 signature (RFC 8463, PyNaCl);
* spf        check_spf for the MAIL FROM (pyspf in the resolver's thread pool, each of its
             look-ups handed back to the event loop and served from the cache);
* check      the whole sender_auth check: SPF + DKIM (rsa) + alignment + Authentication-Results.

The DNS answers come from a static table (the resolver's network fetch replaced), so nothing
leaves the process; the cache, the thread bridge and every check path are the real ones.
Each figure is the median over the rounds of (elapsed / iterations); the ratio is to baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import statistics
import subprocess
import sys
import tempfile
import time
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import dkim  # noqa: E402
import nacl.signing  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from gateway.checks.auth_dkim import DkimOptions, DkimVerifier  # noqa: E402
from gateway.checks.auth_spf import check_spf  # noqa: E402
from gateway.checks.base import Context, Deps  # noqa: E402
from gateway.checks.sender_auth import SenderAuth  # noqa: E402
from gateway.infra.clock import FakeClock  # noqa: E402
from gateway.infra.config import Config, ServerConfig  # noqa: E402
from gateway.infra.dns import Answer, Resolver  # noqa: E402
from gateway.ops.metrics import Metrics  # noqa: E402
from gateway.policy.senders import Sender  # noqa: E402

DOMAIN = "em.bench.example"


class StaticResolver(Resolver):
    """The real resolver and cache, with the network fetch answered from a table."""

    def __init__(self, table: dict[tuple[str, str], tuple], **kw) -> None:
        super().__init__(**kw)
        self.table = table

    async def _fetch(self, name: str, rdtype: str) -> Answer:
        values = self.table.get((name, rdtype))
        return Answer(values or (), nxdomain=values is None, ttl=3600)


def rsa_key() -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory() as d:
        key = Path(d) / "k.pem"
        subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(key), "2048"],
                       check=True, capture_output=True)
        der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return key.read_bytes(), base64.b64encode(der).decode()


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; policy IV.B.3.c.iii benchmark.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return (f"From: Bench <news@{DOMAIN}>\r\nTo: someone@example.edu\r\nSubject: bench\r\n"
            f"Date: Mon, 02 Nov 2026 15:00:00 +0000\r\nMessage-ID: <1@{DOMAIN}>\r\n"
            "List-Unsubscribe: <mailto:u@em.bench.example>\r\n\r\n").encode() + body


def sign(raw: bytes, selector: bytes, key: bytes, algorithm: bytes) -> bytes:
    return dkim.sign(raw, selector, DOMAIN.encode(), key, signature_algorithm=algorithm) + raw


async def timed(fn, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - started) / n


async def run(args) -> dict[str, list[float]]:
    pem, rsa_p = rsa_key()
    ed = nacl.signing.SigningKey.generate()
    ed_seed, ed_p = base64.b64encode(bytes(ed)), base64.b64encode(bytes(ed.verify_key)).decode()
    raw = message(args.size)
    rsa_signed = sign(raw, b"rsa", pem, b"rsa-sha256")
    ed_signed = sign(raw, b"ed", ed_seed, b"ed25519-sha256")
    table = {
        (DOMAIN, "TXT"): ((b"v=spf1 ip4:192.0.2.0/24 -all",),),
        (f"rsa._domainkey.{DOMAIN}", "TXT"): ((f"v=DKIM1; k=rsa; p={rsa_p}".encode(),),),
        (f"ed._domainkey.{DOMAIN}", "TXT"): ((f"v=DKIM1; k=ed25519; p={ed_p}".encode(),),),
    }
    clock = FakeClock()
    resolver = StaticResolver(table, clock=clock, metrics=Metrics(CollectorRegistry()))
    now = time.time()  # dkimpy's signatures carry the system time in t=
    opts = DkimOptions(now=now)
    verifier = DkimVerifier(resolver)
    sender = Sender(id="bench", organization="b", contact="c@bench.example",
                    networks=("192.0.2.0/24",), domains=(DOMAIN,),
                    return_path=(f"b-*@{DOMAIN}",), expires=clock.now().date())
    sender.validate("bench", "")
    config = Config(file=REPO / "gateway.toml", server=ServerConfig(hostname="gw.bench"))

    class NowClock(FakeClock):
        def now(self):
            import datetime as dt
            return dt.datetime.fromtimestamp(now, dt.timezone.utc)

    check = SenderAuth(Deps(config=config, registry=None, clock=NowClock(), state=None,
                            dns=resolver))
    parser = BytesParser(policy=compat32)

    def context() -> Context:
        ctx = Context(client_ip=ipaddress.ip_address("192.0.2.7"), helo="mta.bench.example",
                      mail_from=f"b-1@{DOMAIN}", recipients=["someone@example.edu"],
                      sender=sender, raw=rsa_signed, size=len(rsa_signed))
        ctx.message = parser.parsebytes(rsa_signed)
        return ctx

    settings_off_helo = check.Settings(check_helo=False)
    check.settings = lambda ctx: settings_off_helo  # the sender's table, without HELO

    async def baseline():
        parser.parsebytes(rsa_signed)

    async def dkim_rsa():
        [r] = await verifier.verify(rsa_signed, opts)
        assert r.result == "pass", r

    async def dkim_ed():
        [r] = await verifier.verify(ed_signed, opts)
        assert r.result == "pass", r

    async def spf():
        r = await check_spf(resolver, "192.0.2.7", f"b-1@{DOMAIN}", "mta.bench.example",
                            "mailfrom", "gw.bench", now, 20.0)
        assert r.result == "pass", r

    ctx = context()

    async def whole():
        verdict = await check.check(ctx)
        assert verdict.accepted, verdict

    cases = {"baseline": baseline, "dkim-rsa": dkim_rsa, "dkim-ed": dkim_ed, "spf": spf,
             "check": whole}
    for fn in cases.values():  # warm up: fill the cache, the pool, the PSL
        await timed(fn, 20)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            results[name].append(await timed(fn, args.n))
    await resolver.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="iterations per case per round")
    parser.add_argument("--size", type=int, default=10240, help="body bytes (default 10 KB)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    base = statistics.median(results["baseline"])
    print(f"{args.size}-byte body, {args.n} iterations x {args.rounds} rounds, median per message")
    print(f"{'case':<10} {'us/msg':>10} {'x baseline':>11}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<10} {median * 1e6:>10.1f} {median / base:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
