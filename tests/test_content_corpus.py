"""Content controls end to end (issue 4): every message of tests/corpus/ (raw bytes, CRLF, as
platforms send them) goes through the SMTP front of a real gateway to a real upstream; the
client's exact reply to the final dot, the decision log line and what arrived upstream are
checked.

The senders: ``acme`` may send transactional and promotional mail (return-path
bounce-*@em.acme.example), ``lms`` educational and transactional (lms-*@lms.vendor.example).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_SENDER, GatewayFactory, Sink, send

CORPUS = Path(__file__).parent / "corpus"
ACME = EXAMPLE_SENDER + 'classes = ["transactional", "promotional"]\n'
LMS = """
id = "lms"
organization = "Campus LMS vendor"
contact = "ops@lms.vendor.example"
networks = ["127.0.0.1/32"]
domains = ["lms.vendor.example"]
return_path = ["lms-*@lms.vendor.example"]
expires = 2027-06-30
classes = ["educational", "transactional"]
"""
SENDERS = {"acme": ACME, "lms": LMS}
A = "bounce-1@em.acme.example"
L = "lms-1@lms.vendor.example"
ACCEPTED = (250, "2.0.0", None, None, None)
ATT = "(policy IV.B.3.c.v)"
LINK = "put the file on a web server and link to it"
MALFORMED = "the message cannot be checked for attachments (policy IV.B.3.c.v)"
WHY_UNSUB = ("promotional mail must be unsubscribable (policy IV.C.1.a, RFC 2369, RFC 8058)")

# file: (envelope sender, reply code, enhanced code, exact reply text, deciding check, reason)
EXPECTED = {
    "newsletter-alternative.eml": (A, *ACCEPTED),
    "newsletter-plain-text.eml": (A, *ACCEPTED),
    "newsletter-8bit-utf8.eml": (A, *ACCEPTED),
    "related-cid-image.eml": (
        A, 550, "5.7.1", f"Embedded media are not accepted {ATT}: part 2.2 (image/png, no file "
        "name) is embedded by cid:logo.fall26@em.acme.example; put it on a web server and link "
        "to it", "attachments", "cid_media"),
    "pdf-attachment.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: part 2 (application/pdf, file "
        f'name "Fall-2026-Schedule.pdf") has Content-Disposition: attachment; {LINK}',
        "attachments", "attachment"),
    "ics-invite.eml": (
        A, 550, "5.7.1", f"Content type text/calendar is not accepted {ATT}: part 3 "
        "(text/calendar, no file name); accepted types: text/plain, text/html; put the content "
        "on a web server and link to it", "attachments", "media_type"),
    "winmail-dat.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: part 2 (application/ms-tnef, "
        f'file name "winmail.dat") has Content-Disposition: attachment; {LINK}',
        "attachments", "attachment"),
    "forwarded-rfc822.eml": (
        A, 550, "5.7.1", f"Content type message/rfc822 is not accepted {ATT}: part 2 "
        "(message/rfc822, no file name); accepted types: text/plain, text/html; put the content "
        "on a web server and link to it", "attachments", "media_type"),
    "disguised-text-attachment.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: part 2 (text/plain, file name "
        f'"invoice-4471.txt") carries a file name; {LINK}', "attachments",
        "attachment_filename"),
    "rfc2231-filename.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: part 2 (text/plain, file name "
        f'"Resume ? Fall 2026.txt") carries a file name; {LINK}', "attachments",
        "attachment_filename"),
    "rfc2231-continuation.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: part 2 (application/octet-stream"
        f", file name \"Programme d'ete 2026 (final).pdf\") carries a file name; {LINK}",
        "attachments", "attachment_filename"),
    "data-uri-image.eml": (
        A, 550, "5.7.1", f"Embedded media are not accepted {ATT}: part 2 (text/html, no file "
        "name) embeds image/png in a data: URI; put it on a web server and link to it",
        "attachments", "data_uri"),
    "data-uri-entity-obfuscated.eml": (
        A, 550, "5.7.1", f"Embedded media are not accepted {ATT}: part 2 (text/html, no file "
        "name) embeds image/gif in a data: URI; put it on a web server and link to it",
        "attachments", "data_uri"),
    "uuencoded-in-text.eml": (
        A, 550, "5.7.1", f"Attachments are not accepted {ATT}: the top-level part (text/plain, "
        f'no file name) holds a uuencoded file "report.pdf"; {LINK}', "attachments",
        "uuencoded_file"),
    "malformed-boundary.eml": (
        A, 550, "5.6.0", "Malformed MIME in the top-level part: the multipart boundary never "
        f"occurs; {MALFORMED}", "attachments", "mime_malformed"),
    "malformed-unclosed.eml": (
        A, 550, "5.6.0", "Malformed MIME in the top-level part: the closing multipart boundary "
        f"is missing; {MALFORMED}", "attachments", "mime_malformed"),
    "malformed-prefix-boundary.eml": (
        A, 550, "5.6.0", 'Malformed MIME in part 1: boundary "outer-inner" overlaps enclosing '
        f'boundary "outer" (one is a prefix of the other); {MALFORMED}', "attachments",
        "mime_malformed"),
    "malformed-header-block.eml": (
        A, 550, "5.6.0", "Malformed MIME in part 2: a line in the header block is not a header; "
        f"{MALFORMED}", "attachments", "mime_malformed"),
    "nesting-12-levels.eml": (
        A, 550, "5.6.0", "MIME nesting is deeper than 10 levels at part 1.1.1.1.1.1.1.1.1.1 "
        f"(multipart/mixed) {ATT}", "attachments", "mime_too_deep"),
    "nesting-10-levels.eml": (A, *ACCEPTED),
    "too-many-parts.eml": (
        A, 550, "5.6.0", f"Too many MIME parts: more than 50 {ATT}; send fewer parts and link to "
        "content instead", "attachments", "mime_too_many_parts"),
    "unsubscribe-missing.eml": (
        A, 550, "5.7.1", f"List-Unsubscribe header is missing; {WHY_UNSUB}: add List-Unsubscribe"
        " with an https: (one-click) or mailto: URI", "unsubscribe", "unsubscribe_missing"),
    "unsubscribe-mailto-only.eml": (A, *ACCEPTED),
    "unsubscribe-one-click.eml": (A, *ACCEPTED),
    "unsubscribe-https-without-post.eml": (
        A, 550, "5.7.1", "List-Unsubscribe-Post: List-Unsubscribe=One-Click is missing; it is "
        "required with an https: unsubscribe URI (RFC 8058 one-click)", "unsubscribe",
        "one_click_missing"),
    "unsubscribe-http-only.eml": (
        A, 550, "5.7.1", f"List-Unsubscribe has no valid https: or mailto: URI; {WHY_UNSUB}",
        "unsubscribe", "unsubscribe_no_uri"),
    "unsubscribe-malformed.eml": (
        A, 550, "5.7.1", "List-Unsubscribe is malformed: expected <https:...> and/or "
        "<mailto:...> URIs in angle brackets, separated by commas", "unsubscribe",
        "unsubscribe_malformed"),
    "unsubscribe-not-signed.eml": (
        A, 550, "5.7.1", "DKIM-Signature does not cover List-Unsubscribe and "
        "List-Unsubscribe-Post: list them in the h= tag of the signature (RFC 8058 section 4)",
        "unsubscribe", "unsubscribe_unsigned"),
    "class-transactional.eml": (A, *ACCEPTED),
    "class-educational.eml": (L, *ACCEPTED),
    "class-educational-not-permitted.eml": (
        A, 550, "5.7.1", "Message class educational (declared by X-Message-Class) is not "
        "permitted for sender acme (registered classes: transactional, promotional)",
        "message_class", "class_not_permitted"),
    "class-promotional.eml": (A, *ACCEPTED),
    "class-invalid.eml": (
        A, 550, "5.7.1", 'X-Message-Class: "newsletter" is not a message class; use one of '
        "transactional, educational, promotional", "message_class", "class_invalid"),
}
CLASSES = {"class-transactional.eml": "transactional", "class-educational.eml": "educational",
           "class-educational-not-permitted.eml": "educational"}


@pytest.fixture(scope="module")
def corpus_gateway(tmp_path_factory):
    sink = Sink()
    factory = GatewayFactory(tmp_path_factory.mktemp("corpus"))
    gw = factory.start(senders=SENDERS, upstream=sink.url)
    yield gw, sink
    gw.stop()
    sink.stop()


def message_id(raw: bytes) -> bytes:
    head = raw.partition(b"\r\n\r\n")[0]
    return next(line for line in head.split(b"\r\n") if line.startswith(b"Message-ID:"))


def test_every_corpus_file_has_an_expectation_and_is_crlf():
    files = {p.name for p in CORPUS.glob("*.eml")}
    assert files == set(EXPECTED)
    readme = (CORPUS / "README.md").read_text()
    assert all(f"| {name} |" in readme for name in files)
    for name in files:
        raw = (CORPUS / name).read_bytes()
        assert b"\n" not in raw.replace(b"\r\n", b""), f"{name}: bare LF"
        assert b"\r" not in raw.replace(b"\r\n", b""), f"{name}: bare CR"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_message_end_to_end(corpus_gateway, logs, name):
    gw, sink = corpus_gateway
    mail_from, code, enhanced, text, check, reason = EXPECTED[name]
    raw = (CORPUS / name).read_bytes()
    mid = message_id(raw)
    client, (got_code, got_text) = send(gw, mail_from=mail_from, message=raw)
    client.quit()
    arrived = [m for m in sink.messages if mid in m.content]
    [line] = logs.events("message")
    assert line["message_class"] == CLASSES.get(name, "promotional")
    if code == 250:
        assert (got_code, got_text[:20]) == (250, b"2.0.0 Ok: queued as ")
        [msg] = arrived
        assert msg.mail_from == mail_from and msg.rcpt_tos == ["alice@example.edu"]
        assert msg.content.startswith(b"Received: from client.test ([127.0.0.1])")
        assert msg.content.endswith(raw)
        assert line["decision"] == "accept" and line["reason"] == "relayed"
    else:
        assert (got_code, got_text.decode()) == (code, f"{enhanced} {text}")
        assert arrived == []
        assert line["decision"] == "reject"
        assert (line["decided_by"], line["reason"]) == (check, reason)
        assert line["reply"] == f"{code} {enhanced} {text}"
