"""The content controls' parsing and MIME walk, unit by unit: constructs that hide or smuggle
files, malformed MIME (refused, never passed, never a crash), the RFC 2369 / RFC 8058 header
parsers. Messages are parsed exactly as the handler does (BytesParser, compat32)."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import random
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import attachments
from gateway.checks.attachments import Attachments, AttachmentsSettings, inspect
from gateway.checks.base import Context
from gateway.checks.message_class import declared_class
from gateway.checks.unsubscribe import (Unsubscribe, dkim_signed_headers,
                                        parse_list_unsubscribe, usable_uri)

CORPUS = Path(__file__).parent / "corpus"
PARSER = BytesParser(policy=compat32)
DEFAULT = AttachmentsSettings()
HEAD = b"From: a@em.acme.example\r\nSubject: t\r\nMIME-Version: 1.0\r\n"


def parse(raw: bytes):
    return PARSER.parsebytes(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


def reason(raw: bytes, settings: AttachmentsSettings = DEFAULT) -> str | None:
    finding = inspect(parse(raw), settings)
    return None if finding is None else finding.reason


def mixed(*parts: bytes, boundary: bytes = b"B") -> bytes:
    body = b"".join(b"--" + boundary + b"\n" + p + b"\n" for p in parts)
    return (HEAD + b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\n\n' + body
            + b"--" + boundary + b"--\n")


TEXT = b"Content-Type: text/plain\n\nHello.\n"


def html(body: bytes, head: bytes = b"Content-Type: text/html; charset=utf-8\n") -> bytes:
    return head + b"\n" + body


def nested(levels: int) -> bytes:
    body = b"Content-Type: text/plain\n\nDeep.\n"
    for i in reversed(range(levels)):
        b = b"n%d" % i
        body = (b'Content-Type: multipart/mixed; boundary="' + b + b'"\n\n--' + b + b"\n" + body
                + b"\n--" + b + b"--\n")
    return HEAD + body


PNG_B64 = (b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJ"
           b"RU5ErkJggg==")


@pytest.mark.parametrize("raw,expected", [
    # accepted
    (HEAD + b"\nJust text, no MIME structure.\n", None),
    (mixed(TEXT, html(b"<p>Hi</p>")), None),
    (mixed(TEXT, html(b"<p>Our metadata:image/png,x and the data: 1/2, 3/4 table.</p>")), None),
    (mixed(TEXT, b"Content-Type: text/plain\n\nbegin 644 pushups\nthen we run.\n"), None),
    (mixed(TEXT, html(b'<a href="https://x.example/cid:logo">x</a>')), None),
    # attachments and file names, whatever the type
    (mixed(TEXT, b"Content-Type: text/plain\nContent-Disposition: x-unknown\n\nx\n"),
     "attachment"),
    (mixed(TEXT, b"Content-Type: text/plain\nContent-Disposition: ATTACHMENT\n\nx\n"),
     "attachment"),
    (mixed(TEXT, b'Content-Type: text/plain\nContent-Disposition: inline; filename=""\n\nx\n'),
     "attachment_filename"),
    (mixed(TEXT, b'Content-Type: text/html; name="page.html"\n\n<p>x</p>\n'),
     "attachment_filename"),
    (mixed(TEXT, b"Content-Type: text/plain; filename=notes.txt\n\nx\n"),
     "attachment_filename"),
    (mixed(TEXT, b"Content-Type: text/plain\nContent-Disposition: inline;\n"
                 b" filename*0=\"a\"; filename*1=\"b.exe\"\n\nx\n"), "attachment_filename"),
    (HEAD + b'Content-Type: multipart/mixed; boundary="B"; name="x.zip"\n\n--B\n'
            + TEXT + b"\n--B--\n", "attachment_filename"),
    # types outside the allow-list
    (HEAD + b"Content-Type: application/pdf\nContent-Transfer-Encoding: base64\n\nJVBERi0=\n",
     "media_type"),
    (mixed(TEXT, b"Content-Type: image/png\nContent-ID: <unreferenced@x>\n"
                 b"Content-Transfer-Encoding: base64\n\n" + PNG_B64 + b"\n"), "media_type"),
    (mixed(TEXT, b"Content-Type: audio/mpeg\n\nID3\n"), "media_type"),
    (mixed(TEXT, b"Content-Type: video/mp4\n\nx\n"), "media_type"),
    (mixed(TEXT, b"Content-Type: text/calendar; method=REQUEST\n\nBEGIN:VCALENDAR\n"),
     "media_type"),
    (mixed(TEXT, b"Content-Type: application/ms-tnef\n\nx\n"), "media_type"),
    (mixed(TEXT, b"Content-Type: text/x-vcard\n\nBEGIN:VCARD\n"), "media_type"),
    # embedded media: cid:, data: (plain, quoted-printable, base64, UTF-16, obfuscated)
    (mixed(html(b'<img src="CID:Logo%40x">'), b"Content-Type: text/plain\n"
           b"Content-ID: <logo@x>\n\nnot even an image\n"), "cid_media"),
    (mixed(TEXT, html(b"<img src='data:image/png;base64," + PNG_B64 + b"'>")), "data_uri"),
    (mixed(TEXT, html(b"<div style=\"background:url( data:image/svg+xml,%3Csvg%3E )\">")),
     "data_uri"),
    (mixed(TEXT, html(b'<img srcset="a.png 1x, data:image/png;base64,AAAA 2x">')), "data_uri"),
    (mixed(TEXT, html(b'<a href="data:,hello">x</a>')), "data_uri"),
    (mixed(TEXT, html(b'<img src="da=\n=74a:image/png;base64,AAAA">',
                      b"Content-Type: text/html\nContent-Transfer-Encoding: quoted-printable\n")),
     "data_uri"),
    (mixed(TEXT, html(base64.encodebytes(b'<img src="data:image/png;base64,AAAA">'),
                      b"Content-Type: text/html\nContent-Transfer-Encoding: base64\n")),
     "data_uri"),
    (mixed(TEXT, html(base64.encodebytes('<img src="data:image/png;base64,AAAA">'
                                         .encode("utf-16")),
                      b"Content-Type: text/html; charset=utf-16\n"
                      b"Content-Transfer-Encoding: base64\n")), "data_uri"),
    (mixed(TEXT, html(b'<img src="&#100;ata&#58;image/png;base64,AAAA">')), "data_uri"),
    (mixed(TEXT, html(b'<img src="d&#x61;ta&colon;image/png;base64,AAAA">')), "data_uri"),
    (mixed(TEXT, html(b'<img src="da\nta:image/png;base64,AAAA">')), "data_uri"),
    (mixed(TEXT, html(b'<img src="da&Tab;ta:image/png;base64,AAAA">')), "data_uri"),
    # files inside text
    (mixed(b"Content-Type: text/plain\n\nbegin 644 a.exe\n"
           b"M5&AE(\"!Q=6EC:R!B<F]W;B!F;W@@:G5M<&5D(&]V97(@=&AE(&QA>GD@9&]G\n`\nend\n"),
     "uuencoded_file"),
    # malformed: refused, never passed
    (HEAD + b"Content-Type: multipart/mixed\n\n--B\n" + TEXT + b"\n--B--\n", "mime_malformed"),
    (HEAD + b'Content-Type: multipart/mixed; boundary="B"\n\n--C\n' + TEXT, "mime_malformed"),
    (HEAD + b'Content-Type: multipart/mixed; boundary="B"\n\n', "mime_malformed"),
    (HEAD + b'Content-Type: multipart/mixed; boundary="B"\nContent-Transfer-Encoding: base64'
            b"\n\n--B\n" + TEXT + b"\n--B--\n", "mime_malformed"),
    (mixed(b"Content-Type: text/plain\nContent-Type: application/pdf\n\nx\n"),
     "mime_malformed"),
    (mixed(b"Content-Type: text/plain\nContent-Disposition: inline\n"
           b"Content-Disposition: attachment; filename=a.pdf\n\nx\n"), "mime_malformed"),
    (mixed(b"Content-Type: image\n\nx\n"), "mime_malformed"),
    (mixed(b"Content-Type: \n\nx\n"), "mime_malformed"),
    (mixed(b"Content-Type: text/plain\nContent-Transfer-Encoding: x-uuencode\n\nx\n"),
     "mime_malformed"),
    (mixed(b" Content-Type: text/plain\n\nx\n"), "mime_malformed"),
    (mixed(TEXT, b"Content-Type: text/plain\n\nhello\n--B junk on the line\n"),
     "mime_malformed"),
    (mixed(TEXT) + b"--B\nContent-Type: application/pdf\n\nafter the close\n",
     "mime_malformed"),
    (mixed(TEXT, html(b"QUJDR", b"Content-Type: text/html\nContent-Transfer-Encoding: base64\n")),
     "mime_malformed"),
    (nested(11), "mime_too_deep"),
    (nested(400), "mime_too_deep"),
    (mixed(*[TEXT] * 50), "mime_too_many_parts"),
])
def test_constructs(raw, expected):
    assert reason(raw) == expected


def test_limits_at_the_edge():
    assert reason(nested(10)) is None
    assert reason(mixed(*[TEXT] * 49)) is None  # 49 parts + the top level = 50


def test_allowed_message_rfc822_is_walked_into():
    inner = (b"Subject: inner\nContent-Type: multipart/mixed; boundary=I\n\n--I\n" + TEXT
             + b"\n--I\nContent-Type: application/pdf; name=a.pdf\n\nx\n--I--\n")
    raw = mixed(TEXT, b"Content-Type: message/rfc822\n\n" + inner)
    assert reason(raw) == "media_type"
    allowed = AttachmentsSettings(allowed_types=("text/plain", "text/html", "message/rfc822"))
    finding = inspect(parse(raw), allowed)
    assert finding.reason == "attachment_filename"
    assert "part 2.1.2 (application/pdf, file name \"a.pdf\")" in finding.text
    clean = mixed(TEXT, b"Content-Type: message/rfc822\n\nSubject: inner\n\nHello.\n")
    assert inspect(parse(clean), allowed) is None


def test_allow_embedded_still_checks_the_embedded_types():
    settings = AttachmentsSettings(allow_embedded=True)
    assert reason(mixed(TEXT, html(b'<img src="data:image/png;base64,AAAA">')),
                  settings) == "data_uri"
    assert reason(mixed(TEXT, html(b'<a href="data:text/plain,hi">x</a>')), settings) is None
    images = AttachmentsSettings(allow_embedded=True, allowed_types=("text/*", "image/png"))
    assert reason(mixed(TEXT, html(b'<img src="data:image/png;base64,AAAA">')), images) is None
    assert reason(mixed(TEXT, html(b'<img src="data:image/gif;base64,AAAA">')),
                  images) == "data_uri"


def test_reply_names_part_type_and_file_name_in_ascii():
    raw = mixed(TEXT, b"Content-Type: application/pdf\nContent-Disposition: attachment;\n"
                      b" filename*=UTF-8''%E5%B1%A5%E6%AD%B4%E6%9B%B8%0D%0A%22.pdf\n\nx\n")
    finding = inspect(parse(raw), DEFAULT)
    assert finding.text.startswith('Attachments are not accepted (policy IV.B.3.c.v): part 2 '
                                   '(application/pdf, file name "??????.pdf") has ')
    finding.text.encode("ascii")


def test_8bit_headers_and_bodies():
    raw = ("X-Message-Class: transactional\u00e9\nContent-Type: multipart/mixed; boundary=B\n\n"
           "--B\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
           "<p>Caf\u00e9 \u2014 \u6b22\u8fce</p>\n--B\nContent-Type: application/pdf\n"
           "Content-Disposition: inline; filename=\"Caf\u00e9 \u2014.pdf\"\n\nx\n--B--\n")
    message = parse(HEAD + raw.encode())
    finding = inspect(message, DEFAULT)
    assert finding.reason == "attachment_filename"
    assert '(application/pdf, file name "Caf' in finding.text  # raw 8-bit: shown as '?'
    finding.text.encode("ascii")
    assert declared_class(message, "X-Message-Class").problem.reason == "class_invalid"
    eight_bit_html = mixed(TEXT, "Content-Type: text/html; charset=utf-8\n"
                                 "Content-Transfer-Encoding: 8bit\n\n<p>Caf\u00e9</p>".encode())
    assert reason(eight_bit_html) is None
    assert reason(eight_bit_html.replace(b"<p>", b'<img src="data:image/png;base64,AA">')) == \
        "data_uri"


def test_check_refuses_what_it_cannot_analyse(monkeypatch):
    def boom(message, settings):
        raise ValueError("unexpected")

    monkeypatch.setattr(attachments, "inspect", boom)

    ctx = Context(client_ip=ipaddress.ip_address("127.0.0.1"), message=parse(mixed(TEXT)))
    verdict = asyncio.run(Attachments(DEPS).check(ctx))
    assert (verdict.action, verdict.reply.code, verdict.reply.enhanced, verdict.reason) == (
        "reject", 550, "5.6.0", "mime_unanalysable")


class DEPS:
    class config:  # noqa: N801 - stands in for gateway.config.Config
        @staticmethod
        def check_settings(name):
            from gateway.checks import CHECK_SETTINGS

            return CHECK_SETTINGS[name]()


def _mutations(raw: bytes, rng: random.Random):
    lines = raw.split(b"\r\n")
    for _ in range(12):
        kind = rng.randrange(6)
        out = list(lines)
        i = rng.randrange(len(out))
        if kind == 0:
            yield raw[:rng.randrange(len(raw))]  # truncated anywhere
            continue
        if kind == 1:
            del out[i]
        elif kind == 2:
            out.insert(i, out[rng.randrange(len(out))])
        elif kind == 3:
            line = bytearray(out[i])
            for _ in range(3):
                if line:
                    line[rng.randrange(len(line))] = rng.choice(b'-";=:\t <>*%\'\x00\xff')
            out[i] = bytes(line)
        elif kind == 4:
            out[i] = out[i].replace(b"--", b"-", 1)
        else:
            out[i] = out[i].replace(b"\r", b"")
        yield b"\r\n".join(out)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.glob("*.eml")))
def test_mutated_corpus_never_crashes(name):
    """Truncations, dropped/duplicated lines, garbled bytes: the walk returns a finding or
    None; it never raises (the check's own catch-all is not what saves it)."""
    rng = random.Random(name)
    raw = (CORPUS / name).read_bytes()
    settings = (DEFAULT, AttachmentsSettings(allow_embedded=True, allowed_types=(
        "text/*", "image/*", "message/rfc822", "application/*"), max_depth=50))
    for mutated in _mutations(raw, rng):
        message = PARSER.parsebytes(mutated)
        for s in settings:
            finding = inspect(message, s)
            assert finding is None or finding.code == 550
        declared_class(message, "X-Message-Class")
        ctx = Context(client_ip=ipaddress.ip_address("127.0.0.1"), message=message,
                      message_class="promotional")
        assert asyncio.run(Unsubscribe(DEPS).check(ctx)).action in ("accept", "reject")


@pytest.mark.parametrize("value,uris", [
    ("<https://x.example/u/1>", ["https://x.example/u/1"]),
    ("<https://x.example/u/1>, <mailto:u@x.example?subject=unsub>",
     ["https://x.example/u/1", "mailto:u@x.example?subject=unsub"]),
    ("<mailto:u@x.example> (Use this one),\r\n <https://x.example/u\r\n /2>",
     ["mailto:u@x.example", "https://x.example/u/2"]),
    ("https://x.example/u/1", None),
    ("<https://x.example/u/1> trailing", None),
    ("<https://x.example/u/1>; <mailto:u@x.example>", None),
    ("", None),
    ("<>", [""]),
])
def test_parse_list_unsubscribe(value, uris):
    assert parse_list_unsubscribe(value) == uris


def _reference_parse_list_unsubscribe(value: str):
    """The parse as it was, all regular expressions (before the fast paths)."""
    import re

    text = re.sub(r"\([^()]*\)", " ", value.replace("\r", "").replace("\n", ""))
    uris, pos = [], 0
    for m in re.finditer(r"<([^<>]*)>", text):
        if not re.fullmatch(r"[\s,]*", text[pos:m.start()]):
            return None
        uris.append(re.sub(r"\s+", "", m.group(1)))
        pos = m.end()
    if not uris or not re.fullmatch(r"[\s,]*", text[pos:]):
        return None
    return uris


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(["<", ">", "(", ")", ",", " ", "\t", "\r\n ", "\u2028",
                                 "\xa0", "https://x.example/u", "mailto:a@b", "x", ";"]),
                max_size=20))
