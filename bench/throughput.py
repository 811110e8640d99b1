#!/usr/bin/env python3
"""Throughput benchmark: the gateway versus direct-to-sink, in one run, on loopback only.

    python bench/throughput.py                # N=2000, C=20, 10 KB; gateway at warning and info
    python bench/throughput.py --rounds 5 --min-ratio 0.5

Three kinds of process, each its own interpreter (one event loop, one GIL each), not pinned:

* the sink: a plain aiosmtpd server on 127.0.0.1 that accepts everything (``_sink``); with
  ``--checks all`` it also answers the gateway's DNS queries for the bench's own names (SPF, and
  with ``--dkim`` the DKIM key: the load generator then sends messages signed beforehand);
* the gateway: ``python -m gateway serve --config <tmp>/gateway.toml`` relaying to the sink over
  its pool of aiosmtplib connections (one gateway process per log level measured);
* the load generator: C asyncio sessions with aiosmtplib, each keeping its connection open and
  sending its share of the N messages back to back (MAIL, RCPT, DATA) (``_load``), or Postfix's
  ``smtp-source`` with ``--driver smtp-source``.

Each round measures "direct" (load generator -> sink), then "gateway" (load generator ->
gateway -> sink) for each log level, with the same N, C and message size: messages per second
from the moment every session has connected and sent one warm-up message (so the gateway's
upstream pool is full) to the last reply to a final dot. The CPU each process used in that phase
is read from /proc and shown per message. See bench/README.md for how to read the figures.

Everything binds 127.0.0.1. Every child process is stopped and the temporary directory removed
when the run ends: finished, failed, interrupted (Ctrl-C) or at the hard --time-limit.

Exit status: 0; 1 with --min-ratio when the ratio of the first log level is below it; 2 when
messages failed or the run did not complete.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
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
DKIM_SELECTOR = "bench"
# the header fields each signature covers (the unsubscribe check wants both List-Unsubscribe
# fields signed, RFC 8058 4)
DKIM_HEADERS = (b"From", b"To", b"Subject", b"Date", b"Message-ID", b"List-Unsubscribe",
                b"List-Unsubscribe-Post")
SANITY_PREFIX = "bounce-sanity-"  # the sink keeps messages with this return path


# ------------------------------------------------------------------------------------------
# The sink (child process)
# ------------------------------------------------------------------------------------------

class SinkHandler:
    """Accepts every message and keeps nothing but a count, except the sanity messages
    (``bounce-sanity-*`` return path), which it writes to ``capture`` for the orchestrator."""

    def __init__(self, capture: Path | None = None) -> None:
        self.count = 0
        self.capture = capture

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        """PIPELINING and CHUNKING offered, as campus mail's Postfix does (RFC 2920, RFC
        3030): aiosmtpd answers pipelined commands in order but does not say so itself, and
        the sink runs on tests/chunking_smtp.py, aiosmtpd with BDAT. A client that neither
        pipelines nor sends BDAT (the direct load) is not affected."""
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        responses.insert(-1, "250-CHUNKING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        if self.capture is not None and envelope.mail_from.startswith(SANITY_PREFIX):
            tmp = self.capture / f".{envelope.mail_from}"
            tmp.write_bytes(envelope.original_content or envelope.content)
            tmp.rename(self.capture / f"{envelope.mail_from}.eml")
        return f"250 2.0.0 Ok: queued as S{self.count}"


DNS_TTL = 300  # every answer, positive or negative, may be cached this long (RFC 2308 for NXDOMAIN)


def txt_strings(value: str) -> str:
    """One TXT record's text form: ``value`` split into quoted character-strings of at most 255
    bytes (RFC 1035 3.3.14; a DKIM key record joins them back, RFC 6376 3.6.2.2)."""
    return " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))


class BenchDNS(asyncio.DatagramProtocol):
    """A minimal authoritative DNS responder for the bench's own names (--checks all): the
    sender domain's SPF record authorizes 127.0.0.1, ``bench._domainkey`` holds the DKIM key
    (--dkim); every other name is NXDOMAIN. Every answer carries a TTL of DNS_TTL, negative ones
    too (an SOA in the authority section), so the gateway's cache answers after the first
    look-up. Nothing is forwarded, so no query leaves loopback. Each query is appended to
    ``log`` (name, type), so the bench can tell how often the gateway asked."""

    def __init__(self, records: dict[tuple[str, str], list[str]], log: Path | None) -> None:
        self.records = records
        self.log = open(log, "a", buffering=1) if log else None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(data)
        except Exception:  # not DNS: ignore
            return
        reply = dns.message.make_response(query)
        reply.flags |= 0x0400  # AA
        if query.question:
            q = query.question[0]
            name, qtype = q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype)
            if self.log is not None:
                self.log.write(f"{name} {qtype}\n")
            values = self.records.get((name, qtype))
            if values:
                reply.answer.append(dns.rrset.from_text(q.name, DNS_TTL, "IN", qtype, *values))
            else:
                if not any(n == name for n, _ in self.records):
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                # RFC 2308: the SOA of the zone (here the top-level label) makes the negative
                # answer cacheable for min(its TTL, its minimum)
                zone = dns.name.Name(q.name.labels[-2:]) if len(q.name.labels) > 1 \
                    else dns.name.root
                reply.authority.append(dns.rrset.from_text(
                    zone, DNS_TTL, "IN", "SOA",
                    f"ns.{SENDER_DOMAIN}. hostmaster.{SENDER_DOMAIN}. 1 3600 600 86400 {DNS_TTL}"))
        self.transport.sendto(reply.to_wire(), addr)


def run_sink(args) -> int:
    sys.path.insert(0, str(REPO))
    from tests.chunking_smtp import ChunkingSMTP

    records = {(f"{SENDER_DOMAIN}.", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"']}
    if args.dkim_record:
        records[(f"{DKIM_SELECTOR}._domainkey.{SENDER_DOMAIN}.", "TXT")] = [
            txt_strings(Path(args.dkim_record).read_text().strip())]

    async def main() -> None:
        handler = SinkHandler(Path(args.capture) if args.capture else None)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: ChunkingSMTP(handler, hostname="sink.bench", ident="bench sink",
                                 data_size_limit=64 * 1024 * 1024),
            host=HOST, port=args.port)
        dns_port = 0
        if args.dns:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: BenchDNS(records, Path(args.dns_log) if args.dns_log else None),
                local_addr=(HOST, 0))
            dns_port = transport.get_extra_info("sockname")[1]
        print(server.sockets[0].getsockname()[1], dns_port, flush=True)
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
    """A plain-text promotional message of ``size`` bytes (CRLF lines), unique Subject and
    Message-ID, with one-click List-Unsubscribe so that it passes the content checks too."""
    head = (f"From: Bench <news@{SENDER_DOMAIN}>\r\n"
            f"To: Student <student{seq % 1000}@{RCPT_DOMAIN}>\r\n"
            f"Subject: Benchmark message {seq}\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bench.{seq}.{os.getpid()}@{SENDER_DOMAIN}>\r\n"
            f"List-Unsubscribe: <https://{SENDER_DOMAIN}/u/{seq}>, "
            f"<mailto:unsubscribe@{SENDER_DOMAIN}?subject=u{seq}>\r\n"
            f"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n").encode()
    return head + _body(max(0, size - len(head)))


def make_dkim_key(kind: str, directory: Path) -> tuple[bytes, str]:
    """A fresh key pair for --dkim: the private key as dkim.sign takes it, and the key record
    the sink publishes at ``bench._domainkey.<sender domain>``."""
    import base64

    if kind == "rsa2048":
        pem = directory / "dkim-rsa.pem"
        subprocess.run(["openssl", "genrsa", "-out", str(pem), "2048"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        der = subprocess.run(["openssl", "rsa", "-in", str(pem), "-pubout", "-outform", "DER"],
                             check=True, capture_output=True).stdout
        return pem.read_bytes(), f"v=DKIM1; k=rsa; h=sha256; p={base64.b64encode(der).decode()}"
    if kind == "ed25519":  # RFC 8463: p= is the raw 32-byte public key; dkimpy signs with the seed
        import nacl.signing

        key = nacl.signing.SigningKey.generate()
        return (base64.b64encode(bytes(key)),
                f"v=DKIM1; k=ed25519; p={base64.b64encode(bytes(key.verify_key)).decode()}")
    raise ValueError(f"unknown DKIM key kind {kind!r}")


def dkim_sign(message: bytes, key: bytes, kind: str) -> bytes:
    """``message`` with a DKIM-Signature field (relaxed/simple) for d=<sender domain>,
    s=bench."""
    import dkim

    algorithm = b"ed25519-sha256" if kind == "ed25519" else b"rsa-sha256"
    return dkim.sign(message, DKIM_SELECTOR.encode(), SENDER_DOMAIN.encode(), key,
                     signature_algorithm=algorithm, include_headers=list(DKIM_HEADERS)) + message


def _signed_range(size: int, start: int, stop: int, key: bytes, kind: str) -> list[bytes]:
    return [dkim_sign(make_message(size, seq), key, kind) for seq in range(start, stop)]


def signed_messages(size: int, count: int, key: bytes, kind: str) -> list[bytes]:
    """``count`` signed messages (sequence numbers 0 to count - 1, each with its own
    Message-ID), signed once per run, before anything is timed, on every CPU (an RSA-2048
    signature costs dkimpy about 8 ms)."""
    import concurrent.futures

    workers = max(1, min(os.cpu_count() or 1, count // 50 or 1))
    step = -(-count // workers)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        parts = pool.map(_signed_range, *zip(*[(size, i, min(count, i + step), key, kind)
                                                for i in range(0, count, step)]))
        return [m for part in parts for m in part]


def verify_locally(message: bytes, record: str) -> bool:
    """dkimpy's own verdict on one signed message, with the key record handed to it."""
    import dkim

    return bool(dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode()))


