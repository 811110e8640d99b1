"""The message as one BDAT chunk (RFC 3030 CHUNKING) to campus mail that offers it, as Postfix
does: on the wire (a scripted upstream on raw sockets), through aiosmtpd with BDAT (the suite's
sink), and through a real Postfix."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import MESSAGE, Sink, free_port, send
from tests.postfix_server import PostfixServer, postfix_installed

LOST = (451, b"4.4.2 Connection to campus mail lost; try again later")


def test_the_message_goes_as_one_last_chunk_without_dot_stuffing(gateways, scripted):
    """After MAIL and RCPT (pipelined), campus mail receives exactly ``BDAT <octets> LAST``
    and the message's octets: no DATA, no 354 to wait for, no dot-stuffing, no final dot."""
    up = scripted(chunking=True)
    gw = gateways.start(upstream=up.url)
    body = b".\r\n..x\r\nmiddle\r\n.\r\n"
    client, got = send(gw, message=MESSAGE.replace(b"Hello, world.\r\n", body))
    client.quit()
    assert got == (250, b"2.0.0 Ok: queued as UP1")
    [(mail_from, rcpts, content)] = up.messages
    assert (mail_from, rcpts) == ("bounce-1@em.acme.example", ["alice@example.edu"])
    assert content.startswith(b"Received: from client.test ([127.0.0.1])")
    assert content.endswith(b"\r\n\r\n" + body)
    [reads] = up.reads
    assert reads[0] == b"MAIL FROM:<bounce-1@em.acme.example>\r\nRCPT TO:<alice@example.edu>\r\n"
    # what followed, whatever TCP made of the writes: the chunk, then QUIT when the pool closed
    rest = b"".join(reads[1:])
    assert rest.startswith(b"BDAT %d LAST\r\n" % len(content) + content)
    assert rest[len(b"BDAT %d LAST\r\n" % len(content) + content):] in (b"", b"QUIT\r\n")


@pytest.mark.parametrize("reply, got", [
    (b"554 5.6.0 Content refused\r\n", (554, b"5.6.0 Content refused")),
    (b"452 4.3.1 Insufficient system storage\r\n", (452, b"4.3.1 Insufficient system storage")),
])
def test_a_refused_chunk_is_the_vendors_reply_and_ends_the_connection(gateways, scripted, reply,
                                                                      got):
    """Campus mail's refusal of the chunk is the vendor's reply. The connection is not reused
    (a receiver that did not take the chunk's octets, as RFC 3030 says it must, would read the
    message as commands): the next message goes on a new one."""
    up = scripted(chunking=True)
    up.chunk_reply = reply
    gw = gateways.start(upstream=up.url)
    with gw.smtp() as client:
        assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
        assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
        assert client.data(MESSAGE) == got
        up.chunk_reply = None
        assert client.sendmail("bounce-2@em.acme.example", ["bob@example.edu"], MESSAGE) == {}
    assert len(up.reads) == 2
    assert [m[:2] for m in up.messages] == [("bounce-2@em.acme.example", ["bob@example.edu"])]


def test_connection_lost_after_the_chunk_is_451_4_4_2(gateways, scripted, logs):
    """Campus mail that closes once the chunk has arrived, unanswered: the vendor gets 451
    4.4.2 (it retries), never 250."""
    up = scripted(chunking=True)
    up.close_on_chunk = {1}
    gw = gateways.start(upstream=up.url)
    client, got = send(gw)
    client.quit()
    assert got == LOST
    assert up.messages == []
    [line] = logs.events("message")
    assert (line["decision"], line["decided_by"]) == ("defer", "upstream")


def test_chunking_off_in_the_configuration_sends_data(gateways, sink):
    """``[upstream] chunking = false``: DATA even to campus mail that offers CHUNKING."""
    gw = gateways.start(f'[upstream]\nurl = "{sink.url}"\nchunking = false\n')
    for i in range(2):
        client, got = send(gw, mail_from=f"bounce-{i}@em.acme.example")
        client.quit()
        assert got == (250, b"2.0.0 Ok: queued as SINK%d" % (i + 1))
    assert [m.chunks for m in sink.messages] == [0, 0]
    assert sink.handler.ehlos == 1