def test_parse_list_unsubscribe_as_the_regular_expressions_did(pieces):
    value = "".join(pieces)
    assert parse_list_unsubscribe(value) == _reference_parse_list_unsubscribe(value)


@pytest.mark.parametrize("uri,scheme", [
    ("https://x.example/u/1", "https"), ("HTTPS://x.example", "https"),
    ("mailto:u@x.example?subject=unsubscribe", "mailto"), ("MAILTO:u@x.example", "mailto"),
    ("http://x.example/u/1", None), ("https://", None), ("https:///path", None),
    ("mailto:", None), ("mailto:nobody", None), ("mailto:u@localhost", None),
    ("https://x.example/a b", None), ("javascript:alert(1)", None), ("", None),
    ("https://x.example:99999/", None),
])
def test_usable_uri(uri, scheme):
    assert usable_uri(uri) == scheme


def test_dkim_signed_headers():
    value = ("v=1; a=rsa-sha256; d=x.example; s=s;\r\n\th=From : To:\r\n List-Unsubscribe:"
             "list-unsubscribe-post ; bh=abc; b=def")
    assert dkim_signed_headers(value) == {"from", "to", "list-unsubscribe",
                                          "list-unsubscribe-post"}
    assert dkim_signed_headers("v=1; d=x.example") == set()


def test_declared_class():
    def msg(*values: str):
        return parse(HEAD + b"".join(b"X-Message-Class: %s\n" % v.encode() for v in values)
                     + b"\nx\n")

    assert declared_class(msg(), "X-Message-Class").message_class == "promotional"
    assert declared_class(msg(" Transactional "), "X-Message-Class").message_class == \
        "transactional"
    same = declared_class(msg("educational", "EDUCATIONAL"), "X-Message-Class")
    assert (same.message_class, same.problem) == ("educational", None)
    bad = declared_class(msg("educational", "promotional"), "x-message-class")
    assert (bad.message_class, bad.problem.reason) == ("promotional", "class_ambiguous")
    odd = declared_class(msg("news\x01letter" + "x" * 80), "X-Message-Class")
    assert odd.problem.reason == "class_invalid"
    assert odd.problem.reply.text.startswith('X-Message-Class: "news?letter' + "x" * 29 + '..."')
