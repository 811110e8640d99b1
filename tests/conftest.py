"""Test fixtures: a real gateway listening on loopback, a real aiosmtpd upstream that records
what it receives, configuration written as real files, and a clock the tests move by hand."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import smtplib
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.infra.clock import FakeClock
from gateway.infra.config import load_config
from gateway.infra.event_loop import loop_factory
from gateway.ops.maillog import configure_logging
from gateway.policy.senders import load_registry
from tests.chunking_smtp import ChunkingController

EXAMPLE_SENDER = """
id = "acme"
organization = "Acme Marketing Cloud"
contact = "postmaster@acme.example"
networks = ["127.0.0.1/32", "::1/128"]
domains = ["em.acme.example"]
return_path = ["bounce-*@em.acme.example"]
expires = 2027-06-30
"""

MESSAGE = (b"From: Acme News <news@em.acme.example>\r\n"
           b"To: Alice <alice@example.edu>\r\n"
           b"List-Unsubscribe: <https://em.acme.example/u/1>, <mailto:unsub-1@em.acme.example>\r\n"
           b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
           b"Subject: Hello\r\n"
           b"Message-ID: <m1@em.acme.example>\r\n"
           b"\r\n"
           b"Hello, world.\r\n")


# Under CI (CI=true) a test whose real component is missing fails instead of skipping: every such
# skip says "... is not installed" (a skip for any other reason stays a skip).
MISSING_COMPONENT = "not installed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_COMPONENT in reason:
        report.outcome = "failed"
        report.longrepr = f"CI=true and a real component is missing: {reason}"


ROOT = Path(__file__).resolve().parent.parent


def serve_process(config: Path, admin_port: int, *, env: dict | None = None,
                  timeout: float = 20, **popen) -> subprocess.Popen:
    """``gateway serve --config CONFIG`` as a process of its own, returned once its /readyz
    answers 200; if it exits or is not ready within ``timeout`` it is killed and the test fails
    with what it printed. ``popen`` goes to Popen (stdout, stderr, text)."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            env=env if env is not None else {**os.environ, "PYTHONPATH": str(ROOT)},
                            **popen)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:  # not listening yet, or 503 (HTTPError) while not ready
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate()
                raise AssertionError(f"gateway did not start: {err or out!r}") from None
            time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    chunks: int = 0  # BDAT chunks it came in (RFC 3030); 0: DATA


class SinkHandler:
    """An upstream that records messages; tests set refusals and replies per stage."""

    def __init__(self) -> None:
        self.messages: list[Received] = []
        self.refuse_rcpt: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.rcpt_seen: list[str] = []
        self.mails = 0  # MAIL commands received, refused or not
        self.ehlos = 0
        self.rsets = 0
        self.tls_seen: list[bool] = []
        # the commands ("MAIL", "RCPT", "DATA": the final dot) this upstream never answers: it
        # hangs until the client closes the connection
        self.stall: set[str] = set()
        # offer PIPELINING (RFC 2920), as campus mail's Postfix does (aiosmtpd itself does not,
        # but answers pipelined commands in order); False: an upstream without it
        self.pipelining = True
        # offer CHUNKING (RFC 3030: BDAT), as Postfix does; False: DATA only
        self.chunking = True

    async def _stalled(self, command: str) -> None:
        if command in self.stall:
            await asyncio.Event().wait()  # cancelled when the connection closes

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlos += 1
        self.tls_seen.append(session.ssl is not None)
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if self.chunking:
            responses.insert(-1, "250-CHUNKING")
        return responses

    async def handle_RSET(self, server, session, envelope):
        self.rsets += 1
        return "250 2.0.0 OK"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        await self._stalled("MAIL")
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_seen.append(address)
        await self._stalled("RCPT")
        if address in self.refuse_rcpt:
            return self.refuse_rcpt[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_tls = session.ssl is not None or server.transport.get_extra_info("sslcontext") is not None
        await self._stalled("DATA")
        if self.data_reply:
            return self.data_reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, list(envelope.mail_options),
                                      getattr(envelope, "chunks", 0)))
        return f"250 2.0.0 Ok: queued as SINK{len(self.messages)}"