def run_load(args) -> int:
    import aiosmtplib

    result: dict = {"sent": 0, "failed": 0, "errors": [], "latencies": [], "timed_out": False}
    counts = [args.n // args.c + (1 if i < args.n % args.c else 0) for i in range(args.c)]
    ready = 0
    go = asyncio.Event()
    clock = {"t0": time.perf_counter(), "cpu0": time.process_time(), "t1": None}
    seq = iter(range(10**9))
    signed: list[bytes] = []
    if args.messages:  # --dkim: the messages the orchestrator signed before any timing
        import pickle

        signed = pickle.loads(Path(args.messages).read_bytes())

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def one(client, latencies: list[float] | None) -> None:
        n = next(seq)
        msg = signed[n % len(signed)] if signed else make_message(args.size, n)
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
            clock["t1"] = time.perf_counter()
            latencies.append(clock["t1"] - started)
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
        loop.add_signal_handler(signal.SIGTERM, everything.cancel)  # stop and report
        try:
            await asyncio.wait({started, everything}, timeout=args.time_limit,
                               return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait_for(everything, max(0.1, deadline - loop.time()))
        except (asyncio.TimeoutError, asyncio.CancelledError):
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
        # until the last reply to a final dot (QUIT and the sessions' teardown are not counted)
        result["elapsed"] = (clock["t1"] or time.perf_counter()) - clock["t0"]
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


def _die_with_parent() -> None:
    """In the child before exec: ask Linux for SIGTERM when the parent exits (PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass


class Children:
    """Every child process started, stopped (TERM, then KILL) when the run ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.closed = False

    def start(self, argv: list[str], **kwargs) -> subprocess.Popen:
        # Children get their own session (a Ctrl-C reaches only this process, which stops them
        # in order) and, on Linux, SIGTERM when this process dies, however it dies.
        with self.lock:
            if self.closed:
                raise RuntimeError("stopping: no new processes")
            proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent,
                                    **kwargs)
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
        with self.lock:
            self.closed = True
        for proc in reversed(list(self.procs)):  # the load first, the sink last
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


def phase_limit(args) -> float:
    """Seconds a load phase may take: what is left of the run, less a margin for the report
    (the load generator stops itself then and reports what it did; the hard limit is a
    backstop)."""
    left = args.deadline - time.monotonic() - 3.0
    if left < 1.0:
        raise RuntimeError("time limit reached")
    return left


def drive_python(children: Children, port: int, args, label: str,
                 watch: dict[str, int]) -> Result:
    argv = [sys.executable, str(Path(__file__).resolve()), "_load", "--port", str(port),
            "-n", str(args.n), "-c", str(args.c), "--size", str(args.size),
            "--warmup", str(args.warmup), "--time-limit", str(phase_limit(args))]
    if args.messages_file:
        argv += ["--messages", str(args.messages_file)]
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
    # -4: IPv4; -d: keep each session's connection open across messages; -s: concurrent
    # sessions; -m: messages in all; -F: the message (header and body; LF lines, smtp-source
    # sends CRLF and dot-stuffs); -M: HELO name.
    argv = [exe, "-4", "-d", "-s", str(args.c), "-m", str(args.n), "-F", str(args.message_file),
            "-M", "loadgen.bench", "-f", f"bounce-1@{SENDER_DOMAIN}",
            "-t", f"student@{RCPT_DOMAIN}", f"{HOST}:{port}"]
    res = Result(label)
    before = {name: cpu_seconds(pid) for name, pid in watch.items()}
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = children.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=phase_limit(args))
    except subprocess.TimeoutExpired:
        res.timed_out = True
        err = ""
    res.elapsed = time.perf_counter() - t0
    after = {name: cpu_seconds(pid) for name, pid in watch.items()}
    children.stop(proc)
    res.cpu = {n: (after[n] - before[n]) if after.get(n) is not None
               and before.get(n) is not None else None for n in watch}
    now = resource.getrusage(resource.RUSAGE_CHILDREN)  # smtp-source is the only child reaped
    res.cpu["loadgen"] = (now.ru_utime + now.ru_stime) - (reaped.ru_utime + reaped.ru_stime)
    if res.timed_out or proc.returncode != 0:
        res.failed = args.n
        res.errors = [err.strip()[:500] or f"smtp-source exit {proc.returncode}"]
    else:
        res.msgs = args.n  # smtp-source exits non-zero on any SMTP error
    return res


