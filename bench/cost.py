#!/usr/bin/env python3
"""What a message costs the gateway, against a bare aiosmtpd sink, all measured in one run.

    .venv-test/bin/python bench/cost.py            # the figures of issue #14, about 2 minutes
    .venv-test/bin/python bench/cost.py -n 3000 --idle 10000 --event-loop asyncio

One command prints:

* CPU per message (process CPU time, utime + stime from /proc/PID/stat, never wall clock) of
  - the baseline: a bare aiosmtpd sink receiving the messages directly;
  - the gateway relaying them to that sink (every check on, SQLite state, info logging);
  - the gateway deferring them for the sender's rate (the same configuration, the sender over
    its rate: each message is refused 451 4.7.1, at MAIL since the early refusal);
  and the ratios relayed / sink and deferred / relayed;
* the latency the gateway adds at a fixed, paced 100 messages a second (open loop: latency is
  from each message's scheduled start to the reply to its final dot), p50 and p99, as the
  gateway's percentile less the direct one;
* the gateway's resident memory with 10,000 idle sessions (connected, greeted, EHLO said).

Messages: 10 KB, DKIM-signed (RSA-2048, signed before anything is timed) by a registered
sender, 10 sessions that keep their connections (``-c``). The machine may be shared: quote the
ratios, which compare processes measured in the same run. Everything is on 127.0.0.1, every
child process is stopped at the end, and the run is capped by ``--time-limit``.

Exit status 0; 2 when a phase failed (unexpected replies, a timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the sink, DNS, DKIM signing and gateway start-up)

HOST = tp.HOST
DEFERRED = b"4.7.1 Sending rate of sender bench is limited to"


def raise_nofile() -> int:
    """The soft open-files limit raised to the hard one (inherited by the children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------------
# The load generator (child process): relay, defer or paced mode
# ------------------------------------------------------------------------------------------

def run_load(args) -> int:
    import pickle

    import aiosmtplib

    messages: list[bytes] = pickle.loads(Path(args.messages).read_bytes())
    result: dict = {"ok": 0, "unexpected": 0, "errors": [], "latencies": [], "timed_out": False}
    seq = iter(range(10**9))

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def unexpected(what: str) -> None:
        result["unexpected"] += 1
        if len(result["errors"]) < 5:
            result["errors"].append(what)

    async def one(client: aiosmtplib.SMTP, counted: bool, scheduled: float | None = None) -> None:
        n = next(seq)
        started = scheduled if scheduled is not None else time.perf_counter()
        try:
            if args.mode == "defer":
                try:
                    await client.mail(f"bounce-{n}@{tp.SENDER_DOMAIN}")
                except aiosmtplib.SMTPSenderRefused as exc:
                    if exc.code == 451 and exc.message.encode().startswith(DEFERRED):
                        if counted:
                            result["ok"] += 1
                        return
                    raise
                unexpected("MAIL was accepted")
                await client.rset()
                return
            await client.mail(f"bounce-{n}@{tp.SENDER_DOMAIN}")
            await client.rcpt(f"student{n % 1000}@{tp.RCPT_DOMAIN}")
            await client.data(messages[n % len(messages)])
        except aiosmtplib.SMTPException as exc:
            unexpected(repr(exc))
            if not client.is_connected:
                await client.connect()
            else:
                try:
                    await client.rset()
                except aiosmtplib.SMTPException:
                    pass
            return
        if counted:
            result["ok"] += 1
            result["latencies"].append(time.perf_counter() - started)

    async def connect() -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(hostname=HOST, port=args.port, start_tls=False,
                                 local_hostname="loadgen.bench", timeout=60)
        await client.connect()
        await client.ehlo()
        for _ in range(args.warmup):
            await one(client, False)
        return client

    async def closed_loop(clients: list) -> None:
        counts = [args.n // len(clients) + (1 if i < args.n % len(clients) else 0)
                  for i in range(len(clients))]

        async def session(client, count):
            for _ in range(count):
                await one(client, True)

        await asyncio.gather(*(session(c, k) for c, k in zip(clients, counts)))

    async def paced(clients: list) -> None:
        """Message i starts at t0 + i / rate on an idle session (open loop)."""
        idle: asyncio.Queue = asyncio.Queue()
        for c in clients:
            idle.put_nowait(c)
        t0 = time.perf_counter()
        tasks = []

        async def send(client, scheduled):
            try:
                await one(client, True, scheduled)
            finally:
                idle.put_nowait(client)

        for i in range(args.n):
            scheduled = t0 + i / args.rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            client = await idle.get()
            tasks.append(asyncio.create_task(send(client, scheduled)))
        await asyncio.gather(*tasks)

    async def main() -> None:
        clients = await asyncio.gather(*(connect() for _ in range(args.c)))
        emit("start")
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            await asyncio.wait_for((paced if args.rate else closed_loop)(clients),
                                   args.time_limit)
        except asyncio.TimeoutError:
            result["timed_out"] = True
        result["elapsed"] = time.perf_counter() - t0
        result["cpu"] = time.process_time() - cpu0
        emit("end " + json.dumps(result))
        for c in clients:
            try:
                await c.quit()
            except aiosmtplib.SMTPException:
                c.close()

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------
# Idle sessions (child process)
# ------------------------------------------------------------------------------------------

def run_idle(args) -> int:
    """Open ``--count`` sessions (greeting read, EHLO answered), print "ready", hold them
    until stdin closes or a line arrives, then close them."""
    raise_nofile()

    async def greeted() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(HOST, args.port)
        try:
            await reader.readline()  # 220 greeting
            writer.write(b"EHLO idle.bench\r\n")
            while True:
                line = await reader.readline()
                if not line or line[3:4] == b" ":
                    return writer
        except BaseException:
            writer.close()
            raise

    async def open_one(sem: asyncio.Semaphore, out: list) -> None:
        # A burst of connections over the listen backlog can leave one that this side thinks
        # established while the server dropped the handshake's last ACK (tcp_abort_on_overflow
        # = 0): it would wait for a greeting forever. Such a connection is given up after 10 s
        # and opened again.
        async with sem:
            for attempt in range(3):
                try:
                    out.append(await asyncio.wait_for(greeted(), 10))
                    return
                except asyncio.TimeoutError:
                    if attempt == 2:
                        raise

    async def main() -> None:
        writers: list = []
        sem = asyncio.Semaphore(64)  # connections in progress at once (under the backlog)
        t0 = time.perf_counter()
        results = await asyncio.wait_for(
            asyncio.gather(*(open_one(sem, writers) for _ in range(args.count)),
                           return_exceptions=True), args.time_limit)
        failed = [r for r in results if isinstance(r, BaseException)]
        print(f"ready {len(writers)} {len(failed)} {time.perf_counter() - t0:.1f} "
              f"{repr(failed[0]) if failed else ''}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for w in writers:
            w.close()

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------
# The orchestrator
# ------------------------------------------------------------------------------------------

@dataclass
class Phase:
    label: str
    ok: int = 0
    unexpected: int = 0
    elapsed: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    def per_msg_us(self, name: str) -> float | None:
        x = self.cpu.get(name)
        return None if x is None or not self.ok else x / self.ok * 1e6

    def pct(self, q: float) -> float | None:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def drive(children: tp.Children, port: int, args, label: str, mode: str,
          watch: dict[str, int], n: int, rate: float = 0.0) -> Phase:
    argv = [sys.executable, str(Path(__file__).resolve()), "_load", "--port", str(port),
            "--mode", mode, "-n", str(n), "-c", str(args.c), "--warmup", str(args.warmup),
            "--messages", str(args.messages_file), "--rate", str(rate),
            "--time-limit", str(tp.phase_limit(args))]
    proc = children.start(argv, stdout=subprocess.PIPE, text=True)
    res = Phase(label)
    before: dict = {}
    try:
        for line in proc.stdout:
            if line.strip() == "start":
                before = {k: tp.cpu_seconds(pid) for k, pid in watch.items()}
            elif line.startswith("end "):
                after = {k: tp.cpu_seconds(pid) for k, pid in watch.items()}
                data = json.loads(line[4:])
                res.ok, res.unexpected = data["ok"], data["unexpected"]
                res.elapsed, res.latencies = data["elapsed"], data["latencies"]
                res.errors, res.timed_out = data["errors"], data["timed_out"]
                res.cpu = {k: after[k] - before[k] for k in watch
                           if after.get(k) is not None and before.get(k) is not None}
                res.cpu["loadgen"] = data["cpu"]
        proc.wait(30)
    finally:
        children.stop(proc)
    return res


def idle_rss(children: tp.Children, gateway: subprocess.Popen, port: int, count: int,
             limit: float) -> tuple[int, int, int, int, str]:
    """(RSS before, RSS with ``count`` idle sessions, sessions opened, failed, first error)."""
    before = rss_bytes(gateway.pid)
    argv = [sys.executable, str(Path(__file__).resolve()), "_idle", "--port", str(port),
            "--count", str(count), "--time-limit", str(limit)]
    proc = children.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split(" ", 4)
        if line[0] != "ready":
            raise RuntimeError("the idle-session client did not report")
        time.sleep(1.0)  # let the gateway settle its last sessions
        after = rss_bytes(gateway.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
    finally:
        children.stop(proc)
    return before, after, int(line[1]), int(line[2]), line[4].strip() if len(line) > 4 else ""


def start_gateway(children, tmp: Path, name: str, sink_port: int, args, features,
                  limits: dict, tree: Path | None = None, event_loop: str | None = None,
                  level: str = "info", state: str = "sqlite:state.sqlite3",
                  checks: str = "all") -> tuple[subprocess.Popen, int, Path]:
    """A gateway process; ``tree``: the code of another checkout (--against) instead of this
    one's; ``checks``: "all" enforced, or "identify" (identity, registration and return_path
    only)."""
    saved_checks, args.checks = args.checks, checks
    try:
        config, smtp_port, admin_port = tp.write_gateway_config(
            tmp / name, sink_port, level, args, features, state, True, limits)
    finally:
        args.checks = saved_checks
    if event_loop:  # else the configuration's default ("auto": uvloop when installed)
        text = config.read_text().replace("[server]\n", f'[server]\nevent_loop = "{event_loop}"\n',
                                          1)
        config.write_text(text)
    if tree is None:
        proc = tp.start_gateway(children, config, admin_port, tmp / name / "log", None)
    else:
        saved = tp.REPO
        tp.REPO = tree  # its PYTHONPATH and working directory
        try:
            proc = tp.start_gateway(children, config, admin_port, tmp / name / "log", None)
        finally:
            tp.REPO = saved
    return proc, smtp_port, config


def run(args) -> int:
    nofile = raise_nofile()
    children = tp.Children()
    tmp = Path(tempfile.mkdtemp(prefix="gw-cost-"))
    expired = threading.Event()

    def abort(why: str) -> None:
        if not expired.is_set():
            expired.set()
            print(f"\nerror: {why}; stopping", file=sys.stderr)
            children.stop_all()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: threading.Thread(
            target=abort, args=(signal.Signals(signum).name,)).start())
    args.deadline = time.monotonic() + args.time_limit
    timer = threading.Timer(args.time_limit, abort, (f"time limit of {args.time_limit:.0f}s",))
    timer.daemon = True
    timer.start()
    phases: dict[str, list[Phase]] = {}
    idle = None
    status = 0
    try:
        features = tp.gateway_features()
        # what throughput.write_gateway_config reads: every check on, the bench's DNS
        args.checks, args.check_modes, args.dkim, args.size = "all", {}, "rsa2048", 10_000
        args.n_sign = max(args.n, args.paced_n)
        saved_n, args.n = args.n, args.n_sign
        first = tp.prepare_dkim(args, tmp)  # signs n + c * warmup messages, untimed
        args.n = saved_n
        sink, sink_port, args.dns_port = tp.start_sink(children, True, tmp,
                                                       tmp / "dkim-record.txt")
        wide = {"sessions_per_ip": args.idle + 100, "sessions_total": args.idle + 100}
        relay, relay_port, _ = start_gateway(children, tmp, "relay", sink_port, args, features,
                                             wide, event_loop=args.event_loop)
        other = None
        if (args.against or args.against_event_loop or args.against_log_level
                or args.against_state or args.against_checks):
            # the same load through another gateway, in every round: one lever, one run
            other, other_port, _ = start_gateway(
                children, tmp, "against", sink_port, args, features, wide,
                Path(args.against).resolve() if args.against else None,
                event_loop=args.against_event_loop, level=args.against_log_level or "info",
                state=args.against_state or "sqlite:state.sqlite3",
                checks=args.against_checks or "all")
        defer, defer_port, _ = start_gateway(children, tmp, "defer", sink_port, args, features,
                                             {"sender_rate": '"1/day"'},
                                             event_loop=args.event_loop)
        sane = {"relay": (relay, relay_port, None), "defer": (defer, defer_port, None)}
        other_defer = None
        if args.against:  # the other tree deferring too
            other_defer, other_defer_port, _ = start_gateway(
                children, tmp, "against-defer", sink_port, args, features,
                {"sender_rate": '"1/day"'}, Path(args.against).resolve(),
                event_loop=args.against_event_loop)
            sane["against-defer"] = (other_defer, other_defer_port, None)
        # one signed message through each must come out with dkim=pass; it spends the
        # deferring gateways' whole budget for the day
        tp.sanity_pass(sane, first, tmp / "capture")
        spies = []  # (py-spy, its output, FILE, which gateway)
        for file, proc, what in ((args.profile, relay, "relaying"),
                                 (args.profile_defer, defer, "deferring")):
            if file:  # over the rounds
                out = tmp / f"py-spy-{what}.txt"
                spies.append((tp.start_py_spy(children, proc.pid, out), out, file, what))
        print(f"{args.n} messages a phase, {args.c} sessions, 10 KB DKIM-signed (RSA-2048), "
              f"every check on, SQLite state, info logging"
              + (f", gateways on {args.event_loop}" if args.event_loop else "")
              + f"; {args.rounds} round(s), {os.cpu_count()} CPUs, RLIMIT_NOFILE {nofile}",
              flush=True)
        for r in range(args.rounds):
            for label, port, mode, watch in (
                    ("sink, direct", sink_port, "relay", {"sink": sink.pid}),
                    ("gateway, relayed", relay_port, "relay",
                     {"gateway": relay.pid, "sink": sink.pid}),
                    ("gateway, deferred", defer_port, "defer", {"gateway": defer.pid}),
                    *([("against, relayed", other_port, "relay",
                        {"gateway": other.pid, "sink": sink.pid})] if other else []),
                    *([("against, deferred", other_defer_port, "defer",
                        {"gateway": other_defer.pid})] if other_defer else [])):
                res = drive(children, port, args, label, mode, watch, args.n)
                phases.setdefault(label, []).append(res)
                print(f"  round {r + 1}: {label:<18} {res.ok / res.elapsed:7.0f} msgs/s"
                      f"{'  (' + str(res.unexpected) + ' unexpected)' if res.unexpected else ''}",
                      flush=True)
        for spy, out, file, what in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(60)
            children.stop(spy)
            dest = Path(file).resolve()
            import shutil

            shutil.copy(out, dest)
            print(f"\nprofile of the {what} gateway: {dest}")
            tp.summarize_profile(dest, "py-spy", top=40)
        for label, port in (("paced, direct", sink_port), ("paced, gateway", relay_port)):
            if not args.paced_n:
                break
            res = drive(children, port, args, label, "relay", {}, args.paced_n, args.rate)
            phases[label] = [res]
            print(f"  {label}: {res.ok} messages at {args.rate:.0f}/s", flush=True)
        if args.idle:
            idle = idle_rss(children, relay, relay_port, args.idle, tp.phase_limit(args))
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    finally:
        timer.cancel()
        children.stop_all()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if expired.is_set():
        status = 2
    return report(phases, idle, args) or status


def report(phases: dict[str, list[Phase]], idle, args) -> int:
    status = 0

    def cpu(label: str, proc: str) -> float | None:
        runs = phases.get(label, [])
        if not runs or any(proc not in r.cpu for r in runs):
            return None
        ok = sum(r.ok for r in runs)
        return sum(r.cpu[proc] for r in runs) / ok * 1e6 if ok else None

    def ratio(label: str, proc: str, base_label: str, base_proc: str) -> float | None:
        """The median over rounds of (CPU per message) / (the baseline's, same round)."""
        xs = [r.per_msg_us(proc) / b.per_msg_us(base_proc)
              for r, b in zip(phases.get(label, []), phases.get(base_label, []))
              if r.per_msg_us(proc) and b.per_msg_us(base_proc)]
        return statistics.median(xs) if xs else None

    def f(x, fmt="{:.0f}"):
        return "-" if x is None else fmt.format(x)

    print("\nCPU per message (process CPU time; all rounds)")
    sink_us = cpu("sink, direct", "sink")
    relay_us = cpu("gateway, relayed", "gateway")
    defer_us = cpu("gateway, deferred", "gateway")
    r_relay = ratio("gateway, relayed", "gateway", "sink, direct", "sink")
    r_defer = ratio("gateway, deferred", "gateway", "gateway, relayed", "gateway")
    print(f"  bare aiosmtpd sink (baseline)   {f(sink_us):>6} us")
    print(f"  gateway, relayed                {f(relay_us):>6} us   "
          f"{f(r_relay, '{:.2f}')}x the sink   (target <= 2.5)")
    print(f"  gateway, deferred (451 4.7.1)   {f(defer_us):>6} us   "
          f"{f(r_defer, '{:.2f}')} of a relay  (target <= 0.2)")
    if "against, relayed" in phases:
        r_other = ratio("gateway, relayed", "gateway", "against, relayed", "gateway")
        what = (args.against or "this tree") + (
            f" on {args.against_event_loop}" if args.against_event_loop else "") \
            + (f", state {args.against_state}" if args.against_state else "") \
            + (f", checks {args.against_checks}" if args.against_checks else "") \
            + (f" at {args.against_log_level}" if args.against_log_level else "")
        print(f"  against ({what}), relayed\n                                  "
              f"{f(cpu('against, relayed', 'gateway')):>6} us   this tree's relay is "
              f"{f(r_other, '{:.3f}')} of it (median of the per-round ratios)")
    if "against, deferred" in phases:
        r_other = ratio("gateway, deferred", "gateway", "against, deferred", "gateway")
        print(f"  against ({args.against}), deferred\n                                  "
              f"{f(cpu('against, deferred', 'gateway')):>6} us   this tree's deferral is "
              f"{f(r_other, '{:.3f}')} of it (median of the per-round ratios)")
    d = phases.get("gateway, relayed", [])
    s = phases.get("sink, direct", [])
    if d and s:
        thr = statistics.median(g.ok / g.elapsed / (x.ok / x.elapsed) for g, x in zip(d, s)
                                if g.elapsed and x.elapsed and x.ok)
        print(f"  throughput, relayed / direct    {thr:.2f}  (median of the rounds)")
    for label, runs in phases.items():
        bad = sum(r.unexpected for r in runs)
        if bad or any(r.timed_out for r in runs):
            status = 2
            print(f"  {label}: {bad} unexpected replies"
                  f"{', timed out' if any(r.timed_out for r in runs) else ''}: "
                  f"{[e for r in runs for e in r.errors][:3]}")
    pd, pg = phases.get("paced, direct"), phases.get("paced, gateway")
    if pd and pg:
        print(f"\nAdded latency at {args.rate:.0f} msg/s ({pg[0].ok} messages, open loop, "
              f"MAIL to the reply to the final dot)")
        for q, name, target in ((0.50, "p50", ""), (0.99, "p99", "  (target <= 10 ms)")):
            a, b = pg[0].pct(q), pd[0].pct(q)
            added = None if a is None or b is None else (a - b) * 1000
            print(f"  {name}: gateway {f(a and a * 1000, '{:.1f}')} ms, direct "
                  f"{f(b and b * 1000, '{:.1f}')} ms, added {f(added, '{:.1f}')} ms{target}")
    if idle is not None:
        before, after, opened, failed, error = idle
        print(f"\nIdle sessions: {opened} open ({failed} failed{': ' + error if error else ''})")
        print(f"  gateway RSS {before / 2**20:.0f} MB before, {after / 2**20:.0f} MB with them "
              f"(target < 500 MB); {(after - before) / max(opened, 1) / 1024:.1f} KB a session")
        if failed:
            status = 2
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_load"]:
        p = argparse.ArgumentParser(prog="cost.py _load")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--mode", choices=["relay", "defer"], required=True)
        p.add_argument("-n", type=int, required=True)
        p.add_argument("-c", type=int, required=True)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--messages", required=True)
        p.add_argument("--rate", type=float, default=0.0)
        p.add_argument("--time-limit", type=float, required=True)
        return run_load(p.parse_args(argv[1:]))
    if argv[:1] == ["_idle"]:
        p = argparse.ArgumentParser(prog="cost.py _idle")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--time-limit", type=float, required=True)
        return run_idle(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # many short rounds: this VM's speed drifts within seconds, and each round's ratios compare
    # phases a few seconds apart (8 x 1,000 gave steadier medians than 2 x 2,000)
    p.add_argument("-n", type=int, default=1000, help="messages a phase (default %(default)s)")
    p.add_argument("-c", type=int, default=10, help="sessions (default %(default)s)")
    p.add_argument("--rounds", type=int, default=8, help="rounds (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2,
                   help="unmeasured messages a session first (default %(default)s)")
    p.add_argument("--rate", type=float, default=100.0,
                   help="the paced phase's messages a second (default %(default)s)")
    p.add_argument("--paced-n", type=int, default=1500,
                   help="messages of the paced phase (default %(default)s: 15 s at 100/s); 0: skip")
    p.add_argument("--idle", type=int, default=10_000,
                   help="idle sessions for the memory figure; 0: skip (default %(default)s)")
    p.add_argument("--event-loop", choices=["auto", "asyncio", "uvloop"],
                   help="the gateways' [server] event_loop (default: the configuration's "
                        'default, "auto": uvloop when installed)')
    p.add_argument("--against", metavar="TREE",
                   help="also run a relaying gateway from another checkout (e.g. `git archive "
                        "COMMIT | tar -x -C TREE`) in every round, and print this tree's CPU per "
                        "relayed message as a ratio of it: one lever measured in one run")
    p.add_argument("--against-event-loop", choices=["auto", "asyncio", "uvloop"],
                   help="the --against gateway (this tree when no --against) on this event "
                        "loop: --against-event-loop asyncio prices uvloop")
    p.add_argument("--against-state", metavar="URL",
                   help='the --against gateway with this [state] url: --against-state memory: '
                        "prices SQLite")
    p.add_argument("--against-checks", choices=["all", "identify"],
                   help="the --against gateway with every check enforced (all) or only "
                        "identity, registration and return_path (identify): the relay alone")
    p.add_argument("--against-log-level", choices=["debug", "info", "warning", "error"],
                   help="the --against gateway (this tree when no --against) at this [logging] "
                        "level: --against-log-level warning prices the decision log")
    p.add_argument("--profile", metavar="FILE",
                   help="py-spy (pip install py-spy) the relaying gateway during the rounds; "
                        "save the raw profile to FILE and print its hottest functions")
    p.add_argument("--profile-defer", metavar="FILE",
                   help="the same for the deferring gateway")
    p.add_argument("--time-limit", type=float, default=600.0,
                   help="hard limit for the run, seconds (default %(default)s)")
    args = p.parse_args(argv)
    if args.n < 1 or args.c < 1 or args.rounds < 1 or args.rate <= 0 or args.idle < 0 \
            or args.paced_n < 0:
        p.error("-n, -c, --rounds and --rate must be positive, --idle and --paced-n not "
                "negative")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