class Sink:
    """An aiosmtpd upstream on loopback. ``implicit_tls`` makes it smtps://; ``starttls`` offers
    STARTTLS (both need a (cert, key) pair)."""

    def __init__(self, implicit_tls=None, starttls=None) -> None:
        import ssl

        self.handler = SinkHandler()
        self.port = free_port()
        self.scheme = "smtps" if implicit_tls else "smtp"
        kwargs = {}
        if implicit_tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*map(str, implicit_tls))
            kwargs["ssl_context"] = ctx
        if starttls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*map(str, starttls))
            kwargs["tls_context"] = ctx
        self.controller = ChunkingController(self.handler, hostname="127.0.0.1", port=self.port,
                                             **kwargs)
        self.controller.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def scripted():
    """Makes scripted upstreams (tests/scripted_upstream.py), stopped after the test."""
    from tests.scripted_upstream import ScriptedUpstream

    servers: list[ScriptedUpstream] = []

    def make(**kwargs) -> ScriptedUpstream:
        servers.append(ScriptedUpstream(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


class RunningGateway:
    """A Gateway on its own event loop in a thread, so tests can use blocking SMTP clients."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # the loop `gateway serve` runs on by default ([server] event_loop = "auto": uvloop);
        # GATEWAY_TEST_EVENT_LOOP=asyncio runs the suite's gateways on the standard library's
        factory, _ = loop_factory(os.environ.get("GATEWAY_TEST_EVENT_LOOP", "auto"))
        self.loop = factory() if factory is not None else asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(gateway.start())

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.gateway.smtp_addresses[0][1]

    @property
    def admin_url(self) -> str:
        host, port = self.gateway.admin_address
        return f"http://{host}:{port}"

    def smtp(self, host: str = "127.0.0.1") -> smtplib.SMTP:
        client = smtplib.SMTP(host, self.port, timeout=30)
        client.ehlo("client.test")
        return client

    def metric(self, name: str, **labels) -> float:
        value = self.gateway.metrics_registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def stop(self) -> None:
        try:
            self.call(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class GatewayFactory:
    tmp_path: Path
    clock: FakeClock = field(default_factory=lambda: FakeClock(
        dt.datetime(2026, 11, 2, 15, 0, tzinfo=dt.timezone.utc)))
    running: list[RunningGateway] = field(default_factory=list)

    def write(self, toml: str = "", senders: dict[str, str] | None = None,
              upstream: str | None = None) -> Path:
        base = self.tmp_path / "gw"
        (base / "senders").mkdir(parents=True, exist_ok=True)
        for name, text in (senders if senders is not None else {"acme": EXAMPLE_SENDER}).items():
            (base / "senders" / f"{name}.toml").write_text(textwrap.dedent(text))
        sections = textwrap.dedent(toml)
        head = ""
        if "[server]" not in sections:
            head += '[server]\nlisten = ["127.0.0.1:0"]\nhostname = "gw.test"\n'
        if "[admin]" not in sections:
            head += '[admin]\nlisten = "127.0.0.1:0"\n'
        if "[upstream]" in sections and "probe =" not in sections:
            # no background probes of the sink unless a test asks (they would be its sessions)
            sections = sections.replace("[upstream]\n", "[upstream]\nprobe = false\n", 1)
        if "[upstream]" not in sections:
            # no background probes of the sink (they would count as its sessions)
            head += f'[upstream]\nurl = "{upstream or "maildir:maildir"}"\nprobe = false\n'
        if "[state]" not in sections:
            head += '[state]\nurl = "memory:"\n'
        if "[senders]" not in sections:
            head += '[senders]\ndir = "senders"\n'
        if "[checks.sender_auth]" not in sections:
            # SPF/DKIM need DNS: off unless a test (tests/test_auth*.py) configures it
            sections += '\n[checks.sender_auth]\nmode = "off"\n'
        path = base / "gateway.toml"
        path.write_text(head + sections)
        return path

    def start(self, toml: str = "", senders: dict[str, str] | None = None,
              upstream: str | None = None) -> RunningGateway:
        path = self.write(toml, senders, upstream)
        config = load_config(path)
        registry = load_registry(config.path(config.senders.dir), config.checks,
                             config.limits.ceiling)
        gw = RunningGateway(Gateway(config, registry, clock=self.clock,
                                    metrics_registry=CollectorRegistry()))
        self.running.append(gw)
        return gw


@pytest.fixture
def gateways(tmp_path):
    factory = GatewayFactory(tmp_path)
    yield factory
    for gw in factory.running:
        gw.stop()


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict]:
        return [line for line in self.lines() if line.get("event") == name]

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    """A self-signed certificate and key for STARTTLS, made with the openssl command."""
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=gw.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free loopback port, for this test (skipped without one)."""
    import shutil

    from tests.redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(tmp_path, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def logs():
    """Every test logs JSON into memory (structlog is configured per process)."""
    capture = LogCapture()
    configure_logging("debug", "json", stream=capture.stream)
    return capture


def send(gw: RunningGateway, mail_from="bounce-1@em.acme.example", rcpts=("alice@example.edu",),
         message: bytes = MESSAGE):
    """Send one message; return (client, the reply to the final dot or the first refusal)."""
    client = gw.smtp()
    code, text = client.mail(mail_from)
    if code != 250:
        return client, (code, text)
    for r in rcpts:
        code, text = client.rcpt(r)
        if code >= 400:
            return client, (code, text)
    return client, client.data(message)
