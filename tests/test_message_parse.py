"""gateway.engine.message.parse_now gives the stdlib parser's tree, field for field and payload
for payload (it only skips the line splitting of a single-part body): over the content corpus
and over generated messages of every shape (property-based)."""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.message import parse_now
from gateway.message.headers import HeaderError, split

CORPUS = Path(__file__).parent / "corpus"
STDLIB = BytesParser(policy=compat32)


def shape(msg: Message):
    """Everything a check can read from a parsed message."""
    payload = msg.get_payload()
    return (msg.items(), msg.get_unixfrom(), [type(d).__name__ for d in msg.defects],
            msg.preamble, msg.epilogue, msg.is_multipart(),
            [shape(p) for p in payload] if isinstance(payload, list) else payload)


def test_corpus_messages_parse_as_the_stdlib_parses_them():
    files = sorted(CORPUS.glob("*.eml"))
    assert len(files) > 20
    for path in files:
        content = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        expected = shape(STDLIB.parsebytes(content))
        assert shape(parse_now(content)) == expected, path.name
        try:
            fields = split(content).fields
        except HeaderError:
            continue
        assert shape(parse_now(content, fields)) == expected, path.name


FIELDS = st.sampled_from([
    b"From: a@b.example", b"Subject: hi", b"Content-Type: text/plain; charset=utf-8",
    b"Content-Type: text/html", b"Content-Type: multipart/mixed; boundary=XX",
    b"Content-Type: multipart/alternative", b"Content-Type: message/rfc822",
    b"Content-Type: message/delivery-status", b"Content-Type: image/png; name=a.png",
    b"Content-Transfer-Encoding: base64", b"MIME-Version: 1.0", b"X-Folded: a\r\n\tb",
    b"Bad line without colon", b" leading space: x", b"Subject: caf\xc3\xa9", b"From x",
    b"X-Empty:", b"X-Tab:\tv", b"X-Fold-First:\r\n next", b"X-Trailing: v \t",
])
BODIES = st.lists(st.sampled_from([
    b"", b"text", b"--XX", b"--XX--", b"Content-Type: text/plain", b"\xff\xfe", b".",
    b"From: inner@x.example", b"--XX\r\nContent-Type: image/gif\r\n\r\nR0lGOD", b"\r\n"]),
    max_size=12)


@settings(max_examples=400, deadline=None)
@given(st.lists(FIELDS, max_size=6), BODIES, st.booleans())
def test_generated_messages_parse_as_the_stdlib_parses_them(fields, body, blank):
    content = b"".join(f + b"\r\n" for f in fields) + (b"\r\n" if blank else b"") \
        + b"\r\n".join(body) + (b"\r\n" if body else b"")
    expected = shape(STDLIB.parsebytes(content))
    assert shape(parse_now(content)) == expected
    try:  # the way the engine calls it: with the fields the intake split
        block = split(content)
    except HeaderError:
        return  # refused before any check: never parsed
    assert shape(parse_now(content, block.fields)) == expected
