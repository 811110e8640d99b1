"""The intake's cheaper looks at the header fields (issue #14: names lower-cased once for the
repeated-field, loop and forged Authentication-Results checks; the Message-ID found without
lower-casing the constant; the parse's own check of the split fields without Field.raw) judge
every message as before: property-tested against the earlier code, kept here as the reference,
over generated header blocks (duplicates in odd case, Received counts around the limit,
Authentication-Results claiming the gateway's name, bare CR / LF / NUL, folds)."""

from __future__ import annotations

import ipaddress
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks.auth_results import HEADER, claims
from gateway.checks.base import Context
from gateway.engine.message import _from_fields, message_id
from gateway.message import headers
from gateway.message.headers import HeaderError, check_body, check_unique, split
from gateway.message.intake import Admitted, admit, loop_problem, refusal, without
from tests.test_header_properties import messages

PROPS = settings(max_examples=400, deadline=None, derandomize=True, database=None)


def reference_check_unique(names) -> None:
    """gateway.message.headers.check_unique before issue #14."""
    counts = Counter(n.lower() for n in names)
    for lower, proper in headers._SINGLE.items():
        if counts[lower] > 1:
            raise HeaderError(f"The message has {counts[lower]} {proper} fields; at most one is "
                              "allowed (RFC 5322 3.6)", "header_duplicate")


def reference_admit(content: bytes, *, hostname: str, max_received: int):
    """gateway.message.intake.admit before issue #14."""
    try:
        block = split(content)
        reference_check_unique(f.name for f in block.fields)
        check_body(block.body)
    except HeaderError as exc:
        return refusal(exc)
    problem = loop_problem(block.fields, max_received)
    if problem is not None:
        return refusal(problem)
    ar = HEADER.lower()
    kept = without(block, [claims(hostname)]) if any(f.name.lower() == ar
                                                     for f in block.fields) else block
    if kept is block:
        return Admitted(content, block.fields)
    return Admitted(kept.assemble(), kept.fields)


def reference_message_id(ctx: Context) -> str:
    for f in ctx.header_fields:
        if f.is_("Message-ID"):
            return f.value.replace(b"\r\n", b"").decode("utf-8", "replace").strip()[:200]
    return ""


def outcome(call):
    try:
        return call()
    except HeaderError as exc:
        return ("HeaderError", exc.text, exc.reason)


NAMES = st.lists(st.sampled_from(["From", "from", "FROM", "Subject", "subject", "To", "Date",
                                  "Received", "received", "X-A", "x-a", "MIME-Version",
                                  "Content-Type", "content-TYPE", "Message-ID", "message-id"]),
                 max_size=8)


@PROPS
@given(NAMES)
def test_repeated_fields_found_as_before(names):
    assert outcome(lambda: check_unique(names)) == outcome(lambda: reference_check_unique(names))
    assert outcome(lambda: check_unique(iter(names))) == outcome(
        lambda: reference_check_unique(iter(names)))


RECEIVED = st.lists(st.sampled_from([b"Received: from a by b; x\r\n",
                                     b"received: by c\r\n\tfor d; y\r\n",
                                     b"Authentication-Results: gw.test; spf=pass\r\n",
                                     b"authentication-results: GW.TEST.; dkim=pass\r\n",
                                     b"Authentication-Results: other.example; spf=fail\r\n",
                                     b"Message-ID: <a@b>\r\n", b"message-id:\r\n <c@d>\r\n"]),
                    max_size=6)


@PROPS
@given(messages(), RECEIVED, st.integers(1, 4))
def test_messages_admitted_as_before(raw, extra, max_received):
    content = b"".join(extra) + raw
    for hostname in ("gw.test", "other.example"):
        assert admit(content, hostname=hostname, max_received=max_received) == reference_admit(
            content, hostname=hostname, max_received=max_received)


@PROPS
@given(messages(), RECEIVED)
def test_message_id_and_the_parse_of_split_fields_as_before(raw, extra):
    content = b"".join(extra) + raw
    try:
        block = split(content)
    except HeaderError:
        return
    ctx = Context(client_ip=ipaddress.ip_address("192.0.2.1"), header_fields=block.fields)
    assert message_id(ctx) == reference_message_id(ctx)
    end = content.find(b"\r\n\r\n")
    if end >= 0 and not content.startswith(b"\r\n"):
        # the split fields are this block: the parse takes them, and never otherwise
        assert _from_fields(content, end, block.fields) is not None
        assert _from_fields(content, end, block.fields[1:]) is None or len(block.fields) == 0
