"""Issue #10 item 9: with pool_size = 2, sessions that send MAIL and go idle cannot starve other
senders of campus mail connections: a slot is waited for with a deadline (451 4.4.5), one sender
holds at most its share of the pool, and a silent transaction is closed (421 4.4.2), its slot
returned. Raw sockets, the real aiosmtplib pool, the sink as campus mail."""

from __future__ import annotations

import time

from tests.conftest import MESSAGE
from tests.raw_smtp import RawSMTP

ACME_V4 = """
id = "acme"
organization = "Acme Marketing Cloud"
contact = "postmaster@acme.example"
networks = ["127.0.0.1/32"]
domains = ["em.acme.example"]
return_path = ["bounce-*@em.acme.example"]
expires = 2027-06-30
"""
BETA_V6 = """
id = "beta"
organization = "Beta Events"
contact = "ops@beta.example"
networks = ["::1/128"]
domains = ["em.beta.example"]
return_path = ["bounce-*@em.beta.example"]
expires = 2027-06-30
"""
BUSY = b"451 4.4.5 All connections to campus mail are busy; try again later\r\n"


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def start(gateways, sink, upstream_keys: str):
    return gateways.start(f"""
    [server]
    listen = ["127.0.0.1:0", "[::1]:0"]
    hostname = "gw.test"
    [upstream]
    url = "{sink.url}"
    pool_size = 2
    {upstream_keys}
    """, senders={"acme": ACME_V4, "beta": BETA_V6})


def session(gw, host="127.0.0.1") -> RawSMTP:
    port = gw.gateway.smtp_addresses[0 if host == "127.0.0.1" else 1][1]
    c = RawSMTP(port, host)
    c.cmd(b"EHLO client.test")
    return c


def mail(c: RawSMTP, sender="acme") -> None:
    c.send(f"MAIL FROM:<bounce-1@em.{sender}.example>\r\n".encode())


def finish(c: RawSMTP, rcpt: bytes) -> bytes:
    assert c.cmd(b"RCPT TO:<" + rcpt + b">") == b"250 2.1.5 OK\r\n"
    assert c.cmd(b"DATA").startswith(b"354")
    c.send(MESSAGE + b".\r\n")
    return c.reply()


def test_a_slot_is_waited_for_with_a_deadline_then_451_4_4_5(gateways, sink):
    gw = start(gateways, sink, "sender_share = 1.0\npool_wait = 5.0")
    first, second, third = session(gw), session(gw), session(gw)
    for c in (first, second):
        mail(c)
        assert c.reply() == b"250 2.1.0 Sender OK\r\n"
    mail(third)  # both slots held: it waits, on the gateway's clock
    wait_until(lambda: gateways.clock.sleeping == 1)
    gateways.clock.advance(5.0)
    assert third.reply() == BUSY
    assert third.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"  # the session goes on
    assert finish(first, b"alice@example.edu").startswith(b"250 2.0.0 Ok: queued as SINK1")
    mail(third)  # the slot first's message freed
    assert third.reply() == b"250 2.1.0 Sender OK\r\n"
    for c in (first, second, third):
        c.close()
    assert [m.rcpt_tos for m in sink.messages] == [["alice@example.edu"]]


def test_one_sender_holds_at_most_its_share_of_the_pool(gateways, sink):
    """sender_share 0.5 of pool_size 2: acme's two idle sessions hold one slot, not both."""
    gw = start(gateways, sink, "pool_wait = 5.0")
    a1, a2, b = session(gw), session(gw), session(gw, "::1")
    mail(a1)
    assert a1.reply() == b"250 2.1.0 Sender OK\r\n"
    mail(a2)  # acme's share is used up: a2 waits for a1's slot
    wait_until(lambda: gateways.clock.sleeping == 1)
    mail(b, "beta")  # another sender is not starved
    assert b.reply() == b"250 2.1.0 Sender OK\r\n"
    assert finish(b, b"bob@example.edu").startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert finish(a1, b"alice@example.edu").startswith(b"250 2.0.0 Ok: queued as SINK2")
    assert a2.reply() == b"250 2.1.0 Sender OK\r\n"  # a1's slot passed on to a2
    assert finish(a2, b"carol@example.edu").startswith(b"250 2.0.0 Ok: queued as SINK3")
    for c in (a1, a2, b):
        c.close()
    assert [m.rcpt_tos for m in sink.messages] == [
        ["bob@example.edu"], ["alice@example.edu"], ["carol@example.edu"]]


def test_an_idle_transaction_is_closed_with_421_4_4_2_and_its_slot_freed(gateways, sink, logs):
    gw = start(gateways, sink, "sender_share = 1.0\ntransaction_idle = 0.5")
    idle1, idle2, third = session(gw), session(gw), session(gw, "::1")
    for c in (idle1, idle2):
        mail(c)
        assert c.reply() == b"250 2.1.0 Sender OK\r\n"
    mail(third, "beta")  # waits until the idle ones are closed (an event, not a sleep)
    assert third.reply() == b"250 2.1.0 Sender OK\r\n"
    for c in (idle1, idle2):
        assert c.reply() == b"421 4.4.2 Idle too long in a mail transaction; closing connection\r\n"
        assert c.closed()
    assert finish(third, b"bob@example.edu").startswith(b"250 2.0.0 Ok: queued as SINK1")
    third.close()
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.edu"]]
    assert [e["sender"] for e in logs.events("transaction_idle")] == ["acme", "acme"]
    assert gw.metric("gateway_sessions_refused_total", cap="idle") == 2


def test_outside_a_transaction_the_session_timeout_applies(gateways, sink):
    gw = start(gateways, sink, "transaction_idle = 0.5")
    c = session(gw)
    mail(c)
    assert c.reply() == b"250 2.1.0 Sender OK\r\n"
    assert c.cmd(b"RSET") == b"250 2.0.0 OK\r\n"
    idle = session(gw)  # a transaction-less session next to it is not closed
    mail(idle)
    assert idle.reply() == b"250 2.1.0 Sender OK\r\n"
    assert idle.reply().startswith(b"421 4.4.2")  # this one idled inside its transaction
    assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"  # still open, well after 0.5 s
    c.close()
    idle.close()


def test_session_timeout_counts_from_the_last_command(gateways, sink):
    """The session timeout is re-armed by every command (its timer only moves its deadline,
    see GatewaySMTP._reset_timeout): a session busy for longer than the timeout stays open, and
    one silent for the timeout is closed."""
    gw = gateways.start(f"""
    [server]
    listen = ["127.0.0.1:0"]
    hostname = "gw.test"
    timeout = 0.6
    [upstream]
    url = "{sink.url}"
    """)
    c = RawSMTP(gw.port, timeout=10)
    began = time.monotonic()
    while time.monotonic() - began < 1.5:  # well past the first deadline, never silent 0.6 s
        sent = time.monotonic()
        assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"
        time.sleep(0.15)
    assert c.closed()  # EOF once silent for the timeout after the last command
    assert 0.55 <= time.monotonic() - sent < 5
    c.close()
