"""Property-based tests (hypothesis) of the canonical header block (issue #10):

- the invariant, through a LIVE gateway over a raw socket: for any header block (CR, LF, folds,
  NUL, white space before the colon, 8-bit bytes), the header fields the checks judged are,
  byte for byte, the fields campus mail received (read here by an independent splitter), plus
  only the gateway's own Received field; a refused message reaches neither the checks nor
  campus mail;
- the stdlib parser the checks' MIME tree comes from and the canonical split agree on every
  block the split accepts, and the split gives back the exact bytes;
- a bounded fuzz run of the MIME/header path through a live gateway: no unhandled exception,
  every reply well-formed (code, enhanced code of the same class, printable ASCII).

One gateway serves all examples of a test; example counts keep each test to a few seconds.
"""

from __future__ import annotations

import base64
import re
from email.parser import BytesParser
from email.policy import compat32

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.checks.auth_results import claims
from gateway.message.headers import HeaderError, check_unique, fields_of, split
from tests.conftest import MESSAGE
from tests.rawsmtp import REPLY_LINE, RawSMTP, install_recorder, on_wire, split_fields

LIVE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

# --- header blocks --------------------------------------------------------------------------

NAMES = st.sampled_from([b"X-Note", b"X-Tag", b"x-note", b"Received", b"Authentication-Results",
                         b"Comments", b"Keywords", b"From", b"Subject", b"Message-ID", b"To",
                         b"Content-Type"])
ATOMS = st.sampled_from([b"a", b"b", b" ", b"\t", b":", b";", b"=", b"gw.test", b"GW.TEST.",
                         b"(c)", b"dkim=pass", b"\xc3\xa9", b"\xff", b'"', b"@", b"<x@y.z>",
                         b"mx.other.test"])
TEXT = st.lists(ATOMS, max_size=6).map(b"".join)
FIELD = st.tuples(NAMES, st.sampled_from([b"", b" ", b"\t"]), TEXT).map(
    lambda t: t[0] + b":" + t[1] + t[2])
FOLD = st.tuples(st.sampled_from([b" ", b"\t"]), TEXT, st.sampled_from([b"x", b"\xc3\xa9"])).map(
    b"".join)
GOOD = st.tuples(FIELD, st.lists(FOLD, max_size=2)).map(lambda t: b"\r\n".join([t[0], *t[1]]))
BAD = st.one_of(
    FOLD,  # a fold where none can be (the first line)
    st.tuples(NAMES, st.sampled_from([b" ", b"\t", b"  "]), TEXT).map(  # obs: WSP before ':'
        lambda t: t[0] + t[1] + b":" + t[2]),
    st.sampled_from([b" ", b"\t \t"]),  # a blank continuation
    TEXT,  # anything
    TEXT.map(lambda t: b"X-\xc3\xa9:" + t),  # an 8-bit field name
)
INSERTS = st.sampled_from([b"\r", b"\n", b"\0", b"\r\n", b"\n ", b"\r\n\t", b"\x80", b" "])
BODIES = st.sampled_from([b"Hello.\r\n", b".leading dot\r\n..two\r\n", b"", b"x\ny\r\n",
                          b"\xc3\xa9t\xc3\xa9\r\n", b"a\rb\r\n", b"nul\0\r\n"])


@st.composite
def messages(draw) -> bytes:
    lines = draw(st.lists(GOOD, max_size=10))
    if draw(st.integers(0, 3)) == 0:  # one line that is not a field
        lines.insert(draw(st.integers(0, len(lines))), draw(BAD))
    head = b"".join(line + b"\r\n" for line in lines)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # a stray CR, LF, NUL, fold, ...
        at = draw(st.integers(0, len(head)))
        head = head[:at] + draw(INSERTS) + head[at:]
    if draw(st.booleans()):
        return head + b"\r\n" + draw(BODIES)
    return head


_FIELD_LINE = re.compile(rb"[!-9;-~]+:")


def ambiguous(data: bytes) -> bool:
    """An independent statement of what must be refused: a bare CR or LF or a NUL anywhere, or a
    header line that is neither a field nor a non-blank continuation."""
    if re.search(rb"\r(?!\n)|(?<!\r)\n|\x00", data):
        return True
    head = data[:data.find(b"\r\n\r\n") + 2] if b"\r\n\r\n" in data else data
    if data.startswith(b"\r\n"):
        return False
    for i, line in enumerate(head[:-2].split(b"\r\n") if head else []):
        if line[:1] in (b" ", b"\t"):
            if i == 0 or not line.strip(b" \t"):
                return True
        elif not _FIELD_LINE.match(line):
            return True
    return False