def start_sink(children: Children, dns: bool, tmp: Path,
               dkim_record: Path | None = None) -> tuple[subprocess.Popen, int, int]:
    """The sink process: its SMTP port, and the port of its DNS responder (0 when none)."""
    (tmp / "capture").mkdir(exist_ok=True)
    argv = [sys.executable, str(Path(__file__).resolve()), "_sink",
            "--capture", str(tmp / "capture")]
    if dns:
        argv += ["--dns", "--dns-log", str(tmp / "dns.log")]
    if dkim_record is not None:
        argv += ["--dkim-record", str(dkim_record)]
    proc = children.start(argv, stdout=subprocess.PIPE, text=True)
    ports = proc.stdout.readline().split()
    if len(ports) != 2 or not all(p.isdigit() for p in ports):
        raise RuntimeError("the sink did not start")
    return proc, int(ports[0]), int(ports[1])


IDENTIFY_CHECKS = ("identity", "registration", "return_path")


def gateway_features() -> dict:
    """What the gateway in this tree knows: its check names and the config keys the bench sets
    (the configuration refuses unknown keys, and other people keep adding sections)."""
    import dataclasses

    sys.path.insert(0, str(REPO))
    from gateway.infra import config as gconfig
    from gateway.checks import CHECKS

    sections = {f.name for f in dataclasses.fields(gconfig.Config)}

    def keys(section: str, cls: str) -> set[str]:
        if section not in sections or not hasattr(gconfig, cls):
            return set()
        return {f.name for f in dataclasses.fields(getattr(gconfig, cls))}

    names = list(dict.fromkeys(c.name for c in CHECKS))  # a check may run at two stages
    return {"checks": names, "limits": keys("limits", "LimitsConfig"),
            "dns": keys("dns", "DnsConfig")}


