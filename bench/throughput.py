#!/usr/bin/env python3
"""Throughput benchmark: the gateway versus direct-to-sink, in one run, on loopback only.

    python bench/throughput.py                      # N=2000, C=20, 10 KB, log levels warning+info
    python bench/throughput.py -n 5000 -c 50 --size 20000 --rounds 3 --min-ratio 0.5

Three kinds of process, each its own Python interpreter (one event loop, one GIL each):

* the sink: a plain aiosmtpd server on 127.0.0.1 that accepts everything (``_sink``);
* the gateway: ``python -m gateway serve --config <tmp>/gateway.toml``, relaying to the sink
  over its pool of aiosmtplib connections (one gateway process per log level measured);
* the load generator: C asyncio sessions with aiosmtplib, each keeping its connection open and
  sending its share of the N messages back to back (MAIL, RCPT, DATA) (``_load``), or Postfix's
  ``smtp-source`` with ``--driver smtp-source``.

Each round measures "direct" (load generator -> sink) and then "gateway" (load generator ->
gateway -> sink) for each log level, with the same N, C and message size. The figure compared is
messages per second over the measured phase (after every session has connected and sent its
warm-up message, so that the gateway's upstream pool is filled). The CPU seconds each process
used during the measured phase are read from /proc and shown per message.

Everything binds 127.0.0.1 only. Every child process is stopped and the temporary directory
removed when the run ends, whether it finishes, fails or hits the hard time limit (--time-limit).

Exit status: 0, or 1 with --min-ratio when the (median) gateway/direct ratio of the first log
level is below it, or 2 when messages failed or the run did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SENDER_DOMAIN = "em.bench.example"
RCPT_DOMAIN = "example.edu"
SENDER_FILE = f"""\
id = "bench"
organization = "Throughput benchmark"
contact = "postmaster@bench.example"
networks = ["127.0.0.1/32"]
domains = ["{SENDER_DOMAIN}"]
return_path = ["bounce-*@{SENDER_DOMAIN}"]
expires = 2099-12-31
"""


# ------------------------------------------------------------------------------------------
# The sink (child process)
# ------------------------------------------------------------------------------------------

class SinkHandler:
    """Accepts every message and keeps nothing but a count."""

    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return f"250 2.0.0 Ok: queued as S{self.count}"


def run_sink(args) -> int:
    from aiosmtpd.smtp import SMTP

    async def main() -> None:
        handler = SinkHandler()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="sink.bench", ident="bench sink",
                         data_size_limit=64 * 1024 * 1024),
            host=HOST, port=args.port)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()

    asyncio.run(main())
    return 0


# ------------------------------------------------------------------------------------------
# The load generator (child process)
# ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _body(length: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog; benchmark filler text 0123456789.\r\n"
    body = (line * (length // len(line) + 1))[:length]
    if body and not body.endswith(b"\r\n"):
        body = body[:-2] + b"\r\n" if len(body) >= 2 else b""
    return body


def make_message(size: int, seq: int) -> bytes:
    """A plain-text message of ``size`` bytes (CRLF lines) with unique Subject and Message-ID."""
    head = (f"From: Bench <news@{SENDER_DOMAIN}>\r\n"
            f"To: Student <student{seq % 1000}@{RCPT_DOMAIN}>\r\n"
            f"Subject: Benchmark message {seq}\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bench.{seq}.{os.getpid()}@{SENDER_DOMAIN}>\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n").encode()
    return head + _body(max(0, size - len(head)))


def run_load(args) -> int:
    import aiosmtplib

    result: dict = {"sent": 0, "failed": 0, "errors": [], "latencies": [], "timed_out": False}
    counts = [args.n // args.c + (1 if i < args.n % args.c else 0) for i in range(args.c)]
    ready = 0
    go = asyncio.Event()
    clock = {"t0": time.perf_counter(), "cpu0": time.process_time()}
    seq = iter(range(10**9))

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def one(client, latencies: list[float] | None) -> None:
        n = next(seq)
        msg = make_message(args.size, n)
        started = time.perf_counter()
        try:
            await client.mail(f"bounce-{n}@{SENDER_DOMAIN}")
            await client.rcpt(f"student{n % 1000}@{RCPT_DOMAIN}")
            await client.data(msg)
        except aiosmtplib.SMTPException as exc:
            result["failed"] += 1
            if len(result["errors"]) < 5:
                result["errors"].append(repr(exc))
            if not client.is_connected:
                await client.connect()
            else:
                try:
                    await client.rset()
                except aiosmtplib.SMTPException:
                    pass
            return
        if latencies is not None:
            latencies.append(time.perf_counter() - started)
            result["sent"] += 1

    async def session(count: int) -> None:
        nonlocal ready
        client = aiosmtplib.SMTP(hostname=args.host, port=args.port, start_tls=False,
                                 local_hostname="loadgen.bench", timeout=60)
        await client.connect()
        await client.ehlo()
        for _ in range(args.warmup):
            await one(client, None)
        ready += 1
        if ready == args.c:
            emit("start")
            clock["t0"], clock["cpu0"] = time.perf_counter(), time.process_time()
            go.set()
        await go.wait()
        for _ in range(count):
            await one(client, result["latencies"])
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.time_limit
        everything = asyncio.gather(*(session(k) for k in counts))
        started = asyncio.ensure_future(go.wait())
        try:
            await asyncio.wait({started, everything}, timeout=args.time_limit,
                               return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait_for(everything, max(0.1, deadline - loop.time()))
        except asyncio.TimeoutError:
            result["timed_out"] = True
        except Exception as exc:  # a session could not connect, or the server went away
            result["errors"].append(repr(exc))
            result["failed"] += 1
        finally:
            everything.cancel()
            started.cancel()
            await asyncio.gather(everything, started, return_exceptions=True)
        if not go.is_set():
            emit("start")
        result["elapsed"] = time.perf_counter() - clock["t0"]
        result["cpu"] = time.process_time() - clock["cpu0"]

    asyncio.run(main())
    emit("end " + json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------
# The orchestrator
# ------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Children:
    """Every child process started, stopped (TERM, then KILL) when the run ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        with self.lock:
            proc = subprocess.Popen(argv, **kwargs)
            self.procs.append(proc)
            return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
        with self.lock:
            if proc in self.procs:
                self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace=3.0)


