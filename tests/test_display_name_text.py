"""The display_name check's reading of the From: field (issue #14: the RFC 2047 expressions run
only on a value holding "=?", the only values they can match) shows exactly the text it showed
before: property-tested against the earlier reading, kept here as the reference."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.checks import display_name
from gateway.checks.display_name import foreign_address, shown_text

PROPS = settings(max_examples=600, deadline=None, derandomize=True, database=None)


def reference_shown_text(value: bytes) -> str:
    """gateway.checks.display_name.shown_text before issue #14."""
    raw = value.replace(b"\r\n", b"")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = re.sub(r"(?<=\?=)\s+(?==\?)", "", text)
    return unicodedata.normalize("NFKC", display_name._ENCODED_WORD.sub(
        display_name._decode_word, text))


WORDS = st.sampled_from([b"=?utf-8?q?pres=40univ.test?=", b"=?utf-8?b?cHJlc0B1bml2LnRlc3Q=?=",
                         b"=?x-bad?q?a?=", b"=?utf-8*en?Q?a_b?=", b"=?", b"?=", b"=?=", b" ",
                         b"\t", b"\r\n ", b"\xc3\xa9", b"\xff", b"\xef\xbc\xa0", b"news",
                         b"@", b"<news@em.vendor.example>", b'"', b"(", b")", b"\xe2\x80\xa8"])
VALUES = st.one_of(st.lists(WORDS, max_size=8).map(b"".join), st.binary(max_size=40))


@PROPS
@given(VALUES)
def test_shown_text_as_before(value):
    assert shown_text(value) == reference_shown_text(value)


@PROPS
@given(VALUES)
def test_foreign_address_as_before(value):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(display_name, "shown_text", reference_shown_text)
        expected = foreign_address(value)
    assert foreign_address(value) == expected
