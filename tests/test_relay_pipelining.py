"""MAIL FROM pipelined with the first RCPT TO (RFC 2920) to campus mail that offers PIPELINING,
against a scripted upstream on raw sockets: what it received in each read, and replies sent
together or apart, as a real MTA may send them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MESSAGE


@pytest.mark.parametrize("together", [True, False], ids=["replies-together", "replies-apart"])
def test_mail_and_the_first_rcpt_go_in_one_write(gateways, scripted, together):
    up = scripted(together=together)
    gw = gateways.start(upstream=up.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
    assert client.rcpt("bob@example.edu") == (250, b"2.1.5 OK")
    assert client.data(MESSAGE) == (250, b"2.0.0 Ok: queued as UP1")
    client.quit()
    [reads] = up.reads
    assert reads[0] == b"MAIL FROM:<bounce-1@em.acme.example>\r\nRCPT TO:<alice@example.edu>\r\n"
    assert reads[1] == b"RCPT TO:<bob@example.edu>\r\n"  # the later ones: one at a time
    [(mail_from, rcpts, content)] = up.messages
    assert (mail_from, rcpts) == ("bounce-1@em.acme.example",
                                  ["alice@example.edu", "bob@example.edu"])
    assert content.startswith(b"Received: from client.test ([127.0.0.1])")
    assert content.endswith(b"\r\n\r\nHello, world.\r\n")


def test_a_pooled_connection_closed_at_the_pipelined_mail_is_replaced(gateways, scripted):
    """Campus mail closes a pooled connection just as MAIL and RCPT arrive on it (its idle
    timeout): the pair goes once more on a fresh connection, and the vendor never knows."""
    up = scripted()
    up.close_on_pair = {1}
    gw = gateways.start(upstream=up.url)
    with gw.smtp() as client:  # connection 1: fresh, so no retry of its own; give it one
        up.close_on_pair = set()
        assert client.sendmail("bounce-1@em.acme.example", ["alice@example.edu"], MESSAGE) == {}
        up.close_on_pair = {1}
        assert client.mail("bounce-2@em.acme.example") == (250, b"2.1.0 Sender OK")
        assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
        assert client.data(MESSAGE) == (250, b"2.0.0 Ok: queued as UP2")
    assert len(up.reads) == 2
    assert [m[0] for m in up.messages] == ["bounce-1@em.acme.example", "bounce-2@em.acme.example"]


def test_a_fresh_connection_closed_at_the_pipelined_mail_is_451_4_4_2(gateways, scripted, logs):
    """A connection just opened that closes at MAIL and RCPT is no stale one: the recipient
    gets 451 4.4.2 (the vendor retries) and nothing is sent again."""
    up = scripted()
    up.close_on_pair = {1}
    gw = gateways.start(upstream=up.url)
    with gw.smtp() as client:
        assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
        assert client.rcpt("alice@example.edu") == (
            451, b"4.4.2 Connection to campus mail lost; try again later")
    assert len(up.reads) == 1 and up.messages == []


def test_a_transaction_left_before_any_recipient_sends_nothing_upstream(gateways, sink):
    """MAIL FROM waits for the first recipient, so a vendor that resets (or leaves) before one
    costs campus mail nothing, not even RSET, and the connection is reused."""
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    assert client.rset() == (250, b"2.0.0 OK")
    assert client.sendmail("bounce-2@em.acme.example", ["bob@example.edu"], MESSAGE) == {}
    client.quit()
    assert (sink.handler.mails, sink.handler.rsets, sink.handler.ehlos) == (1, 0, 1)
    assert [m.mail_from for m in sink.messages] == ["bounce-2@em.acme.example"]


@settings(max_examples=500, deadline=None)
@given(head=st.binary(max_size=40).map(lambda b: b.translate(bytes.maketrans(b"\x00\x01", b"\r\n"))),
       tail=st.lists(st.sampled_from([b"a", b"\r\n", b".", b" "]), max_size=20).map(b"".join))
def test_wire_exact_with_a_checked_tail_agrees_with_counting_it_all(head, tail):
    """Leaving out a tail that is CRLF-exact and ends with CRLF changes no answer for a head of
    whole lines (what the gateway puts before a message); a head that ends inside a line is
    refused (the tail starts a line)."""
    from gateway.relay.smtp import wire_exact

    tail += b"\r\n"
    whole_lines = not head or head.endswith(b"\r\n")
    assert wire_exact(head + tail, checked=len(tail)) == (whole_lines and wire_exact(head + tail))
