"""The accept path end to end: client -> gateway -> aiosmtpd upstream, before-queue."""

from __future__ import annotations

import pytest

from tests.conftest import MESSAGE, send


@pytest.fixture(params=[True, False], ids=["bdat", "data"])
def chunking(request, sink):
    """Campus mail that offers CHUNKING (RFC 3030: the message goes as one BDAT chunk), or
    not (DATA and the final dot): the tests of the message's own reply and bytes run on both."""
    sink.handler.chunking = request.param
    return request.param


def test_accepted_message_arrives_upstream_and_reply_is_upstreams(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    client, (code, text) = send(gw, rcpts=("alice@example.edu", "bob@dept.example.edu"))
    client.quit()
    assert code == 250
    assert text == b"2.0.0 Ok: queued as SINK1"
    [msg] = sink.messages
    assert msg.mail_from == "bounce-1@em.acme.example"
    assert msg.rcpt_tos == ["alice@example.edu", "bob@dept.example.edu"]
    head, _, body = msg.content.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test "
                           b"(ecomm-gateway) with ESMTP id ")
    assert body == b"Hello, world.\r\n"
    [line] = logs.events("message")
    assert line["decision"] == "accept" and line["sender"] == "acme"
    assert line["message_id"] == "<m1@em.acme.example>"
    assert "alice@example.edu" not in logs.text()
    assert gw.metric("gateway_messages_total", sender="acme", decision="accept",
                     reason="relayed") == 1


def test_connection_is_pooled_across_messages_and_sessions(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    for _ in range(3):
        client = gw.smtp()
        for i in range(3):
            client.sendmail(f"bounce-{i}@em.acme.example", ["alice@example.edu"], MESSAGE)
        client.quit()
    assert len(sink.messages) == 9
    assert sink.handler.ehlos == 1  # one upstream connection served all nine messages


def test_upstream_unreachable_is_451_4_4_1_and_nothing_is_acknowledged(gateways, logs):
    from tests.conftest import free_port

    gw = gateways.start(upstream=f"smtp://127.0.0.1:{free_port()}")
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        451, b"4.4.1 Campus mail is unavailable; try again later")
    client.quit()
    [line] = logs.events("message")
    assert line["decision"] == "defer" and line["decided_by"] == "upstream"


def test_failover_to_the_next_host(gateways, sink):
    from tests.conftest import free_port

    dead = f"smtp://127.0.0.1:{free_port()}"
    gw = gateways.start(f'[upstream]\nurl = "{dead}"\nhosts = ["{sink.url}"]\n')
    client, (code, text) = send(gw)
    client.quit()
    assert (code, text) == (250, b"2.0.0 Ok: queued as SINK1")
    assert len(sink.messages) == 1


def test_upstream_mail_refusal_passed_through(gateways, sink):
    """Campus mail without PIPELINING gets MAIL FROM at the vendor's MAIL: its refusal is the
    reply to MAIL."""
    sink.handler.pipelining = False
    sink.handler.mail_reply = "550 5.1.8 Sender domain rejected by campus"
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        550, b"5.1.8 Sender domain rejected by campus")
    client.quit()
    assert sink.handler.mails == 1 and sink.handler.rcpt_seen == []


def test_upstream_mail_refusal_with_pipelining_is_each_recipients_reply(gateways, sink, logs):
    """Campus mail with PIPELINING gets MAIL FROM with the first RCPT TO: its refusal of MAIL
    is that recipient's reply, and each later recipient's (MAIL is tried again with each);
    nothing is relayed, and the next transaction on the connection goes through."""
    sink.handler.mail_reply = "550 5.1.8 Sender domain rejected by campus"
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    assert sink.handler.mails == 0  # not yet: it goes with the first recipient
    assert client.rcpt("alice@example.edu") == (550, b"5.1.8 Sender domain rejected by campus")
    assert client.rcpt("bob@example.edu") == (550, b"5.1.8 Sender domain rejected by campus")
    assert sink.handler.mails == 2
    assert client.docmd("DATA") == (503, b"5.5.1 Error: need RCPT command")
    assert client.rset()[0] == 250
    sink.handler.mail_reply = None
    assert client.sendmail("bounce-2@em.acme.example", ["alice@example.edu"], MESSAGE) == {}
    client.quit()
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [
        ("bounce-2@em.acme.example", ["alice@example.edu"])]
    assert sink.handler.ehlos == 1
    assert [r["reason"] for r in logs.events("rcpt_refused")] == ["upstream", "upstream"]


