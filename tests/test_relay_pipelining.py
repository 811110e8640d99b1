"""MAIL FROM pipelined with the first RCPT TO (RFC 2920) to campus mail that offers PIPELINING,
against a scripted upstream on raw sockets: what it received in each read, and replies sent
together or apart, as a real MTA may send them."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MESSAGE


class ScriptedUpstream:
    """An SMTP server on loopback that offers PIPELINING and records every read of each
    connection. ``together``: the replies to the commands of one read go in one write;
    else one write each, 50 ms apart. ``close_on_pair``: connection numbers (from 1) that
    close, unanswered, when MAIL and RCPT arrive."""

    def __init__(self, together: bool = True) -> None:
        self.together = together
        self.close_on_pair: set[int] = set()
        self.reads: list[list[bytes]] = []  # per connection, every read after EHLO
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"smtp://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.reads.append([])
            t = threading.Thread(target=self._serve, args=(conn, len(self.reads)), daemon=True)
            t.start()
            self._threads.append(t)

    def _send(self, conn: socket.socket, replies: list[bytes]) -> None:
        if self.together:
            conn.sendall(b"".join(replies))
            return
        for i, reply in enumerate(replies):
            if i:
                time.sleep(0.05)
            conn.sendall(reply)

    def _serve(self, conn: socket.socket, number: int) -> None:
        reads = self.reads[number - 1]
        conn.settimeout(30)
        buf = b""
        try:
            conn.sendall(b"220 up.test ESMTP\r\n")
            while b"\r\n" not in buf:
                buf += conn.recv(65536)
            buf = buf.partition(b"\r\n")[2]
            conn.sendall(b"250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10000000\r\n")
            mail_from, rcpts = "", []
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                reads.append(chunk)
                buf += chunk
                if number in self.close_on_pair and b"MAIL" in buf and b"RCPT" in buf:
                    return  # (finally: closed, nothing answered)
                replies = []
                while b"\r\n" in buf:
                    line, _, buf = buf.partition(b"\r\n")
                    verb = line[:4].upper()
                    if verb == b"MAIL":
                        mail_from, rcpts = line[11:].split(b">")[0].decode(), []
                        replies.append(b"250 2.1.0 OK\r\n")
                    elif verb == b"RCPT":
                        rcpts.append(line[9:].split(b">")[0].decode())
                        replies.append(b"250 2.1.5 OK\r\n")
                    elif verb == b"DATA":
                        self._send(conn, [*replies, b"354 go ahead\r\n"])
                        replies = []
                        while b"\r\n.\r\n" not in b"\r\n" + buf:
                            more = conn.recv(65536)
                            if not more:
                                return
                            buf += more
                        body, _, buf = (b"\r\n" + buf).partition(b"\r\n.\r\n")
                        self.messages.append((mail_from, rcpts, body[2:] + b"\r\n"))
                        replies.append(b"250 2.0.0 Ok: queued as UP%d\r\n" % len(self.messages))
                    elif verb == b"RSET":
                        replies.append(b"250 2.0.0 OK\r\n")
                    elif verb == b"QUIT":
                        self._send(conn, [*replies, b"221 bye\r\n"])
                        return
                    else:
                        replies.append(b"502 5.5.2 what\r\n")
                if replies:
                    self._send(conn, replies)
        except OSError:
            return
        finally:
            conn.close()

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted():
    servers: list[ScriptedUpstream] = []

    def make(**kwargs) -> ScriptedUpstream:
        servers.append(ScriptedUpstream(**kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


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
