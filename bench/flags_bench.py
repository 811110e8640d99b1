#!/usr/bin/env python3
"""Recipient flags benchmark: what looking up 20 recipients' flags costs, against the cost of a
message through the gateway, measured in the same run, with 500,000 flagged addresses loaded.

    python bench/flags_bench.py                       # SQLite state, 500,000 flagged
    python bench/flags_bench.py --redis               # also Redis (a redis-server on loopback)
    python bench/flags_bench.py --flagged 100000 -n 500

Per backend:

1. load: ``--flagged`` addresses are swapped in with ``flag_replace`` (60 % ferpa, 20 %
   do_not_email, 20 % sender-scoped opt_out), as ``gateway flags import --replace`` does;
2. the look-up alone: ``FlagStore.lookup`` of 20 recipients (a quarter of them flagged) against
   every set that applies to the sender (one round trip), ``--lookups`` times in a row: wall time
   and CPU (the whole process: event loop and SQLite worker thread) per look-up;
3. the baseline: the gateway as its own process (``python -m gateway serve``) relaying
   ``-n`` messages of 20 recipients each from ``-c`` concurrent sessions to an aiosmtpd sink
   process, with ``checks.recipient_flags`` off: wall time per message (1 / throughput) and the
   gateway process's CPU per message (from /proc);
4. the same with the check on (recipients not flagged, so both runs relay the same mail): the
   end-to-end difference, a cross-check (noisier than 2. against 3.). Runs of 3. and 4. are
   alternated ``--rounds`` times and averaged, each with a sender of its own.

The figure asked for is 2. against 3.: the look-up's CPU per message as a share of the gateway's
CPU per message (the gateway is one event loop: its CPU per message is what bounds throughput),
and the look-up's wall time as a share of the wall time per message. No assertion is made here:
the numbers are printed. Everything binds 127.0.0.1 and lives in a temporary directory removed
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SENDER = """\
id = "{id}"
organization = "Flags benchmark"
contact = "postmaster@bench.example"
networks = ["127.0.0.1/32"]
domains = ["em.bench.example"]
return_path = ["bounce-*@em.bench.example"]
expires = 2099-12-31
"""
RCPTS = 20
MESSAGE = (b"From: Bench <news@em.bench.example>\r\nTo: Students <list@example.edu>\r\n"
           b"Subject: Benchmark\r\nMessage-ID: <%d@em.bench.example>\r\n"
           b"List-Unsubscribe: <https://em.bench.example/u/1>\r\n"
           b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
           b"\r\n" + b"Benchmark body line of text.\r\n" * 60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flagged(i: int) -> str:
    return f"flagged{i}@example.edu"


def unflagged(i: int) -> str:
    return f"student{i}@example.edu"


# --- the sink (child process) -------------------------------------------------------------------

def run_sink(port: int) -> None:
    from aiosmtpd.smtp import SMTP

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok"

    async def main():
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: SMTP(Sink(), hostname="sink.bench"), "127.0.0.1", port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    asyncio.run(main())


# --- phases ---------------------------------------------------------------------------------------

def write_config(base: Path, state_url: str, smtp: int, admin: int, sink: int,
                 check: str, sender: str = "bench") -> Path:
    """The gateway's configuration, with one registered sender ``sender`` (each gateway run has
    its own, so that no run inherits another's rate-limit window or audience counts)."""
    senders = base / "senders"
    shutil.rmtree(senders, ignore_errors=True)
    senders.mkdir(parents=True)
    (senders / f"{sender}.toml").write_text(SENDER.format(id=sender))
    path = base / "gateway.toml"
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{smtp}"]
[admin]
listen = "127.0.0.1:{admin}"
[upstream]
url = "smtp://127.0.0.1:{sink}"
starttls = "off"
[state]
url = "{state_url}"
[senders]
dir = "senders"
[limits]
sender_rate = "100000000/minute"
allow_above_policy = true
[logging]
level = "info"
[checks.sender_auth]
mode = "off"
[checks.recipient_flags]
mode = "{check}"
""")
    return path


async def load(config, count: int) -> float:
    from gateway.infra.clock import SystemClock
    from gateway.policy.flags import OPT_OUT, Scope, open_flags, set_name
    from gateway.state import open_store

    flags = open_flags(config, open_store(config.state.url, SystemClock(), config.base_dir))
    started = time.perf_counter()
    shares = [("ferpa", 0.6), ("do_not_email", 0.2),
              (set_name(OPT_OUT, Scope("sender", "bench")), 0.2)]
    first = 0
    for name, share in shares:
        n = int(count * share)
        await flags.replace(name, (flags.member(flagged(i)) for i in range(first, first + n)))
        first += n
    elapsed = time.perf_counter() - started
    await flags.store.close()
    return elapsed


async def lookups(config, count: int, total_flagged: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per look-up of 20 recipients."""
    from gateway.infra.clock import SystemClock
    from gateway.policy.flags import open_flags, sets_for
    from gateway.policy.senders import load_registry
    from gateway.state import open_store

    registry = load_registry(config.path(config.senders.dir), config.checks,
                             config.limits.ceiling)
    names = sets_for(registry.by_id["bench"])
    flags = open_flags(config, open_store(config.state.url, SystemClock(), config.base_dir))
    rng = random.Random(7)
    batches = [[flagged(rng.randrange(total_flagged)) if j % 4 == 0 else
                unflagged(rng.randrange(10**6)) for j in range(RCPTS)] for _ in range(count)]
    for batch in batches[:50]:  # warm the cache and the connection
        await flags.lookup(batch, names, parsed=True)
    wall, cpu = time.perf_counter(), time.process_time()
    hits = 0
    for batch in batches:  # as the check does it: hashing included, addresses already parsed
        hits += len(await flags.lookup(batch, names, parsed=True))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert hits >= count * RCPTS // 4, "the flagged recipients were not found"
    await flags.store.close()
    return wall / count, cpu / count