def test_per_recipient_upstream_refusal_passed_through_per_recipient(gateways, sink, logs):
    sink.handler.refuse_rcpt["gone@example.edu"] = "550 5.1.1 <gone@example.edu>: user unknown"
    sink.handler.refuse_rcpt["full@example.edu"] = "452 4.2.2 Mailbox full"
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
    assert client.rcpt("gone@example.edu") == (550, b"5.1.1 <gone@example.edu>: user unknown")
    assert client.rcpt("full@example.edu") == (452, b"4.2.2 Mailbox full")
    assert client.data(MESSAGE) == (250, b"2.0.0 Ok: queued as SINK1")
    client.quit()
    assert sink.messages[0].rcpt_tos == ["alice@example.edu"]
    refused = logs.events("rcpt_refused")
    assert [r["reason"] for r in refused] == ["upstream", "upstream"]
    assert "gone@example.edu" not in logs.text()


@pytest.mark.parametrize("reply, code, text", [
    ("451 4.3.0 Queue full, try later", 451, b"4.3.0 Queue full, try later"),
    ("554 5.6.0 Content refused", 554, b"5.6.0 Content refused"),
    ("550 Message rejected", 550, b"5.7.1 Message rejected"),
])
def test_upstream_data_reply_is_the_clients_reply(gateways, sink, chunking, logs, reply, code,
                                                  text):
    sink.handler.data_reply = reply
    gw = gateways.start(upstream=sink.url)
    client, got = send(gw)
    client.quit()
    assert got == (code, text)
    [line] = logs.events("message")
    assert line["decision"] == ("defer" if code < 500 else "reject")
    assert gw.metric("gateway_upstream_replies_total", stage="data", **{"class": f"{code // 100}xx"}) == 1


def test_multiline_upstream_reply_passed_through(gateways, sink, chunking):
    sink.handler.data_reply = "554-5.7.1 Refused by campus policy\r\n554 5.7.1 See the mail desk"
    gw = gateways.start(upstream=sink.url)
    client, got = send(gw)
    client.quit()
    assert got == (554, b"5.7.1 Refused by campus policy\n5.7.1 See the mail desk")


