"""Issue #10 items 4 and 6, through a listening gateway on raw sockets: a repeated recipient is
accepted once, and no reply ever carries a control character from the client."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.message import replies
from gateway.message.replies import Reply, escape_reply, from_upstream
from tests.conftest import MESSAGE
from tests.raw_smtp import REPLY_LINE, RawSMTP


def _session(gw) -> RawSMTP:
    c = RawSMTP(gw.port)
    assert c.cmd(b"EHLO client.test").endswith(b"250 HELP\r\n")
    return c


def _data(c: RawSMTP, message: bytes = MESSAGE) -> bytes:
    assert c.cmd(b"DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    c.send(message + b".\r\n")
    return c.reply()


# --- item 6: replies -------------------------------------------------------------------------

def test_bad_sender_address_with_bare_cr_is_one_escaped_reply_line(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    with _session(gw) as c:
        # a lenient client reading the bare CR as a line end would see "250 2.1.0 Sender OK"
        assert c.cmd(b"MAIL FROM:<a\r250 2.1.0 Sender OK@x>") == (
            b"553 5.1.7 Bad sender address <a\\x0d250 2.1.0 Sender OK@x>: "
            b"invalid domain 'x'\r\n")
        assert c.cmd(b"NOOP") == b"250 2.0.0 OK\r\n"  # the session goes on, in step
    assert sink.handler.rcpt_seen == [] and sink.messages == []


def test_unknown_command_with_terminal_escapes_is_escaped(gateways):
    gw = gateways.start()
    with _session(gw) as c:
        assert c.cmd(b"FOO\x1b[31mRED\x07\x00") == (
            b'500 5.5.2 Error: command "FOO\\x1b[31MRED\\x07\\x00" not recognized\r\n')
        # aiosmtpd's own syntax error echoes nothing raw either
        assert c.cmd(b"VRFY <\x1b]0;owned\x07") == (
            b"502 5.5.1 Could not VRFY <\\x1b]0;owned\\x07\r\n")


def test_recipient_with_control_characters_is_refused_in_one_line(gateways, sink):
    gw = gateways.start(upstream=sink.url)
    with _session(gw) as c:
        assert c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>") == b"250 2.1.0 Sender OK\r\n"
        assert c.cmd(b"RCPT TO:<x@gmail.com\r\x0b>") == (
            b"550 5.7.1 Relaying denied: invalid domain 'gmail.com\\r\\x0b'\r\n")
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert _data(c).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == ["alice@example.edu"]


def test_reply_text_from_any_source_never_breaks_a_line():
    # the gateway's own text: one line, whatever it holds
    assert str(Reply(550, "5.7.1", "bad part name\r\n250 2.0.0 ok\x1b")) == (
        "550 5.7.1 bad part name\\x0d\\x0a250 2.0.0 ok\\x1b")
    # an upstream's multi-line reply keeps its lines, each made safe
    assert str(from_upstream(550, "5.1.1 no such user\nsee \x1b[1mhelp\u2028x")) == (
        "550-5.1.1 no such user\r\n550 5.1.1 see \\x1b[1mhelp\\u2028x")
    # what reaches the wire is at most 512 octets a line, CRLF included
    assert len(escape_reply("500 " + "\x01" * 400)) == 510


@given(st.text(alphabet=st.characters(max_codepoint=0x2100), max_size=600))
def test_escape_line_equals_the_full_substitution(text):
    # the fast path (printable ASCII is left as it is) gives what the substitution gives
    escaped = replies._UNSAFE.sub(replies._escape_char, text)
    expected = escaped if len(escaped) <= replies.MAX_LINE else (
        escaped[:replies.MAX_LINE - 3] + "...")
    assert replies.escape_line(text) == expected


# --- item 4: duplicate recipients ------------------------------------------------------------

def test_duplicate_recipient_is_250_and_forwarded_and_counted_once(gateways, sink):
    gw = gateways.start('[server]\nlisten = ["127.0.0.1:0"]\nmax_recipients = 2\n',
                        upstream=sink.url)
    with _session(gw) as c:
        assert c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>") == b"250 2.1.0 Sender OK\r\n"
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        for same in (b"alice@example.edu", b"alice@EXAMPLE.EDU", b'"alice"@Example.Edu',
                     b'"al\\ice"@example.edu', b"alice@example.edu", b"alice@example.edu"):
            assert c.cmd(b"RCPT TO:<" + same + b">") == (
                b"250 2.1.5 Duplicate recipient; already accepted\r\n")
        # five repeats did not use up max_recipients = 2: bob still fits, then the cap
        assert c.cmd(b"RCPT TO:<bob@example.edu>") == b"250 2.1.5 OK\r\n"
        assert c.cmd(b"RCPT TO:<carol@example.edu>") == b"452 4.5.3 Too many recipients\r\n"
        assert _data(c).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == ["alice@example.edu", "bob@example.edu"]
    assert sink.messages[0].rcpt_tos == ["alice@example.edu", "bob@example.edu"]
    assert gw.metric("gateway_recipients_total", sender="acme", decision="accept") == 2


def test_local_parts_differing_in_case_are_different_recipients(gateways, sink):
    """RFC 5321 2.4: the local part is case-sensitive; only campus mail may fold it."""
    gw = gateways.start(upstream=sink.url)
    with _session(gw) as c:
        assert c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>") == b"250 2.1.0 Sender OK\r\n"
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert c.cmd(b"RCPT TO:<Alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert _data(c).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.messages[0].rcpt_tos == ["alice@example.edu", "Alice@example.edu"]


def test_a_refused_recipient_is_not_a_duplicate_and_a_new_transaction_starts_afresh(
        gateways, sink):
    gw = gateways.start(upstream=sink.url)
    sink.handler.refuse_rcpt["bob@example.edu"] = "550 5.1.1 No such user"
    with _session(gw) as c:
        c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>")
        assert c.cmd(b"RCPT TO:<bob@example.edu>") == b"550 5.1.1 No such user\r\n"
        assert c.cmd(b"RCPT TO:<bob@example.edu>") == b"550 5.1.1 No such user\r\n"
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert c.cmd(b"RSET") == b"250 2.0.0 OK\r\n"
        c.cmd(b"MAIL FROM:<bounce-1@em.acme.example>")
        assert c.cmd(b"RCPT TO:<alice@example.edu>") == b"250 2.1.5 OK\r\n"
        assert _data(c).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.handler.rcpt_seen == ["bob@example.edu", "bob@example.edu",
                                      "alice@example.edu", "alice@example.edu"]