async def drive(port: int, n: int, c: int) -> tuple[float, int]:
    """Send n messages of 20 recipients from c sessions; (seconds, failures)."""
    import aiosmtplib

    failures = 0
    seq = iter(range(10**9))

    async def session(count: int):
        nonlocal failures
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60,
                                 local_hostname="load.bench", start_tls=False)
        await client.connect()
        for _ in range(count):
            k = next(seq)
            try:
                await client.mail(f"bounce-{k}@em.bench.example")
                for j in range(RCPTS):
                    await client.rcpt(unflagged((k * RCPTS + j) % 5000))
                await client.data(MESSAGE % k)
            except aiosmtplib.SMTPException:
                failures += 1
                await client.rset()
        await client.quit()

    counts = [n // c + (1 if i < n % c else 0) for i in range(c)]
    await asyncio.gather(*(session(1) for _ in range(c)))  # warm-up: pool connections
    started = time.perf_counter()
    await asyncio.gather(*(session(k) for k in counts))
    return time.perf_counter() - started, failures


def gateway_run(base: Path, state_url: str, sink: int, check: str, n: int, c: int,
                sender: str) -> tuple[float, float, int]:
    """(wall seconds per message, gateway CPU seconds per message, failures)."""
    smtp, admin = free_port(), free_port()
    write_config(base, state_url, smtp, admin, sink, check, sender)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                             str(base / "gateway.toml")], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"gateway did not start: {proc.communicate()[1].decode()}")
                time.sleep(0.1)
        cpu0 = cpu_of(proc.pid)
        elapsed, failures = asyncio.run(drive(smtp, n, c))
        cpu = cpu_of(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return elapsed / n, cpu / n, failures


def bench_backend(label: str, state_url: str, base: Path, sink: int, args) -> None:
    from gateway.infra.config import load_config

    path = write_config(base, state_url, 0, 0, sink, "enforce")
    config = load_config(path)
    print(f"\n== {label}: {args.flagged:,} flagged addresses, {RCPTS} recipients a message")
    seconds = asyncio.run(load(config, args.flagged))
    print(f"load (replace, {args.flagged:,} members)        {seconds:8.2f} s")
    lookup_wall, lookup_cpu = asyncio.run(lookups(config, args.lookups, args.flagged))
    runs: dict[str, list[tuple[float, float, int]]] = {"off": [], "enforce": []}
    for r in range(args.rounds):  # alternated, each run with its own sender
        for check in ("off", "enforce"):
            runs[check].append(gateway_run(base, state_url, sink, check, args.n, args.c,
                                           f"bench-{check}-{r}"))

    def mean(check, i):
        return sum(run[i] for run in runs[check]) / len(runs[check])

    off_wall, off_cpu, on_wall, on_cpu = (mean("off", 0), mean("off", 1), mean("enforce", 0),
                                          mean("enforce", 1))
    failed = sum(run[2] for check in runs for run in runs[check])
    if failed:
        print(f"WARNING: {failed} messages failed")
    ms = 1000
    print(f"look-up of {RCPTS} recipients, one round trip   wall {lookup_wall * ms:8.3f} ms   "
          f"cpu {lookup_cpu * ms:8.3f} ms")
    print(f"baseline per message (check off, c={args.c:<3})   wall {off_wall * ms:8.3f} ms   "
          f"cpu {off_cpu * ms:8.3f} ms   ({1 / off_wall:,.0f} msg/s)")
    print(f"ratio look-up / baseline                      wall {lookup_wall / off_wall:8.1%}"
          f"      cpu {lookup_cpu / off_cpu:8.1%}   (target: under 5 %)")
    print(f"cross-check: per message with the check on    wall {on_wall * ms:8.3f} ms   "
          f"cpu {on_cpu * ms:8.3f} ms   ({1 / on_wall:,.0f} msg/s; "
          f"{on_cpu / off_cpu - 1:+.1%} cpu, {off_wall / on_wall - 1:+.1%} throughput)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagged", type=int, default=500_000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("-n", type=int, default=1000, help="messages per gateway run")
    parser.add_argument("-c", type=int, default=10, help="concurrent SMTP sessions")
    parser.add_argument("--rounds", type=int, default=2, help="gateway runs with the check "
                        "off and on, alternated; the means are shown")
    parser.add_argument("--redis", action="store_true", help="also measure Redis state "
                        "(starts redis-server on loopback)")
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink)
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="flags-bench-"))
    procs = []
    try:
        sink = free_port()
        procs.append(subprocess.Popen([sys.executable, __file__, "--sink", str(sink)]))
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", sink), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        bench_backend("SQLite", "sqlite:state.sqlite3", tmp / "sqlite", sink, args)
        if args.redis:
            if shutil.which("redis-server") is None:
                print("redis-server is not installed: Redis skipped")
            else:
                port = free_port()
                procs.append(subprocess.Popen(
                    ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                     "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL))
                time.sleep(0.5)
                bench_backend("Redis", f"redis://127.0.0.1:{port}/0", tmp / "redis", sink, args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
