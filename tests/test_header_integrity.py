"""Issue #10, items 1, 2, 3, 5 and 7, as an attacker would try them: through a gateway
listening on loopback, over a raw socket (smtplib would turn a bare CR or LF into CRLF), with a
real aiosmtpd upstream. Each asserts the exact reply and what campus mail received: nothing,
for a refusal."""

from __future__ import annotations

import asyncio
import base64

import pytest

from gateway.infra.clock import SystemClock
from gateway.message.headers import SINGLE, SINGLE_MIME
from gateway.relay.smtp import SMTPUpstream
from tests.conftest import MESSAGE
from tests.rawsmtp import RawSMTP, install_recorder, split_fields

HEAD, BODY = MESSAGE.split(b"\r\n\r\n", 1)
FORGED = b"Authentication-Results: gw.test; dkim=pass header.d=univ.test"


def with_lines(*lines: bytes, after: int = 1, body: bytes = BODY) -> bytes:
    """MESSAGE with ``lines`` (raw, each ending as given) inserted after header line ``after``."""
    head = [ln + b"\r\n" for ln in HEAD.split(b"\r\n")]
    return b"".join(head[:after]) + b"".join(lines) + b"".join(head[after:]) + b"\r\n" + body


@pytest.fixture
def gw(gateways, sink):
    return gateways.start(upstream=sink.url)


@pytest.fixture
def raw(gw):
    client = RawSMTP(gw.port)
    yield client
    client.close()


def refused(text: bytes, code: bytes = b"550 5.6.0") -> bytes:
    return code + b" " + text + b"\r\n"


# --- item 1: bare CR or LF in the header block ----------------------------------------------

@pytest.mark.parametrize("lines,expected", [
    ([b"X-Note: hello\n" + FORGED + b"\r\n"],
     b"Bare LF in the header block (line 2); lines must end with CRLF"),
    ([b"X-Note: hello\r" + FORGED + b"\r\n"],
     b"Bare CR in the header block (line 2); lines must end with CRLF"),
    ([b"X-Note: hello\n\t" + FORGED + b"\r\n"],  # an LF followed by a fold
     b"Bare LF in the header block (line 2); lines must end with CRLF"),
    ([b"X-Note: hello\r\n \n" + FORGED + b"\r\n"],
     b"Bare LF in the header block (line 3); lines must end with CRLF"),
    ([b"X-Note: hello\n\n" + FORGED + b"\r\n"],  # an LF-only end of the header block
     b"Bare LF in the header block (line 2); lines must end with CRLF"),
    ([b"X-Note: a\x00b\r\n"], b"NUL character in the header block (line 2)"),
])
def test_bare_cr_or_lf_in_the_header_block_is_refused(raw, sink, lines, expected):
    assert raw.send(with_lines(*lines)) == refused(expected)
    assert sink.messages == []


