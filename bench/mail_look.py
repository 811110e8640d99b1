#!/usr/bin/env python3
"""The rate check's MAIL half with and without its look at the store skipped while the room is
known (gateway.state.rooms, issue #14), in one process and one run.

    .venv-test/bin/python bench/mail_look.py            # about 10 s
    .venv-test/bin/python bench/mail_look.py -n 20000 --rounds 7

A registered sender relaying 500 messages a second (a fake clock, 2 ms a message) under limits
raised so that they never bind (sender 10^6/minute, gateway-wide 10^6/minute), on a real
SQLite store (WAL, as the gateway opens it): each message is the MAIL half's check then the
DATA half's (the admission), as the SMTP front runs them. "before" is the MAIL half as it was
(always ``Store.peek``, the code kept verbatim below); "after" is this tree's. Process CPU time
(``time.process_time``) of ``-n`` messages, the two alternating for ``--rounds`` rounds;
prints each one's median µs per message, for the MAIL half alone and for both halves, and the
median of the rounds' ratios after / before. No network, no gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.checks.base import ACCEPT, Context, Deps
from gateway.checks.rate_limit import RateLimit, RateLimitAtMail
from gateway.infra.clock import FakeClock
from gateway.infra.config import load_config
from gateway.policy.senders import load_registry
from gateway.state import StoreError
from gateway.state.sqlite import SQLiteStore

CONFIG = """[limits]
sender_rate = "1000000/minute"
allow_above_policy = true
global_rate = "1000000/minute"
[senders]
dir = "senders"
"""
SENDER = """id = "bench"
organization = "Bench"
contact = "postmaster@bench.example"
networks = ["127.0.0.1/32"]
domains = ["em.bench.example"]
return_path = ["bounce-*@em.bench.example"]
expires = 2099-12-31
"""


class Before(RateLimitAtMail):
    async def check(self, ctx: Context):  # the MAIL half before gateway.state.rooms
        try:
            sender_id, budget, _ = await self.budget(ctx)
            now = self.deps.clock.now().timestamp()
            admission = await self.deps.state.peek([limit for limit, _, _ in budget], now)
        except StoreError:
            return ACCEPT
        if admission.wait > self.max_hold:
            _, kind, rate = budget[admission.limit]
            return self._deferred(sender_id, rate, kind, admission.wait, count=not ctx.dry_run)
        return ACCEPT


async def run(args, base: Path) -> None:
    (base / "senders").mkdir()
    (base / "senders" / "bench.toml").write_text(SENDER)
    (base / "gateway.toml").write_text(CONFIG)
    config = load_config(base / "gateway.toml")
    registry = load_registry(base / "senders", config.checks, config.limits.ceiling)
    clock = FakeClock()
    store = SQLiteStore(base / "state.sqlite3", clock)
    deps = Deps(config=config, registry=registry, clock=clock, state=store)
    halves = {"before": Before(deps), "after": RateLimitAtMail(deps)}
    data = RateLimit(deps)
    ctx = Context(client_ip=ipaddress.ip_address("127.0.0.1"),
                  mail_from="bounce-1@em.bench.example",
                  recipients=["alice@example.edu"], sender=registry.senders[0])

    async def messages(mail, n: int) -> tuple[float, float]:
        """CPU seconds of n messages: the MAIL half's alone, and both halves'."""
        mail_cpu = total = 0.0
        for _ in range(n):
            clock.advance(0.002)
            t0 = time.process_time()
            assert (await mail.check(ctx)).accepted
            t1 = time.process_time()
            assert (await data.check(ctx)).accepted
            t2 = time.process_time()
            mail_cpu += t1 - t0
            total += t2 - t0
        return mail_cpu, total

    for mail in halves.values():
        await messages(mail, 1000)  # warm-up: the file, the statements' cache
    figures = {name: {"mail": [], "both": []} for name in halves}
    ratios = {"mail": [], "both": []}
    for _ in range(args.rounds):
        got = {}
        for name, mail in halves.items():
            got[name] = await messages(mail, args.n)
            figures[name]["mail"].append(got[name][0] / args.n * 1e6)
            figures[name]["both"].append(got[name][1] / args.n * 1e6)
        ratios["mail"].append(got["after"][0] / got["before"][0])
        ratios["both"].append(got["after"][1] / got["before"][1])
    await store.close()
    for name in halves:
        print(f"{name:7} MAIL half {statistics.median(figures[name]['mail']):7.1f} µs/msg   "
              f"MAIL + DATA halves {statistics.median(figures[name]['both']):7.1f} µs/msg")
    print(f"after / before: MAIL half {statistics.median(ratios['mail']):.3f}   "
          f"both halves {statistics.median(ratios['both']):.3f}   "
          f"(median of {args.rounds} rounds of {args.n})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10000, help="messages a round (10000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