def test_rset_mid_transaction_resets_upstream_and_nothing_is_relayed(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    client = gw.smtp()
    client.mail("bounce-1@em.acme.example")
    client.rcpt("alice@example.edu")
    assert client.rset() == (250, b"2.0.0 OK")
    client.sendmail("bounce-2@em.acme.example", ["bob@example.edu"], MESSAGE)
    client.quit()
    assert [m.rcpt_tos for m in sink.messages] == [["bob@example.edu"]]
    assert sink.handler.rsets == 1 and sink.handler.ehlos == 1


def test_clients_vanishing_mid_transaction_do_not_leak_upstream_connections(gateways, sink):
    gw = gateways.start(f'[upstream]\nurl = "{sink.url}"\npool_size = 2\n')
    for _ in range(5):  # more abandoned transactions than pool slots
        client = gw.smtp()
        client.mail("bounce-1@em.acme.example")
        client.rcpt("alice@example.edu")
        client.close()
    client, (code, _) = send(gw)
    client.quit()
    assert code == 250 and len(sink.messages) == 1


def test_maildir_delivery_is_atomic_and_carries_envelope(gateways, logs):
    gw = gateways.start()
    client, (code, text) = send(gw, rcpts=("alice@example.edu", "bob@example.edu"))
    client.quit()
    assert code == 250 and text.startswith(b"2.0.0 Ok: delivered as ")
    maildir = gateways.tmp_path / "gw" / "maildir"
    assert list((maildir / "tmp").iterdir()) == []
    [path] = list((maildir / "new").iterdir())
    data = path.read_bytes()
    assert data.startswith(b"Return-Path: <bounce-1@em.acme.example>\nDelivered-To: alice@example.edu\n"
                           b"Delivered-To: bob@example.edu\nReceived: from client.test ([127.0.0.1])\n")
    assert data.endswith(b"Subject: Hello\nMessage-ID: <m1@em.acme.example>\n\nHello, world.\n")


def test_dot_stuffed_lines_survive_the_relay(gateways, sink, chunking):
    gw = gateways.start(upstream=sink.url)
    body = MESSAGE + b".leading dot\r\n..two dots\r\n"
    client, (code, _) = send(gw, message=body)
    client.quit()
    assert code == 250
    assert sink.messages[0].content.endswith(b"Hello, world.\r\n.leading dot\r\n..two dots\r\n")
    assert sink.messages[0].chunks == (1 if chunking else 0)


def test_pathologically_nested_mime_is_refused_not_deferred(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\nMIME-Version: 1.0\r\n"
    depth = 1200
    parts = b"".join(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
                     for i in range(depth))
    message = head + parts + b"Content-Type: text/plain\r\n\r\nhi\r\n"
    client, reply = send(gw, message=message)
    client.quit()
    assert reply[0] == 550 and reply[1].startswith(b"5.6.0 ")
    assert sink.messages == []
    assert logs.events("message")[0]["decision"] == "reject"


def test_raw_8bit_message_id_is_logged_not_crashed_on(gateways, sink, logs):
    gw = gateways.start(upstream=sink.url)
    message = MESSAGE.replace(b"<m1@em.acme.example>", "<m\u00e9@em.acme.example>".encode())
    client, (code, _) = send(gw, message=message)
    client.quit()
    assert code == 250 and len(sink.messages) == 1
    assert logs.events("message")[0]["decision"] == "accept"


def test_large_message_parsed_off_the_loop_is_relayed_intact(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    body = MESSAGE + (b"y" * 76 + b"\r\n") * 8000  # ~600 KB: parsed in a worker thread
    client, (code, _) = send(gw, message=body)
    client.quit()
    assert code == 250
    assert sink.messages[0].content.endswith(body.split(b"\r\n\r\n", 1)[1])


def _raw_session(gw, payload: bytes) -> bytes:
    """Send ``payload`` in one write after EHLO/MAIL/RCPT/DATA and return all the replies."""
    import socket

    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.test\r\nMAIL FROM:<bounce-1@em.acme.example>\r\n"
                  b"RCPT TO:<alice@example.edu>\r\nDATA\r\n")
        replies = b""
        while not replies.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
            replies += f.readline()
        s.sendall(payload)
        out = b""
        while True:
            line = f.readline()
            if not line:
                return out
            out += line
            if line.startswith(b"221"):
                return out


def test_bare_lf_dot_does_not_end_the_message(gateways, sink):
    """SMTP smuggling: only <CRLF>.<CRLF> ends DATA; "\\n.\\r\\n" inside is content, and
    content with a bare LF is refused whole (aiosmtplib would send it as CRLF, making the dot a
    terminator upstream): one reply, one 5xx, nothing relayed."""
    gw = gateways.start(upstream=sink.url)
    smuggled = (MESSAGE + b"legit\n.\r\nMAIL FROM:<bounce-2@em.acme.example>\r\n"
                b"RCPT TO:<bob@example.edu>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nQUIT\r\n")
    replies = _raw_session(gw, smuggled)
    assert replies == (b"550 5.6.0 Bare CR or LF in the message body; lines must end with CRLF "
                       b"(RFC 5321 2.3.8)\r\n221 2.0.0 Bye\r\n")
    assert sink.messages == []


def test_pipelined_commands_after_the_final_dot(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    replies = _raw_session(gw, MESSAGE + b".\r\nMAIL FROM:<bounce-2@em.acme.example>\r\n"
                                         b"RCPT TO:<bob@example.edu>\r\nQUIT\r\n")
    assert replies == (b"250 2.0.0 Ok: queued as SINK1\r\n250 2.1.0 Sender OK\r\n"
                       b"250 2.1.5 OK\r\n221 2.0.0 Bye\r\n")
    assert [m.rcpt_tos for m in sink.messages] == [["alice@example.edu"]]


def test_message_split_across_many_reads_is_relayed_exactly(gateways, sink, chunking):
    import socket

    gw = gateways.start(upstream=sink.url)
    lines = [b"line %d ends with a dot." % i for i in range(3000)] + [b".starts with a dot"]
    body = MESSAGE + b"\r\n".join(lines) + b"\r\n"
    wire = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO c\r\nMAIL FROM:<bounce-1@em.acme.example>\r\nRCPT TO:<a@example.edu>\r\nDATA\r\n")
        while not f.readline().startswith(b"354"):
            pass
        for i in range(0, len(wire), 997):  # odd slices: terminators split across reads
            s.sendall(wire[i:i + 997])
        assert f.readline() == b"250 2.0.0 Ok: queued as SINK1\r\n"
    assert sink.messages[0].content.endswith(body.split(b"\r\n\r\n", 1)[1])
    assert sink.messages[0].chunks == (1 if chunking else 0)


def test_lines_starting_with_a_dot_arrive_as_sent(gateways, sink, chunking):
    """The relay dot-stuffs the body itself for DATA (gateway.relay.smtp.send_data), and sends
    it as it is in a BDAT chunk: a line that is a lone dot, two dots or a dot and text arrives
    at campus mail exactly as the client sent it, and the message is not ended early."""
    gw = gateways.start(upstream=sink.url)
    body = b".\r\n..\r\n.x\r\nmiddle\r\n.\r\n...\r\n"
    client, (code, _) = send(gw, message=MESSAGE.replace(b"Hello, world.\r\n", body))
    client.quit()
    assert code == 250
    [msg] = sink.messages
    assert msg.content.partition(b"\r\n\r\n")[2] == body
    assert msg.chunks == (1 if chunking else 0)


def test_size_and_8bitmime_are_passed_on_from_the_first_message_of_a_connection(gateways, sink):
    """The upstream connection says EHLO before the first MAIL, so that MAIL's parameters
    (RFC 1870 SIZE, RFC 6152 BODY=8BITMIME) follow the extensions campus mail offers even on
    a fresh connection (also with starttls = "off", where no STARTTLS asks for EHLO first); the
    paths go out exactly as normalized."""
    gw = gateways.start(f'[upstream]\nurl = "{sink.url}"\nstarttls = "off"\n')
    client = gw.smtp()
    assert client.docmd("MAIL", f"FROM:<bounce-1@em.acme.example> SIZE={len(MESSAGE)} "
                                "BODY=8BITMIME")[0] == 250
    assert client.rcpt("alice@example.edu") == (250, b"2.1.5 OK")
    assert client.data(MESSAGE)[0] == 250
    client.quit()
    [msg] = sink.messages
    assert msg.mail_from == "bounce-1@em.acme.example" and msg.rcpt_tos == ["alice@example.edu"]
    assert msg.mail_options == ["BODY=8BITMIME", f"SIZE={len(MESSAGE)}"]
    assert sink.handler.ehlos == 1


# --- campus mail that stops answering -------------------------------------------------------

def _silent_at(gateways, sink, command):
    sink.handler.stall = {command}
    return gateways.start(f'[upstream]\nurl = "{sink.url}"\ntimeout = 1.0\npool_wait = 1.0\n')


def test_upstream_silent_after_the_data_is_451_4_4_2_and_nothing_is_acknowledged(
        gateways, sink, chunking, logs):
    """Campus mail that takes the message but never answers the final dot (or the BDAT LAST
    chunk): after [upstream]
    timeout the vendor is told 451 (it will retry), never 250, and the connection is dropped
    (its late reply could not be told from the next transaction's)."""
    gw = _silent_at(gateways, sink, "DATA")
    client, (code, text) = send(gw)
    assert (code, text) == (451, b"4.4.2 Connection to campus mail lost; try again later")
    client.quit()
    assert sink.messages == []
    [line] = logs.events("message")
    assert (line["decision"], line["reason"], line["decided_by"]) == (
        "defer", "upstream", "upstream")
    sink.handler.stall = set()  # campus mail answers again: a fresh connection, 250
    client, (code, text) = send(gw)
    client.quit()
    assert (code, text) == (250, b"2.0.0 Ok: queued as SINK1")
    assert sink.messages[0].chunks == (1 if chunking else 0)


def test_upstream_silent_at_mail_is_451_4_4_1(gateways, sink):
    sink.handler.pipelining = False  # MAIL FROM goes at the vendor's MAIL
    gw = _silent_at(gateways, sink, "MAIL")
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (
        451, b"4.4.1 Campus mail is unavailable; try again later")
    client.quit()
    assert sink.messages == []


@pytest.mark.parametrize("command", ["RCPT", "MAIL"])
def test_upstream_silent_at_the_pipelined_pair_is_451_4_4_2_for_the_recipient(
        gateways, sink, command):
    """MAIL FROM and the first RCPT TO go together; campus mail that never answers one of them
    gives that recipient 451 4.4.2 after [upstream] timeout. A timeout is not a stale
    connection, so the pair is not sent again elsewhere."""
    gw = _silent_at(gateways, sink, command)
    client = gw.smtp()
    assert client.mail("bounce-1@em.acme.example") == (250, b"2.1.0 Sender OK")
    assert client.rcpt("alice@example.edu") == (
        451, b"4.4.2 Connection to campus mail lost; try again later")
    client.quit()
    assert sink.handler.mails == 1 and sink.messages == []


# --- what goes to campus mail ends every line with CRLF --------------------------------------

def _relay_one(sink, content: bytes, checked: int):
    """One transaction straight through the relay's SMTPUpstream to the sink."""
    import asyncio
    import ssl

    from gateway.infra.clock import SystemClock
    from gateway.relay.smtp import SMTPUpstream

    async def run():
        up = SMTPUpstream(urls=(sink.url,), starttls="off", tls_context=ssl.create_default_context(),
                          pool_size=1, timeout=10, idle_timeout=60, helo="gw.test",
                          clock=SystemClock())
        try:
            txn = await up.begin("bounce-1@em.acme.example", False, None)
            assert (await txn.rcpt("alice@example.edu")).code == 250
            return await txn.data(content, checked=checked)
        finally:
            await up.close()

    return asyncio.run(run())


@pytest.mark.parametrize("head", [b"X-Added: a\nb\r\n", b"X-Added: a\rb\r\n", b"X-Added: a"])
def test_relay_refuses_a_head_that_is_not_crlf_exact(sink, head):
    """The message part was admitted (CRLF only, gateway.message.intake) and is not counted
    again; what the gateway put before it is, and a bare CR or LF there is never sent."""
    body = b"Subject: x\r\n\r\nHello.\r\n"
    reply = _relay_one(sink, head + body, checked=len(body))
    assert (reply.code, reply.enhanced) == (554, "5.6.0")
    assert sink.messages == [] and sink.handler.rsets == 1  # the transaction was reset


def test_relay_sends_a_crlf_exact_head_with_the_admitted_message(sink):
    body = b"Subject: x\r\n\r\nHello.\r\n"
    reply = _relay_one(sink, b"X-Added: a\r\n\tb\r\n" + body, checked=len(body))
    assert (reply.code, reply.text) == (250, "Ok: queued as SINK1")
    assert sink.messages[0].content == b"X-Added: a\r\n\tb\r\n" + body