def start_redis(children: Children, directory: Path) -> str:
    """A redis-server on loopback for the --rate-limit redis variant; its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("--rate-limit redis needs redis-server (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    children.start([exe, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no",
                    "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), 0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return f"redis://{HOST}:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def write_gateway_config(directory: Path, sink_port: int, log_level: str, args,
                         features: dict, state_url: str = "memory:",
                         rate_limit: bool = False,
                         limits: dict[str, object] | None = None) -> tuple[Path, int, int]:
    """The gateway's config; ``limits`` (TOML values as text) override the bench's [limits]."""
    directory.mkdir(parents=True)
    (directory / "senders").mkdir()
    (directory / "senders" / "bench.toml").write_text(SENDER_FILE)
    smtp_port, admin_port = free_port(), free_port()
    text = textwrap.dedent(f"""\
        [server]
        listen = ["{HOST}:{smtp_port}"]
        hostname = "gw.bench"

        [upstream]
        url = "smtp://{HOST}:{sink_port}"
        starttls = "off"
        pool_size = {max(20, args.c)}

        [state]
        url = "{state_url}"

        [university]
        domains = ["{RCPT_DOMAIN}"]

        [senders]
        dir = "senders"

        [admin]
        listen = "{HOST}:{admin_port}"

        [logging]
        level = "{log_level}"
        hash_key_file = "recipient-hash.key"
        """)
    # Rate limits and session caps raised so they never bind (the limiter code still runs).
    overrides = limits or {}
    limits = {"sender_rate": '"1000000/second"', "allow_above_policy": "true",
              "sessions_per_sender": max(1000, args.c), "sessions_per_ip": max(1000, args.c),
              "sessions_total": max(1000, args.c), "connection_rate": '"1000000/second"'}
    limits.update(overrides)
    limits = {k: v for k, v in limits.items() if k in features["limits"]}
    if limits:
        text += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    # No DNS query may leave loopback: the resolver asks the sink's responder (--checks all),
    # or a closed port on 127.0.0.1.
    if "nameservers" in features["dns"]:
        text += f'\n[dns]\nnameservers = ["{HOST}:{args.dns_port or free_port()}"]\n'
        if "timeout" in features["dns"]:
            text += "timeout = 1.0\n"
    modes = {name: ("enforce" if args.checks == "all" or name in IDENTIFY_CHECKS else "off")
             for name in features["checks"]}
    modes.update(args.check_modes)
    if rate_limit:
        modes["rate_limit"] = "enforce"
    for name, mode in modes.items():
        text += f'\n[checks.{name}]\nmode = "{mode}"\n'
    path = directory / "gateway.toml"
    path.write_text(text)
    return path, smtp_port, admin_port


_UVLOOP_GATEWAY = ("import asyncio, sys, uvloop; "
                   "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                   "from gateway.ops.cli import main; sys.exit(main(sys.argv[1:]))")


def start_gateway(children: Children, config: Path, admin_port: int, log_path: Path,
                  profile: str | None, uvloop: bool = False,
                  timeout: float = 30.0) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    if uvloop:  # an experiment: the same gateway on uvloop's event loop
        argv[1:3] = ["-c", _UVLOOP_GATEWAY]
    if profile == "cprofile":
        if uvloop:
            raise RuntimeError("--profile cprofile and --gateway-uvloop do not go together")
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


def start_py_spy(children: Children, pid: int, out: Path) -> subprocess.Popen:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        raise RuntimeError("--profile py-spy needs py-spy (pip install py-spy)")
    proc = children.start([exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                           "--output", str(out), "--nonblocking"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    if proc.poll() is not None:
        raise RuntimeError("py-spy failed: " + proc.stderr.read().decode(errors="replace"))
    return proc


_BOILERPLATE = {  # frames every sample of the gateway goes through
    "_run_module_as_main (<frozen runpy>)", "_run_code (<frozen runpy>)", "<module> (__main__.py)",
    "main (cli.py)", "cmd_serve (cli.py)", "run (runners.py)", "Runner.run (runners.py)",
    "BaseEventLoop.run_until_complete (base_events.py)",
    "BaseEventLoop.run_forever (base_events.py)", "BaseEventLoop._run_once (base_events.py)"}


def _short_frame(frame: str) -> str:
    """``"func (/path/to/file.py:12)"`` -> ``"func (file.py)"``."""
    if " (" not in frame:
        return frame
    name, where = frame.rsplit(" (", 1)
    return f"{name} ({where.split(':')[0].rsplit('/', 1)[-1].rstrip(')')})"


def summarize_profile(path: Path, kind: str, top: int = 25) -> None:
    """Print the hottest functions: cumulative (inclusive) and own time."""
    if kind == "cprofile":
        import pstats
        stats = pstats.Stats(str(path))
        stats.sort_stats("tottime").print_stats(top)
        return
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short_frame(f) for f in stack.split(";")]
        for f in set(frames) - _BOILERPLATE:
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    if not total:
        print("  (no samples)")
        return
    for title, table in (("inclusive", inclusive), ("own", own)):
        print(f"  top {top} by {title} share of {total} on-CPU samples:")
        for name, n in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {100 * n / total:5.1f}%  {name}")


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def fmt_cpu(res: Result, name: str) -> str:
    x = res.cpu.get(name)
    return "-" if x is None or not res.msgs else f"{x / res.msgs * 1e6:.0f}"


def prepare_dkim(args, tmp: Path) -> bytes:
    """--dkim: a key pair, its record for the sink's DNS, and every message the load generator
    will send signed ahead of the timed part (pickled to ``args.messages_file``). Returns the
    first signed message (smtp-source's message and the sanity message)."""
    import pickle

    t0 = time.perf_counter()
    key, record = make_dkim_key(args.dkim, tmp)
    (tmp / "dkim-record.txt").write_text(record + "\n")
    count = args.n + args.c * args.warmup  # one sequence number per message sent in a phase
    messages = signed_messages(args.size, count, key, args.dkim)
    if not verify_locally(messages[0], record):
        raise RuntimeError("dkimpy does not verify the bench's own DKIM signature")
    args.messages_file = tmp / "messages.pickle"
    args.messages_file.write_bytes(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL))
    print(f"DKIM: {args.dkim} key, s={DKIM_SELECTOR} d={SENDER_DOMAIN}; {count} messages signed "
          f"in {time.perf_counter() - t0:.1f}s, before any timing "
          f"({len(messages[0])} bytes each with the signature)", flush=True)
    return messages[0]