def test_forged_authentication_results_never_reach_the_checks_or_campus_mail(gw, raw, sink):
    recorder = install_recorder(gw)
    other = b"Authentication-Results: mx.vendor.example; spf=pass smtp.mailfrom=em.acme.example"
    folded = b"Authentication-Results:\r\n  GW.TEST. (comment); dkim=pass"
    reply = raw.send(with_lines(FORGED + b"\r\n", other + b"\r\n", folded + b"\r\n"))
    assert reply.startswith(b"250 2.0.0 Ok: queued as SINK1")
    [msg] = sink.messages
    fields, body = split_fields(msg.content)
    assert fields[0].startswith(b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test ")
    assert fields[1:] == [f.raw for f in recorder.seen[0][0]]  # judged == received
    assert other + b"\r\n" in fields and FORGED + b"\r\n" not in fields
    assert not any(f.startswith(b"Authentication-Results:\r\n  GW.TEST.") for f in fields)
    assert body == BODY


# --- item 2: a second From: in obsolete syntax, and other lines that are not fields ----------

@pytest.mark.parametrize("line,expected", [
    (b"From : President <president@univ.test>\r\n",
     b'White space between the field name "From" and its colon (line 2; obsolete syntax that '
     b"readers disagree on)"),
    (b"From\t: President <president@univ.test>\r\n",
     b'White space between the field name "From" and its colon (line 2; obsolete syntax that '
     b"readers disagree on)"),
    (b"From president@univ.test Mon Nov  2 15:00:00 2026\r\n",
     b"A line in the header block is not a header field (line 2)"),
    (b"no colon here\r\n", b"A line in the header block is not a header field (line 2)"),
    (b"X-\xc3\xa9t\xc3\xa9: 8-bit name\r\n",
     b"A line in the header block is not a header field (line 2)"),
    (b": empty name\r\n", b"A line in the header block is not a header field (line 2)"),
    (b"X-Note: a\r\n \t \r\n", b"A continuation line (line 3) holds only white space"),
])
def test_lines_that_are_not_fields_are_refused(raw, sink, line, expected):
    assert raw.send(with_lines(line)) == refused(expected)
    assert sink.messages == []


def test_header_block_starting_with_a_continuation_is_refused(raw, sink):
    assert raw.send(b" folded\r\n" + MESSAGE) == refused(
        b"The header block starts with a continuation line")
    assert sink.messages == []


@pytest.mark.parametrize("name", [*SINGLE, *SINGLE_MIME])
def test_a_field_rfc_5322_allows_once_is_refused_twice(raw, sink, name):
    line = name.lower().encode() + b": x\r\n"  # field names are case-insensitive
    text = f"The message has 2 {name} fields; at most one is allowed (RFC 5322 3.6)".encode()
    message = with_lines(f"{name}: y\r\n".encode(), line, after=6) if name not in (
        "From", "To", "Subject", "Message-ID") else with_lines(line)
    assert raw.send(message) == refused(text)
    assert sink.messages == []


def test_fields_that_may_repeat_are_relayed(raw, sink):
    message = with_lines(b"Received: from a\r\n", b"Received: from b\r\n", b"Comments: 1\r\n",
                         b"Comments: 2\r\n", b"X-Tag: \xc3\xa9t\xc3\xa9\r\n")
    assert raw.send(message).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.messages[0].content.endswith(message)


# --- bare CR or LF and NUL in the body -------------------------------------------------------

@pytest.mark.parametrize("body,expected", [
    (b"line one\nline two\r\n",
     b"Bare CR or LF in the message body; lines must end with CRLF (RFC 5321 2.3.8)"),
    (b"line one\rline two\r\n",
     b"Bare CR or LF in the message body; lines must end with CRLF (RFC 5321 2.3.8)"),
    (b"line one\r\r\n", b"Bare CR or LF in the message body; lines must end with CRLF "
                        b"(RFC 5321 2.3.8)"),
    (b"a NUL \x00 here\r\n", b"NUL character in the message body"),
])
def test_bare_cr_or_lf_or_nul_in_the_body_is_refused(raw, sink, body, expected):
    """aiosmtplib would send a bare CR or LF as CRLF: campus mail would not get the bytes the
    checks judged. Refused, never rewritten."""
    assert raw.send(with_lines(body=body)) == refused(expected)
    assert sink.messages == []


def test_the_relay_never_sends_bytes_aiosmtplib_would_rewrite(sink):
    """The last line of defence, in the relay itself: content with a bare LF is not sent."""
    async def run():
        upstream = SMTPUpstream(urls=(sink.url,), starttls="off", tls_context=None, pool_size=1,
                                timeout=10, idle_timeout=10, helo="gw.test", clock=SystemClock())
        txn = await upstream.begin("bounce-1@em.acme.example", False, None)
        assert (await txn.rcpt("alice@example.edu")).code == 250
        reply = await txn.data(b"Subject: x\r\n\r\nbare\nLF\r\n")
        await upstream.close()
        return reply

    reply = asyncio.run(run())
    assert (reply.code, reply.enhanced) == (554, "5.6.0")
    assert str(reply) == "554 5.6.0 Message has line endings other than CRLF; not relayed"
    assert sink.messages == []
    assert sink.handler.rsets >= 1  # the upstream transaction was reset, not left open


# --- item 3: a display name claiming another address ----------------------------------------

DISPLAY = (b"550 5.7.1 The From: field shows the address %s, which is not its own address "
           b"news@em.acme.example; a display name may not name another address\r\n")


def from_line(value: bytes) -> bytes:
    return MESSAGE.replace(b"From: Acme News <news@em.acme.example>", b"From: " + value)


@pytest.mark.parametrize("value,shown", [
    (b'"president@univ.test" <news@em.acme.example>', b"president@univ.test"),
    (b"president@univ.test <news@em.acme.example>", b"president@univ.test"),
    (b'"Office of the President (President@Univ.Test)" <news@em.acme.example>',
     b"President@Univ.Test"),
    (b"news@em.acme.example (president@univ.test)", b"president@univ.test"),
    (b"=?utf-8?q?president=40univ=2Etest?= <news@em.acme.example>", b"president@univ.test"),
    (b"=?utf-8?b?" + base64.b64encode("president\uff20univ.test".encode()) +
     b"?= <news@em.acme.example>", b"president@univ.test"),  # a full-width at sign
    # an unknown charset does not hide the next word; adjacent words join (RFC 2047 6.2)
    (b"=?x-unknown?q?a?= =?utf-8?q?president=40univ.test?= <news@em.acme.example>",
     b"apresident@univ.test"),
])
def test_display_name_showing_another_address_is_refused(raw, sink, value, shown):
    assert raw.send(from_line(value)) == DISPLAY % shown
    assert sink.messages == []


@pytest.mark.parametrize("value", [
    b'"news@em.acme.example" <news@em.acme.example>',
    b'"NEWS@em.acme.example" <news@em.acme.example>',
    b'"Acme News at em.acme.example" <news@em.acme.example>',
    b"news@em.acme.example",
])
def test_display_name_with_no_other_address_is_relayed(raw, sink, value):
    assert raw.send(from_line(value)).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert len(sink.messages) == 1


def test_display_name_check_in_monitor_mode_relays_and_counts(gateways, sink, logs):
    gw = gateways.start('[checks.display_name]\nmode = "monitor"\n', upstream=sink.url)
    client = RawSMTP(gw.port)
    try:
        reply = client.send(from_line(b'"president@univ.test" <news@em.acme.example>'))
    finally:
        client.close()
    assert reply.startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert len(sink.messages) == 1
    [line] = logs.events("message")
    assert line["monitored"] == [{"check": "display_name", "would": "reject",
                                  "reason": "display_name_address"}]


# --- item 5: mail loops ---------------------------------------------------------------------

def hops(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.example by hop%d.example; Mon, 2 Nov 2026 "
                    b"15:00:00 +0000\r\n" % (i, i + 1) for i in range(n))


@pytest.mark.parametrize("n,reply", [
    (99, None),
    (100, b"554 5.4.6 Too many Received fields (100, at most 99): mail loop (RFC 5321 6.3)\r\n"),
    (120, b"554 5.4.6 Too many Received fields (120, at most 99): mail loop (RFC 5321 6.3)\r\n"),
])
def test_mail_loop_is_refused(raw, sink, n, reply):
    got = raw.send(hops(n) + MESSAGE)
    if reply is None:
        assert got.startswith(b"250 2.0.0 Ok: queued as SINK1")
        assert sink.messages[0].content.count(b"\r\nReceived: ") == n
    else:
        assert got == reply
        assert sink.messages == []


def test_max_received_is_configurable(gateways, sink):
    gw = gateways.start("[server]\nlisten = [\"127.0.0.1:0\"]\nhostname = \"gw.test\"\n"
                        "max_received = 3\n", upstream=sink.url)
    client = RawSMTP(gw.port)
    try:
        assert client.send(hops(2) + MESSAGE).startswith(b"250 2.0.0")
        assert client.send(hops(3) + MESSAGE) == (
            b"554 5.4.6 Too many Received fields (3, at most 2): mail loop (RFC 5321 6.3)\r\n")
    finally:
        client.close()
    assert len(sink.messages) == 1


# --- item 7: RFC 2231 parameters ------------------------------------------------------------

PNG = (b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
       b"RU5ErkJggg==")
MIME_HEAD = HEAD + b"\r\nMIME-Version: 1.0\r\n"


def utf16_html(param: bytes) -> bytes:
    html = f'<p>Hi</p><img src="data:image/png;base64,{PNG.decode()}">'.encode("utf-16")
    return (MIME_HEAD + b"Content-Type: text/html; " + param + b"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(html).replace(
                b"\n", b"\r\n"))


