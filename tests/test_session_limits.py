"""Issue #10 items 10 and 11 through a listening gateway on raw sockets: the gateway-wide
session cap, the per-IP connection rate, and SMTP AUTH throttling over real STARTTLS (exact
replies, the log events, the metrics; counts shared through a real Redis)."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from gateway.policy.passwords import hash_password
from tests.conftest import EXAMPLE_SENDER
from tests.raw_smtp import RawSMTP

FAST_HASH = hash_password("s3cret-pass", ln=4)
AUTH_SENDER = EXAMPLE_SENDER + f"""
[auth]
username = "acme-smtp"
password_hash = "{FAST_HASH}"
"""
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
OK = b"235 2.7.0 Authentication successful\r\n"


def wait_until(condition, timeout: float = 10.0) -> None:
    """Wait for a condition the gateway's thread makes true (a session counted, a reply held)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def plain(username: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{username}\0{password}".encode())


def tls_gateway(gateways, tls_files, limits: str = "", state: str = ""):
    cert, key = tls_files
    return gateways.start(f"""
    [server]
    listen = ["127.0.0.1:0", "[::1]:0"]
    hostname = "gw.test"
    tls_cert = "{cert}"
    tls_key = "{key}"
    [limits]
    {limits}
    {state}
    """, senders={"acme": AUTH_SENDER})


def tls_session(gw, host: str = "127.0.0.1") -> RawSMTP:
    port = gw.gateway.smtp_addresses[0 if host == "127.0.0.1" else 1][1]
    c = RawSMTP(port, host)
    assert c.greeting.startswith(b"220 gw.test")
    c.cmd(b"EHLO client.test")
    c.starttls()
    assert b"250-AUTH LOGIN PLAIN" in c.cmd(b"EHLO client.test")
    return c


def held(gw, gateways, command: bytes, c: RawSMTP, seconds: float) -> bytes:
    """Send ``command``; its reply is held for ``seconds`` of the gateway's clock: wait for
    the hold to begin, move the clock on, and return the reply."""
    c.send(command + b"\r\n")
    wait_until(lambda: gateways.clock.sleeping == 1)
    gateways.clock.advance(seconds)
    return c.reply()


# --- item 11: sessions_total and connection_rate ----------------------------------------------

def test_sessions_total_caps_the_gateway_with_421_before_the_greeting(gateways):
    gw = gateways.start("[limits]\nsessions_total = 2\n")
    guard = gw.gateway.handler.guard
    first, second = RawSMTP(gw.port), RawSMTP(gw.port)
    assert first.greeting.startswith(b"220 ") and second.greeting.startswith(b"220 ")
    with RawSMTP(gw.port) as third:
        assert third.greeting == b"421 4.7.0 Too many sessions (at most 2); try again later\r\n"
        assert third.closed()
    assert gw.metric("gateway_sessions_refused_total", cap="total") == 1
    first.cmd(b"QUIT")
    first.close()
    wait_until(lambda: guard.open == 1)
    with RawSMTP(gw.port) as again:
        assert again.greeting.startswith(b"220 ")
        assert again.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"
    second.close()


def test_connection_rate_per_ip_refuses_before_tls(gateways, tls_files):
    gw = tls_gateway(gateways, tls_files, 'connection_rate = "2/minute"')
    for _ in range(2):
        with RawSMTP(gw.port) as c:
            assert c.greeting.startswith(b"220 gw.test")
    with RawSMTP(gw.port) as c:  # the refusal is the first line: no STARTTLS, no AUTH
        assert c.greeting == (b"421 4.7.0 Too many connections from [127.0.0.1] "
                              b"(at most 2/minute); try again later\r\n")
        assert c.closed()
    assert gw.metric("gateway_sessions_refused_total", cap="rate") == 1
    # another address has its own budget
    with RawSMTP(gw.gateway.smtp_addresses[1][1], "::1") as c:
        assert c.greeting.startswith(b"220 gw.test")