def _header_field(message: bytes, name: str) -> list[str]:
    """The unfolded values of every ``name`` field in the header of ``message``."""
    import email.parser
    import email.policy

    head = message.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    return [" ".join(str(v).split()) for v in parsed.get_all(name) or []]


def sanity_pass(gateways: dict, message: bytes, capture: Path, timeout: float = 30.0) -> None:
    """Before any timing: one signed message through each gateway; the copy the sink received
    must carry the gateway's Authentication-Results with dkim=pass, or the run stops."""
    import smtplib

    for i, (level, (_, port, _)) in enumerate(gateways.items()):
        sender = f"{SANITY_PREFIX}{i}@{SENDER_DOMAIN}"
        try:
            with smtplib.SMTP(HOST, port, local_hostname="loadgen.bench", timeout=timeout) as c:
                c.sendmail(sender, [f"student0@{RCPT_DOMAIN}"], message)
        except smtplib.SMTPException as exc:
            raise RuntimeError(f"DKIM sanity message refused by the gateway ({level}): "
                               f"{exc}") from None
        path = capture / f"{sender}.eml"
        deadline = time.monotonic() + timeout
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not path.exists():
            raise RuntimeError(f"DKIM sanity message: the sink did not receive it ({level})")
        results = [v for v in _header_field(path.read_bytes(), "Authentication-Results")
                   if v.split(";", 1)[0].strip() == "gw.bench"]
        dkim_part = [p.strip() for v in results for p in v.split(";")
                     if p.strip().startswith("dkim=")]
        if not any(p.startswith("dkim=pass") for p in dkim_part):
            raise RuntimeError(f"DKIM sanity message ({level}): no dkim=pass in the "
                               f"Authentication-Results the sink received: {results or 'none'}")
        print(f"DKIM sanity ({level}): the sink received {dkim_part[0]}", flush=True)


