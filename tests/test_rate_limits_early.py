"""The early refusal: a sender over its rate (or the gateway over its own) is answered 451 4.7.1
at MAIL, with the very text and retry time the end of the message would get, before anything
reaches campus mail; it spends no budget. On every state backend, through a live gateway."""

from __future__ import annotations

import pytest

from gateway.policy.rates import Rate
from gateway.state import Limit
from tests.conftest import EXAMPLE_SENDER, MESSAGE
from tests.raw_smtp import RawSMTP
from tests.test_rate_limits import WIDE, send_one

RATE3 = {"acme": EXAMPLE_SENDER + 'rate = "3/minute"\n'}
OVER = b"451 4.7.1 Sending rate of sender acme is limited to 3/minute; retry in %d s\r\n"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def state_toml(request, tmp_path):
    if request.param == "memory":
        return '[state]\nurl = "memory:"\n'
    if request.param == "sqlite":
        return f'[state]\nurl = "sqlite:{tmp_path / "state.sqlite3"}"\n'
    server = request.getfixturevalue("redis_server")
    return f'[state]\nurl = "{server.url}"\n'


def upstream_counts(sink) -> tuple[int, int, int]:
    """What campus mail saw: MAIL commands, RCPT commands, messages."""
    return sink.handler.mails, len(sink.handler.rcpt_seen), len(sink.messages)


def used(gw, key: str, count: int) -> int:
    """Events in the sliding window of ``key`` now, read from the gateway's store."""
    now = gw.gateway.clock.now().timestamp()
    return gw.call(gw.gateway.store.peek([Limit(key, count, 60)], now)).used


def refused_at_mail(gw) -> tuple[bytes, bytes, bytes]:
    """MAIL, then RCPT and DATA anyway, on raw sockets: the exact replies."""
    with RawSMTP(gw.port) as raw:
        raw.cmd(b"EHLO client.test")
        mail = raw.cmd(b"MAIL FROM:<bounce-9@em.acme.example>")
        rcpt = raw.cmd(b"RCPT TO:<alice@example.edu>")
        data = raw.cmd(b"DATA")
        raw.cmd(b"QUIT")
    return mail, rcpt, data


def test_sender_over_its_rate_is_refused_at_mail(gateways, sink, state_toml, logs):
    gw = gateways.start(WIDE + state_toml, senders=RATE3, upstream=sink.url)
    assert [send_one(gw)[0] for _ in range(3)] == [250, 250, 250]
    before = upstream_counts(sink)
    assert used(gw, "rate:acme:60", 3) == 3
    gateways.clock.advance(30)

    mail, rcpt, data = refused_at_mail(gw)
    assert mail == OVER % 30  # the text and retry time of the end-of-message deferral
    assert rcpt.startswith(b"503 ") and data.startswith(b"503 ")
    # nothing reached campus mail, not even a MAIL: the upstream transaction was never opened
    assert upstream_counts(sink) == before
    assert used(gw, "rate:acme:60", 3) == 3  # a look, not a take

    line = [e for e in logs.events("message") if e["decision"] == "defer"][-1]
    assert (line["stage"], line["reason"], line["decided_by"], line["reply"]) == (
        "mail", "rate_limited", "rate_limit",
        "451 4.7.1 Sending rate of sender acme is limited to 3/minute; retry in 30 s")
    assert line["queue_id"] is None and line["sender"] == "acme"
    assert gw.metric("gateway_messages_total", sender="acme", decision="defer",
                     reason="rate_limited") == 1
    assert gw.metric("gateway_rate_deferrals_total", sender="acme", limit="sender") == 1

    # once the first three leave the window, three more go through: the refusal spent nothing
    gateways.clock.advance(30)
    assert [send_one(gw)[0] for _ in range(3)] == [250, 250, 250]
    assert send_one(gw) == (451, OVER[4:-2] % 60)
    assert len(sink.messages) == 6


