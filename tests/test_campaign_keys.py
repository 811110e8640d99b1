"""Campaign keys are stored keys that survive upgrades (gateway.policy.audience): issue #14's
cheaper reading of the From: address and the Subject must give byte-identical keys for every
input. Property-tested against the earlier reading (kept here as the reference: the stdlib's
parseaddr, decode_header and make_header), over arbitrary text, over text built from the
grammar the fast path takes (so that it is exercised), and over whole messages through
identify()."""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import hashlib
import hmac
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.message import parse_now
from gateway.message.address import plain_header_address
from gateway.policy import audience
from gateway.policy.audience import Campaign, campaign_part, identify

PROPS = settings(max_examples=1500, deadline=None, derandomize=True, database=None)
HEADERS = ("Feedback-ID", "X-Campaign-ID", "List-Id")
KEY = b"k" * 32


def reference_from_address(message) -> str:
    raw = message.get("From") if message is not None else None
    return email.utils.parseaddr(str(raw))[1].lower() if raw is not None else ""


def reference_normalized_subject(message) -> str:
    raw = message.get("Subject") if message is not None else None
    if raw is None:
        return ""
    try:
        text = str(email.header.make_header(email.header.decode_header(str(raw))))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        text = str(raw)
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(audience._REPLY_PREFIX.sub("", " ".join(text.split())).split())


def reference_identify(message, sender_id: str, headers, key: bytes) -> Campaign:
    """gateway.policy.audience.identify before issue #14."""

    def keyed(*parts: str) -> str:
        data = "\0".join((sender_id, *parts)).encode("utf-8", "surrogateescape")
        return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]

    for name in headers:
        value = audience._header(message, name)
        ident = campaign_part(name, value) if value is not None else ""
        if ident:
            return Campaign(keyed(name.lower(), ident), name,
                            f"{name} {audience._printable(ident)}")
    subject = reference_normalized_subject(message)
    sender = reference_from_address(message)
    digest = keyed("fingerprint", sender, subject)
    return Campaign(digest, "fingerprint", f"fingerprint {digest[:12]}")


class Value:
    """A stand-in message with one field (any str value, as the parse could hold it)."""

    def __init__(self, name: str, value: str | None) -> None:
        self.name, self.value = name, value

    def get(self, name):
        return self.value if name == self.name else None


# --- the From: address ----------------------------------------------------------------------

ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
ATOM = st.text(alphabet=ATEXT, min_size=1, max_size=5)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
ADDR = st.tuples(DOT_ATOM, DOT_ATOM).map("@".join)
WSP = st.text(alphabet=" \t", max_size=2)
WORDS = st.lists(st.text(alphabet="abcXYZ019", min_size=1, max_size=5), max_size=3)
# the shapes the fast path takes, and their near misses (one token changed anywhere)
SIMPLE_FROM = st.one_of(
    st.tuples(WSP, WORDS, WSP, ADDR, WSP).map(
        lambda t: f"{t[0]}{' '.join(t[1])}{t[2]}<{t[3]}>{t[4]}"),
    st.tuples(WSP, ADDR, WSP).map("".join))
NOISE = st.sampled_from(list(" \t\r\n<>@.,;:\"()[]\\'é\x00\udcc3=?") + ["=?utf-8?q?x?=", "..",
                                                                    "\r\n ", "a@b", "<>"])


@st.composite
def near_miss(draw):
    text = draw(SIMPLE_FROM)
    i = draw(st.integers(0, len(text)))
    return text[:i] + draw(NOISE) + text[i + draw(st.integers(0, 1)):]


SPECIALS = " \t\r\n,.;:\"()@<>[]\\'é=?!#"
FROM_TEXT = st.one_of(
    SIMPLE_FROM, near_miss(), st.text(max_size=40),
    st.text(alphabet=ATEXT + " \t<>@.,:;\"()[]\\é", max_size=40),
    # display names and addr-specs with one special or more: parseaddr reads them otherwise
    st.tuples(st.text(alphabet="ab01" + SPECIALS, max_size=8), ADDR, WSP).map(
        lambda t: f"{t[0]}<{t[1]}>{t[2]}"),
    st.tuples(WSP, st.text(alphabet="ab01.@" + SPECIALS, min_size=1, max_size=12), WSP).map(
        "".join),
    st.tuples(WORDS, st.text(alphabet="ab01.@" + SPECIALS, min_size=1, max_size=12)).map(
        lambda t: f"{' '.join(t[0])} <{t[1]}>"))


@PROPS
@given(FROM_TEXT)
def test_from_address_as_parseaddr_reads_it(text):
    msg = Value("From", text)
    assert audience.from_address(msg) == reference_from_address(msg)
    plain = plain_header_address(text)
    if plain is not None:  # what getaddresses (the author domain's reading) makes of it too
        assert [a for _, a in email.utils.getaddresses([text]) if a] == [plain]
        assert email.utils.parseaddr(text)[1] == plain


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(SIMPLE_FROM)
def test_the_fast_path_takes_the_simple_shapes(text):
    assert plain_header_address(text) is not None
    assert audience.from_address(Value("From", text)) == reference_from_address(
        Value("From", text))


# --- the Subject ----------------------------------------------------------------------------

SUBJECT_TEXT = st.one_of(
    st.text(alphabet="abc XYZ:[]0-9\tRe:Fwd:", max_size=30),
    st.text(max_size=30),
    st.tuples(st.text(alphabet="ab =?", max_size=8),
              st.sampled_from(["=?utf-8?q?caf=C3=A9?=", "=?utf-8?b?U3ByaW5nIEdhbGE=?=",
                               "=?x-bad?q?a?=", "=?utf-8?q?=FF?=", "=?", "?=", "=?utf-8?b?!?="]),
              st.text(alphabet="ab =?", max_size=8)).map("".join),
    st.sampled_from(["\udcc3\udca9t\udcc3\udca9", "RE: Fwd:  hi", "\u212b \ufb01 ß İ"]))


@PROPS
@given(SUBJECT_TEXT)
def test_normalized_subject_as_the_stdlib_decodes_it(text):
    msg = Value("Subject", text)
    assert audience.normalized_subject(msg) == reference_normalized_subject(msg)


# --- whole messages -------------------------------------------------------------------------

FIELD = st.one_of(
    FROM_TEXT.map(lambda v: ("From", v)), SUBJECT_TEXT.map(lambda v: ("Subject", v)),
    st.sampled_from([("X-Campaign-ID", "c9"), ("Feedback-ID", "a:b:acme"),
                     ("List-Id", "News <l.example.edu>"), ("X-Campaign-ID", " "),
                     ("Feedback-ID", "acme")]))


def as_bytes(fields) -> bytes:
    lines = []
    for name, value in fields:
        value = value.replace("\r", " ").replace("\n", " ")
        lines.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    return b"".join(lines) + b"\r\nbody\r\n"


@PROPS
@given(st.lists(FIELD, max_size=5), st.sampled_from(["acme", "other"]))
def test_campaign_keys_are_byte_identical(fields, sender_id):
    message = parse_now(as_bytes(fields))
    assert identify(message, sender_id, HEADERS, KEY) == reference_identify(
        message, sender_id, HEADERS, KEY)
    assert identify(None, sender_id, HEADERS, KEY) == reference_identify(
        None, sender_id, HEADERS, KEY)