def dns_summary(log: Path, gateways: int) -> str:
    """How many DNS queries the sink's responder answered over the whole run: with the
    gateway's cache working, a handful per gateway process, whatever the number of messages."""
    try:
        lines = log.read_text().splitlines()
    except OSError:
        lines = []
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"DNS: the sink answered {len(lines)} queries in all, for {gateways} gateway "
            f"process(es) (TTL {DNS_TTL}s): {detail or 'none'}")


def run(args) -> int:
    if args.driver == "smtp-source" and not shutil.which("smtp-source"):
        print("error: --driver smtp-source needs Postfix's smtp-source on PATH", file=sys.stderr)
        return 2
    drive = drive_smtp_source if args.driver == "smtp-source" else drive_python
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    expired = threading.Event()

    def abort(why: str) -> None:
        if not expired.is_set():
            expired.set()
            print(f"\nerror: {why}; stopping", file=sys.stderr)
            children.stop_all()

    def on_signal(signum, frame) -> None:  # Ctrl-C or kill: stop the children, then report
        threading.Thread(target=abort, args=(signal.Signals(signum).name,)).start()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    args.deadline = time.monotonic() + args.time_limit
    timer = threading.Timer(args.time_limit, abort,
                            (f"hard time limit of {args.time_limit:.0f}s reached",))
    timer.daemon = True
    timer.start()
    results: dict[str, list[Result]] = {}
    spies: dict[str, subprocess.Popen] = {}
    try:
        features = gateway_features()
        unknown = set(args.check_modes) - set(features["checks"])
        if unknown:
            raise RuntimeError(f"--check-mode: no check named {', '.join(sorted(unknown))} "
                               f"(checks: {', '.join(features['checks'])})")
        on = [n for n in features["checks"] if args.check_modes.get(
            n, "enforce" if args.checks == "all" or n in IDENTIFY_CHECKS else "off") != "off"]
        first = make_message(args.size, 0)
        args.messages_file = dkim_record = None
        if args.dkim != "none":
            first = prepare_dkim(args, tmp)
            dkim_record = tmp / "dkim-record.txt"
        args.message_file = tmp / "message.txt"  # smtp-source's: LF lines, it sends CRLF
        args.message_file.write_bytes(first.replace(b"\r\n", b"\n"))
        dns_on = bool(set(on) - set(IDENTIFY_CHECKS)) or args.dkim != "none"
        sink, sink_port, args.dns_port = start_sink(children, dns_on, tmp, dkim_record)
        gateways = {}
        # (label, log level, state url, rate limit on): the log levels first, then one variant
        # per --rate-limit backend, at the first log level, to price the rate decision
        variants = [(level, level, "memory:", False) for level in args.log_levels]
        for backend in args.rate_limits:
            url = {"memory": "memory:", "sqlite": "sqlite:state.sqlite3"}.get(backend) \
                or start_redis(children, tmp / "redis")
            variants.append((f"{args.log_levels[0]}+rate {backend}", args.log_levels[0], url, True))
        for level, log_level, state_url, rate in variants:
            slug = level.replace(" ", "-").replace("+", "-")
            config, smtp_port, admin_port = write_gateway_config(
                tmp / f"gw-{slug}", sink_port, log_level, args, features, state_url, rate)
            proc = start_gateway(children, config, admin_port, tmp / f"gw-{slug}" / "log",
                                 args.profile, args.gateway_uvloop)
            gateways[level] = (proc, smtp_port, config)
            if args.profile == "py-spy":
                spies[level] = start_py_spy(children, proc.pid, config.parent / "py-spy.txt")
        print(f"N={args.n} messages, C={args.c} sessions, {args.size} bytes each, "
              f"driver={args.driver}, {args.rounds} round(s), {os.cpu_count()} CPU(s)"
              + (", gateway on uvloop" if args.gateway_uvloop else ""), flush=True)
        print(f"gateway checks on: {', '.join(on) or 'none'}; "
              f"off: {', '.join(n for n in features['checks'] if n not in on) or 'none'}",
              flush=True)
        if args.dkim != "none":
            if "sender_auth" in on:
                sanity_pass(gateways, first, tmp / "capture")
            else:
                print("DKIM: sender_auth is off, so the gateway does not verify the signatures "
                      "(--checks all or --check-mode sender_auth=enforce to verify them)",
                      flush=True)
        w = max(len(f"gateway ({level})") for level in gateways)
        for r in range(args.rounds):
            res = drive(children, sink_port, args, "direct", {"sink": sink.pid})
            results.setdefault("direct", []).append(res)
            print(f"  round {r + 1}: {'direct':<{w}} {res.rate:8.0f} msgs/s", flush=True)
            for level, (proc, smtp_port, _) in gateways.items():
                label = f"gateway ({level})"
                res = drive(children, smtp_port, args, label,
                            {"gateway": proc.pid, "sink": sink.pid})
                results.setdefault(label, []).append(res)
                print(f"  round {r + 1}: {label:<{w}} {res.rate:8.0f} msgs/s", flush=True)
        if dns_on and (args.checks == "all" or "sender_auth" in on):
            print(dns_summary(tmp / "dns.log", len(gateways)), flush=True)
        for level, (proc, _, config) in gateways.items():
            if level in spies:
                spies[level].send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spies[level].wait(30)
                children.stop(spies[level])
            children.stop(proc)
            if args.profile:
                name = "gateway.pstats" if args.profile == "cprofile" else "py-spy.txt"
                dest = Path(args.profile_out or ".").resolve() / f"gateway-{level}.{name}"
                shutil.copy(config.parent / name, dest)
                print(f"\nprofile of the gateway ({level}), all rounds: {dest}")
                summarize_profile(dest, args.profile)
            if args.keep_logs:
                dest = Path(args.keep_logs).resolve() / f"gateway-{level}.log"
                shutil.copy(config.parent / "log", dest)
    except Exception as exc:
        failure = str(exc)
    else:
        failure = None
    finally:
        timer.cancel()
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if failure or expired.is_set():
        if failure and not expired.is_set():
            print(f"error: {failure}", file=sys.stderr)
        if results:
            print("\n(incomplete run: what was measured)")
            report(results, args)
        return 2
    return report(results, args)