def test_gateway_wide_rate_is_refused_at_mail(gateways, sink, state_toml, logs):
    gw = gateways.start('[limits]\nglobal_rate = "2/minute"\nsessions_per_sender = 200\n'
                        'sessions_per_ip = 200\n' + state_toml, upstream=sink.url)
    assert [send_one(gw)[0] for _ in range(2)] == [250, 250]
    before = upstream_counts(sink)
    mail, _, _ = refused_at_mail(gw)
    assert mail == (b"451 4.7.1 Gateway-wide sending rate is limited to 2/minute to protect "
                    b"campus mail; retry in 60 s\r\n")
    assert upstream_counts(sink) == before
    assert used(gw, "rate:global:60", 2) == 2
    assert gw.metric("gateway_messages_total", sender="acme", decision="defer",
                     reason="global_rate_limited") == 1
    assert logs.events("message")[-1]["stage"] == "mail"


def test_budget_that_frees_within_max_hold_is_not_refused_at_mail(gateways, sink):
    gw = gateways.start(WIDE, senders=RATE3, upstream=sink.url)
    assert [send_one(gw)[0] for _ in range(3)] == [250, 250, 250]
    gateways.clock.advance(55)  # room in 5 s, within max_hold (10 s): MAIL goes through
    with gw.smtp() as client:
        assert client.mail("bounce-9@em.acme.example") == (250, b"2.1.0 Sender OK")
        assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
        assert sink.handler.mails == 4  # (MAIL FROM goes upstream with the first RCPT TO)
        client.rset()


def test_throttles_decide_at_mail_too(gateways, sink):
    gw = gateways.start(WIDE, upstream=sink.url)
    assert send_one(gw)[0] == 250
    throttles = gw.gateway.throttles
    gw.call(throttles.set("acme", Rate(1, 60)))
    mail, _, _ = refused_at_mail(gw)
    assert mail == b"451 4.7.1 Sending rate of sender acme is limited to 1/minute; retry in 60 s\r\n"
    gw.call(throttles.clear("acme"))  # the throttle lifted: the sender's own rate applies again
    assert send_one(gw)[0] == 250


def test_a_sender_deferred_at_the_end_is_refused_early_in_its_other_sessions(gateways, sink):
    """Two sessions pass MAIL while one message of budget is left; the second to finish is
    deferred at the end of its message, and from then on every further MAIL of the sender, in
    that session or any other, is refused before anything is sent upstream."""
    gw = gateways.start(WIDE, senders={"acme": EXAMPLE_SENDER + 'rate = "2/minute"\n'},
                        upstream=sink.url)
    assert send_one(gw)[0] == 250
    a, b, c = gw.smtp(), gw.smtp(), gw.smtp()
    try:
        for client in (a, b):
            assert client.mail("bounce-1@em.acme.example")[0] == 250
            assert client.rcpt("alice@example.edu")[0] == 250
        assert a.data(MESSAGE)[0] == 250
        assert b.data(MESSAGE) == (
            451, b"4.7.1 Sending rate of sender acme is limited to 2/minute; retry in 60 s")
        mails = sink.handler.mails
        for client in (b, c):
            assert client.mail("bounce-1@em.acme.example") == (
                451, b"4.7.1 Sending rate of sender acme is limited to 2/minute; retry in 60 s")
        assert sink.handler.mails == mails and len(sink.messages) == 2
    finally:
        for client in (a, b, c):
            client.close()


def test_monitor_mode_refuses_nothing_at_mail(gateways, sink, logs):
    gw = gateways.start(WIDE + '[checks.rate_limit]\nmode = "monitor"\n', senders=RATE3,
                        upstream=sink.url)
    assert [send_one(gw)[0] for _ in range(4)] == [250, 250, 250, 250]
    assert len(sink.messages) == 4
    assert gw.metric("gateway_check_monitored_total", check="rate_limit", action="defer") == 1