@pytest.mark.parametrize("param", [
    b"charset*=''utf-16",
    b"charset*=us-ascii'en'utf-16",
    b"charset*0*=''utf-; charset*1=16",
])
def test_rfc2231_charset_is_decoded_so_utf16_html_is_read(raw, sink, param):
    assert raw.send(utf16_html(param)) == (
        b"550 5.7.1 Embedded media are not accepted (policy IV.B.3.c.v): the top-level part "
        b"(text/html, no file name) embeds image/png in a data: URI; put it on a web server and "
        b"link to it\r\n")
    assert sink.messages == []


def test_utf16_html_without_media_is_relayed(raw, sink):
    html = "<p>Hi, no images here.</p>".encode("utf-16")
    message = (MIME_HEAD + b"Content-Type: text/html; charset*=''utf-16\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(html).replace(
                   b"\n", b"\r\n"))
    assert raw.send(message).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert len(sink.messages) == 1


def multipart(params: bytes) -> bytes:
    return (MIME_HEAD + b"Content-Type: multipart/alternative; " + params + b"\r\n\r\n"
            b"--a\r\nContent-Type: text/plain\r\n\r\nHello.\r\n--a--\r\n")


@pytest.mark.parametrize("message,expected", [
    (multipart(b'boundary="a"; boundary*=b'),
     b'Content-Type: parameter "boundary" is given more than once or in more than one form '
     b"(RFC 2231)"),
    (multipart(b'boundary="a"; BOUNDARY="b"'),
     b'Content-Type: parameter "boundary" is given more than once or in more than one form '
     b"(RFC 2231)"),
    (multipart(b"boundary*0=a; boundary*2=b"),
     b'Content-Type: parameter "boundary" is given more than once or in more than one form '
     b"(RFC 2231)"),
    (MIME_HEAD + b"Content-Type: text/plain; charset=utf-8; charset*=''utf-16\r\n\r\nHi.\r\n",
     b'Content-Type: parameter "charset" is given more than once or in more than one form '
     b"(RFC 2231)"),
    (MIME_HEAD + b"Content-Type: text/plain\r\nContent-Disposition: inline; filename=a.txt; "
     b"filename*=utf-8''b.exe\r\n\r\nHi.\r\n",
     b'Content-Disposition: parameter "filename" is given more than once or in more than one '
     b"form (RFC 2231)"),
])
def test_parameters_two_parsers_could_read_differently_are_refused(raw, sink, message,
                                                                   expected):
    assert raw.send(message) == (
        b"550 5.6.0 Malformed MIME in the top-level part: " + expected + b"; the message cannot "
        b"be checked for attachments (policy IV.B.3.c.v)\r\n")
    assert sink.messages == []