def report(results: dict[str, list[Result]], args) -> int:
    direct = results["direct"]
    w = max(18, *(len(label) for label in results))
    print()
    print(f"{'':<{w}} {'msgs/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'failed':>6}   CPU µs/msg: {'gateway':>7} {'sink':>5} {'loadgen':>7}")
    status = 0
    first_ratio = None
    for label, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        # each gateway round is compared with the direct measurement of the same round
        ratio = statistics.median(r.rate / d.rate if d.rate else 0.0 for r, d in zip(runs, direct))
        if label != "direct" and first_ratio is None:
            first_ratio = ratio
        merged = Result(label, msgs=sum(r.msgs for r in runs),
                        latencies=[x for r in runs for x in r.latencies])
        for name in ("gateway", "sink", "loadgen"):
            vals = [r.cpu.get(name) for r in runs]
            merged.cpu[name] = None if any(v is None for v in vals) else sum(vals)
        failed = sum(r.failed for r in runs)
        print(f"{label:<{w}} {rate:8.0f} {ratio:6.2f} {fmt_ms(merged.pct(0.50)):>7} "
              f"{fmt_ms(merged.pct(0.99)):>7} {failed:>6}   {'':<11} "
              f"{fmt_cpu(merged, 'gateway'):>7} {fmt_cpu(merged, 'sink'):>5} "
              f"{fmt_cpu(merged, 'loadgen'):>7}")
        errors: dict[str, int] = {}
        for r in runs:
            for e in r.errors:
                errors[e] = errors.get(e, 0) + 1
        for e, n in list(errors.items())[:3]:
            print(f"    error{f' (x{n})' if n > 1 else ''}: {e}")
        if failed or any(r.timed_out for r in runs):
            status = 2
    if args.rounds > 1:
        print(f"(msgs/s: median of {args.rounds} rounds; ratio: median of the per-round ratios; "
              "latency and CPU: all rounds)")
    if status:
        print("error: some messages failed or a phase timed out", file=sys.stderr)
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
        p.add_argument("--dns", action="store_true")
        p.add_argument("--dkim-record", help="file holding the DKIM key record to publish")
        p.add_argument("--dns-log", help="append each DNS query (name, type) to this file")
        p.add_argument("--capture", help="directory for the sanity messages received")
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
        p.add_argument("--messages", help="pickled list of the (signed) messages to send")
        return run_load(p.parse_args(argv[1:]))

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--messages", dest="n", type=int, default=2000,
                   help="messages per measurement (default %(default)s)")
    p.add_argument("-c", "--concurrency", dest="c", type=int, default=20,
                   help="concurrent SMTP sessions (default %(default)s)")
    p.add_argument("--size", type=int, default=10_000,
                   help="message size in bytes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
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
    p.add_argument("--checks", choices=["identify", "all"], default="identify",
                   help="gateway checks: 'identify' (default, the documented target) enforces "
                        "identity, registration and return_path and turns every other check off; "
                        "'all' enforces every check")
    p.add_argument("--dkim", choices=["none", "rsa2048", "ed25519"], default="none",
                   help="DKIM-sign every message (d=%s, s=%s) with a key made for the run, "
                        "ahead of the timed part; the sink publishes the key in DNS. With "
                        "sender_auth on (--checks all), one message through each gateway must "
                        "come out with dkim=pass first (default %%(default)s)"
                        % (SENDER_DOMAIN, DKIM_SELECTOR))
    p.add_argument("--rate-limit", dest="rate_limits", action="append", default=[],
                   choices=["memory", "sqlite", "redis"],
                   help="also run the gateway with the rate_limit check on (limits too high to "
                        "bind) over this state backend, to price the rate decision; repeat")
    p.add_argument("--check-mode", dest="check_modes", action="append", default=[],
                   metavar="NAME=MODE", help="override one check's mode (enforce, monitor, off); "
                                             "repeat")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="hard limit for the whole run, seconds (default %(default)s)")
    p.add_argument("--min-ratio", type=float,
                   help="exit 1 when gateway/direct (first log level) is below this")
    p.add_argument("--profile", choices=["py-spy", "cprofile"],
                   help="profile the gateway during the run (py-spy attaches to it; cProfile "
                        "runs it under python -m cProfile), save and summarize the profile")
    p.add_argument("--gateway-uvloop", action="store_true",
                   help="experiment: run the gateway on uvloop (needs uvloop installed); the "
                        "sink and load generator stay on asyncio")
    p.add_argument("--profile-out", metavar="DIR", help="where to save profiles (default .)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the gateway logs here at the end")
    args = p.parse_args(argv)
    if args.n < 1 or args.c < 1 or args.size < 512 or args.rounds < 1:
        p.error("-n, -c and --rounds must be positive and --size at least 512")
    args.c = min(args.c, args.n)
    modes = {}
    for item in args.check_modes:
        name, eq, mode = item.partition("=")
        if not eq or mode not in ("enforce", "monitor", "off"):
            p.error(f"--check-mode {item!r}: expected NAME=enforce|monitor|off")
        modes[name] = mode
    args.check_modes = modes
    args.log_levels = args.log_levels or ["warning", "info"]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