PARSER = BytesParser(policy=compat32)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(messages())
def test_split_is_exact_and_agrees_with_the_stdlib_parser(raw):
    try:
        block = split(raw)
    except HeaderError:
        assert ambiguous(raw + (b"" if raw.endswith(b"\r\n") else b"\r\n")) or not raw.endswith(
            b"\r\n")
        return
    assert block.assemble() == raw
    parsed = PARSER.parsebytes(raw)
    # compat32 keeps a value's folds, drops the white space after the colon and the final CRLF
    assert list(parsed.raw_items()) == [
        (f.name, f.value.lstrip(b" \t").decode("ascii", "surrogateescape")) for f in block.fields]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_split_of_any_bytes_returns_or_refuses(raw):
    try:
        block = split(raw)
    except HeaderError as exc:
        assert exc.code == 550 and exc.enhanced == "5.6.0" and exc.text.isprintable()
    else:
        assert block.assemble() == raw


# --- the invariant, through a live gateway --------------------------------------------------

MONITOR = "".join(f'[checks.{name}]\nmode = "monitor"\n' for name in (
    "display_name", "message_class", "unsubscribe", "attachments", "large_audience"))
MONITOR += '[checks.rate_limit]\nmode = "off"\n'
OURS = b"Received: from client.test ([127.0.0.1])\r\n\tby gw.test (ecomm-gateway) with ESMTP id "


def test_judged_fields_are_byte_for_byte_what_campus_mail_receives(gateways, sink, logs):
    gw = gateways.start(MONITOR, upstream=sink.url)
    recorder = install_recorder(gw)
    raw = RawSMTP(gw.port)
    forged = claims("gw.test")
    outcomes: list[bytes] = []

    @LIVE
    @given(messages())
    def check(message):
        data = on_wire(message)
        relayed, judged = len(sink.messages), len(recorder.seen)
        reply = raw.send(message)
        outcomes.append(reply[:9])
        assert REPLY_LINE.fullmatch(reply), reply
        if not reply.startswith(b"250"):
            assert reply.startswith((b"550 5.6.0 ", b"554 5.4.6 ")), reply
            assert len(sink.messages) == relayed and len(recorder.seen) == judged
            return
        assert not ambiguous(data)
        fields, parsed, judged_raw = recorder.seen[-1]
        got = sink.messages[-1].content
        received, body = split_fields(got)  # read independently of gateway.message
        assert received[0].startswith(OURS)  # the gateway's own field, then exactly the judged
        assert received[1:] == [f.raw for f in fields]
        assert got == received[0] + judged_raw
        # what the checks' MIME tree holds is the same fields
        assert parsed == [(f.name, f.value.lstrip(b" \t").decode("ascii", "surrogateescape"))
                          for f in fields]
        # the only fields left out are Authentication-Results claiming the gateway's name
        sent, _ = split_fields(data) if not data.startswith(b"\r\n") else ([], b"")
        dropped = [f for f in sent if f not in received[1:]]
        assert all(f.lower().startswith(b"authentication-results:") for f in dropped)
        assert [f for f in sent if f not in dropped] == received[1:]
        assert not any(forged(f.name, f.unfolded()) for f in fields)

    try:
        check()
    finally:
        raw.close()
    assert logs.events("internal_error") == []
    # both sides of the property were exercised, and the forged field was met
    assert outcomes.count(b"250 2.0.0") >= 25 and outcomes.count(b"550 5.6.0") >= 25, outcomes
    assert any(b"Authentication-Results:" in m.content for m in sink.messages)


# --- a bounded fuzz run of the MIME/header path ---------------------------------------------

TYPES = st.sampled_from([b"text/plain", b"text/html", b"image/png", b"application/pdf",
                         b"message/rfc822", b"text/calendar", b"text", b"x/y/z", b""])
PARAMS = st.lists(st.sampled_from([
    b'charset="utf-8"', b"charset*=''utf-16", b"charset*0*=''utf-; charset*1=16",
    b"charset=x-unknown", b'name="a.pdf"', b"name*=utf-8''r%C3%A9sum%C3%A9.pdf",
    b"filename*0=a; filename*2=b", b"boundary=B", b"boundary*=B", b'boundary="', b"=x",
    b"format=flowed"]), max_size=3).map(lambda ps: b"".join(b"; " + p for p in ps))
ENCODINGS = st.sampled_from([None, b"7bit", b"8bit", b"base64", b"quoted-printable", b"x-uue",
                             b"binary"])
BODY_TEXT = st.sampled_from([
    b"Hello.", b'<img src="data:image/png;base64,iVBORw0KGgo=">', b"<a href=cid:logo>x</a>",
    base64.encodebytes("<p>h\u00e9</p>".encode("utf-16")).strip(), b"=3D=C3=A9=\r\nx",
    b"begin 644 x.bin\r\nM86)C\r\n`\r\nend", b"--B\r\n", b"\xff\xfe<\x00p\x00>\x00", b"",
    b"%%%not base64%%%", b"data:text/plain,hi"])