# --- item 10: AUTH throttling ----------------------------------------------------------------

def test_auth_failures_grow_the_delay_then_421_and_close(gateways, tls_files, logs):
    gw = tls_gateway(gateways, tls_files)
    with tls_session(gw) as c:
        assert c.cmd(plain("acme-smtp", "guess-1")) == INVALID  # the first: no delay
        assert held(gw, gateways, plain("acme-smtp", "guess-2"), c, 1.0) == INVALID
        # the third on one connection (auth_failures_per_session = 3): 421 and closed
        assert held(gw, gateways, plain("acme-smtp", "guess-3"), c, 2.0) == (
            b"421 4.7.0 Too many authentication failures (3); closing connection\r\n")
        assert c.closed()
    events = logs.events("auth_failed")
    assert [(e["reason"], e["session_failures"], e["ip_failures"], e["delay"], e["reply"])
            for e in events] == [("invalid", 1, 1, 0.0, "535 5.7.8"),
                                 ("invalid", 2, 2, 1.0, "535 5.7.8"),
                                 ("invalid", 3, 3, 2.0, "421 4.7.0")]
    assert all(e["username"] == "acme-smtp" and e["client_ip"] == "127.0.0.1" for e in events)
    assert "guess" not in logs.text()
    assert gw.metric("gateway_auth_failures_total", reason="invalid") == 3
    assert gw.metric("gateway_auth_throttled_total", action="delay") == 2
    assert gw.metric("gateway_auth_throttled_total", action="disconnect") == 1
    # a new connection from the same IP carries on where the window is (4th failure: 4 s)
    with tls_session(gw) as c:
        assert held(gw, gateways, plain("acme-smtp", "guess-4"), c, 4.0) == INVALID
        assert c.cmd(plain("acme-smtp", "s3cret-pass")) == OK


def test_a_username_under_attack_from_several_ips_is_slowed_not_locked(gateways, tls_files,
                                                                        logs):
    gw = tls_gateway(gateways, tls_files, "auth_failures_per_session = 5")
    with tls_session(gw) as c:
        assert c.cmd(plain("acme-smtp", "guess-1")) == INVALID
        assert held(gw, gateways, plain("acme-smtp", "guess-2"), c, 1.0) == INVALID
    with tls_session(gw, "::1") as c:  # a new IP, the same username: its count decides
        assert held(gw, gateways, plain("acme-smtp", "guess-3"), c, 2.0) == INVALID
        # ::1's second failure, other-user's first: the IP's count decides
        assert held(gw, gateways, plain("other-user", "guess"), c, 1.0) == INVALID
    last = logs.events("auth_failed")[-2:]
    assert [(e["client_ip"], e["ip_failures"], e["username_failures"], e["delay"])
            for e in last] == [("::1", 1, 3, 2.0), ("::1", 2, 1, 1.0)]


def test_auth_failures_allowed_per_session_must_be_5_or_fewer(gateways):
    from gateway.infra.typed import ConfigError

    with pytest.raises(ConfigError, match="auth_failures_per_session: must be between 1 and 5"):
        gateways.start("[limits]\nauth_failures_per_session = 6\n")


def _lockout_then_expiry(gateways, first, second, logs) -> None:
    """Three failures through ``first`` lock the IP out on ``second`` too, until the window
    (auth_window) has passed."""
    with tls_session(first) as c:
        for i in range(3):
            assert c.cmd(plain("acme-smtp", f"guess-{i}")) == INVALID
        locked = b"454 4.7.0 Too many authentication failures from [127.0.0.1]; try again later\r\n"
        # the right password is not even verified while locked out
        assert c.cmd(plain("acme-smtp", "s3cret-pass")) == locked
    with tls_session(second) as c:
        assert c.cmd(plain("acme-smtp", "s3cret-pass")) == locked
        [lockout] = logs.events("auth_lockout")
        assert lockout["client_ip"] == "127.0.0.1" and lockout["failures"] == 3
    gateways.clock.advance(601)
    with tls_session(second) as c:
        assert c.cmd(plain("acme-smtp", "s3cret-pass")) == OK
    assert first.metric("gateway_auth_throttled_total", action="lockout") == 1
    gws = {id(first): first, id(second): second}.values()
    assert sum(g.metric("gateway_auth_failures_total", reason="locked_out") for g in gws) == 2