@dataclass
class Result:
    label: str
    msgs: int = 0
    failed: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float | None] = field(default_factory=dict)  # process -> CPU seconds
    errors: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def rate(self) -> float:
        return self.msgs / self.elapsed if self.elapsed > 0 else 0.0

    def pct(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def drive_python(children: Children, port: int, args, label: str,
                 watch: dict[str, int]) -> Result:
    argv = [sys.executable, str(Path(__file__).resolve()), "_load", "--port", str(port),
            "-n", str(args.n), "-c", str(args.c), "--size", str(args.size),
            "--warmup", str(args.warmup), "--time-limit", str(args.phase_limit)]
    proc = children.start(argv, stdout=subprocess.PIPE, text=True)
    res = Result(label)
    before: dict[str, float | None] = {}
    try:
        for line in proc.stdout:
            if line.strip() == "start":
                before = {name: cpu_seconds(pid) for name, pid in watch.items()}
            elif line.startswith("end "):
                after = {name: cpu_seconds(pid) for name, pid in watch.items()}
                data = json.loads(line[4:])
                res.msgs, res.failed, res.elapsed = data["sent"], data["failed"], data["elapsed"]
                res.latencies, res.errors = data["latencies"], data["errors"]
                res.timed_out = data["timed_out"]
                res.cpu = {n: (after[n] - before[n]) if after.get(n) is not None
                           and before.get(n) is not None else None for n in watch}
                res.cpu["loadgen"] = data["cpu"]
        proc.wait(10)
    finally:
        children.stop(proc)
    if proc.returncode not in (0, None) and not res.elapsed:
        raise RuntimeError(f"load generator exited with status {proc.returncode}")
    return res


def drive_smtp_source(children: Children, port: int, args, label: str,
                      watch: dict[str, int]) -> Result:
    exe = shutil.which("smtp-source")
    # -d: keep each session's connection open across messages; -s: concurrent sessions;
    # -m: messages in all; -l: body length; -M: HELO name.
    argv = [exe, "-d", "-s", str(args.c), "-m", str(args.n), "-l", str(args.size),
            "-M", "loadgen.bench", "-f", f"bounce-1@{SENDER_DOMAIN}",
            "-t", f"student@{RCPT_DOMAIN}", f"{HOST}:{port}"]
    res = Result(label)
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    t0 = time.perf_counter()
    proc = children.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=args.phase_limit)
    except subprocess.TimeoutExpired:
        res.timed_out = True
        err = ""
    res.elapsed = time.perf_counter() - t0
    after = {name: cpu_seconds(pid) for name, pid in watch.items()}
    children.stop(proc)
    res.cpu = {n: (after[n] - before[n]) if after.get(n) is not None
               and before.get(n) is not None else None for n in watch}
    res.cpu["loadgen"] = None
    if res.timed_out or proc.returncode != 0:
        res.failed = args.n
        res.errors = [err.strip()[:500] or f"smtp-source exit {proc.returncode}"]
    else:
        res.msgs = args.n  # smtp-source exits non-zero on any SMTP error
    return res