def test_a_connection_is_reused_after_a_chunk_is_taken(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    with gw.smtp() as client:
        for i in range(3):
            assert client.sendmail(f"bounce-{i}@em.acme.example", ["alice@example.edu"],
                                   MESSAGE) == {}
    assert [m.chunks for m in sink.messages] == [1, 1, 1]
    assert sink.handler.ehlos == 1


# --- byte for byte: what goes in a chunk is what campus mail keeps ---------------------------

_line = st.lists(st.sampled_from([b"a", b".", b" ", b"\xc3\xa9", b"BDAT 5 LAST", b"\t",
                                  b"QUIT", b"0"]), max_size=12).map(b"".join)


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(_line, max_size=30))
def test_any_crlf_exact_message_arrives_byte_for_byte(lines):
    """Through the relay's upstream, BDAT to the aiosmtpd sink and DATA to the same sink:
    each keeps exactly the message's octets (lines of dots, empty lines, 8-bit text and lines
    that look like commands included)."""
    from gateway.infra.clock import SystemClock
    from gateway.relay.smtp import SMTPUpstream

    content = b"Subject: x\r\n\r\n" + b"".join(line + b"\r\n" for line in lines)
    sink = Sink()
    try:
        async def relay(chunking: bool) -> None:
            up = SMTPUpstream(urls=(sink.url,), starttls="off",
                              tls_context=ssl.create_default_context(), pool_size=1,
                              timeout=10, idle_timeout=10, helo="gw.test", clock=SystemClock(),
                              chunking=chunking)
            try:
                txn = await up.begin("bounce-1@em.acme.example", True, len(content))
                assert (await txn.rcpt("alice@example.edu")).code == 250
                reply = await txn.data(content)
                assert (reply.code, reply.enhanced) == (250, "2.0.0")
            finally:
                await up.close()

        asyncio.run(relay(True))
        asyncio.run(relay(False))
    finally:
        sink.stop()
    assert [(m.content, m.chunks) for m in sink.messages] == [(content, 1), (content, 0)]


# --- a real Postfix as campus mail -----------------------------------------------------------

@pytest.fixture(scope="module")
def postfix_campus():
    """A private Postfix as campus mail (no milter), relaying what it accepts to a sink."""
    if not (postfix_installed() and os.geteuid() == 0):
        if os.environ.get("CI") == "true":
            pytest.fail("a private Postfix needs postfix installed and root (.ci/run)")
        pytest.skip("a private Postfix needs postfix installed and root (CI has both)")
    relay_sink = Sink()
    workdir = Path(tempfile.mkdtemp(prefix="gw-postfix-"))
    workdir.chmod(0o755)
    server = PostfixServer(workdir, free_port(), relay_sink.port, milter=None)
    try:
        server.start()
        yield server, relay_sink
    finally:
        server.stop()
        relay_sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_postfix_takes_the_message_as_a_bdat_chunk(gateways, postfix_campus):
    """Postfix offers CHUNKING: the gateway's message reaches it as BDAT (Postfix's own log
    counts the commands of each session), it answers the chunk with its queue id, and the
    message it passes on is the one the gateway sent, lines of dots included."""
    import re
    import time

    postfix, relay_sink = postfix_campus
    relay_sink.handler.__init__()
    relay_sink.handler.chunking = False  # Postfix's own hop to the sink: DATA, as aiosmtpd has
    gw = gateways.start(f'[upstream]\nurl = "smtp://127.0.0.1:{postfix.smtp_port}"\n'
                        'starttls = "off"\n')
    body = b".\r\n..x\r\nmiddle\r\n"
    client, (code, text) = send(gw, message=MESSAGE.replace(b"Hello, world.\r\n", body))
    client.quit()
    # (Postfix's reply to a last chunk counts the octets it took)
    assert code == 250 and re.fullmatch(rb"2\.0\.0 Ok: \d+ bytes queued as [0-9A-F]+", text), text
    gateways.running.remove(gw)
    gw.stop()  # the pooled connection closes: Postfix logs the session's commands
    deadline = time.monotonic() + 30
    while not (relay_sink.messages and b"bdat=1" in postfix.log.read_bytes()):
        assert time.monotonic() < deadline, postfix.log.read_text()[-3000:]
        time.sleep(0.1)
    log = postfix.log.read_text()
    assert re.search(r"disconnect from \S+ ehlo=1 mail=1 rcpt=1 bdat=1 quit=1 commands=5", log), \
        log[-3000:]
    [msg] = relay_sink.messages
    assert msg.rcpt_tos == ["alice@example.edu"]
    assert msg.content.endswith(b"\r\n\r\n" + body)
    assert b"\r\nReceived: from client.test ([127.0.0.1])\r\n\tby gw.test " in msg.content