LOCKOUT = "auth_lockout = 3\nauth_window = 600\nauth_delay = 0\nauth_failures_per_session = 5"


@pytest.mark.parametrize("state", ['url = "memory:"', 'url = "sqlite:state.sqlite3"'])
def test_lockout_per_ip_after_failures_in_the_window(gateways, tls_files, logs, state):
    gw = tls_gateway(gateways, tls_files, LOCKOUT, f"[state]\n{state}")
    _lockout_then_expiry(gateways, gw, gw, logs)


def test_lockout_holds_across_gateways_sharing_redis(gateways, tls_files, redis_server, logs):
    state = f'[state]\nurl = "{redis_server.url}"'
    first = tls_gateway(gateways, tls_files, LOCKOUT, state)
    second = tls_gateway(gateways, tls_files, LOCKOUT, state)
    # (real Redis expires keys on its own clock: move it on by expiring the keys now)
    import redis

    def expire_now():
        client = redis.Redis.from_url(redis_server.url)
        for key in client.scan_iter("authfail:*"):
            client.pexpire(key, 1)
        client.close()

    original = gateways.clock.advance

    def advance(seconds):
        expire_now()
        wait_until(lambda: not redis.Redis.from_url(redis_server.url).keys("authfail:*"))
        original(seconds)

    gateways.clock.advance = advance
    _lockout_then_expiry(gateways, first, second, logs)


async def test_scrypt_verifications_run_at_most_auth_concurrency_at_once():
    from prometheus_client import CollectorRegistry

    from gateway.infra.clock import FakeClock
    from gateway.infra.config import LimitsConfig
    from gateway.ops.maillog import MailLog
    from gateway.ops.metrics import Metrics
    from gateway.smtp.auth_throttle import AuthThrottle
    from gateway.state.memory import MemoryStore

    clock = FakeClock()
    throttle = AuthThrottle(limits=LimitsConfig(auth_concurrency=2, auth_delay=0),
                            store=MemoryStore(clock), clock=clock,
                            metrics=Metrics(CollectorRegistry()), maillog=MailLog(b"k"))
    running, peak, release = 0, 0, asyncio.Event()

    async def verify() -> bool:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return True

    class Session:
        pass

    tasks = [asyncio.create_task(throttle.attempt(Session(), f"192.0.2.{i}", b"u", verify))
             for i in range(5)]
    while running < 2:
        await asyncio.sleep(0)
    for _ in range(20):
        await asyncio.sleep(0)
    assert running == 2  # the other three wait their turn
    release.set()
    assert all(v.ok for v in await asyncio.gather(*tasks)) and peak == 2


def test_auth_login_failures_are_throttled_the_same_way(gateways, tls_files, logs):
    gw = tls_gateway(gateways, tls_files)
    with tls_session(gw) as c:
        assert c.cmd(b"AUTH LOGIN") == b"334 VXNlciBOYW1lAA==\r\n"
        assert c.cmd(base64.b64encode(b"acme-smtp")) == b"334 UGFzc3dvcmQA\r\n"
        assert c.cmd(base64.b64encode(b"guess-1")) == INVALID
        assert c.cmd(b"AUTH LOGIN " + base64.b64encode(b"acme-smtp")) == b"334 UGFzc3dvcmQA\r\n"
        assert held(gw, gateways, base64.b64encode(b"guess-2"), c, 1.0) == INVALID
    assert [e["delay"] for e in logs.events("auth_failed")] == [0.0, 1.0]