DISPOSITIONS = st.sampled_from([None, b"inline", b"attachment", b"inline; filename=a.txt",
                                b"x-unknown", b"inline; filename*=''b.txt; filename=c.txt"])


@st.composite
def leaf(draw) -> bytes:
    head = b"Content-Type: " + draw(TYPES) + draw(PARAMS) + b"\r\n"
    cte, disposition = draw(ENCODINGS), draw(DISPOSITIONS)
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    if disposition is not None:
        head += b"Content-Disposition: " + disposition + b"\r\n"
    if draw(st.booleans()):
        head += b"Content-ID: <logo>\r\n"
    return head + b"\r\n" + draw(BODY_TEXT) + b"\r\n"


@st.composite
def _multipart(draw, children: st.SearchStrategy[bytes]) -> bytes:
    boundary = draw(st.sampled_from([b"B", b"B1", b"=_x", b"B--"]))
    kind = draw(st.sampled_from([b"mixed", b"alternative", b"related"]))
    parts = draw(st.lists(children, max_size=3))
    body = b"".join(b"--" + boundary + b"\r\n" + p for p in parts)
    closing = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b""]))
    return (b"Content-Type: multipart/" + kind + b"; boundary=\"" + boundary + b"\"\r\n\r\n"
            + draw(st.sampled_from([b"", b"preamble\r\n"])) + body + closing)


def multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return _multipart(children)


ENTITIES = st.recursive(leaf(), multipart, max_leaves=6)
HEAD = MESSAGE.split(b"\r\n\r\n", 1)[0] + b"\r\nMIME-Version: 1.0\r\n"


@st.composite
def mime_messages(draw) -> bytes:
    data = HEAD + draw(ENTITIES)
    for _ in range(draw(st.integers(0, 2))):  # byte-level damage anywhere
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        data = data[:at] + draw(st.sampled_from([b"", b"\r\n", b"\n", b"\0", b"\xff", b"--",
                                                 b"\r\n\r\n", b";", b'"', b"*"])) + data[at + cut:]
    return data


def test_fuzz_mime_and_header_path(gateways, sink, logs):
    gw = gateways.start('[checks.rate_limit]\nmode = "off"\n', upstream=sink.url)
    raw = RawSMTP(gw.port)
    seen_codes: set[bytes] = set()

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(mime_messages())
    def check(message):
        reply = raw.send(message)
        lines = reply.split(b"\r\n")[:-1]
        for i, line in enumerate(lines):
            m = REPLY_LINE.fullmatch(line + b"\r\n")
            assert m is not None, reply
            assert m.group(1)[:1] == m.group(3)  # 550 with 5.x.x, never 550 4.x.x
            assert m.group(2) == (b" " if i == len(lines) - 1 else b"-"), reply
        assert not reply.startswith(b"451 4.3.0 Internal error"), reply
        seen_codes.add(reply[:9])

    try:
        check()
    finally:
        raw.close()
    assert logs.events("internal_error") == []
    reasons = {line.get("reason") for line in logs.events("message")}
    assert "mime_unanalysable" not in reasons  # the attachments walk never crashed
    assert {b"250 2.0.0", b"550 5.6.0", b"550 5.7.1"} <= seen_codes  # every path was taken


# --- the same rules for fields handed over one by one (a milter front) ----------------------

@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(messages())
def test_fields_one_by_one_are_judged_as_in_a_block(raw):
    """A front that gets (name, value) pairs (LF-folded, as milters do) gets the same fields
    and the same refusals as the split of the whole block."""
    try:
        block = split(raw)
    except HeaderError:
        return
    pairs = [(f.name, f.value.replace(b"\r\n", b"\n")) for f in block.fields]
    try:
        check_unique(f.name for f in block.fields)
    except HeaderError as exc:
        with pytest.raises(HeaderError) as caught:
            fields_of(pairs, eol=b"\n")
        assert caught.value.text == exc.text
    else:
        assert fields_of(pairs, eol=b"\n") == block.fields


@pytest.mark.parametrize("pairs,reason", [
    ([("From ", b" a@b.example")], "header_space_before_colon"),
    ([("X-A", b" a\rb")], "header_bare_newline"),
    ([("X-A", b" a\r\nb")], "header_bare_newline"),  # with eol LF, the CR is bare
    ([("X-A", b" a\n \n b")], "header_blank_continuation"),
    ([("X-A", b" a\nb")], "header_bad_line"),
    ([("X-A", b" a\0")], "header_nul"),
    ([("X-\xe9", b" a")], "header_bad_name"),
    ([("", b" a")], "header_bad_name"),
    ([("From", b" a@b.example"), ("FROM", b" c@d.example")], "header_duplicate"),
])
def test_fields_one_by_one_refused(pairs, reason):
    with pytest.raises(HeaderError) as caught:
        fields_of(pairs, eol=b"\n")
    assert caught.value.reason == reason and (caught.value.code, caught.value.enhanced) == (
        550, "5.6.0")