def test_rfc2231_boundary_and_file_name_are_decoded(raw, sink):
    message = (MIME_HEAD + b"Content-Type: multipart/mixed; boundary*=''a%2Db\r\n\r\n"
               b"--a-b\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
               b"--a-b\r\nContent-Type: text/plain\r\nContent-Disposition: inline; "
               b"filename*0*=utf-8''r%C3%A9; filename*1=sum.pdf\r\n\r\nx\r\n--a-b--\r\n")
    assert raw.send(message) == (
        b"550 5.7.1 Attachments are not accepted (policy IV.B.3.c.v): part 2 (text/plain, file "
        b'name "resum.pdf") carries a file name; put the file on a web server and link to it'
        b"\r\n")
    assert sink.messages == []


# --- the gateway's own fields ---------------------------------------------------------------

def test_client_bytes_in_the_helo_name_do_not_reach_the_gateways_received_field(gw, sink):
    client = RawSMTP(gw.port)
    try:
        assert client.command(b"EHLO a\x00b\x1b[31m\x7f x").startswith(b"250-")
        assert client.send(MESSAGE).startswith(b"250 2.0.0 Ok: queued as SINK1")
    finally:
        client.close()
    fields, _ = split_fields(sink.messages[0].content)
    assert fields[0].startswith(b"Received: from a?b?[31m??x ([127.0.0.1])\r\n\tby gw.test ")
    assert fields[1:] == split_fields(MESSAGE)[0]


def test_a_big_message_is_checked_the_same_way(raw, sink):
    """Over 256 KB the checks run in a worker thread (gateway.engine.Engine.admit)."""
    lines = b"".join(b"line %06d of a long newsletter, nothing to see\r\n" % i
                     for i in range(8000))
    assert len(lines) > 256 * 1024
    bare = lines[:-300] + b"a bare\nLF" + lines[-300:]
    assert raw.send(with_lines(body=bare)) == refused(
        b"Bare CR or LF in the message body; lines must end with CRLF (RFC 5321 2.3.8)")
    assert sink.messages == []
    assert raw.send(with_lines(body=lines)).startswith(b"250 2.0.0 Ok: queued as SINK1")
    assert sink.messages[0].content.endswith(b"\r\n\r\n" + lines)