def start_sink(children: Children) -> tuple[subprocess.Popen, int]:
    proc = children.start([sys.executable, str(Path(__file__).resolve()), "_sink"],
                          stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise RuntimeError("the sink did not start")
    return proc, int(line)


def write_gateway_config(directory: Path, sink_port: int, log_level: str) -> tuple[Path, int, int]:
    directory.mkdir(parents=True)
    (directory / "senders").mkdir()
    (directory / "senders" / "bench.toml").write_text(SENDER_FILE)
    smtp_port, admin_port = free_port(), free_port()
    path = directory / "gateway.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        listen = ["{HOST}:{smtp_port}"]
        hostname = "gw.bench"

        [upstream]
        url = "smtp://{HOST}:{sink_port}"
        starttls = "off"

        [state]
        url = "memory:"

        [university]
        domains = ["{RCPT_DOMAIN}"]

        [senders]
        dir = "senders"

        [admin]
        listen = "{HOST}:{admin_port}"

        [logging]
        level = "{log_level}"
        hash_key_file = "recipient-hash.key"
        """))
    return path, smtp_port, admin_port


def start_gateway(children: Children, config: Path, admin_port: int, log_path: Path,
                  profile: str | None, timeout: float = 30.0) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    if profile == "cprofile":
        argv[1:1] = ["-m", "cProfile", "-o", str(config.parent / "gateway.pstats")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = open(log_path, "wb")
    try:
        proc = children.start(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
    finally:
        log.close()
    url = f"http://{HOST}:{admin_port}/readyz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}:\n"
                               + log_path.read_text(errors="replace")[-2000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready within {timeout:.0f}s ({url})")


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def fmt_cpu(res: Result, name: str) -> str:
    x = res.cpu.get(name)
    return "-" if x is None or not res.msgs else f"{x / res.msgs * 1e6:.0f}"


def run(args) -> int:
    if args.driver == "smtp-source" and not shutil.which("smtp-source"):
        print("error: --driver smtp-source needs Postfix's smtp-source on PATH", file=sys.stderr)
        return 2
    drive = drive_smtp_source if args.driver == "smtp-source" else drive_python
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    expired = threading.Event()

    def on_time_limit() -> None:
        expired.set()
        print(f"\nerror: hard time limit of {args.time_limit:.0f}s reached; stopping",
              file=sys.stderr)
        children.stop_all()

    timer = threading.Timer(args.time_limit, on_time_limit)
    timer.daemon = True
    timer.start()
    results: dict[str, list[Result]] = {}
    try:
        sink, sink_port = start_sink(children)
        gateways = {}
        for level in args.log_levels:
            config, smtp_port, admin_port = write_gateway_config(tmp / f"gw-{level}", sink_port,
                                                                 level)
            proc = start_gateway(children, config, admin_port, tmp / f"gw-{level}" / "log",
                                 args.profile)
            gateways[level] = (proc, smtp_port, config)
        print(f"N={args.n} messages, C={args.c} sessions, {args.size} bytes each, "
              f"driver={args.driver}, {args.rounds} round(s), {os.cpu_count()} CPU(s)",
              flush=True)
        for r in range(args.rounds):
            res = drive(children, sink_port, args, "direct", {"sink": sink.pid})
            results.setdefault("direct", []).append(res)
            print(f"  round {r + 1}: direct            {res.rate:8.0f} msgs/s", flush=True)
            for level, (proc, smtp_port, _) in gateways.items():
                label = f"gateway ({level})"
                res = drive(children, smtp_port, args, label,
                            {"gateway": proc.pid, "sink": sink.pid})
                results.setdefault(label, []).append(res)
                print(f"  round {r + 1}: {label:<17} {res.rate:8.0f} msgs/s", flush=True)
        for level, (proc, _, config) in gateways.items():
            children.stop(proc)
            if args.profile == "cprofile":
                dest = Path(args.profile_out or ".").resolve() / f"gateway-{level}.pstats"
                shutil.copy(config.parent / "gateway.pstats", dest)
                print(f"cProfile of the gateway ({level}): {dest}")
            if args.keep_logs:
                dest = Path(args.keep_logs).resolve() / f"gateway-{level}.log"
                shutil.copy(config.parent / "log", dest)
    except Exception as exc:
        if not expired.is_set():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        timer.cancel()
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if expired.is_set():
        return 2
    return report(results, args)


def report(results: dict[str, list[Result]], args) -> int:
    direct_rate = statistics.median(r.rate for r in results["direct"])
    print()
    print(f"{'':<18} {'msgs/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'failed':>6}   CPU µs/msg: {'gateway':>7} {'sink':>5} {'loadgen':>7}")
    status = 0
    first_ratio = None
    for label, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        ratio = rate / direct_rate if direct_rate else 0.0
        if label != "direct" and first_ratio is None:
            first_ratio = ratio
        lat = [x for r in runs for x in r.latencies]
        merged = Result(label, msgs=sum(r.msgs for r in runs), latencies=lat)
        for name in ("gateway", "sink", "loadgen"):
            vals = [r.cpu.get(name) for r in runs]
            merged.cpu[name] = None if any(v is None for v in vals) else sum(vals)
        failed = sum(r.failed for r in runs)
        print(f"{label:<18} {rate:8.0f} {ratio:6.2f} {fmt_ms(merged.pct(0.50)):>7} "
              f"{fmt_ms(merged.pct(0.99)):>7} {failed:>6}   {'':<11} "
              f"{fmt_cpu(merged, 'gateway'):>7} {fmt_cpu(merged, 'sink'):>5} "
              f"{fmt_cpu(merged, 'loadgen'):>7}")
        for r in runs:
            for e in r.errors:
                print(f"    error: {e}")
            if failed or any(r.timed_out for r in runs):
                status = 2
    if args.rounds > 1:
        print(f"(msgs/s and ratio: median of {args.rounds} rounds; latency and CPU: all rounds)")
    if status:
        print("some messages failed or a phase timed out", file=sys.stderr)
        return status
    if args.min_ratio is not None and first_ratio is not None and first_ratio < args.min_ratio:
        print(f"ratio {first_ratio:.2f} is below --min-ratio {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_sink"]:
        p = argparse.ArgumentParser(prog="throughput.py _sink")
        p.add_argument("--port", type=int, default=0)
        return run_sink(p.parse_args(argv[1:]))
    if argv[:1] == ["_load"]:
        p = argparse.ArgumentParser(prog="throughput.py _load")
        p.add_argument("--host", default=HOST)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("-n", type=int, required=True)
        p.add_argument("-c", type=int, required=True)
        p.add_argument("--size", type=int, required=True)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--time-limit", type=float, required=True)
        return run_load(p.parse_args(argv[1:]))

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--messages", dest="n", type=int, default=2000,
                   help="messages per measurement (default %(default)s)")
    p.add_argument("-c", "--concurrency", dest="c", type=int, default=20,
                   help="concurrent SMTP sessions (default %(default)s)")
    p.add_argument("--size", type=int, default=10_000,
                   help="message size in bytes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat direct + gateway this many times; report medians "
                        "(default %(default)s)")
    p.add_argument("--log-level", dest="log_levels", action="append",
                   choices=["debug", "info", "warning", "error"],
                   help="gateway [logging] level; repeat to measure several "
                        "(default: warning and info)")
    p.add_argument("--driver", choices=["python", "smtp-source"], default="python",
                   help="load generator: the bundled aiosmtplib one or Postfix's smtp-source")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured messages per session before the clock starts "
                        "(python driver; default %(default)s)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="hard limit for the whole run, seconds (default %(default)s)")
    p.add_argument("--min-ratio", type=float,
                   help="exit 1 when gateway/direct (first log level) is below this")
    p.add_argument("--profile", choices=["cprofile"],
                   help="run the gateway under cProfile and save its stats")
    p.add_argument("--profile-out", metavar="DIR", help="where to save profiles (default .)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the gateway logs here at the end")
    args = p.parse_args(argv)
    if args.n < 1 or args.c < 1 or args.size < 512 or args.rounds < 1:
        p.error("-n, -c and --rounds must be positive and --size at least 512")
    args.c = min(args.c, args.n)
    args.log_levels = args.log_levels or ["warning", "info"]
    args.phase_limit = max(10.0, args.time_limit / 2)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
